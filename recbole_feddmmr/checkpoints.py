"""Checkpoints this project writes, read back safely on torch >= 2.6, and never confused between runs.

torch >= 2.6 defaults ``torch.load(weights_only=True)``, which refuses RecBole's checkpoints because they
pickle the whole Config. :class:`TrustedCheckpointMixin` loads them itself with ``weights_only=False``
(they are files this process or the user wrote) wherever RecBole's trainer would call ``torch.load``
(loading the best model before a test, resuming), so ``torch.load`` itself is never patched.
"""

from __future__ import annotations

import functools
import os
import uuid
from typing import Any

import torch

from recbole_feddmmr.errors import CheckpointError
from recbole_feddmmr.fingerprint import config_fingerprint


def load_trusted(path, map_location=None) -> Any:
    """``torch.load`` of a file this project wrote (a checkpoint, a resume state): they pickle configs and
    numpy RNG states, which ``weights_only=True`` refuses. Never call it on a file from elsewhere."""
    return torch.load(path, map_location=map_location, weights_only=False)


def read_checkpoint(path, map_location="cpu") -> dict:
    """A checkpoint or resume file this project wrote, or :class:`CheckpointError` naming what is wrong."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint {path}")
    try:
        state = load_trusted(path, map_location=map_location)
    except Exception as error:  # a truncated or foreign file fails in pickle, zipfile or torch, variously
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(error).__name__}: {error})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a checkpoint of this project")
    return state


class TrustedCheckpointMixin:
    """Mix into a RecBole trainer so best-model loading and resuming work on torch >= 2.6, and so that a run
    never evaluates another run's checkpoint.

    RecBole names a checkpoint ``<model>-<date>_<time to the second>.pth``: two runs of a model started in
    the same second write, and then evaluate, the same file (one run's test metrics would come from the
    other's model). Here each run's file also carries its dataset and a random suffix, and loading the
    best model refuses a checkpoint whose configuration is not this run's.
    """

    def __init__(self, config, model) -> None:
        from recbole.utils import get_local_time

        # RecBole's trainer creates the folder by check-then-create, which two runs started side by side (the
        # benchmarks' process pools) can race into a FileExistsError; created here first, that cannot happen
        os.makedirs(config["checkpoint_dir"], exist_ok=True)
        super().__init__(config, model)
        kind = "-federated" if config["federated"] else ""
        stem = f"{config['model']}-{config['dataset']}{kind}-{get_local_time()}-{uuid.uuid4().hex[:8]}"
        self.saved_model_file = os.path.join(self.checkpoint_dir, f"{stem}.pth")
        self.best_epoch: int | None = None  # the epoch (round) of the checkpoint last saved

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        """RecBole's checkpoint, written to a temporary name and renamed: a crash or kill during the write
        leaves the previous checkpoint whole."""
        target = kwargs.pop("saved_model_file", self.saved_model_file)
        partial = f"{target}.partial"
        super()._save_checkpoint(epoch, verbose=False, saved_model_file=partial, **kwargs)
        if not os.path.exists(partial):  # a non-zero rank of a distributed run writes nothing
            return
        os.replace(partial, target)
        self.best_epoch = epoch
        if verbose:
            self.logger.info(f"Saving current: {target}")

    def _generate_train_loss_output(self, epoch_idx, s_time, e_time, losses):
        """RecBole's epoch line, with the model's names for the parts of its loss (``loss_names``) instead
        of ``train_loss1``, ``train_loss2``."""
        line = super()._generate_train_loss_output(epoch_idx, s_time, e_time, losses)
        for index, name in enumerate(getattr(self.model, "loss_names", ()), start=1):
            line = line.replace(f"train_loss{index}", name)
        return line

    def load_checkpoint_weights(self, path: str) -> dict:
        """Load a checkpoint's weights (and the model's other parameters) into this trainer's model -> the
        checkpoint."""
        checkpoint = read_checkpoint(path, map_location=self.device)
        self.model.load_state_dict(checkpoint["state_dict"])
        self.model.load_other_parameter(checkpoint.get("other_parameter"))
        return checkpoint

    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        """RecBole's evaluation; the best model (or ``model_file``) is loaded here, not by RecBole's
        ``torch.load``, and this run's own best checkpoint is checked to be its own."""
        if load_best_model and eval_data:
            path = model_file or self.saved_model_file
            if model_file is None:
                self._check_own_checkpoint(path)
            self.load_checkpoint_weights(path)
            self.logger.info(f"Loading model structure and parameters from {path}")
        return super().evaluate(eval_data, load_best_model=False, show_progress=show_progress)

    def _check_own_checkpoint(self, path: str) -> None:
        saved = read_checkpoint(path).get("config")
        if saved is None or config_fingerprint(saved) != config_fingerprint(self.config):
            raise CheckpointError(
                f"{path} was not written by this run (its configuration differs): refusing to evaluate it"
            )

    def resume_checkpoint(self, resume_file):
        """RecBole's resume from one of its checkpoints, read with :func:`load_trusted`."""
        checkpoint = self.load_checkpoint_weights(str(resume_file))
        self.saved_model_file = str(resume_file)
        self.start_epoch = checkpoint["epoch"] + 1
        self.cur_step, self.best_valid_score = checkpoint["cur_step"], checkpoint["best_valid_score"]
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.logger.info(f"Checkpoint loaded. Resume training from epoch {self.start_epoch}")


@functools.cache
def with_trusted_checkpoints(trainer_class: type) -> type:
    """``trainer_class`` with :class:`TrustedCheckpointMixin` in front (cached, one class per input)."""
    if issubclass(trainer_class, TrustedCheckpointMixin):
        return trainer_class
    return type(trainer_class.__name__, (TrustedCheckpointMixin, trainer_class), {})
