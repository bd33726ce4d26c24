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

from recbole_feddmmr.errors import ConfigError


class MemoryReadout(NamedTuple):
    """What the experts read. A modality the dataset lacks is ``None`` with an all-False mask."""

    visual: Tensor | None  # [B, K, Fv]
    visual_mask: Tensor  # [B, K] bool
    text: Tensor | None  # [B, K, Ft]
    text_mask: Tensor  # [B, K] bool


class MemoryWrites(NamedTuple):
    """Interactions a training step offers to the memory (written if their surprise passes the threshold)."""

    users: Tensor  # [P] memory rows (user ids)
    items: Tensor  # [P] the interacted items
    surprise: Tensor  # [P] in (0, 1)
    times: Tensor | None  # [P] interaction times


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
            raise ConfigError(f"memory top_k must be >= 1, got {top_k}")
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


class LocalDynamicMemory(nn.Module):
    """FedDMMR's private per-user memory: surprise-gated writes, utility-based eviction.

    Every user owns ``capacity`` slots, stored for all users at once as ``[num_users, capacity, *]``
    tensors, so a batch's writes and reads are batched tensor operations on CPU or GPU. A slot holds an
    item id (-1 = empty), the item's visual and text features (with per-modality validity), the
    interaction's time, a write count, the training step of its last write and the surprise of that write.

    Surprise is computed by the caller; UR4RecV2MoE uses ``1 - sigmoid(s_pos - mean_j s_neg_j)`` in (0, 1):
    0.5 means the positive scored like the average negative, so the default threshold 0.5 writes the
    interactions the model ranked below the average negative, i.e. the ones it did not expect.

    Utility (for eviction and for ranking reads) is ``alpha * decay ** (step - last_write) + beta * log1p(count)``:
    recency in training steps since the slot was last written, and frequency as the log of its write count.
    Reads do not refresh recency: a read-time refresh would let the retrieved slots keep themselves alive,
    and it would make evaluation mutate the model.

    A re-seen item updates its slot (count + 1, last write, surprise) and keeps the later of the two
    interaction times, so a slot is never visible to a sample that precedes any interaction it counts.
    """

    # the tables with one row per user (dim 0 = user id): a user's private state; the clock and the
    # global prototypes are shared by all users
    per_user_buffers = (
        "item_ids", "visual", "text", "visual_valid", "text_valid", "time", "count", "last_write", "surprise",
    )  # fmt: skip

    def __init__(
        self,
        num_users: int,
        capacity: int = 50,
        surprise_threshold: float = 0.5,
        visual_dim: int = 512,
        text_dim: int = 384,
        *,
        utility_alpha: float = 1.0,
        utility_beta: float = 0.5,
        recency_decay: float = 0.999,
        feature_dtype: torch.dtype = torch.float32,
        store_visual: bool = True,
        store_text: bool = True,
        num_global_prototypes: int = 0,
    ) -> None:
        super().__init__()
        if capacity < 1:
            raise ConfigError(f"memory capacity must be >= 1, got {capacity}")
        if not 0.0 < recency_decay <= 1.0:
            raise ConfigError(f"recency_decay must be in (0, 1], got {recency_decay}")
        self.capacity = capacity
        self.surprise_threshold = surprise_threshold
        self.utility_alpha = utility_alpha
        self.utility_beta = utility_beta
        self.recency_decay = recency_decay
        shape = (num_users, capacity)
        self.register_buffer("item_ids", torch.full(shape, -1, dtype=torch.long))  # [U, C], -1 = empty
        self.register_buffer("visual", torch.zeros(*shape, visual_dim if store_visual else 0, dtype=feature_dtype))
        self.register_buffer("text", torch.zeros(*shape, text_dim if store_text else 0, dtype=feature_dtype))
        self.register_buffer("visual_valid", torch.zeros(shape, dtype=torch.bool))  # [U, C]
        self.register_buffer("text_valid", torch.zeros(shape, dtype=torch.bool))  # [U, C]
        self.register_buffer("time", torch.zeros(shape, dtype=torch.float64))  # [U, C] interaction time
        self.register_buffer("count", torch.zeros(shape, dtype=torch.long))  # [U, C] writes
        self.register_buffer("last_write", torch.zeros(shape, dtype=torch.long))  # [U, C] training step
        self.register_buffer("surprise", torch.zeros(shape))  # [U, C] surprise of the last write
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # the training clock
        # global prototypes (federated): G extra slots every user reads, invalid until set
        prototypes = num_global_prototypes
        self.register_buffer("prototype_visual", torch.zeros(prototypes, self.visual.size(-1), dtype=feature_dtype))
        self.register_buffer("prototype_text", torch.zeros(prototypes, self.text.size(-1), dtype=feature_dtype))
        self.register_buffer("prototype_valid", torch.zeros(prototypes, dtype=torch.bool))  # [G]
        self.store_visual, self.store_text = store_visual, store_text
        self.reset_stats()

    # ------------------------------------------------------------------ stats
    def reset_stats(self) -> None:
        """Start counting offered / written interactions and their surprise (e.g. per epoch)."""
        self.offered, self.written, self.surprise_sum = 0, 0, 0.0

    def stats(self) -> dict[str, float]:
        """Fill rate (occupied slots / all slots), write rate and mean surprise since :meth:`reset_stats`."""
        return {
            "fill_rate": float((self.item_ids >= 0).float().mean()),
            "write_rate": self.written / self.offered if self.offered else 0.0,
            "mean_surprise": self.surprise_sum / self.offered if self.offered else 0.0,
        }

    # ------------------------------------------------------------------ utility
    def utility(self, user_ids: Tensor) -> Tensor:
        """``user_ids`` [B] -> utility [B, C] of every slot at the current step; empty slots get -inf."""
        age = (self.step - self.last_write[user_ids]).to(self.surprise.dtype)  # [B, C]
        utility = self.utility_alpha * self.recency_decay**age + self.utility_beta * torch.log1p(
            self.count[user_ids].to(age.dtype)
        )
        return utility.masked_fill(self.item_ids[user_ids] < 0, float("-inf"))

    # ------------------------------------------------------------------ writes
    def add_batch(
        self,
        user_ids: Tensor,
        item_ids: Tensor,
        surprises: Tensor,
        visual_features: Tensor | None,
        text_features: Tensor | None,
        positions: Tensor,
        *,
        visual_available: Tensor | None = None,
        text_available: Tensor | None = None,
        step: int | None = None,
    ) -> int:
        """Offer P interactions; those with ``surprise > surprise_threshold`` are written. -> number written.

        ``user_ids``, ``item_ids`` [P] long, ``surprises`` [P], features [P, Fv] / [P, Ft] (``None`` when the
        memory does not store that modality), ``positions`` [P] interaction times (any increasing clock),
        ``*_available`` [P] bool (default all True). All writes of one call happen at training step ``step``
        (default: one past the last step). A user's writes are applied in the given order, so one call equals
        the same writes made one by one at the same step.
        """
        with torch.no_grad():
            self.step.fill_(int(self.step) + 1 if step is None else step)
            self.offered += int(user_ids.numel())
            self.surprise_sum += float(surprises.float().sum())
            keep = torch.nonzero(surprises > self.surprise_threshold).squeeze(1)  # [W]
            if keep.numel() == 0:
                return 0
            users = user_ids[keep]
            order = torch.sort(users, stable=True).indices  # group by user, keep each user's write order
            keep, users = keep[order], users[order]
            index = torch.arange(users.numel(), device=users.device)
            group_start = torch.cat([users.new_ones(1, dtype=torch.bool), users[1:] != users[:-1]])
            rank = index - torch.where(group_start, index, 0).cummax(0).values  # [W] n-th write of its user
            ones = torch.ones_like(user_ids, dtype=torch.bool)
            visual_ok = ones if visual_available is None else visual_available.bool()
            text_ok = ones if text_available is None else text_available.bool()
            for round_rank in range(int(rank.max()) + 1):  # each round: at most one write per user, batched
                rows = keep[rank == round_rank]
                self._write_distinct_users(
                    user_ids[rows],
                    item_ids[rows],
                    surprises[rows],
                    None if visual_features is None else visual_features[rows],
                    None if text_features is None else text_features[rows],
                    positions[rows],
                    visual_ok[rows] & (visual_features is not None),
                    text_ok[rows] & (text_features is not None),
                )
            self.written += int(keep.numel())
            return int(keep.numel())

    def _write_distinct_users(
        self,
        users: Tensor,
        items: Tensor,
        surprises: Tensor,
        visual: Tensor | None,
        text: Tensor | None,
        times: Tensor,
        visual_ok: Tensor,
        text_ok: Tensor,
    ) -> None:
        """One write per user (``users`` [n] distinct): update the item's slot, else a free one, else evict."""
        slot_items = self.item_ids[users]  # [n, C]
        same_item = slot_items == items[:, None]  # [n, C]
        seen = same_item.any(dim=1)  # [n]
        free = slot_items < 0  # [n, C]
        lowest_utility = self.utility(users).argmin(dim=1)  # [n]; only used when the memory is full
        slot = torch.where(
            seen, same_item.int().argmax(dim=1), torch.where(free.any(dim=1), free.int().argmax(dim=1), lowest_utility)
        )  # [n]
        times = times.to(self.time.dtype)
        self.count[users, slot] = torch.where(seen, self.count[users, slot] + 1, 1)
        self.time[users, slot] = torch.where(seen, torch.maximum(self.time[users, slot], times), times)
        self.item_ids[users, slot] = items
        self.last_write[users, slot] = self.step
        self.surprise[users, slot] = surprises.to(self.surprise.dtype)
        if self.store_visual:
            self.visual[users, slot] = 0 if visual is None else visual.to(self.visual.dtype) * visual_ok[:, None]
            self.visual_valid[users, slot] = visual_ok
        if self.store_text:
            self.text[users, slot] = 0 if text is None else text.to(self.text.dtype) * text_ok[:, None]
            self.text_valid[users, slot] = text_ok

    # ------------------------------------------------------------ prototypes
    def entry_features(self, user_ids: Tensor) -> Tensor:
        """The occupied slots of ``user_ids`` as multimodal vectors [n, Fv + Ft] (what k-means prototypes summarise)."""
        occupied = self.item_ids[user_ids] >= 0  # [B, C]
        return torch.cat([self.visual[user_ids][occupied], self.text[user_ids][occupied]], dim=-1).float()

    def set_global_prototypes(self, prototypes: Tensor) -> None:
        """Global prototypes [g, Fv + Ft] (g <= G) become extra slots every user reads; the rest stay invalid."""
        count = prototypes.size(0)
        if count > self.prototype_valid.numel():
            raise ValueError(f"{count} prototypes for {self.prototype_valid.numel()} global prototype slots")
        visual_dim = self.visual.size(-1)
        with torch.no_grad():
            self.prototype_visual.zero_()
            self.prototype_text.zero_()
            # the server's merged prototypes come from k-means on the CPU: to this memory's device and dtype
            self.prototype_visual[:count] = prototypes[:, :visual_dim].to(self.prototype_visual)
            self.prototype_text[:count] = prototypes[:, visual_dim:].to(self.prototype_text)
            self.prototype_valid.fill_(False)
            self.prototype_valid[:count] = True

    def clear_global_prototypes(self) -> None:
        self.prototype_valid.fill_(False)

    # ------------------------------------------------------------------ reads
    def retrieve_multimodal_memory(
        self, user_ids: Tensor, top_k: int = 20, before: Tensor | None = None
    ) -> MemoryReadout:
        """The ``top_k`` highest-utility slots of each user, visible only if their time < ``before``,
        followed by the G global prototype slots (valid once set; prototypes carry no time).

        ``user_ids`` [B], ``before`` [B] the sample's prediction time (``None``: every slot is visible)
        -> features [B, K + G, Fv] / [B, K + G, Ft] (``None`` for a modality not stored), masks [B, K + G];
        K = min(top_k, C).
        """
        utility = self.utility(user_ids)  # [B, C]
        if before is not None:
            utility = utility.masked_fill(self.time[user_ids] >= before.to(self.time.dtype)[:, None], float("-inf"))
        top_utility, slots = utility.topk(min(top_k, self.capacity), dim=1)  # [B, K]
        visible = torch.isfinite(top_utility)  # [B, K]
        rows = user_ids[:, None]  # [B, 1]
        batch = user_ids.numel()
        prototype_mask = self.prototype_valid.expand(batch, -1)  # [B, G]

        def with_prototypes(user_slots: Tensor, prototypes: Tensor) -> Tensor:
            return torch.cat([user_slots, prototypes.expand(batch, -1, -1)], dim=1)  # [B, K + G, F]

        return MemoryReadout(
            visual=with_prototypes(self.visual[rows, slots], self.prototype_visual) if self.store_visual else None,
            visual_mask=torch.cat([visible & self.visual_valid[rows, slots], prototype_mask & self.store_visual], 1),
            text=with_prototypes(self.text[rows, slots], self.prototype_text) if self.store_text else None,
            text_mask=torch.cat([visible & self.text_valid[rows, slots], prototype_mask & self.store_text], 1),
        )

    def user_table(self, user_id: int) -> dict[str, Tensor]:
        """One user's occupied slots as columns (item_id, utility, count, time, surprise, last_write), by utility."""
        user = torch.tensor([user_id], device=self.item_ids.device)
        utility = self.utility(user)[0]  # [C]
        order = utility.argsort(descending=True)
        order = order[self.item_ids[user_id, order] >= 0]
        return {
            "item_id": self.item_ids[user_id, order],
            "utility": utility[order],
            "count": self.count[user_id, order],
            "time": self.time[user_id, order],
            "surprise": self.surprise[user_id, order],
            "last_write": self.last_write[user_id, order],
        }
