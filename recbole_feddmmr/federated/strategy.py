"""The server's algorithm as one small object that knows no transport, in the shape of Flower's strategies.

A round: :meth:`FedMemStrategy.configure_fit` picks the participants (seeded) and says what each
receives (:class:`FitInstructions`: the global parameters, the local settings, the memory clock);
the execution backend runs them; :meth:`FedMemStrategy.aggregate_fit` folds the
:class:`ClientResult` each sends into an :class:`UpdateAccumulator` (a streaming weighted sum, so
memory does not grow with the number of clients), turns the aggregated update (the pseudo-gradient)
into new global parameters with a :class:`ServerOptimizer`, and merges the clients' memory prototypes
into the global prototypes every client reads next round.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.cluster import KMeans
from torch import Tensor

from recbole_feddmmr.errors import CheckpointError, ConfigError

AGGREGATIONS = ("mean", "rowwise", "sum")
SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam", "fedyogi")
LOCAL_OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class LocalSettings:
    """How a client trains in a round (the same for every client)."""

    local_epochs: int = 1
    local_batch_size: int = 256  # training targets per local step
    local_lr: float = 1e-3
    # created fresh every round (no optimizer state is kept between rounds): adam, or plain sgd as in the
    # FedOpt papers (a fresh Adam moves every coordinate it touches by about lr, whatever the gradient)
    local_optimizer: str = "adam"
    fedprox_mu: float = 0.0  # FedProx proximal term mu/2 ||w - w_global||^2 (0 = FedAvg)
    num_prototypes: int = 5  # k-means centres of the client's memory sent up (0 = none)
    prototype_min_entries: int = 5  # a prototype averages at least this many memory entries
    seed: int = 2020

    def __post_init__(self) -> None:
        if self.local_optimizer not in LOCAL_OPTIMIZERS:
            raise ConfigError(f"local_optimizer must be one of {LOCAL_OPTIMIZERS}, got {self.local_optimizer!r}")


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

    def num_bytes(self) -> int:
        tensors = [*self.update.values(), *self.changed_rows.values(), self.prototypes, self.prototype_counts]
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
    states: dict[int, dict[str, Tensor]] = field(default_factory=dict)

    def add(self, result: ClientResult | ShardResult) -> None:
        """Fold in one client's result, or a whole shard's (the strategy's round aggregate is one of these)."""
        if isinstance(result, ShardResult):
            self.accumulator.add_partial(result.accumulator)
            self.prototypes.update(result.prototypes)
            self.losses.extend(result.losses)
            self.bytes_up += result.bytes_up
            self.clients += result.clients
            return
        self.accumulator.add(result.update, result.num_samples, result.changed_rows)
        if len(result.prototypes):
            self.prototypes[result.client_id] = (result.prototypes, result.prototype_counts)
        self.losses.append(result.mean_loss)
        self.bytes_up += result.num_bytes()
        self.clients += 1


def sparse_row_updates(
    update: dict[str, Tensor], row_tables: Collection[str]
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Dense client update -> (the message's update, changed rows): each table of ``row_tables`` keeps only
    the rows with a nonzero delta ``[k, D]`` and reports their indices ``[k]``."""
    message, changed = dict(update), {}
    for name in row_tables:
        if name in update:
            delta = update[name]  # [R, D]
            rows = delta.flatten(1).ne(0).any(dim=1).nonzero().squeeze(1)  # [k]
            message[name], changed[name] = delta[rows], rows
    return message, changed


class UpdateAccumulator:
    """Streaming aggregation of client updates, one client at a time.

    Dense parameters: the weighted mean ``sum_i n_i * update_i / sum_i n_i``. A row table (``row_shapes``:
    name -> full shape) aggregates by ``aggregation``:

    * ``mean``: as a dense parameter (a row no client changed counts as a zero update from every client,
      so a row few clients touched is diluted by all the others);
    * ``rowwise``: each row by the weighted mean over the clients that changed that row,
      ``sum_{i: r changed} n_i * update_i[r] / sum_{i: r changed} n_i``;
    * ``sum``: each row by the plain sum of the clients' updates of that row (FedRec-style servers).

    A row that no client changed gets a zero update in every mode.
    """

    def __init__(self, aggregation: str = "mean", row_shapes: dict[str, torch.Size] | None = None) -> None:
        if aggregation not in AGGREGATIONS:
            raise ConfigError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        self.aggregation = aggregation
        self.row_shapes = dict(row_shapes or {})
        self.total: dict[str, Tensor] = {}  # name -> sum_i n_i * update_i (float64); row tables: sum_i update_i for sum
        self.row_weight: dict[str, Tensor] = {}  # rowwise: row table -> [R] sum of n_i of the clients that changed it
        self.weight = 0

    def add(self, update: dict[str, Tensor], num_samples: int, changed_rows: dict[str, Tensor] | None = None) -> None:
        if num_samples <= 0:
            return
        changed_rows = changed_rows or {}
        for name, delta in update.items():
            if name in changed_rows:
                rows = changed_rows[name]
                scale = 1.0 if self.aggregation == "sum" else float(num_samples)
                if name not in self.total:
                    self.total[name] = delta.new_zeros(self.row_shapes[name], dtype=torch.float64)
                self.total[name].index_add_(0, rows, delta.detach().double() * scale)
                if self.aggregation == "rowwise":
                    if name not in self.row_weight:
                        self.row_weight[name] = delta.new_zeros(self.row_shapes[name][0], dtype=torch.float64)
                    weights = delta.new_full(rows.shape, num_samples, dtype=torch.float64)  # [k]
                    self.row_weight[name].index_add_(0, rows, weights)
                continue
            weighted = delta.detach().double() * num_samples
            self.total[name] = self.total[name] + weighted if name in self.total else weighted
        self.weight += num_samples

    def add_partial(self, other: UpdateAccumulator) -> None:
        """Merge a pre-aggregated shard (e.g. a worker's many clients)."""
        if other.aggregation != self.aggregation:
            raise ValueError(f"cannot merge a {other.aggregation!r} shard into a {self.aggregation!r} aggregate")
        for name, weighted in other.total.items():
            self.total[name] = self.total[name] + weighted if name in self.total else weighted.clone()
        for name, weight in other.row_weight.items():
            self.row_weight[name] = self.row_weight[name] + weight if name in self.row_weight else weight.clone()
        self.weight += other.weight

    def mean(self) -> dict[str, Tensor]:
        """The aggregated update (the server optimizer's pseudo-gradient), in float32."""
        if not self.weight:
            raise ValueError("no client update with samples to aggregate")
        aggregated = {}
        for name, total in self.total.items():
            if name not in self.row_shapes or self.aggregation == "mean":
                aggregated[name] = (total / self.weight).float()
            elif self.aggregation == "rowwise":
                row_weight = self.row_weight[name].clamp(min=1.0).view(-1, *[1] * (total.dim() - 1))  # [R, 1...]
                aggregated[name] = (total / row_weight).float()  # untouched rows: 0 / 1
            else:  # sum
                aggregated[name] = total.float()
        return aggregated


class ServerOptimizer:
    """The server's step on the aggregated client update (the pseudo-gradient ``delta``), after
    "Adaptive Federated Optimization" (Reddi et al., ICLR 2021, Algorithm 2):

    * ``fedavg``: ``x += lr * delta`` (``lr`` 1 is plain FedAvg);
    * ``fedavgm``: ``m = momentum * m + delta; x += lr * m``;
    * ``fedadam``: ``m = b1 * m + (1 - b1) * delta; v = b2 * v + (1 - b2) * delta^2; x += lr * m / (sqrt(v) + tau)``;
    * ``fedyogi``: as fedadam with ``v = v - (1 - b2) * delta^2 * sign(v - delta^2)``.

    As in the paper, ``m`` starts at 0 and ``v`` at ``tau^2``, with no bias correction. Written out rather
    than borrowed from ``torch.optim`` because torch's Adam adds bias correction and has no Yogi, and these
    four lines are the algorithm the paper specifies. The state is per parameter and is part of the run's
    resume state (:meth:`state_dict`).
    """

    def __init__(
        self,
        name: str = "fedavg",
        lr: float = 1.0,
        momentum: float = 0.9,
        beta1: float = 0.9,
        beta2: float = 0.999,
        tau: float = 1e-3,
    ) -> None:
        if name not in SERVER_OPTIMIZERS:
            raise ConfigError(f"server_optimizer must be one of {SERVER_OPTIMIZERS}, got {name!r}")
        if lr <= 0:
            raise ConfigError(f"server_lr must be > 0, got {lr}")
        self.name, self.lr, self.momentum, self.beta1, self.beta2, self.tau = name, lr, momentum, beta1, beta2, tau
        self.first_moment: dict[str, Tensor] = {}
        self.second_moment: dict[str, Tensor] = {}

    def step(self, params: dict[str, Tensor], delta: dict[str, Tensor]) -> dict[str, Tensor]:
        """New parameters from ``params`` and the pseudo-gradient ``delta`` (names without one are kept)."""
        new = dict(params)
        for name, update in delta.items():
            value = params[name]
            update = update.to(value.dtype)
            if self.name == "fedavg":
                new[name] = value + self.lr * update
                continue
            m = self.first_moment.get(name)
            if self.name == "fedavgm":
                m = update.clone() if m is None else self.momentum * m + update
                self.first_moment[name] = m
                new[name] = value + self.lr * m
                continue
            m = torch.zeros_like(update) if m is None else m
            v = self.second_moment.get(name, torch.full_like(update, self.tau**2))
            m = self.beta1 * m + (1 - self.beta1) * update
            squared = update * update
            if self.name == "fedadam":
                v = self.beta2 * v + (1 - self.beta2) * squared
            else:  # fedyogi
                v = v - (1 - self.beta2) * squared * torch.sign(v - squared)
            self.first_moment[name], self.second_moment[name] = m, v
            new[name] = value + self.lr * m / (v.sqrt() + self.tau)
        return new

    def state_dict(self) -> dict:
        return {"name": self.name, "first_moment": self.first_moment, "second_moment": self.second_moment}

    def load_state_dict(self, state: dict) -> None:
        if state["name"] != self.name:
            raise CheckpointError(f"server optimizer state of {state['name']!r} cannot resume {self.name!r}")
        self.first_moment, self.second_moment = dict(state["first_moment"]), dict(state["second_moment"])


class FedMemStrategy:
    """Client selection, aggregation (weighted mean, row-wise for item tables) with a server optimizer,
    and prototype merging."""

    def __init__(
        self,
        num_prototypes: int = 5,
        clients_per_round: int | None = None,
        client_fraction: float = 1.0,
        seed: int = 0,
        *,
        aggregation: str = "mean",
        server_optimizer: ServerOptimizer | None = None,
    ) -> None:
        if not 0.0 < client_fraction <= 1.0:
            raise ConfigError(f"client_fraction must be in (0, 1], got {client_fraction}")
        if aggregation not in AGGREGATIONS:
            raise ConfigError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        self.num_prototypes = num_prototypes
        self.clients_per_round = clients_per_round
        self.client_fraction = client_fraction
        self.seed = seed
        self.aggregation = aggregation
        self.server_optimizer = server_optimizer or ServerOptimizer()

    def round_size(self, num_clients: int) -> int:
        """How many of ``num_clients`` clients a round selects."""
        return min(self.clients_per_round or max(1, round(self.client_fraction * num_clients)), num_clients)

    def select_clients(self, round_idx: int, num_clients: int) -> np.ndarray:
        """Sorted client indices of round ``round_idx``; the same (seed, round) always selects the same.

        O(selected) for large populations: numpy's ``Generator.choice`` without replacement draws a small
        sample by Floyd's method rather than permuting all ``num_clients``.
        """
        count = self.round_size(num_clients)
        if count == num_clients:
            return np.arange(num_clients)
        rng = np.random.default_rng([self.seed, round_idx])
        return np.sort(rng.choice(num_clients, size=count, replace=False))

    def configure_fit(
        self,
        round_idx: int,
        num_clients: int,
        parameters: dict[str, Tensor],
        settings: LocalSettings,
        epoch_steps: int,
        row_shapes: dict[str, torch.Size] | None = None,
    ) -> tuple[np.ndarray, FitInstructions]:
        """The clients of round ``round_idx`` (sorted indices) and what each receives. ``epoch_steps``: a
        centralised epoch's number of steps, by which a local epoch advances the memory clock;
        ``row_shapes``: the item-indexed tables among the parameters and their full shapes."""
        clock = round_idx * settings.local_epochs * epoch_steps
        return self.select_clients(round_idx, num_clients), FitInstructions(
            round_idx, parameters, settings, clock, epoch_steps, self.aggregation, dict(row_shapes or {})
        )

    def aggregate_fit(
        self,
        parameters: dict[str, Tensor],
        results: Iterable[ClientResult | ShardResult],
        row_shapes: dict[str, torch.Size] | None = None,
    ) -> RoundAggregate:
        """Fold the round's results as they arrive (streaming), step the server optimizer, merge prototypes.

        ``row_shapes``: the item-indexed tables among the parameters and their full shapes. Prototypes are
        merged in client order, whatever order the results arrived in (the merge's k-means depends on it).
        """
        folded = ShardResult(self.new_accumulator(row_shapes))
        for result in results:
            folded.add(result)
        merged = None
        if folded.prototypes:
            order = sorted(folded.prototypes)
            prototypes, counts = zip(*(folded.prototypes[client_id] for client_id in order), strict=True)
            merged, _ = self.merge_prototypes(list(prototypes), list(counts))
        return RoundAggregate(
            parameters=self.aggregate(parameters, folded.accumulator),
            prototypes=merged,
            clients=folded.clients,
            samples=folded.accumulator.weight,
            mean_loss=math.fsum(folded.losses) / len(folded.losses) if folded.losses else 0.0,
            bytes_up=folded.bytes_up,
        )

    def new_accumulator(self, row_shapes: dict[str, torch.Size] | None = None) -> UpdateAccumulator:
        """An empty aggregate for one round; ``row_shapes``: the item-indexed tables and their full shapes."""
        return UpdateAccumulator(self.aggregation, row_shapes)

    def aggregate(self, global_params: dict[str, Tensor], accumulator: UpdateAccumulator) -> dict[str, Tensor]:
        """New global parameters: the server optimizer's step on the round's aggregated update."""
        return self.server_optimizer.step(global_params, accumulator.mean())

    def merge_prototypes(self, prototypes: list[Tensor], counts: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Clients' prototypes [k_i, D] with entry counts [k_i] -> K global prototypes [K, D] and their counts.

        Weighted k-means (weights = counts) over all received prototypes; with K or fewer received,
        they are the global prototypes as they are.
        """
        if not prototypes:
            raise ValueError("no prototypes to merge")
        points = torch.cat(prototypes).double()  # [P, D]
        weights = torch.cat(counts).double()  # [P]
        if len(points) <= self.num_prototypes:
            return points.float(), weights.float()
        kmeans = KMeans(n_clusters=self.num_prototypes, n_init=4, random_state=self.seed)
        labels = kmeans.fit_predict(points.numpy(), sample_weight=weights.numpy())
        merged_counts = torch.zeros(self.num_prototypes, dtype=torch.float64).index_add_(
            0, torch.as_tensor(labels), weights
        )
        return torch.as_tensor(kmeans.cluster_centers_).float(), merged_counts.float()


def memory_prototypes(
    features: Tensor, num_prototypes: int = 5, seed: int = 0, min_entries: int = 5
) -> tuple[Tensor, Tensor]:
    """A client's memory features [n, D] -> (k-means centres [k, D], entries per centre [k]).

    A centre is sent only if it averages at least ``min_entries`` memory entries: k = min(K, n // min_entries)
    clusters, and a cluster that k-means left with fewer entries is dropped. So no prototype is one item's
    feature row (which would tell the server an item the user has seen), and a client with fewer than
    ``min_entries`` entries sends none.
    """
    min_entries = max(1, min_entries)
    clusters = min(num_prototypes, len(features) // min_entries)
    if clusters == 0:
        return torch.zeros(0, features.size(1)), torch.zeros(0)
    if clusters == 1:
        return features.double().mean(dim=0, keepdim=True).float(), torch.tensor([float(len(features))])
    # one k-means++ start (scikit-learn's default): every client runs this every round, and a few dozen
    # memory entries need no restarts (the server's merge, once a round, keeps 4)
    kmeans = KMeans(n_clusters=clusters, n_init=1, random_state=seed)
    labels = kmeans.fit_predict(features.double().numpy())
    counts = torch.bincount(torch.as_tensor(labels), minlength=clusters).float()
    keep = counts >= min_entries
    return torch.as_tensor(kmeans.cluster_centers_).float()[keep], counts[keep]
