"""Malicious clients, to measure what the robust rules and DP protect against.

A seeded share of the clients (``attack_fraction``) is malicious; each trains as an honest client, then
changes what it uploads:

* ``promote`` (targeted, after FedRecAttack / PipAttack): the rows of the target items in the item table move
  towards the mean row of the most popular items, ``attack_scale`` times the distance, so the targets look
  like what everyone is recommended. Only the target rows are sent changed; the rest of the upload is honest.
* ``scale`` (untargeted): the whole update times ``attack_scale``;
* ``sign_flip`` (untargeted): the whole update times ``-attack_scale``.

The targets are ``attack_num_targets`` items drawn (seeded) among the least popular half of the catalogue,
where a promotion is visible. They depend on the seed and the data only, not on ``attack_fraction``, and
``attack: promote`` with ``attack_fraction: 0`` draws them with no client malicious: runs at every attacker
share, and the run without attackers, measure the same items. What an attack achieves is measured as the
targets' exposure, ER@10: the share of the clean users whose top 10 holds a target (experiments'
``run_model`` reports it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from recbole_feddmmr.errors import ConfigError

ATTACKS = ("none", "promote", "scale", "sign_flip")


@dataclass(frozen=True)
class AttackSettings:
    kind: str = "none"
    fraction: float = 0.0
    scale: float = 10.0
    malicious: frozenset[int] = field(default_factory=frozenset)  # client ids
    targets: tuple[int, ...] = ()  # item ids
    popular: tuple[int, ...] = ()  # item ids the promoted rows move towards

    def __post_init__(self) -> None:
        if self.kind not in ATTACKS:
            raise ConfigError(f"attack must be one of {', '.join(ATTACKS)}, got {self.kind!r}")
        if not 0.0 <= self.fraction < 1.0:
            raise ConfigError(f"attack_fraction must be in [0, 1), got {self.fraction}")

    @property
    def on(self) -> bool:
        return self.kind != "none" and bool(self.malicious)


def plan_attack(
    kind: str, fraction: float, scale: float, num_targets: int, num_clients: int, item_counts: Tensor, seed: int
) -> AttackSettings:
    """Which clients are malicious and which items they push, each drawn from ``seed`` in a stream of its own (so
    the targets do not change with ``fraction``, and ``promote`` at fraction 0 names them with no attacker); the
    targets among the least popular half of the items that have any training interaction (``item_counts``
    [n_items], item 0 the padding), the promoted rows' reference the 20 most popular items."""
    if kind == "none":
        return AttackSettings(kind, fraction, scale)
    malicious: frozenset[int] = frozenset()
    if fraction > 0.0:
        clients_rng = np.random.default_rng([seed, 17])
        size = max(1, round(fraction * num_clients))
        # the first clients of one seeded order: a larger share holds a smaller one's attackers
        malicious = frozenset(clients_rng.permutation(num_clients)[:size].tolist())
    if kind != "promote":  # untargeted: no target items
        return AttackSettings(kind, fraction, scale, malicious)
    counts = item_counts.clone().double()
    counts[0] = -1
    order = torch.argsort(counts, descending=True)  # most popular first
    seen = order[counts[order] > 0]
    tail = seen[len(seen) // 2 :].numpy()
    targets_rng = np.random.default_rng([seed, 18])
    targets = tuple(sorted(targets_rng.choice(tail, size=min(num_targets, len(tail)), replace=False).tolist()))
    popular = tuple(seen[:20].tolist())
    return AttackSettings(kind, fraction, scale, malicious, targets, popular)


def poison(
    update: dict[str, Tensor], global_params: dict[str, Tensor], item_tables: tuple[str, ...], attack: AttackSettings
) -> dict[str, Tensor]:
    """A malicious client's dense upload (local - global) in place of its honest ``update``."""
    if attack.kind == "scale":
        return {name: delta * attack.scale for name, delta in update.items()}
    if attack.kind == "sign_flip":
        return {name: -attack.scale * delta for name, delta in update.items()}
    poisoned = dict(update)
    targets, popular = list(attack.targets), list(attack.popular)
    for name in item_tables:
        if name not in global_params:
            continue
        table = global_params[name]  # [R, D]
        delta = torch.zeros_like(table) if name not in update else update[name].clone()
        toward = table[popular].mean(dim=0, keepdim=True) - table[targets]  # [T, D]
        delta[targets] = attack.scale * toward.to(delta.dtype)
        poisoned[name] = delta
    return poisoned


def exposure_at_k(top_items: Tensor, targets: Tensor, clean_users: Tensor) -> float:
    """ER@k: the share of ``clean_users`` [u] (bool mask over the rows of ``top_items`` [U, k]) whose top k holds
    at least one of ``targets`` [T]."""
    hit = torch.isin(top_items, targets).any(dim=1)  # [U]
    clean = clean_users.bool()
    return float(hit[clean].float().mean()) if bool(clean.any()) else 0.0
