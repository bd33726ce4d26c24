"""The ``ray`` execution backend: a round's clients sharded over a pool of Ray actors.

Each actor holds a replica of the model and the training windows (sent once, when the pool starts).
Every round, :class:`RayBackend` cuts the selected clients into contiguous shards of about equal cost
(:func:`balanced_shards`, ``shards_per_actor`` per actor), hands one to each actor and the next to
whichever actor finishes first, and sends with a shard the round's :class:`FitInstructions`, the
model's shared state (parameters and buffers such as the global prototypes) and, for every client of
the shard, that client's private state from the client state store: the state moves with the client.
An actor trains its clients one after another exactly as the sequential backend does (same
generators, same memory clock) and returns a :class:`ShardResult`: the shard's pre-aggregated weighted sum (an
:class:`UpdateAccumulator`, with the item-table rows it changed), each client's prototypes, and each
client's new private state, which the backend puts back into the store before the strategy sees the
result. An actor that dies mid-round is replaced and its whole shard rerun: a shard's result arrives
whole or not at all, so no client's update or state is lost or counted twice. The aggregate equals
the sequential backend's up to the order of float64 sums (tested to 1e-4, as for the vectorized
backend; a client's dropout masks are keyed by its own generator, so they do not depend on the process).

``ray.init()`` starts a local Ray unless one is running; ``address="auto"`` joins an existing cluster
(docs/federated.md has a two-node example).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from recbole_feddmmr.data import SequenceWindows
from recbole_feddmmr.errors import ConfigError
from recbole_feddmmr.federated.aggregation import UpdateAccumulator
from recbole_feddmmr.federated.client import FedMemClient, train_in_turn
from recbole_feddmmr.federated.messages import FitInstructions, LocalSettings, ShardResult
from recbole_feddmmr.federated.state import ClientStateStore


class ShardRunner:
    """The work of one actor (a plain class, so that it also runs without Ray, e.g. in a test)."""

    def __init__(self, model: nn.Module, windows: SequenceWindows) -> None:
        self.model = model
        self.windows = windows

    def run(
        self,
        instructions: FitInstructions,
        shared: dict[str, Tensor],
        clients: list[FedMemClient],
        states: dict[int, dict[str, Tensor]],
    ) -> ShardResult:
        store = ClientStateStore(self.model, clients)
        store.states = dict(states)  # every client of the shard arrives with its state (initial if new)
        self.model.load_state_dict(shared, strict=False)  # the server's state; per-user tables come with clients
        result = ShardResult(UpdateAccumulator(instructions.aggregation, instructions.row_shapes))
        for client_result in train_in_turn(self.model, clients, instructions, self.windows, store):
            result.add(client_result)
        store.release(self.model)
        result.states = store.states
        return result


def balanced_shards(
    clients: list[FedMemClient], windows: SequenceWindows, settings: LocalSettings, count: int
) -> list[list[FedMemClient]]:
    """``clients`` cut, in order, into at most ``count`` contiguous shards of about equal cost. A client's cost
    is its local steps: each step is at most ``local_batch_size`` targets, and on a CPU the per-step work
    that does not depend on the targets (the item-side layers over a step's distinct candidates, the
    optimizer) dominates such small steps."""
    if not clients:
        return []
    costs = torch.tensor([client.steps_per_epoch(windows, settings) for client in clients], dtype=torch.float64)
    ends = costs.cumsum(0)  # [n] cost up to and including each client
    # shard k ends at the first client whose cumulative cost reaches (k + 1) / count of the total
    cuts = torch.searchsorted(ends, ends[-1] * torch.arange(1, count + 1, dtype=torch.float64) / count) + 1
    bounds = sorted({0, *cuts.clamp(max=len(clients)).tolist()})
    return [clients[start:end] for start, end in itertools.pairwise(bounds) if end > start]


class RayBackend:
    """Clients sharded over ``num_actors`` Ray actors; see the module docstring."""

    name = "ray"

    def __init__(
        self,
        num_actors: int = 2,
        cpus_per_actor: float = 1.0,
        address: str | None = None,
        max_retries: int = 3,
        shards_per_actor: int = 4,
        shard_clients: int = 32,
    ) -> None:
        if num_actors < 1:
            raise ConfigError(f"num_actors must be >= 1, got {num_actors}")
        if shards_per_actor < 1 or shard_clients < 1:
            raise ConfigError(
                f"shards_per_actor and shard_clients must be >= 1, got {shards_per_actor}, {shard_clients}"
            )
        self.num_actors, self.cpus_per_actor, self.address = num_actors, cpus_per_actor, address
        # a round is cut into this many shards per actor, handed out as actors finish: clients' costs vary
        # (a one-user client's steps follow its user's history), and one shard per actor left the
        # first actor to finish idle for up to a fifth of the round on ml-100k
        self.shards_per_actor = shards_per_actor
        self.shard_clients = shard_clients  # clients a shard should have before a round is cut finer than per actor
        self.max_retries = max_retries  # reruns of one shard whose actor died, per round
        self.actors: list[Any] = []
        self.started_ray = False  # whether this backend called ray.init (and so shuts Ray down again)

    def _start(self, model: nn.Module, windows: SequenceWindows) -> None:
        import ray

        if not ray.is_initialized():
            # a local Ray's workers import the driver's recbole_feddmmr (a source checkout included); on a
            # cluster every node needs the package installed
            package_root = str(Path(__file__).resolve().parents[2])
            runtime_env = None if self.address else {"env_vars": {"PYTHONPATH": package_root}}
            if not self.address:
                # Ray starts its workers at nice 15; the actors are this run's compute, not background work:
                # niced, they stalled next to any other job (16-client rounds 15-17 s beside a test run, 2 s alone)
                os.environ.setdefault("RAY_worker_niceness", "0")
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False, runtime_env=runtime_env)
            self.started_ray = True
        self._runner = ray.remote(num_cpus=self.cpus_per_actor)(ShardRunner)
        self._replica = (ray.put(model), ray.put(windows))  # shipped once, shared by the actors (and replacements)
        self.actors = [self._new_actor() for _ in range(self.num_actors)]

    def shard_count(self, num_clients: int) -> int:
        """Shards of a round of ``num_clients``: a multiple of the actors, so that equal shards keep every actor
        busy to the end (7 shards for 2 actors left one idle for a seventh of the round). More than one per
        actor only while each shard keeps ``shard_clients`` clients: a shard's result carries a dense float64
        sum of the model's update, which costs the same to ship whatever the shard's size."""
        per_actor = min(self.shards_per_actor, num_clients // (self.shard_clients * self.num_actors))
        return self.num_actors * max(1, per_actor)

    def _new_actor(self):
        return self._runner.remote(*self._replica)

    def run(
        self,
        model: nn.Module,
        clients: list[FedMemClient],
        instructions: FitInstructions,
        windows: SequenceWindows,
        store: ClientStateStore,
    ) -> Iterator[ShardResult]:
        import ray

        if not self.actors:
            self._start(model, windows)
        shared = ray.put(store.shared_state(model))
        shards = balanced_shards(clients, windows, instructions.settings, self.shard_count(len(clients)))
        queue = list(reversed(shards))  # pop() hands out the shards in client order

        def submit(index: int, shard: list[FedMemClient], retries: int = 0) -> None:
            states = {client.client_id: store.client_state(client) for client in shard}
            pending[self.actors[index].run.remote(instructions, shared, shard, states)] = (index, shard, retries)

        pending: dict[Any, tuple[int, list[FedMemClient], int]] = {}
        for index in range(min(len(self.actors), len(queue))):
            submit(index, queue.pop())
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            index, shard, retries = pending.pop(done[0])
            try:
                shard_result: ShardResult = ray.get(done[0])
            except ray.exceptions.RayActorError:
                # the actor died mid-round: nothing of its shard reached the store or the aggregate (a shard's
                # result comes back whole or not at all), so a fresh actor reruns the whole shard
                if retries >= self.max_retries:
                    raise
                self.actors[index] = self._new_actor()
                submit(index, shard, retries + 1)
                continue
            if queue:  # the actor that finished first takes the next shard: no actor idles while work is left
                submit(index, queue.pop())
            store.states.update(shard_result.states)  # the clients' private state comes home with them
            shard_result.states = {}
            yield shard_result

    def shutdown(self) -> None:
        """Kill the actors, and stop Ray if this backend started it."""
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        if self.started_ray:
            ray.shutdown()
            self.started_ray = False
        self.actors = []
