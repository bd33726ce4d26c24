"""Dropout that is cheap on a CPU and, inside :func:`keyed_dropout`, a pure function of a key.

Why keyed masks: a federated client's local steps must draw the same dropout masks whichever execution
backend runs it (alone, in a Ray actor, or stacked with other clients under ``torch.func.vmap``), so that
every backend trains the same round. A mask is then a hash of (the step's key, the call's rank in the
step, the element's index), not a draw from a random generator. Outside :func:`keyed_dropout` the masks
are random, as ``nn.Dropout``'s.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recbole_feddmmr.vmapping import in_vmap_mode

_dropout_key = threading.local()


@contextmanager
def keyed_dropout(key: Tensor | None) -> Iterator[None]:
    """Within this block every :func:`fast_dropout` and :class:`KeyedDropout` call draws its mask from
    ``key`` (an int64 scalar tensor, batched under ``vmap``), the call's rank in the block and each element's
    flat index, not from a random generator. The same key gives the same masks whether one client's forward
    runs alone or among clients stacked by ``vmap`` (padding only ever extends a tensor's first dimension,
    so an element keeps its index). ``None``: the usual random masks."""
    previous = getattr(_dropout_key, "state", None)
    _dropout_key.state = None if key is None else [key, 0]  # [key, dropout calls so far]
    try:
        yield
    finally:
        _dropout_key.state = previous


# splitmix64's constants as signed int64 (torch's int64 arithmetic wraps, as the hash needs)
_GOLDEN, _MIX1, _MIX2 = -7046029254386353131, -4658895280553007687, -7723592293110705685


def _shift_right(x: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 (torch's ``>>`` extends the sign, which would pin the hash's top bit)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix64(x: Tensor) -> Tensor:
    """splitmix64's finaliser, elementwise on int64: every output bit depends on every input bit."""
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    return x ^ _shift_right(x, 31)


def keyed_bytes(key: Tensor, call: int, shape: torch.Size, rows: Tensor | None = None) -> Tensor:
    """Uniform bytes (uint8) of ``shape``, a pure function of (``key``, ``call``, element index); with ``rows``
    [R] (for ``shape`` [R, W]) an element's index is (its row's id, its column) instead of its position. One
    64-bit hash gives eight elements' bytes (read little-endian through ``view``, which ``vmap`` batches)."""
    stream = _mix64(key * _GOLDEN + call)  # [] (one per client under vmap)
    if rows is None:
        words = torch.arange(-(-math.prod(shape) // 8), dtype=torch.int64, device=key.device)  # [ceil(n / 8)]
        return _mix64(words * _GOLDEN + stream).view(torch.uint8)[: math.prod(shape)].view(shape)
    per_row = -(-shape[-1] // 8)
    words = rows[:, None] * per_row + torch.arange(per_row, device=key.device)  # [R, ceil(W / 8)]
    return _mix64(words * _GOLDEN + stream).view(torch.uint8)[:, : shape[-1]]  # [R, W]


def keyed_mask_dropout(x: Tensor, p: float, rows: Tensor | None = None) -> Tensor:
    """Inverted dropout of ``x`` with the mask of the current :func:`keyed_dropout` key and call."""
    keyed = _dropout_key.state
    key, call = keyed
    keyed[1] += 1
    threshold = round(p * 256)  # the rate rounded to 1/256, as the random-byte masks of fast_dropout
    return x * (keyed_bytes(key, call, x.shape, rows) >= threshold) * (256.0 / (256 - threshold))


def fast_dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Inverted dropout whose CPU mask costs ~10x less than ``F.dropout``'s.

    On CPU ``bernoulli_`` spends ~10 ns per element, more than the whole
    SASRec block around it. Here the mask comes from random bytes of
    ``int64.random_()`` (7 uniform bytes per word, the 8th is not uniform):
    an element is kept when its byte is >= round(256 p), so the effective rate
    is p rounded to 1/256 (0.1 -> 0.102), and kept values are scaled by the
    exact keep probability. On other devices this is ``F.dropout``. Inside :func:`keyed_dropout` the mask
    is a function of the key instead (a federated client's steps: every backend then draws the same masks).
    """
    if not training or p == 0.0:
        return x
    if getattr(_dropout_key, "state", None) is not None:
        return keyed_mask_dropout(x, p)
    if x.device.type != "cpu" or in_vmap_mode():
        return F.dropout(x, p, training=True)
    threshold = round(p * 256)
    words = torch.empty(-(-x.numel() // 7), dtype=torch.int64).random_()  # [W], 63 random bits each
    random_bytes = words.view(torch.uint8).view(-1, 8)[:, :7].reshape(-1)[: x.numel()].view(x.shape)
    return x * (random_bytes >= threshold) * (256.0 / (256 - threshold))


class KeyedDropout(nn.Dropout):
    """Dropout with :func:`fast_dropout`'s masks (``nn.Dropout``'s ``bernoulli_`` cost the router's
    [items, hidden] masks ~3 ms a step on a CPU) that takes the keyed masks inside :func:`keyed_dropout`;
    ``rows`` as for :func:`keyed_bytes`."""

    def forward(self, x: Tensor, rows: Tensor | None = None) -> Tensor:
        if self.training and self.p > 0 and getattr(_dropout_key, "state", None) is not None:
            return keyed_mask_dropout(x, self.p, rows)
        return fast_dropout(x, self.p, self.training)


class FastDropout(nn.Module):
    """``nn.Dropout`` with :func:`fast_dropout`."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return fast_dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
