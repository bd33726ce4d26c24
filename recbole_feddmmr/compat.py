"""The one place that makes RecBole 1.2.1 run on today's stack, installed by one explicit call.

RecBole 1.2.1 was written for numpy 1.x, pandas 1.x and torch < 2.6. What breaks, and what :func:`install`
does about it (the entry points call it: the command-line tools, :func:`recbole_feddmmr.run_recbole_feddmmr`,
:func:`recbole_feddmmr.load_checkpoint`; importing the package patches nothing):

* numpy 2 removed ``np.float_``, ``np.complex_`` and ``np.unicode_``, which
  ``recbole.config.Config.compatibility_settings`` reads on every Config: restored as aliases of the types
  they always meant (the plugin's Config also does this when it is built, so a script that builds one
  directly works too).
* pandas 2.2 makes RecBole's dataset loading (``df[field].fillna(..., inplace=True)``, ``Series.agg(len)``)
  emit five multi-line ``FutureWarning``s per run about what pandas 3 will change; under the pinned
  ``pandas<3`` (requirements.txt: pandas 3 breaks RecBole's float_seq loading) the results are right, so
  exactly those messages, from RecBole's dataset module only, are filtered.
* importing RecBole's sequential models runs ``sine.py``, whose module body calls
  ``torch.autograd.set_detect_anomaly(True)`` for the whole process: anomaly mode records a traceback at
  every forward operation (1.6-3.7x slower for every model). The plugin imports RecBole's models under
  :func:`keep_anomaly_mode`, which puts the mode back as it was.

torch >= 2.6's ``torch.load(weights_only=True)`` refuses RecBole's checkpoints: the plugin's trainers read
them with :mod:`recbole_feddmmr.checkpoints` instead of patching ``torch.load``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

_NUMPY_ALIASES = {"float_": np.float64, "complex_": np.complex128, "unicode_": np.str_}
RECBOLE_PANDAS_DEPRECATIONS = (
    r"A value is trying to be set on a copy of a DataFrame or Series through chained assignment",
    r"using <built-in function len> in Series\.agg cannot aggregate",
)


def apply_numpy_aliases() -> None:
    """Re-create the numpy 1.x aliases RecBole reads (idempotent, no-op on numpy 1)."""
    for name, target in _NUMPY_ALIASES.items():
        if name not in np.__dict__:
            setattr(np, name, target)


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


def install() -> None:
    """Make this process run RecBole 1.2.1 on numpy 2 and pandas 2.2 (see the module docstring); idempotent."""
    apply_numpy_aliases()
    silence_recbole_pandas_warnings()
