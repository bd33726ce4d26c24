"""User memories that feed the visual and semantic experts.

A memory answers one question: for each sample of a batch, which multimodal
features may the experts attend to? Its answer is a :class:`MemoryReadout`
of features plus validity masks (an invalid slot gets exactly zero attention).
This module knows nothing about RecBole or federation: only item ids,
sequences and feature tables.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn


class MemoryReadout(NamedTuple):
    """What the experts read. A modality the dataset lacks is ``None`` with an all-False mask."""

    visual: Tensor | None  # [B, K, Fv]
    visual_mask: Tensor  # [B, K] bool
    text: Tensor | None  # [B, K, Ft]
    text_mask: Tensor  # [B, K] bool


class ItemFeatures(nn.Module):
    """Per-item feature tables and availability flags (row 0 = padding item, never available).

    Buffers are non-persistent: they are data, rebuilt from the dataset, not learned weights.
    """

    def __init__(
        self,
        visual: Tensor | None = None,
        text: Tensor | None = None,
        visual_available: Tensor | None = None,
        text_available: Tensor | None = None,
    ) -> None:
        super().__init__()
        for name, table, available in (("visual", visual, visual_available), ("text", text, text_available)):
            if table is not None and available is None:
                available = table.abs().sum(dim=1) > 0  # an all-zero row is a missing feature
            if table is not None:
                available = available.clone().bool()
                available[0] = False
            self.register_buffer(name, None if table is None else table.float(), persistent=False)  # [n_items, F]
            self.register_buffer(f"{name}_available", available, persistent=False)  # [n_items]

    @property
    def has_visual(self) -> bool:
        return self.visual is not None and bool(self.visual_available.any())

    @property
    def has_text(self) -> bool:
        return self.text is not None and bool(self.text_available.any())


class RecentHistoryMemory(nn.Module):
    """Stand-in memory: the features of the user's ``top_k`` most recent items before the prediction point.

    It reads only the sample's own input sequence, which by construction ends
    strictly before the target, so nothing from the future is visible.
    """

    def __init__(self, features: ItemFeatures, top_k: int = 20) -> None:
        super().__init__()
        if top_k < 1:
            raise ValueError(f"memory top_k must be >= 1, got {top_k}")
        self.features = features
        self.top_k = top_k

    def retrieve(self, user_ids: Tensor, item_seq: Tensor, item_seq_len: Tensor) -> MemoryReadout:
        """``item_seq`` [B, L] right-padded, ``item_seq_len`` [B] -> slots most recent first, K = top_k."""
        del user_ids  # the history is in the sequence itself
        offsets = torch.arange(self.top_k, device=item_seq.device)  # [K]
        positions = item_seq_len.long()[:, None] - 1 - offsets[None, :]  # [B, K]
        in_history = positions >= 0
        items = item_seq.gather(1, positions.clamp(min=0)) * in_history  # [B, K], 0 = empty slot
        features = self.features
        no_slot = torch.zeros_like(in_history)
        visual_mask = no_slot if features.visual is None else in_history & features.visual_available[items]
        text_mask = no_slot if features.text is None else in_history & features.text_available[items]
        return MemoryReadout(
            visual=None if features.visual is None else features.visual[items],  # [B, K, Fv]
            visual_mask=visual_mask,
            text=None if features.text is None else features.text[items],  # [B, K, Ft]
            text_mask=text_mask,
        )
