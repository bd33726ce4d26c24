"""Robust aggregation: server rules that a few malicious clients cannot steer at will.

Every rule needs each client's own upload (none can run on a sum, so none runs under secure aggregation,
and a backend that pre-aggregates shards, Ray's, is refused with them). A client's sparse item-table rows
are scattered into the full table first, its untouched rows zero, as the mean aggregation counts them, so
every rule sees every client's whole update as one vector:

* ``median``: the coordinate-wise median of the updates;
* ``trimmed_mean``: per coordinate, the mean after dropping the ``robust_trim`` largest and smallest
  share of the values;
* ``norm_bound``: each update scaled to L2 norm at most ``robust_norm_bound``, then the weighted mean;
* ``krum`` / ``multi_krum`` (Blanchard et al., NeurIPS 2017): each update's score is the sum of squared
  distances to its n - f - 2 nearest others (f = ``robust_byzantine``); Krum keeps the lowest-scored
  update, multi-Krum the mean of the ``robust_multi_krum`` lowest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from recbole_feddmmr.errors import ConfigError
from recbole_feddmmr.federated.messages import ClientResult

ROBUST_RULES = ("none", "median", "trimmed_mean", "norm_bound", "krum", "multi_krum")


@dataclass(frozen=True)
class RobustSettings:
    rule: str = "none"
    trim: float = 0.1  # trimmed_mean: the share cut at each end
    norm_bound: float | None = None  # norm_bound: the L2 bound of each update
    byzantine: int = 1  # krum / multi_krum: the attackers f the rule tolerates
    multi_krum: int | None = None  # multi_krum: updates averaged (default n - f)

    def __post_init__(self) -> None:
        if self.rule not in ROBUST_RULES:
            raise ConfigError(f"robust_aggregation must be one of {', '.join(ROBUST_RULES)}, got {self.rule!r}")
        if not 0.0 <= self.trim < 0.5:
            raise ConfigError(f"robust_trim must be in [0, 0.5), got {self.trim}")
        if self.rule == "norm_bound" and not (self.norm_bound and self.norm_bound > 0):
            raise ConfigError("robust_aggregation=norm_bound needs robust_norm_bound > 0")
        if self.byzantine < 0:
            raise ConfigError(f"robust_byzantine must be >= 0, got {self.byzantine}")

    @property
    def on(self) -> bool:
        return self.rule != "none"


def flatten_uploads(results: Sequence[ClientResult], names: Sequence[str], shapes: dict[str, torch.Size]) -> Tensor:
    """Each client's whole update as one row: [n, P] (float32), sparse rows scattered into their tables."""
    rows = []
    for result in results:
        parts = []
        for name in names:
            full = torch.zeros(shapes[name])
            if name in result.update:
                delta = result.update[name].float()
                if name in result.changed_rows:
                    full[result.changed_rows[name]] = delta
                else:
                    full = delta.reshape(shapes[name])
            parts.append(full.flatten())
        rows.append(torch.cat(parts))
    return torch.stack(rows)


def unflatten(vector: Tensor, names: Sequence[str], shapes: dict[str, torch.Size]) -> dict[str, Tensor]:
    update, start = {}, 0
    for name in names:
        size = int(torch.Size(shapes[name]).numel())
        update[name] = vector[start : start + size].view(shapes[name])
        start += size
    return update


def krum_scores(updates: Tensor, byzantine: int) -> Tensor:
    """``updates`` [n, P] -> each one's Krum score [n]: the sum of squared distances to its n - f - 2 nearest."""
    count = updates.size(0)
    distances = torch.cdist(updates.double(), updates.double()).pow(2)  # [n, n]
    neighbours = max(1, count - byzantine - 2)
    nearest = distances.masked_fill(torch.eye(count, dtype=torch.bool), float("inf")).sort(dim=1).values
    return nearest[:, : min(neighbours, count - 1)].sum(dim=1)


def robust_mean(updates: Tensor, weights: Tensor, settings: RobustSettings) -> Tensor:
    """The rule's aggregate of ``updates`` [n, P] with the clients' ``weights`` [n] (used by norm_bound) -> [P]."""
    rule = settings.rule
    if rule == "median":
        ordered, middle = updates.sort(dim=0).values, updates.size(0) // 2
        return ordered[middle] if updates.size(0) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
    if rule == "trimmed_mean":
        cut = int(settings.trim * updates.size(0))
        ordered = updates.sort(dim=0).values
        return ordered[cut : updates.size(0) - cut].mean(dim=0)
    if rule == "norm_bound":
        norms = updates.norm(dim=1, keepdim=True)  # [n, 1]
        bounded = updates * (settings.norm_bound / norms.clamp(min=settings.norm_bound))
        return (bounded * weights[:, None]).sum(dim=0) / weights.sum()
    scores = krum_scores(updates, settings.byzantine)
    if rule == "krum":
        return updates[scores.argmin()]
    keep = settings.multi_krum or max(1, updates.size(0) - settings.byzantine)
    return updates[scores.argsort()[:keep]].mean(dim=0)


def robust_aggregate(
    results: Sequence[ClientResult], parameters: dict[str, Tensor], settings: RobustSettings
) -> dict[str, Tensor]:
    """The round's aggregated update under ``settings.rule`` from every client's own upload (name -> tensor
    of the parameter's shape); parameters no client updated get a zero update."""
    if not results:
        raise ValueError("no client update to aggregate")
    names = [name for name in parameters if any(name in result.update for result in results)]
    shapes = {name: parameters[name].shape for name in names}
    updates = flatten_uploads(results, names, shapes)
    weights = torch.tensor([float(result.aggregation_weight) for result in results])
    return unflatten(robust_mean(updates, weights, settings), names, shapes)
