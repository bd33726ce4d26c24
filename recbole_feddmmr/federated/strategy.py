"""The server's algorithm, FedAvg with memory prototypes, as one small object that knows no transport.

A round: :meth:`FedMemStrategy.select_clients` picks the participants (seeded), the execution
backend runs them and feeds each :class:`ClientResult` to an :class:`UpdateAccumulator`
(a streaming weighted sum, so memory does not grow with the number of clients), and
:meth:`FedMemStrategy.merge_prototypes` turns the clients' memory prototypes into the
global prototypes every client reads next round.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.cluster import KMeans
from torch import Tensor


@dataclass
class ClientResult:
    """What one client sends up: nothing else of its state ever reaches the server."""

    update: dict[str, Tensor]  # parameter name -> (local - global) delta
    num_samples: int  # training targets seen, the FedAvg weight
    prototypes: Tensor  # [k, D] k-means centres of the client's memory features (k <= K)
    prototype_counts: Tensor  # [k] memory entries behind each centre
    mean_loss: float = 0.0
    client_id: int = -1  # who sent it (the server orders prototypes by it, so the merge ignores arrival order)

    def num_bytes(self) -> int:
        tensors = [*self.update.values(), self.prototypes, self.prototype_counts]
        return sum(t.numel() * t.element_size() for t in tensors)


class UpdateAccumulator:
    """Streaming weighted FedAvg: sum_i n_i * update_i / sum_i n_i, one client at a time."""

    def __init__(self) -> None:
        self.total: dict[str, Tensor] = {}
        self.weight = 0

    def add(self, update: dict[str, Tensor], num_samples: int) -> None:
        if num_samples <= 0:
            return
        for name, delta in update.items():
            weighted = delta.detach().double() * num_samples
            self.total[name] = self.total[name] + weighted if name in self.total else weighted
        self.weight += num_samples

    def add_partial(self, other: UpdateAccumulator) -> None:
        """Merge a pre-aggregated shard (e.g. a worker's many clients)."""
        for name, weighted in other.total.items():
            self.total[name] = self.total[name] + weighted if name in self.total else weighted.clone()
        self.weight += other.weight

    def mean(self) -> dict[str, Tensor]:
        if not self.weight:
            raise ValueError("no client update with samples to aggregate")
        return {name: (total / self.weight).float() for name, total in self.total.items()}


class FedMemStrategy:
    """Client selection, weighted FedAvg and prototype merging."""

    def __init__(
        self,
        num_prototypes: int = 5,
        clients_per_round: int | None = None,
        client_fraction: float = 1.0,
        seed: int = 0,
    ) -> None:
        if not 0.0 < client_fraction <= 1.0:
            raise ValueError(f"client_fraction must be in (0, 1], got {client_fraction}")
        self.num_prototypes = num_prototypes
        self.clients_per_round = clients_per_round
        self.client_fraction = client_fraction
        self.seed = seed

    def select_clients(self, round_idx: int, num_clients: int) -> np.ndarray:
        """Sorted client indices of round ``round_idx``; the same (seed, round) always selects the same."""
        count = self.clients_per_round or max(1, round(self.client_fraction * num_clients))
        count = min(count, num_clients)
        if count == num_clients:
            return np.arange(num_clients)
        rng = np.random.default_rng([self.seed, round_idx])
        return np.sort(rng.choice(num_clients, size=count, replace=False))

    @staticmethod
    def apply(global_params: dict[str, Tensor], mean_update: dict[str, Tensor]) -> dict[str, Tensor]:
        """New global parameters: the old plus the weighted mean update (names without an update are kept)."""
        return {
            name: value + mean_update[name] if name in mean_update else value for name, value in global_params.items()
        }

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


def memory_prototypes(features: Tensor, num_prototypes: int = 5, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A client's memory features [n, D] -> (k-means centres [k, D], entries per centre [k]), k = min(K, n)."""
    if len(features) <= num_prototypes:
        return features.float().clone(), torch.ones(len(features))
    # one k-means++ start (scikit-learn's default): every client runs this every round, and a few dozen
    # memory entries need no restarts (the server's merge, once a round, keeps 4)
    kmeans = KMeans(n_clusters=num_prototypes, n_init=1, random_state=seed)
    labels = kmeans.fit_predict(features.double().numpy())
    counts = torch.bincount(torch.as_tensor(labels), minlength=num_prototypes).float()
    return torch.as_tensor(kmeans.cluster_centers_).float(), counts
