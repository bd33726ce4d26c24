"""What crosses between the server and its clients in a round, in the shape of Flower's messages.

:class:`FitInstructions` go down to every selected client (Flower's ``FitIns``), a :class:`ClientResult`
comes back from each (``FitRes``); a worker that runs many clients folds theirs into one
:class:`ShardResult`; :class:`RoundAggregate` is what the strategy made of a round.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from recbole_feddmmr.errors import ConfigError
from recbole_feddmmr.federated.aggregation import UpdateAccumulator
from recbole_feddmmr.federated.attacks import AttackSettings

LOCAL_OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class LocalSettings:
    """How a client trains in a round (the same for every client). No defaults here: they are
    ``properties/federated.yaml``'s, read by :class:`recbole_feddmmr.federated.settings.FederatedSettings`."""

    local_epochs: int
    local_batch_size: int  # training targets per local step
    local_lr: float
    # created fresh every round (no optimizer state is kept between rounds): adam, or plain sgd as in the
    # FedOpt papers (a fresh Adam moves every coordinate it touches by about lr, whatever the gradient)
    local_optimizer: str
    fedprox_mu: float  # FedProx proximal term mu/2 ||w - w_global||^2 (0 = FedAvg)
    num_prototypes: int  # k-means centres of the client's memory sent up (0 = none)
    prototype_min_entries: int  # a prototype averages at least this many memory entries
    seed: int
    # user-level DP (privacy.py): the client clips its whole upload to this L2 norm and weighs 1 (None: off)
    clip_norm: float | None = None
    weight_decay: float = 0.0  # the local optimizer's L2 penalty (the model's weight_decay), item tables excepted
    # secure aggregation (secure.py): the client sends dense, pre-weighted tensors the server only sums
    secure_aggregation: bool = False
    aggregation: str = "mean"  # how the server aggregates (a sum-ready upload is weighted for it)
    attack: AttackSettings | None = None  # which clients are malicious and what they upload (attacks.py)

    def __post_init__(self) -> None:
        if self.local_optimizer not in LOCAL_OPTIMIZERS:
            raise ConfigError(
                f"local_optimizer must be one of {', '.join(LOCAL_OPTIMIZERS)}, got {self.local_optimizer!r}"
            )


@dataclass(frozen=True)
class FitInstructions:
    """What every client selected for a round receives (Flower's ``FitIns``); the same for all of them.

    The memory clock: every client's local epoch e of round r starts at the same clock, as if the
    clients ran in parallel (which real clients do), and a local epoch advances it by a centralised
    epoch's number of steps, so the memory's recency decay means in federated training what it means
    in centralised training. Clients never share users, so their clocks never interfere.
    """

    round_idx: int
    parameters: dict[str, Tensor]  # the global shared parameters
    settings: LocalSettings
    memory_clock: int  # the clock at the round's first local step
    memory_clock_per_epoch: int  # how far a local epoch advances it
    # how the server will aggregate, for workers that pre-aggregate many clients (:class:`ShardResult`)
    aggregation: str = "mean"
    row_shapes: dict[str, torch.Size] = field(default_factory=dict)  # item-indexed tables and their full shapes

    def clock_at(self, local_epoch: int) -> int:
        """The memory clock at the first step of ``local_epoch`` (the training step adds its step index)."""
        return self.memory_clock + local_epoch * self.memory_clock_per_epoch


@dataclass
class RoundAggregate:
    """What :meth:`FedMemStrategy.aggregate_fit` made of a round's client results."""

    parameters: dict[str, Tensor]  # the new global parameters
    prototypes: Tensor | None  # [K, D] merged global prototypes (None: no client sent any)
    clients: int
    samples: int
    mean_loss: float  # mean over clients of their mean local loss
    bytes_up: int


@dataclass
class ClientResult:
    """What one client sends up: nothing else of its state ever reaches the server.

    For an item-indexed table (a row per item, e.g. the item embedding) the client sends only the rows
    its training changed: ``update[name]`` is then ``[k, D]`` and ``changed_rows[name]`` their indices
    ``[k]``; every other parameter's update is dense.
    """

    update: dict[str, Tensor]  # parameter name -> (local - global) delta (changed rows only for row tables)
    num_samples: int  # training targets seen, the FedAvg weight
    prototypes: Tensor  # [k, D] k-means centres of the client's memory features (k <= K)
    prototype_counts: Tensor  # [k] memory entries behind each centre
    mean_loss: float = 0.0
    client_id: int = -1  # who sent it (the server orders prototypes by it, so the merge ignores arrival order)
    changed_rows: dict[str, Tensor] = field(default_factory=dict)  # row table name -> [k] int64 row indices
    weight: float | None = None  # its weight in the aggregate (None: num_samples; under DP every client 1)
    # secure aggregation: ``update`` is dense and already weighted (``sum_ready_upload``), ``row_weights`` the
    # dense row counts of rowwise aggregation; the server only adds such uploads up
    sum_ready: bool = False
    row_weights: dict[str, Tensor] = field(default_factory=dict)

    @property
    def aggregation_weight(self) -> float:
        return self.num_samples if self.weight is None else self.weight

    def num_bytes(self) -> int:
        tensors = [*self.update.values(), *self.changed_rows.values(), *self.row_weights.values(), self.prototypes,
                   self.prototype_counts]  # fmt: skip
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class ShardResult:
    """Many clients' results folded into one: their updates already summed (a partial
    :class:`UpdateAccumulator`, the item-table rows they changed included), each client's prototypes, losses
    and bytes. A worker running a shard of clients sends one up; :meth:`FedMemStrategy.aggregate_fit` folds
    a round into one. ``states``: a shard's clients' new private state, which the backend returns to the
    client state store before the strategy sees the result (it never reaches the strategy)."""

    accumulator: UpdateAccumulator
    prototypes: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)  # client id -> (centres, counts)
    losses: list[float] = field(default_factory=list)  # each client's mean local loss
    bytes_up: int = 0  # what the clients sent, counted as if each sent its own message
    clients: int = 0
    samples: int = 0  # the training targets the clients trained on
    states: dict[int, dict[str, Tensor]] = field(default_factory=dict)

    def add(self, result: ClientResult | ShardResult) -> None:
        """Fold in one client's result, or a whole shard's (the strategy's round aggregate is one of these)."""
        if isinstance(result, ShardResult):
            self.accumulator.add_partial(result.accumulator)
            self.prototypes.update(result.prototypes)
            self.losses.extend(result.losses)
            self.bytes_up += result.bytes_up
            self.clients += result.clients
            self.samples += result.samples
            return
        if result.sum_ready:
            self.accumulator.add_summable(result.update, result.aggregation_weight, result.row_weights)
        else:
            self.accumulator.add(result.update, result.aggregation_weight, result.changed_rows)
        self.samples += result.num_samples
        if len(result.prototypes):
            self.prototypes[result.client_id] = (result.prototypes, result.prototype_counts)
        self.losses.append(result.mean_loss)
        self.bytes_up += result.num_bytes()
        self.clients += 1
