"""How a round's clients are executed. The strategy never knows which backend ran them."""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor, nn

from recbole_feddmmr.federated.client import FedMemClient, LocalSettings
from recbole_feddmmr.federated.strategy import ClientResult
from recbole_feddmmr.trainer import SequenceWindows


class SequentialBackend:
    """A plain loop over the clients with one model whose weights are reloaded per client: the correctness
    oracle, and on a CPU about as fast as centralised training (DESIGN.md)."""

    name = "sequential"

    def run(
        self,
        model: nn.Module,
        clients: list[FedMemClient],
        global_params: dict[str, Tensor],
        windows: SequenceWindows,
        round_idx: int,
        settings: LocalSettings,
    ) -> Iterator[ClientResult]:
        for client in clients:
            yield client.fit(model, global_params, windows, round_idx, settings)
