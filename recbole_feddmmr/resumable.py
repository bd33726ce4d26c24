"""A RecBole trainer's ``fit`` that a killed run continues where it stopped.

After each validation (at most every ``resume_every_s`` seconds, when that is set), ``fit(saved=True)`` writes
the run's whole training state to ``<checkpoint_dir>/<model>-<dataset>-seed<seed>-<fingerprint>.resume.pth``:
the model and its optimizer, the epoch, early stopping's state, the best checkpoint's file and epoch, every
random generator the next epoch draws from (torch, CUDA, numpy, Python, and the training dataloader's
shuffling generator) and what the caller records along the way (``run_records``). The same command run
again restores it and goes on with the next epoch, so the resumed run ends where the uninterrupted one
would have (the tests check it). The file's name carries the configuration's fingerprint, so a run of other
settings never reads it; a finished ``fit`` removes it. ``fit(saved=False)`` (e.g. a Ray Tune trial) neither
writes nor reads it: without the best checkpoint, a resumed run could not evaluate its best epoch.

Why after each validation: a centralised epoch is long beside the save (ml-100k on a 2-core CPU: 20-180 s
per epoch, a few MB of state, or ~85 MB with UR4RecV2MoE's memory of every user), and early stopping's
state only changes there. The federated trainer keeps its own loop and uses the same file, the same progress
state (:meth:`ResumableFitMixin._progress_state`) and the same generators, adding only its server's state.
"""

from __future__ import annotations

import functools
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from recbole.utils import early_stopping

from recbole_feddmmr.atomic_write import replaced_when_whole
from recbole_feddmmr.checkpoints import read_checkpoint, with_trusted_checkpoints
from recbole_feddmmr.errors import CheckpointError
from recbole_feddmmr.fingerprint import config_fingerprint
from recbole_feddmmr.provenance import git_commit, machine_description


def rng_states(device: torch.device) -> dict[str, Any]:
    """The global random generators' states: torch's, CUDA's (dropout on CUDA draws there), numpy's, Python's."""
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any], device: torch.device) -> None:
    """Undo :func:`rng_states`'s snapshot (its tensors may come back on any device)."""
    torch.set_rng_state(states["torch"].cpu())  # RNG states are CPU byte tensors, whatever map_location
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state_all([state.cpu() for state in states["cuda"]])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])


def save_atomically(state: dict[str, Any], path: Path) -> None:
    """``torch.save`` to a temporary name, then a rename: a kill during the write leaves the old file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with replaced_when_whole(path) as partial:
        torch.save(state, partial)


class ResumableFitMixin:
    """Mix in front of a RecBole trainer (after :class:`~recbole_feddmmr.compat.TrustedCheckpointMixin`, whose
    ``best_epoch`` and run-owned checkpoint names it keeps)."""

    def __init__(self, config, model) -> None:
        # what the run records along the way and wants back after a resume: seconds per training epoch
        # ("epoch_seconds", every epoch this run trained), the trainer's own records (e.g. the memory's
        # statistics per epoch) and a caller's (e.g. a benchmark's validation curve); set before the trainer
        # below is built, so that it can record into it
        self.run_records: dict[str, Any] = {}
        super().__init__(config, model)
        # named by the fingerprint: runs of other settings (e.g. side by side in a benchmark) never share one
        self.run_fingerprint = config_fingerprint(config)
        kind = "-federated" if config["federated"] else ""
        name = f"{config['model']}-{config['dataset']}{kind}-seed{config['seed']}-{self.run_fingerprint}.resume.pth"
        self.resume_file = Path(config["checkpoint_dir"]) / name
        # one entry per process that trained this run: the epoch it started at, its commit and machine
        self.segments: list[dict[str, Any]] = []
        self.elapsed_before_resume = 0.0  # seconds of fit spent by the processes before this one
        self._fit_started = time.perf_counter()

    def fit_elapsed(self) -> float:
        """Seconds of ``fit`` so far (training and validation), the interrupted processes' included."""
        return self.elapsed_before_resume + time.perf_counter() - self._fit_started

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        """RecBole's ``fit``, resumable (with ``saved``), and always ending with a validated model: when the
        last epoch trained was not validated (``eval_step`` does not divide ``epochs``, or exceeds it), it is
        validated after the loop, so the best checkpoint exists and is the best of what was validated."""
        finished = self._resume_fit_if_interrupted(train_data) if saved else False
        self._start_segment()
        if finished:  # killed between its last validation and the end of fit: nothing is left to train
            self.resume_file.unlink(missing_ok=True)
            return self.best_valid_score, self.best_valid_result
        every = self.config["resume_every_s"] or 0
        last_save = -float("inf")
        validated: set[int] = set()

        def after_validation(epoch_idx: int, valid_score: float) -> None:
            nonlocal last_save
            validated.add(epoch_idx)
            self._step_lr_schedule(epoch_idx, valid_score)
            if callback_fn:  # first, so that what it records is part of the saved state
                callback_fn(epoch_idx, valid_score)
            if saved and self.fit_elapsed() - last_save >= every:
                self._save_resume_state(epoch_idx, train_data)
                last_save = self.fit_elapsed()

        self._last_trained_epoch: int | None = None
        super().fit(train_data, valid_data, verbose, saved, show_progress, after_validation)
        last = self._last_trained_epoch
        if valid_data and self.eval_step > 0 and last is not None and last not in validated:
            self._validate_final_epoch(last, valid_data, saved, verbose, show_progress, callback_fn)
        self.resume_file.unlink(missing_ok=True)  # finished: the same command starts afresh
        return self.best_valid_score, self.best_valid_result

    def _step_lr_schedule(self, epoch_idx: int, valid_score: float) -> None:
        """Feed the validation to the trainer's ``lr_scheduler`` (a plateau schedule), if it has one."""
        scheduler = getattr(self, "lr_scheduler", None)
        if scheduler is None:
            return
        before = [group["lr"] for group in self.optimizer.param_groups]
        scheduler.step(valid_score)
        after = [group["lr"] for group in self.optimizer.param_groups]
        if after != before:
            self.logger.info(
                f"epoch {epoch_idx}: validation on a plateau, learning rate {before[0]:.3g} -> {after[0]:.3g}"
            )
        self.run_records.setdefault("learning_rate", []).append((epoch_idx, after[0]))

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        started = time.perf_counter()
        loss = super()._train_epoch(train_data, epoch_idx, loss_func=loss_func, show_progress=show_progress)
        self.run_records.setdefault("epoch_seconds", []).append(time.perf_counter() - started)
        self._last_trained_epoch = epoch_idx
        return loss

    def _validate_final_epoch(self, epoch_idx, valid_data, saved, verbose, show_progress, callback_fn) -> None:
        """Validate ``epoch_idx``, the last one trained, as RecBole's loop validates an epoch."""
        valid_score, valid_result = self._valid_epoch(valid_data, show_progress=show_progress)
        self.best_valid_score, self.cur_step, _, improved = early_stopping(
            valid_score, self.best_valid_score, self.cur_step, max_step=self.stopping_step,
            bigger=self.valid_metric_bigger,
        )  # fmt: skip
        if verbose:
            self.logger.info(f"epoch {epoch_idx} (the last) evaluating [valid_score: {valid_score:.6f}]")
        self.tensorboard.add_scalar("Vaild_score", valid_score, epoch_idx)  # RecBole's tag, typo included
        if improved:
            if saved:
                self._save_checkpoint(epoch_idx, verbose=verbose)
            self.best_valid_result = valid_result
        if callback_fn:
            callback_fn(epoch_idx, valid_score)

    def _start_segment(self) -> None:
        self.segments.append({"from_epoch": self.start_epoch, "commit": git_commit(), "machine": machine_description()})
        self._fit_started = time.perf_counter()

    # ------------------------------------------------------------ the state every resumable loop shares
    def _progress_state(self, epoch_idx: int) -> dict[str, Any]:
        """Where training stands after ``epoch_idx`` (an epoch, or a federated round): early stopping, the best
        checkpoint, the records, the time spent and the global random generators. Each loop adds its weights."""
        return {
            "fingerprint": self.run_fingerprint,
            "epoch": epoch_idx,
            "elapsed_seconds": self.fit_elapsed(),  # so a resumed run keeps its time budget and throughput
            "cur_step": self.cur_step,
            "best_valid_score": self.best_valid_score,
            "best_valid_result": self.best_valid_result,
            "saved_model_file": self.saved_model_file,
            "best_epoch": self.best_epoch,
            "train_loss_dict": self.train_loss_dict,
            "run_records": self.run_records,
            "segments": self.segments,
            "rng": rng_states(self.device),
            "lr_scheduler": scheduler.state_dict() if (scheduler := getattr(self, "lr_scheduler", None)) else None,
        }

    def _read_resume_state(self, weights_key: str) -> dict[str, Any] | None:
        """The resume file's state (tensors on this run's device), None when there is none. Refused when another
        configuration or another kind of loop (no ``weights_key``) wrote it, or its best checkpoint is gone."""
        if not self.resume_file.exists():
            return None
        state = read_checkpoint(self.resume_file, map_location=self.device)
        if state.get("fingerprint") != self.run_fingerprint or weights_key not in state or "epoch" not in state:
            raise CheckpointError(f"{self.resume_file} belongs to a run with other settings: delete it to start afresh")
        if state["best_epoch"] is not None and not os.path.exists(state["saved_model_file"]):
            raise CheckpointError(
                f"{self.resume_file} resumes a run whose best checkpoint {state['saved_model_file']} is gone: "
                "delete the resume file to start afresh"
            )
        return state

    def _restore_progress_state(self, state: dict[str, Any]) -> None:
        """Undo :meth:`_progress_state`: training goes on with the epoch (or round) after the saved one."""
        self.start_epoch = state["epoch"] + 1
        self.cur_step, self.best_valid_score = state["cur_step"], state["best_valid_score"]
        self.best_valid_result, self.best_epoch = state["best_valid_result"], state["best_epoch"]
        self.saved_model_file, self.train_loss_dict = state["saved_model_file"], state["train_loss_dict"]
        self.run_records.clear()
        self.run_records.update(state["run_records"])
        self.segments = state["segments"]
        self.elapsed_before_resume = state["elapsed_seconds"]
        restore_rng_states(state["rng"], self.device)
        scheduler = getattr(self, "lr_scheduler", None)
        if scheduler is not None and state.get("lr_scheduler") is not None:
            scheduler.load_state_dict(state["lr_scheduler"])

    # ------------------------------------------------------------ RecBole's epoch loop
    def _save_resume_state(self, epoch_idx: int, train_data) -> None:
        state = self._progress_state(epoch_idx)
        state.update(
            # RecBole stops once cur_step passes stopping_step, or after the last epoch
            finished=self.cur_step > self.stopping_step or epoch_idx + 1 >= self.epochs,
            state_dict=self.model.state_dict(),
            other_parameter=self.model.other_parameter(),
            optimizer=self.optimizer.state_dict(),
            # RecBole's training dataloader shuffles with a generator of its own
            loader_rng=train_data.generator.get_state() if hasattr(train_data, "generator") else None,
        )
        save_atomically(state, self.resume_file)

    def _resume_fit_if_interrupted(self, train_data) -> bool:
        """Restore the resume state if there is one. -> whether that run had already finished training."""
        state = self._read_resume_state("optimizer")
        if state is None:
            return False
        self.model.load_state_dict(state["state_dict"])
        self.model.load_other_parameter(state["other_parameter"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._restore_progress_state(state)
        if state["loader_rng"] is not None:
            train_data.generator.set_state(state["loader_rng"].cpu())
        self.logger.info(f"resuming the interrupted run from epoch {self.start_epoch} ({self.resume_file})")
        return state["finished"]


@functools.cache
def with_resumable_fit(trainer_class: type) -> type:
    """``trainer_class`` with :class:`ResumableFitMixin` and :class:`TrustedCheckpointMixin` in front, as the
    plugin's own trainers have them (cached, one class per input)."""
    if issubclass(trainer_class, ResumableFitMixin):
        return trainer_class
    return type(trainer_class.__name__, (ResumableFitMixin, with_trusted_checkpoints(trainer_class)), {})
