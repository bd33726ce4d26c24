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

pandas 3 also breaks RecBole's float_seq loading; that is handled by pinning
``pandas<3`` in requirements.txt rather than by patching.
"""

from __future__ import annotations

import functools
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

_NUMPY_ALIASES = {"float_": np.float64, "complex_": np.complex128, "unicode_": np.str_}


def apply_numpy_aliases() -> None:
    """Re-create the numpy 1.x aliases RecBole reads (idempotent, no-op on numpy 1)."""
    for name, target in _NUMPY_ALIASES.items():
        if name not in np.__dict__:
            setattr(np, name, target)


def load_trusted(path, map_location=None):
    """``torch.load`` of a file this project wrote (a checkpoint, a federated resume state): they pickle
    configs and numpy RNG states, which ``weights_only=True`` refuses. Never call it on a file from elsewhere."""
    return torch.load(path, map_location=map_location, weights_only=False)


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

        super().__init__(config, model)
        stem = f"{config['model']}-{config['dataset']}-{get_local_time()}-{uuid.uuid4().hex[:8]}"
        self.saved_model_file = os.path.join(self.checkpoint_dir, f"{stem}.pth")

    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        if load_best_model and model_file is None:
            self._check_own_checkpoint(self.saved_model_file)
        with trusted_checkpoint_loading():
            return super().evaluate(
                eval_data, load_best_model=load_best_model, model_file=model_file, show_progress=show_progress
            )

    def _check_own_checkpoint(self, path: str) -> None:
        from recbole_feddmmr.config import config_fingerprint

        saved = load_trusted(path, map_location="cpu").get("config")
        if saved is None or config_fingerprint(saved) != config_fingerprint(self.config):
            raise RuntimeError(
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
