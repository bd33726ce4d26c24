"""The server's algorithm as one small object that knows no transport, in the shape of Flower's strategies.

A round: :meth:`FedMemStrategy.configure_fit` picks the participants (seeded) and says what each
receives (:class:`~recbole_feddmmr.federated.messages.FitInstructions`: the global parameters, the local
settings, the memory clock); the execution backend runs them; :meth:`FedMemStrategy.aggregate_fit` folds the
:class:`~recbole_feddmmr.federated.messages.ClientResult` each sends into an
:class:`~recbole_feddmmr.federated.aggregation.UpdateAccumulator` (a streaming weighted sum, so memory does
not grow with the number of clients), turns the aggregated update (the pseudo-gradient) into new global
parameters with a :class:`~recbole_feddmmr.federated.server_optimizer.ServerOptimizer`, and merges the
clients' memory prototypes into the global prototypes every client reads next round.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
from sklearn.cluster import KMeans
from torch import Tensor

from recbole_feddmmr.errors import ConfigError
from recbole_feddmmr.federated.aggregation import AGGREGATIONS, UpdateAccumulator
from recbole_feddmmr.federated.messages import (
    ClientResult,
    FitInstructions,
    LocalSettings,
    RoundAggregate,
    ShardResult,
)
from recbole_feddmmr.federated.privacy import PrivacySettings, add_noise
from recbole_feddmmr.federated.robust import RobustSettings, robust_aggregate
from recbole_feddmmr.federated.server_optimizer import ServerOptimizer


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
        privacy: PrivacySettings | None = None,
        sampling: str = "fixed",
        robust: RobustSettings | None = None,
    ) -> None:
        if not 0.0 < client_fraction <= 1.0:
            raise ConfigError(f"client_fraction must be in (0, 1], got {client_fraction}")
        if aggregation not in AGGREGATIONS:
            raise ConfigError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        if privacy is not None and aggregation == "rowwise":
            raise ConfigError(
                "aggregation=rowwise divides a row by the clients that changed it, so one client's influence on a "
                "rarely changed row is not bounded by dp_clip_norm: use aggregation=mean (or sum) with DP"
            )
        if sampling not in ("fixed", "poisson"):
            raise ConfigError(f"client_sampling must be fixed or poisson, got {sampling!r}")
        self.robust = robust or RobustSettings()
        if self.robust.on and privacy is not None:
            raise ConfigError("a robust rule and DP together are not supported: the noise goes on a sum of uploads")
        self.privacy, self.sampling = privacy, sampling
        self.cohort = 0  # the expected clients of a round, set by configure_fit (DP's fixed denominator)
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
        if self.sampling == "poisson":  # each client independently, with probability count / num_clients
            return np.flatnonzero(rng.random(num_clients) < count / num_clients)
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
        self.cohort = self.round_size(num_clients)
        return self.select_clients(round_idx, num_clients), FitInstructions(
            round_idx, parameters, settings, clock, epoch_steps, self.aggregation, dict(row_shapes or {})
        )

    def aggregate_fit(
        self,
        parameters: dict[str, Tensor],
        results: Iterable[ClientResult | ShardResult],
        row_shapes: dict[str, torch.Size] | None = None,
        round_idx: int = 0,
    ) -> RoundAggregate:
        """Fold the round's results as they arrive (streaming), step the server optimizer, merge prototypes.

        ``row_shapes``: the item-indexed tables among the parameters and their full shapes. Prototypes are
        merged in client order, whatever order the results arrived in (the merge's k-means depends on it).
        Under DP the sum of the (clipped) uploads gets its noise, drawn from (seed, ``round_idx``), and is
        divided by the expected cohort (:mod:`recbole_feddmmr.federated.privacy`).
        """
        folded = ShardResult(self.new_accumulator(row_shapes))
        uploads: list[ClientResult] = []  # each client's own upload, which only a robust rule keeps
        for result in results:
            if self.robust.on:
                if isinstance(result, ShardResult):
                    raise ConfigError(
                        f"robust_aggregation={self.robust.rule} needs each client's upload, and this backend sums "
                        "shards of clients first: use federated_backend=sequential or vectorized"
                    )
                uploads.append(result)
            folded.add(result)
        merged = None
        if folded.prototypes:
            order = sorted(folded.prototypes)
            prototypes, counts = zip(*(folded.prototypes[client_id] for client_id in order), strict=True)
            merged, _ = self.merge_prototypes(list(prototypes), list(counts))
        if folded.clients == 0 and self.privacy is None:  # every client dropped out or came late: no step
            new_parameters = dict(parameters)
        elif self.robust.on:
            new_parameters = self.server_optimizer.step(parameters, robust_aggregate(uploads, parameters, self.robust))
        elif self.privacy is not None:
            new_parameters = self.server_optimizer.step(
                parameters, self.private_update(parameters, folded.accumulator, round_idx)
            )
        else:
            new_parameters = self.aggregate(parameters, folded.accumulator)
        return RoundAggregate(
            parameters=new_parameters,
            prototypes=merged,
            clients=folded.clients,
            samples=folded.samples,
            mean_loss=math.fsum(folded.losses) / len(folded.losses) if folded.losses else 0.0,
            bytes_up=folded.bytes_up,
        )

    def new_accumulator(self, row_shapes: dict[str, torch.Size] | None = None) -> UpdateAccumulator:
        """An empty aggregate for one round; ``row_shapes``: the item-indexed tables and their full shapes."""
        return UpdateAccumulator(self.aggregation, row_shapes)

    def aggregate(self, global_params: dict[str, Tensor], accumulator: UpdateAccumulator) -> dict[str, Tensor]:
        """New global parameters: the server optimizer's step on the round's aggregated update."""
        return self.server_optimizer.step(global_params, accumulator.mean())

    def private_update(
        self, parameters: dict[str, Tensor], accumulator: UpdateAccumulator, round_idx: int
    ) -> dict[str, Tensor]:
        """DP-FedAvg's pseudo-gradient: (sum of the clipped uploads + N(0, (z C)^2) per coordinate, on every
        shared parameter and every row) / the expected cohort. A round no client answered is noise alone."""
        privacy = self.privacy
        totals = {
            name: accumulator.total[name]
            if name in accumulator.total
            else value.new_zeros(value.shape, dtype=torch.float64)
            for name, value in parameters.items()
        }
        generator = torch.Generator().manual_seed(
            int(np.random.SeedSequence([self.seed, round_idx, 7]).generate_state(1)[0])
        )
        noisy = add_noise(totals, privacy.noise_multiplier * privacy.clip_norm, generator)
        return {name: (total / max(self.cohort, 1)).float() for name, total in noisy.items()}

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
