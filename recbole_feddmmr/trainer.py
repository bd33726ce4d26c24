"""The trainer of UR4RecV2MoE: RecBole's Trainer with a fast training data path.

RecBole trains a sequential model on one augmented sample per training target
(the target's prefix, up to MAX_ITEM_LIST_LENGTH items), each run through the
Transformer on its own, and builds every batch as a new ``Interaction`` from
numpy. On a CPU the backbone then runs ~50 times per user window and the
data path costs as much as the model.

Here the same training targets are served as whole sequence windows
(:class:`recbole_feddmmr.data.SequenceWindows`), one causal pass per window.
Evaluation, early stopping, checkpoints, logging and TensorBoard are RecBole's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from recbole.trainer import Trainer
from recbole.utils import set_color
from torch import Tensor
from torch.nn.utils import clip_grad_norm_
from tqdm import tqdm

from recbole_feddmmr.checkpoints import TrustedCheckpointMixin
from recbole_feddmmr.data import SequenceWindows
from recbole_feddmmr.errors import ConfigError
from recbole_feddmmr.model.losses import TrainingLoss
from recbole_feddmmr.resumable import ResumableFitMixin


def train_steps(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[tuple],
    loss_func: Callable[..., Tensor | tuple[Tensor, ...] | TrainingLoss],
    *,
    clip_grad_norm: dict | None = None,
    amp: bool = False,
    extra_loss: Callable[[], Tensor] | None = None,
    memory_clock: int | None = None,
) -> float | tuple[float, ...] | None:
    """One optimizer step per batch, then the memory writes of that batch: the training loop of both the
    centralised trainer and a federated client. -> summed loss (per part when the loss has parts).

    ``loss_func(*batch)`` returns a loss, a tuple of loss parts, or a :class:`TrainingLoss` (parts plus
    the memory writes the step makes through ``model.write_memory`` after its optimizer step).

    ``extra_loss`` (e.g. FedProx's proximal term) is added to each step's loss and not reported.
    ``memory_clock``: the memory's reads see step ``memory_clock + i`` at the i-th batch and its writes are
    stamped one later (default: the memory's own clock, which ticks once per write).
    """
    device_type = next(model.parameters()).device.type
    total_loss = None
    for step, batch in enumerate(batches):
        if memory_clock is not None:  # a federated client's step (its model has a memory clock)
            model.set_memory_clock(memory_clock + step)
        optimizer.zero_grad()
        with torch.autocast(device_type=device_type, enabled=amp):
            losses = loss_func(*batch)
        writes = None
        if isinstance(losses, TrainingLoss):
            losses, writes = losses.losses, losses.memory_writes
        if isinstance(losses, tuple):
            loss = sum(losses)
            parts = tuple(part.item() for part in losses)
            total_loss = parts if total_loss is None else tuple(map(sum, zip(total_loss, parts, strict=True)))
        else:
            loss = losses
            total_loss = loss.item() if total_loss is None else total_loss + loss.item()
        if torch.isnan(loss):
            raise ValueError("Training loss is nan")
        if extra_loss is not None:
            loss = loss + extra_loss()
        loss.backward()
        if clip_grad_norm:
            clip_grad_norm_(model.parameters(), **clip_grad_norm)
        optimizer.step()
        if writes is not None:  # this step's positives, gated by their surprise
            model.write_memory(writes, None if memory_clock is None else memory_clock + step + 1)
    return total_loss


def plateau_schedule(optimizer: torch.optim.Optimizer, config, *, bigger: bool = True):
    """``lr_plateau_factor`` x the learning rate once validation has not improved for more than
    ``lr_plateau_patience`` validations (torch's ReduceLROnPlateau); ``None`` when ``lr_plateau_factor`` is unset or 0.

    Why: on 943 validation users the score moves by a few thousandths from one epoch to the next while it
    still climbs, so at a constant rate the best epoch is partly chance; a smaller rate later in training
    settles the weights (docs/model.md, "The trainer's data path")."""
    factor = config["lr_plateau_factor"] or 0.0
    if not factor:
        return None
    patience = config["lr_plateau_patience"]
    if not 0.0 < factor < 1.0:
        raise ConfigError(f"lr_plateau_factor={factor} must be in (0, 1) (0 or ~: a constant learning rate)")
    if patience is None or int(patience) != patience or patience < 0:
        raise ConfigError(f"lr_plateau_patience={patience} must be a whole number of validations >= 0")
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max" if bigger else "min", factor=factor, patience=int(patience)
    )


class WindowTrainer(Trainer):
    """RecBole Trainer whose training epochs use :class:`SequenceWindows` and ``model.calculate_window_loss``."""

    def __init__(self, config, model) -> None:
        super().__init__(config, model)
        self._windows: SequenceWindows | None = None
        self._windows_source = None
        self.lr_scheduler = plateau_schedule(self.optimizer, config, bigger=self.valid_metric_bigger)

    def sequence_windows(self, train_data) -> SequenceWindows:
        """The (cached) windows of ``train_data``."""
        if self._windows is None or self._windows_source is not train_data:
            self._windows = SequenceWindows(
                train_data,
                self.model,
                self.config["train_batch_size"],
                self.device,
                self.config["seed"],
                shuffle_ties=bool(self.config["shuffle_tied_items"]),
            )
            self._windows_source = train_data
        return self._windows

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        self.model.train()
        loss_func = loss_func or self.model.calculate_window_loss
        batches = self.sequence_windows(train_data)
        iterator = batches.epoch(epoch_idx)
        if show_progress:
            iterator = tqdm(iterator, total=len(batches), ncols=100, desc=set_color(f"Train {epoch_idx:>5}", "pink"))
        memory = getattr(self.model, "memory", None)
        if hasattr(memory, "reset_stats"):
            memory.reset_stats()
        total_loss = train_steps(
            self.model,
            self.optimizer,
            iterator,
            loss_func,
            clip_grad_norm=self.clip_grad_norm,
            amp=self.enable_amp,
        )
        if hasattr(memory, "stats"):
            self._log_memory(memory.stats(), epoch_idx)
        return total_loss

    def _log_memory(self, stats: dict[str, float], epoch_idx: int) -> None:
        self.logger.info(
            set_color(f"epoch {epoch_idx} memory", "green")
            + f" [fill rate: {stats['fill_rate']:.3f}, write rate: {stats['write_rate']:.3f}, "
            f"mean surprise: {stats['mean_surprise']:.3f}, seconds: {stats['seconds']:.1f}]"
        )
        for name, value in stats.items():
            self.tensorboard.add_scalar(f"memory/{name}", value, epoch_idx)
        # kept with the run's records where the trainer has them (resumable runs), so a resumed run keeps them
        records = getattr(self, "run_records", None)
        if records is not None:
            records.setdefault("memory_epochs", []).append(stats)


class UR4RecV2MoETrainer(ResumableFitMixin, TrustedCheckpointMixin, WindowTrainer):
    """The plugin's trainer of UR4RecV2MoE (the registry finds it by name, ``<model>Trainer``): the window data
    path, resumable runs and checkpoints only this run evaluates."""
