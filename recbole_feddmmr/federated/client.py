"""A federated client: local training on its own users' sequences; only an update and summaries leave it."""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
from torch import Tensor, nn

from recbole_feddmmr.data import SequenceWindows
from recbole_feddmmr.federated.state import Residents
from recbole_feddmmr.federated.strategy import (
    ClientResult,
    FitInstructions,
    LocalSettings,
    memory_prototypes,
    sparse_row_updates,
)
from recbole_feddmmr.trainer import train_steps


def local_optimizer(params: list[Tensor], settings: LocalSettings) -> torch.optim.Optimizer:
    """A client's fresh optimizer for one round (elementwise, so one over stacked client copies is each
    client's own)."""
    if settings.local_optimizer == "sgd":
        return torch.optim.SGD(params, lr=settings.local_lr)
    return torch.optim.Adam(params, lr=settings.local_lr)


def proximal_term(params: dict[str, Tensor], global_params: dict[str, Tensor], mu: float) -> Tensor:
    """FedProx's ``mu / 2 * ||w - w_global||^2`` over the shared parameters (one client's or, under vmap, each's)."""
    return mu / 2 * sum(((params[name] - value) ** 2).sum() for name, value in global_params.items())


def shared_parameters(model: nn.Module) -> dict[str, Tensor]:
    """What the server aggregates: the model's trainable parameters (detached copies). Buffers, such as the
    users' memories, and the model's per-user state (e.g. the user embedding, one row per user) are
    private: each client trains its own users' rows, which never leave it (see ``state.py``)."""
    private = set(getattr(model, "per_user_state", ()))
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad and name not in private}


def load_parameters(model: nn.Module, params: dict[str, Tensor]) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in params:
                p.copy_(params[name])


def client_generator(seed: int, round_idx: int, client_id: int, device: torch.device) -> torch.Generator:
    """The random stream of one client in one round (its negatives). It depends on nothing but
    (seed, round, client), so every execution backend, in any order, draws the same numbers."""
    state = int(np.random.SeedSequence([seed, round_idx, client_id]).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator(device=device).manual_seed(state)


class FedMemClient:
    """One client of the simulation: its users and their training windows.

    Its private state (its users' memory slots and per-user parameter rows) lives in the client state
    store and is resident in the simulation's model only while it trains; what it returns
    (:class:`ClientResult`) holds only a parameter update, a sample count and k-means summaries of its
    memory.
    """

    def __init__(
        self, client_id: int, user_ids: Tensor, windows: SequenceWindows, window_index: Tensor | None = None
    ) -> None:
        """``window_index``: the client's windows if already known (see :meth:`SequenceWindows.windows_of_groups`)."""
        self.client_id = client_id
        self.user_ids = user_ids
        self.window_index = windows.windows_of(user_ids) if window_index is None else window_index  # [w]
        self.num_samples = int(windows.target_mask[self.window_index].sum())

    def steps_per_epoch(self, windows: SequenceWindows, settings: LocalSettings) -> int:
        per_batch = windows.windows_per_batch_for(settings.local_batch_size)
        return -(-len(self.window_index) // per_batch)

    def epoch_batches(
        self,
        windows: SequenceWindows,
        round_idx: int,
        local_epoch: int,
        settings: LocalSettings,
        residents: Residents,
    ) -> list[tuple[Tensor, ...]]:
        """This client's batches of one local epoch, in order (shuffled by seed, round and epoch), with user
        ids turned into the resident rows of the model."""
        per_batch = windows.windows_per_batch_for(settings.local_batch_size)
        epoch_idx = round_idx * settings.local_epochs + local_epoch
        batches = windows.epoch(epoch_idx, subset=self.window_index, windows_per_batch=per_batch)
        return [(residents.rows(user_ids), *rest) for user_ids, *rest in batches]

    def prototypes(self, model: nn.Module, settings: LocalSettings, residents: Residents) -> tuple[Tensor, Tensor]:
        """k-means centres [k, D] of this client's memory entries and their sizes [k] (empty without a memory)."""
        memory = getattr(model, "memory", None)
        if not settings.num_prototypes or not hasattr(memory, "entry_features"):
            return torch.zeros(0, 0), torch.zeros(0)
        entries = memory.entry_features(residents.rows(self.user_ids)).cpu()  # [n, Fv + Ft]
        if entries.size(1) == 0:  # the memory stores no feature modality (experts off): nothing to summarise
            return torch.zeros(0, 0), torch.zeros(0)
        return memory_prototypes(entries, settings.num_prototypes, settings.seed, settings.prototype_min_entries)

    def fit(
        self, model: nn.Module, instructions: FitInstructions, windows: SequenceWindows, residents: Residents
    ) -> ClientResult:
        """Train ``model`` from the round's global parameters on this client's windows -> its update and
        prototypes.

        ``residents``: this client's users, whose private rows the client state store made resident in
        ``model``; the optimizer trains those per-user rows too (they stay with the client).
        """
        global_params, settings, round_idx = instructions.parameters, instructions.settings, instructions.round_idx
        load_parameters(model, global_params)
        model.train()
        optimizer = local_optimizer([p for p in model.parameters() if p.requires_grad], settings)
        proximal = None
        if settings.fedprox_mu > 0:
            proximal = partial(proximal_term, dict(model.named_parameters()), global_params, settings.fedprox_mu)

        generator = client_generator(settings.seed, round_idx, self.client_id, windows.user_ids.device)
        loss_func = partial(model.calculate_window_loss, generator=generator)
        loss_sum, steps = 0.0, 0
        for local_epoch in range(settings.local_epochs):
            batches = self.epoch_batches(windows, round_idx, local_epoch, settings, residents)
            clock = instructions.clock_at(local_epoch)  # train_steps adds the step index
            total = train_steps(model, optimizer, batches, loss_func, extra_loss=proximal, memory_clock=clock)
            loss_sum += sum(total) if isinstance(total, tuple) else total or 0.0
            steps += len(batches)
        update = {
            name: p.detach() - global_params[name] for name, p in model.named_parameters() if name in global_params
        }
        update, changed_rows = sparse_row_updates(update, getattr(model, "per_item_parameters", ()))
        centres, counts = self.prototypes(model, settings, residents)
        mean_loss = loss_sum / steps if steps else 0.0
        return ClientResult(
            update,
            self.num_samples,
            centres,
            counts,
            mean_loss=mean_loss,
            client_id=self.client_id,
            changed_rows=changed_rows,
        )
