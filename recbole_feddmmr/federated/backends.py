"""How a round's clients are executed. The strategy never knows which backend ran them.

The backends (sequential and vectorized here, Ray in ``ray_backend.py``; :func:`make_backend` builds the
one a configuration names) yield, client by client, the :class:`ClientResult` each client sends up (Ray: a
:class:`ShardResult` per shard of clients, pre-aggregated); the server
folds them into a streaming sum, so memory never grows with the number of clients. Before a client
trains (sequential) or a chunk of clients (vectorized), the client state store makes exactly their
private rows resident in the model, and takes them back afterwards. All draw a
client's negatives and its dropout masks (:func:`recbole_feddmmr.model.dropout.keyed_dropout`) from that
client's own generator (:func:`client_generator`) and give its memory the same clock
(:meth:`FitInstructions.clock_at`), so they compute the same round up to float summation order (tested in
float64 without dropout to 1e-4, and in float32 with the default dropout).
"""

from __future__ import annotations

import importlib.util
from collections import defaultdict
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap
from torch.nn.utils.rnn import pad_sequence

from recbole_feddmmr.data import SequenceWindows
from recbole_feddmmr.errors import ConfigError
from recbole_feddmmr.federated.client import (
    FedMemClient,
    client_generator,
    load_parameters,
    local_optimizer,
    proximal_term,
    train_in_turn,
)
from recbole_feddmmr.federated.contracts import VectorizableModel
from recbole_feddmmr.federated.messages import ClientResult, FitInstructions, LocalSettings
from recbole_feddmmr.federated.state import ClientStateStore
from recbole_feddmmr.memory import MemoryWrites
from recbole_feddmmr.provenance import usable_cpus
from recbole_feddmmr.vmapping import vmap_mode


class SequentialBackend:
    """A plain loop over the clients with one model whose weights are reloaded per client: the correctness
    oracle, and on a CPU close to centralised training in cost."""

    name = "sequential"

    def run(
        self,
        model: nn.Module,
        clients: list[FedMemClient],
        instructions: FitInstructions,
        windows: SequenceWindows,
        store: ClientStateStore,
    ) -> Iterator[ClientResult]:
        return train_in_turn(model, clients, instructions, windows, store)


def mapped_dims(points):
    """vmap's ``in_dims`` for padded points: dim 0 of every tensor; a field or modality the batch lacks
    (``None``) is not mapped."""
    return points._replace(
        **{name: None if value is None else 0 for name, value in points._asdict().items() if name != "memory"},
        memory=points.memory._make(None if value is None else 0 for value in points.memory),
    )


class _PointsLoss(nn.Module):
    """``model.points_loss`` as a module's forward, so ``functional_call`` can swap in one client's parameters."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, windows: Tensor, points) -> tuple[Tensor, Tensor, Tensor | None]:
        return self.model.points_loss(windows, points, all_items=True)


def default_chunk_targets(device: torch.device) -> int:
    """``vectorized_chunk_targets`` when unset: small chunks on a CPU, where vmap gains little, large on CUDA."""
    return 8192 if device.type == "cuda" else 256


class VectorizedBackend:
    """Many clients in one batched computation: ``torch.func.vmap`` of the loss gradient over per-client
    parameter copies stacked as ``[n, ...]``, one Adam over the stacks (Adam is elementwise, so that is each
    client's own Adam).

    Clients are grouped by their number of local steps (all clients of a chunk step together) and cut
    into chunks of about ``chunk_targets`` training targets per step; within a chunk each client's
    windows and prediction points are padded to the chunk's largest (padded points weigh 0). Only one
    chunk's parameter copies exist at a time. Needs the model's two-stage window loss
    (``prediction_points`` / ``points_loss``).
    """

    name = "vectorized"

    def __init__(self, chunk_targets: int = 2048) -> None:
        if chunk_targets < 1:
            raise ConfigError(f"chunk_targets must be >= 1, got {chunk_targets}")
        self.chunk_targets = chunk_targets

    def chunks(
        self, clients: list[FedMemClient], windows: SequenceWindows, settings: LocalSettings
    ) -> list[list[FedMemClient]]:
        """Clients grouped by local steps per epoch, each group cut into chunks of ~``chunk_targets`` per step."""
        groups: dict[int, list[FedMemClient]] = defaultdict(list)
        for client in clients:
            groups[client.steps_per_epoch(windows, settings)].append(client)
        chunks = []
        for steps, group in sorted(groups.items()):
            chunk, targets = [], 0.0
            for client in group:
                per_step = client.num_samples / max(steps, 1)
                if chunk and targets + per_step > self.chunk_targets:
                    chunks.append(chunk)
                    chunk, targets = [], 0.0
                chunk.append(client)
                targets += per_step
            if chunk:
                chunks.append(chunk)
        return chunks

    def run(
        self,
        model: nn.Module,
        clients: list[FedMemClient],
        instructions: FitInstructions,
        windows: SequenceWindows,
        store: ClientStateStore,
    ) -> Iterator[ClientResult]:
        if not isinstance(model, VectorizableModel):
            raise TypeError(
                f"the vectorized backend needs a model with prediction_points / points_loss (UR4RecV2MoE), "
                f"not {type(model).__name__}: use federated_backend=sequential"
            )
        load_parameters(model, instructions.parameters)
        model.train()
        for chunk in self.chunks(clients, windows, instructions.settings):
            yield from self._run_chunk(model, chunk, instructions, windows, store)

    def _run_chunk(
        self,
        model: nn.Module,
        chunk: list[FedMemClient],
        instructions: FitInstructions,
        windows: SequenceWindows,
        store: ClientStateStore,
    ) -> Iterator[ClientResult]:
        global_params, settings, round_idx = instructions.parameters, instructions.settings, instructions.round_idx
        count = len(chunk)
        residents = store.load(model, chunk)  # the chunk's users' private rows, and only theirs
        # each client's copy of the shared parameters and of the per-user ones (the chunk's resident rows)
        model_params = dict(model.named_parameters())
        per_user = {name: model_params[name].detach() for name in model.per_user_parameters}
        params = {
            name: value.expand(count, *value.shape).clone() for name, value in {**global_params, **per_user}.items()
        }  # [n, ...]
        optimizer = local_optimizer(params, settings, model.per_item_parameters)
        device = windows.user_ids.device
        generators = [client_generator(settings.seed, round_idx, client.client_id, device) for client in chunk]
        loss_module = _PointsLoss(model)
        mu = settings.fedprox_mu

        def client_loss(client_params: dict[str, Tensor], client_windows: Tensor, points):
            rec_loss, lb_loss, surprise = functional_call(
                loss_module, {f"model.{name}": value for name, value in client_params.items()}, (client_windows, points)
            )
            reported = rec_loss + lb_loss
            loss = reported
            if mu > 0:  # FedProx, as in the sequential client
                loss = loss + proximal_term(client_params, global_params, mu)
            return loss, (reported, rec_loss.new_zeros(points.weight.shape) if surprise is None else surprise)

        client_gradients = grad_and_value(client_loss, has_aux=True)
        loss_sum, steps = torch.zeros(count, dtype=torch.float64, device=device), 0  # on the device: no sync per step
        for local_epoch in range(settings.local_epochs):
            clock = instructions.clock_at(local_epoch)
            batches = [client.epoch_batches(windows, round_idx, local_epoch, settings, residents) for client in chunk]
            for step in range(len(batches[0])):  # a chunk's clients take the same number of steps
                model.set_memory_clock(clock + step)
                stacked_windows, points, flat_points = self._stack(
                    model, [client_batches[step] for client_batches in batches], generators
                )
                client_step = vmap(client_gradients, in_dims=(0, 0, mapped_dims(points)), randomness="different")
                with vmap_mode():
                    grads, (_, (reported, surprise)) = client_step(params, stacked_windows, points)
                if torch.isnan(reported).any():
                    raise ValueError("Training loss is nan")
                for name, value in params.items():
                    value.grad = grads[name]
                optimizer.step()
                if model.writes_memory:  # the chunk's positives, as the sequential training step writes them
                    real = points.weight > 0  # [n, P_max], row-major = the points' order
                    writes = MemoryWrites(flat_points.users, flat_points.positives, surprise[real], flat_points.times)
                    model.write_memory(writes, clock + step + 1)
                loss_sum += reported.double()
                steps += 1
        with torch.no_grad():  # per-user parameters: each client's own users' rows go back into the model
            for name in per_user:
                for index, client in enumerate(chunk):
                    rows = residents.rows(client.user_ids)
                    model_params[name][rows] = params[name][index, rows]
        store.save(model, chunk)
        mean_losses = (loss_sum / steps).tolist() if steps else [0.0] * count  # one host sync per chunk
        for index, client in enumerate(chunk):
            update = {name: params[name][index] - value for name, value in global_params.items()}
            yield client.result(model, settings, residents, update, mean_losses[index], global_params)

    @staticmethod
    def _stack(model: nn.Module, batches: list[tuple[Tensor, ...]], generators: list[torch.Generator]):
        """One step's batches of n clients -> (windows [n, b_max, L], padded points [n, P_max, ...], all points flat).

        Each client's prediction points (its own memory read, negatives from its own generator) are
        built as in the sequential client, then padded; padded points get weight 0.
        """
        per_client = [
            model.prediction_points(*batch, generator=generator)
            for batch, generator in zip(batches, generators, strict=True)
        ]
        stacked_windows = pad_sequence([batch[1] for batch in batches], batch_first=True)  # [n, b_max, L]

        def pad(tensors: list[Tensor | None]) -> Tensor | None:
            if tensors[0] is None:
                return None
            return torch.stack(tensors) if tensors[0].dim() == 0 else pad_sequence(tensors, batch_first=True)

        def flat(tensors: list[Tensor | None]) -> Tensor | None:
            if tensors[0] is None:
                return None
            return torch.stack(tensors) if tensors[0].dim() == 0 else torch.cat(tensors)

        fields = list(zip(*per_client, strict=True))  # per field: n tensors
        memory_fields = list(zip(*(points.memory for points in per_client), strict=True))
        first = per_client[0]
        weight = pad([torch.ones_like(points.positives, dtype=torch.float32) for points in per_client])
        padded = first._replace(
            **{
                name: pad(list(values))
                for name, values in zip(first._fields, fields, strict=True)
                if name not in ("memory", "weight")
            },
            memory=first.memory._make(pad(list(values)) for values in memory_fields),
            weight=weight,
        )
        flattened = first._replace(
            **{
                name: flat(list(values))
                for name, values in zip(first._fields, fields, strict=True)
                if name not in ("memory", "weight")
            }
        )
        return stacked_windows, padded, flattened


# auto picks Ray from this many local steps per round: on the 2-core CPU a 16-client ml-100k round (~60
# steps) already ran faster over two actors than in one process (docs/federated.md, "Execution backends")
AUTO_RAY_MIN_STEPS = 32


def auto_backend(device: torch.device, cpus: int, steps_per_round: float, ray_installed: bool) -> str:
    """What ``federated_backend: auto`` runs.

    On a CPU with two or more cores, rounds of at least ``AUTO_RAY_MIN_STEPS`` local steps run on ``ray``
    (one single-threaded actor per core): a one-user client's step is a batch of ~30 targets, too small
    for torch's threads to share among cores, so separate processes use the cores and one process does
    not. Smaller rounds do not repay shipping the model's state to the actors, and stay ``sequential``.
    On CUDA: ``sequential``, until the vectorized path has passed ``scripts/gpu_check.sh`` on a GPU.
    """
    if device.type == "cpu" and cpus >= 2 and ray_installed and steps_per_round >= AUTO_RAY_MIN_STEPS:
        return "ray"
    return "sequential"


def make_backend(
    name: str,
    device: torch.device,
    *,
    steps_per_round: float = 0.0,
    cpus: int | None = None,
    chunk_targets: int | None = None,
    ray_num_actors: int | None = None,
    ray_cpus_per_actor: float | None = None,
    ray_address: str | None = None,
):
    """The execution backend ``name`` (auto, sequential, vectorized, ray); ``auto`` decides by
    :func:`auto_backend` from the device, the usable cores and ``steps_per_round``, the local steps a round
    is expected to take (0: unknown, sequential)."""
    cpus = cpus or usable_cpus()
    if name == "auto":
        name = auto_backend(device, cpus, steps_per_round, importlib.util.find_spec("ray") is not None)
    if name == "sequential":
        return SequentialBackend()
    if name == "vectorized":
        return VectorizedBackend(chunk_targets or default_chunk_targets(device))
    if name == "ray":
        from recbole_feddmmr.federated.ray_backend import RayBackend  # Ray only where it is asked for

        actors = ray_num_actors or min(cpus, 8)
        return RayBackend(actors, cpus_per_actor=ray_cpus_per_actor or min(1.0, cpus / actors), address=ray_address)
    raise ConfigError(f"federated_backend must be auto, sequential, vectorized or ray, got {name!r}")
