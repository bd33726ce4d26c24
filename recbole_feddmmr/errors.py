"""The errors the plugin raises on purpose, and how its commands report them.

Each error's message names the file or the option at fault and the fix, so a command prints it as one
line (``error: ...``) and exits with status 2 instead of a traceback. Every class also derives from the
built-in error it refines (``ValueError``, ``FileNotFoundError``, ...), so callers catching those keep
working. Anything else (a bug) still ends in a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


class FedDMMRError(Exception):
    """An error the plugin raises on purpose: its message says what is wrong and how to fix it."""


class ConfigError(FedDMMRError, ValueError):
    """A setting (yaml, ``--key=value`` or config dict) that cannot run."""


class DataFileError(FedDMMRError, ValueError):
    """A dataset file (atomic ``.inter`` / ``.item`` / ``.itememb``) that must not be trained on."""


class MissingFileError(FedDMMRError, FileNotFoundError):
    """A file or folder a command needs and that is not there."""


class CheckpointError(FedDMMRError, RuntimeError):
    """A checkpoint or resume file that is corrupt or was written by another run or model."""


def run_cli(main: Callable[[], Any]) -> Any:
    """Run a command's ``main`` and return what it returns; an error raised on purpose ends the process
    with one line on stderr and status 2."""
    try:
        return main()
    except FedDMMRError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
