"""A federated client: local training on its own users' sequences; only an update and summaries leave it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from recbole_feddmmr.federated.strategy import ClientResult, memory_prototypes
from recbole_feddmmr.trainer import SequenceWindows, train_steps


@dataclass(frozen=True)
class LocalSettings:
    local_epochs: int = 1
    local_batch_size: int = 256  # training targets per local step
    local_lr: float = 1e-3  # Adam, created fresh every round: no optimizer state is kept between rounds
    fedprox_mu: float = 0.0  # FedProx proximal term mu/2 ||w - w_global||^2 (0 = FedAvg)
    num_prototypes: int = 5  # k-means centres of the client's memory sent up (0 = none)
    seed: int = 2020


def shared_parameters(model: nn.Module) -> dict[str, Tensor]:
    """What the server aggregates: the model's trainable parameters (detached copies). Buffers, such as the
    users' memories, are private and never part of it."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def load_parameters(model: nn.Module, params: dict[str, Tensor]) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in params:
                p.copy_(params[name])


class FedMemClient:
    """One client of the simulation: its users and their training windows.

    Its private state, the memory rows of its users, lives in the simulation's model (rows no other
    client touches); what it returns (:class:`ClientResult`) holds only a parameter update, a sample
    count and k-means summaries of its memory.
    """

    def __init__(self, client_id: int, user_ids: Tensor, windows: SequenceWindows) -> None:
        self.client_id = client_id
        self.user_ids = user_ids
        self.window_index = windows.windows_of(user_ids)  # [w]
        self.num_samples = int(windows.target_mask[self.window_index].sum())

    def fit(
        self,
        model: nn.Module,
        global_params: dict[str, Tensor],
        windows: SequenceWindows,
        round_idx: int,
        settings: LocalSettings,
    ) -> ClientResult:
        """Train ``model`` from ``global_params`` on this client's windows -> its update and prototypes."""
        load_parameters(model, global_params)
        model.train()
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=settings.local_lr)
        proximal = None
        if settings.fedprox_mu > 0:
            trainable = dict(model.named_parameters())

            def proximal() -> Tensor:
                return (
                    settings.fedprox_mu
                    / 2
                    * sum(((trainable[name] - value) ** 2).sum() for name, value in global_params.items())
                )

        per_batch = windows.windows_per_batch_for(settings.local_batch_size)
        losses = []
        for local_epoch in range(settings.local_epochs):
            batches = windows.epoch(
                round_idx * settings.local_epochs + local_epoch, subset=self.window_index, windows_per_batch=per_batch
            )
            total = train_steps(model, optimizer, batches, model.calculate_window_loss, extra_loss=proximal)
            if total is not None:
                losses.append(sum(total) if isinstance(total, tuple) else total)
        update = {
            name: p.detach() - global_params[name] for name, p in model.named_parameters() if name in global_params
        }
        memory = getattr(model, "memory", None)
        if settings.num_prototypes and hasattr(memory, "entry_features"):
            centres, counts = memory_prototypes(
                memory.entry_features(self.user_ids), settings.num_prototypes, settings.seed
            )
        else:
            centres, counts = torch.zeros(0, 0), torch.zeros(0)
        steps = max(1, len(losses))
        return ClientResult(update, self.num_samples, centres, counts, mean_loss=sum(losses) / steps)
