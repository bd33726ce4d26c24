"""A switch the layers read and execution code sets: whether the model now runs under ``torch.func.vmap``.

It lives here, in neither the model nor the federated package, so that each knows only this switch and not
the other: the federated vectorized backend turns it on, the layers pick vmap-friendly ops while it is on.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

_vmap_mode = threading.local()


@contextmanager
def vmap_mode() -> Iterator[None]:
    """Inside, the layers use only ops that ``torch.func.vmap`` batches: :func:`fast_dropout` is ``F.dropout``
    (each vmapped sample draws its own mask; the fast path's in-place random bytes cannot run), and causal
    attention is written out (the fused CPU kernel has no batching rule and would run sample by sample)."""
    previous = in_vmap_mode()
    _vmap_mode.on = True
    try:
        yield
    finally:
        _vmap_mode.on = previous


def in_vmap_mode() -> bool:
    return getattr(_vmap_mode, "on", False)
