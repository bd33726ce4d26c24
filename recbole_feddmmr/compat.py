"""The one place that makes RecBole 1.2.1 run on today's stack.

RecBole 1.2.1 was written for numpy 1.x and torch < 2.6. Two things break:

* numpy 2 removed ``np.float_``, ``np.complex_`` and ``np.unicode_``, which
  ``recbole.config.Config.compatibility_settings`` reads on every Config. We
  restore them as aliases of the types they always meant.
* torch >= 2.6 defaults ``torch.load(weights_only=True)``, which refuses RecBole's
  checkpoints because they pickle the whole Config. ``Trainer.evaluate`` (loading
  the best model) and ``Trainer.resume_checkpoint`` call ``torch.load`` directly.
  Those checkpoints are files this process (or the user) wrote, so loading them
  with ``weights_only=False`` is safe; :class:`TrustedCheckpointMixin` does that
  for RecBole's own trainers and for ours.

RecBole also slows every model down: importing its sequential models (``recbole.model.sequential_recommender``,
which RecBole's model lookup and the plugin's feature-aware baselines import) runs ``sine.py``, whose module
body calls ``torch.autograd.set_detect_anomaly(True)`` for the whole process. Anomaly mode records a
traceback at every forward operation and checks every gradient for NaN, a fixed cost per operation (a full
federated round of ml-100k took ~170 s with it and ~75 s without; the README's round-against-epoch runs).
The plugin imports RecBole's models under :func:`keep_anomaly_mode`, which puts the mode back as it was.

pandas 3 also breaks RecBole's float_seq loading; that is handled by pinning
``pandas<3`` in requirements.txt rather than by patching. On pandas 2.2 RecBole's dataset loading
(``df[field].fillna(..., inplace=True)``, ``Series.agg(len)``) emits five multi-line ``FutureWarning``s per
run about what pandas 3 will change; under the pinned pandas the results are right, so
:func:`silence_recbole_pandas_warnings` filters exactly those messages, from RecBole's dataset module only.
"""

from __future__ import annotations

import functools
import os
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from recbole_feddmmr.errors import CheckpointError

_NUMPY_ALIASES = {"float_": np.float64, "complex_": np.complex128, "unicode_": np.str_}


def apply_numpy_aliases() -> None:
    """Re-create the numpy 1.x aliases RecBole reads (idempotent, no-op on numpy 1)."""
    for name, target in _NUMPY_ALIASES.items():
        if name not in np.__dict__:
            setattr(np, name, target)


RECBOLE_PANDAS_DEPRECATIONS = (
    r"A value is trying to be set on a copy of a DataFrame or Series through chained assignment",
    r"using <built-in function len> in Series\.agg cannot aggregate",
)


def silence_recbole_pandas_warnings() -> None:
    """Ignore the pandas-3 deprecation warnings RecBole 1.2.1's dataset module raises (idempotent)."""
    for message in RECBOLE_PANDAS_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning, module=r"recbole\.data\.dataset")


@contextmanager
def keep_anomaly_mode() -> Iterator[None]:
    """Run an import of RecBole's models without letting it switch torch's anomaly detection on (see above);
    a user who wants anomaly detection keeps it, before or after."""
    enabled, check_nan = torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled()
    try:
        yield
    finally:
        torch.autograd.set_detect_anomaly(enabled, check_nan)


def load_trusted(path, map_location=None):
    """``torch.load`` of a file this project wrote (a checkpoint, a federated resume state): they pickle
    configs and numpy RNG states, which ``weights_only=True`` refuses. Never call it on a file from elsewhere."""
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


@contextmanager
def trusted_checkpoint_loading() -> Iterator[None]:
    """Within this block ``torch.load`` unpickles full RecBole checkpoints."""
    original = torch.load
    torch.load = functools.partial(original, weights_only=False)
    try:
        yield
    finally:
        torch.load = original


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

    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        if load_best_model and model_file is None:
            self._check_own_checkpoint(self.saved_model_file)
        with trusted_checkpoint_loading():
            return super().evaluate(
                eval_data, load_best_model=load_best_model, model_file=model_file, show_progress=show_progress
            )

    def _check_own_checkpoint(self, path: str) -> None:
        from recbole_feddmmr.config import config_fingerprint

        saved = read_checkpoint(path).get("config")
        if saved is None or config_fingerprint(saved) != config_fingerprint(self.config):
            raise CheckpointError(
                f"{path} was not written by this run (its configuration differs): refusing to evaluate it"
            )

    def resume_checkpoint(self, resume_file):
        with trusted_checkpoint_loading():
            return super().resume_checkpoint(resume_file)


@functools.cache
def with_trusted_checkpoints(trainer_class: type) -> type:
    """``trainer_class`` with :class:`TrustedCheckpointMixin` in front (cached, one class per input)."""
    if issubclass(trainer_class, TrustedCheckpointMixin):
        return trainer_class
    return type(trainer_class.__name__, (TrustedCheckpointMixin, trainer_class), {})


apply_numpy_aliases()
silence_recbole_pandas_warnings()
