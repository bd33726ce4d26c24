"""Files that are whole or absent, even with several writers: each writer fills a temporary file of its own
beside the target and renames it onto the target when done.

Why a name per writer: runs side by side (the benchmark's ``--jobs``, Ray Tune trials) may build the same
dataset file at once on first use. With one shared temporary name, a writer renames the other's
half-written file into place and then fails to find its own (``FileNotFoundError``).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replaced_when_whole(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary path beside ``path``; when the block ends without an error it replaces ``path``
    (an atomic rename), otherwise it is deleted and ``path`` is left as it was."""
    path = Path(path)
    handle, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(handle)
    try:
        yield Path(partial)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
