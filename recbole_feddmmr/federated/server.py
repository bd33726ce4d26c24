"""The server of the simulation: one round = select, run clients on a backend, aggregate, merge prototypes."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

from torch import nn

from recbole_feddmmr.data import SequenceWindows
from recbole_feddmmr.federated.backends import SequentialBackend
from recbole_feddmmr.federated.client import FedMemClient, LocalSettings, load_parameters, shared_parameters
from recbole_feddmmr.federated.state import ClientStateStore
from recbole_feddmmr.federated.strategy import FedMemStrategy


@dataclass
class RoundReport:
    round_idx: int
    clients: int
    samples: int
    mean_loss: float
    bytes_up: int
    bytes_down: int
    seconds: float
    peak_rss_mb: float = 0.0  # the process's peak resident memory so far (getrusage)
    valid_score: float | None = None  # validation metric after the round, when the trainer evaluated it
    elapsed_seconds: float = 0.0  # wall time of the run up to the end of this round (evaluation included)


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MB (ru_maxrss is in KB on Linux, bytes on macOS); 0 where
    the ``resource`` module does not exist (Windows)."""
    try:
        import resource
    except ImportError:
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


class FedMemServer:
    """Holds the shared parameters, the server optimizer (in the strategy) and the merged prototypes; every
    round it aggregates what the selected clients send back.

    The clients' private state is in ``self.store`` (:class:`ClientStateStore`), not in the server's
    model: between rounds ``model``'s per-user tables have no rows, so call :meth:`assemble_private_state`
    before anything reads users' rows (evaluation, saving, analysis).
    """

    def __init__(
        self,
        model: nn.Module,
        clients: list[FedMemClient],
        windows: SequenceWindows,
        strategy: FedMemStrategy,
        settings: LocalSettings,
        backend=None,
        enable_prototype_aggregation: bool = True,
    ) -> None:
        self.model = model
        self.clients = clients
        self.windows = windows
        self.strategy = strategy
        self.settings = settings
        self.backend = backend or SequentialBackend()
        self.enable_prototype_aggregation = enable_prototype_aggregation
        self.global_params = shared_parameters(model)
        self.store = ClientStateStore(model, clients)
        self.store.release(model)  # every user's private rows now live in the store, none in the model
        # item-indexed tables among the shared parameters: clients send their changed rows only
        self.row_shapes = {
            name: self.global_params[name].shape
            for name in getattr(model, "per_item_parameters", ())
            if name in self.global_params
        }

    def run_round(self, round_idx: int) -> RoundReport:
        started = time.perf_counter()
        selected = [self.clients[i] for i in self.strategy.select_clients(round_idx, len(self.clients))]
        accumulator = self.strategy.new_accumulator(self.row_shapes)
        sent_prototypes, losses, bytes_up = {}, [], 0
        for result in self.backend.run(
            self.model, selected, self.global_params, self.windows, round_idx, self.settings, self.store
        ):
            accumulator.add(result.update, result.num_samples, result.changed_rows)
            if len(result.prototypes):
                sent_prototypes[result.client_id] = (result.prototypes, result.prototype_counts)
            losses.append(result.mean_loss)
            bytes_up += result.num_bytes()
        # in client order, whatever order the backend returned them in: the merge's k-means depends on it
        prototypes = [sent_prototypes[client_id][0] for client_id in sorted(sent_prototypes)]
        counts = [sent_prototypes[client_id][1] for client_id in sorted(sent_prototypes)]
        self.store.release(self.model)  # the last clients' rows went back to the store
        self.global_params = self.strategy.aggregate(self.global_params, accumulator)
        load_parameters(self.model, self.global_params)
        bytes_down = sum(p.numel() * p.element_size() for p in self.global_params.values()) * len(selected)
        memory = getattr(self.model, "memory", None)
        if self.enable_prototype_aggregation and prototypes and hasattr(memory, "set_global_prototypes"):
            merged, _ = self.strategy.merge_prototypes(prototypes, counts)
            memory.set_global_prototypes(merged)
            bytes_down += merged.numel() * merged.element_size() * len(selected)
        return RoundReport(
            round_idx,
            len(selected),
            accumulator.weight,
            math.fsum(losses) / len(losses) if losses else 0.0,
            bytes_up,
            bytes_down,
            time.perf_counter() - started,
            peak_rss_mb(),
        )

    def assemble_private_state(self) -> None:
        """Every user's private rows into the model's full per-user tables, as a centralised model holds them
        (RecBole's evaluator and checkpoints index users by id)."""
        self.store.assemble(self.model)
