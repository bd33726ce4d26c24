"""The server of the simulation: one round = select and configure, run the clients on a backend, aggregate.

Prototypes travel only when clients send them: ``LocalSettings.num_prototypes`` 0
(``enable_prototype_aggregation: false``) means none are sent, merged or broadcast.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from recbole_feddmmr.data import SequenceWindows
from recbole_feddmmr.errors import ConfigError
from recbole_feddmmr.federated.backends import SequentialBackend
from recbole_feddmmr.federated.client import FedMemClient, load_parameters, shared_parameters
from recbole_feddmmr.federated.contracts import FederatedModel
from recbole_feddmmr.federated.messages import LocalSettings
from recbole_feddmmr.federated.state import ClientStateStore
from recbole_feddmmr.federated.strategy import FedMemStrategy
from recbole_feddmmr.provenance import peak_rss_mb


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
    epsilon: float | None = None  # user-level DP: epsilon spent after this round (None without DP)
    dropped: int = 0  # selected clients that dropped out before training (client_dropout)
    late: int = 0  # clients whose update came after the round's deadline (round_deadline_s) and was left out


@dataclass(frozen=True)
class Availability:
    """Which selected clients answer: each drops out with probability ``dropout`` (drawn from (seed, round)),
    and the round takes no update after ``deadline_s`` seconds (None: no deadline)."""

    dropout: float = 0.0
    deadline_s: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.dropout < 1.0 or (self.deadline_s is not None and self.deadline_s <= 0):
            raise ConfigError(
                f"client_dropout must be in [0, 1) and round_deadline_s > 0, got {self.dropout}, {self.deadline_s}"
            )

    def answering(self, round_idx: int, selected: list) -> list:
        """The selected clients that do not drop out this round."""
        if not self.dropout:
            return selected
        stays = np.random.default_rng([self.seed, round_idx, 13]).random(len(selected)) >= self.dropout
        return [client for client, stay in zip(selected, stays, strict=True) if stay]


class FedMemServer:
    """Holds the shared parameters, the server optimizer (in the strategy) and the merged prototypes; every
    round it aggregates what the selected clients send back.

    The clients' private state is in ``self.store`` (:class:`ClientStateStore`), not in the server's
    model: between rounds ``model``'s per-user tables have no rows, so call :meth:`assemble_private_state`
    before anything reads users' rows (evaluation, saving, analysis).
    """

    def __init__(
        self,
        model: FederatedModel,
        clients: list[FedMemClient],
        windows: SequenceWindows,
        strategy: FedMemStrategy,
        settings: LocalSettings,
        backend=None,
        availability: Availability | None = None,
    ) -> None:
        self.model = model
        self.clients = clients
        self.windows = windows
        self.strategy = strategy
        self.settings = settings
        self.backend = backend or SequentialBackend()
        self.availability = availability or Availability()
        self.global_params = shared_parameters(model)
        self.store = ClientStateStore(model, clients)
        self.store.release(model)  # every user's private rows now live in the store, none in the model
        # item-indexed tables among the shared parameters: clients send their changed rows only
        self.row_shapes = {
            name: self.global_params[name].shape for name in model.per_item_parameters if name in self.global_params
        }

    def run_round(self, round_idx: int) -> RoundReport:
        """Select and configure (strategy), run (backend, client state from the store), aggregate (strategy)."""
        started = time.perf_counter()
        selected_idx, instructions = self.strategy.configure_fit(
            round_idx, len(self.clients), self.global_params, self.settings, len(self.windows), self.row_shapes
        )
        chosen = [self.clients[i] for i in selected_idx]
        selected = self.availability.answering(round_idx, chosen)  # a dropped client never trains: its state stays
        results = self.backend.run(self.model, selected, instructions, self.windows, self.store)
        late = [0]
        if self.availability.deadline_s is not None:
            results = self._before_deadline(results, started, late)
        outcome = self.strategy.aggregate_fit(self.global_params, results, self.row_shapes, round_idx)
        self.store.release(self.model)  # the last clients' rows went back to the store
        # the round's end, whichever client ran last (or elsewhere)
        self.model.set_memory_clock(instructions.clock_at(self.settings.local_epochs))
        self.global_params = outcome.parameters
        load_parameters(self.model, self.global_params)
        bytes_down = sum(p.numel() * p.element_size() for p in self.global_params.values()) * len(selected)
        memory = self.model.prototype_memory()
        if outcome.prototypes is not None and memory is not None:
            memory.set_global_prototypes(outcome.prototypes)
            bytes_down += outcome.prototypes.numel() * outcome.prototypes.element_size() * len(selected)
        return RoundReport(
            round_idx,
            outcome.clients,
            outcome.samples,
            outcome.mean_loss,
            outcome.bytes_up,
            bytes_down,
            time.perf_counter() - started,
            peak_rss_mb(),
            dropped=len(chosen) - len(selected),
            late=late[0],
        )

    def _before_deadline(self, results: Iterator, started: float, late: list[int]) -> Iterator:
        """The results that arrive within the round's deadline; the backend runs no client after it. A client
        whose update arrives late trained (its own private state moved on, as a real device's would) but its
        update is left out; ``late[0]`` counts the results left out (a Ray shard counts as its clients)."""
        for result in results:
            if time.perf_counter() - started > self.availability.deadline_s:
                late[0] += getattr(result, "clients", 1)
                return
            yield result

    def assemble_private_state(self) -> None:
        """Every user's private rows into the model's full per-user tables, as a centralised model holds them
        (RecBole's evaluator and checkpoints index users by id)."""
        self.store.assemble(self.model)
