"""User memories that feed the visual and semantic experts.

A memory answers one question: for each sample of a batch, which multimodal
features may the experts attend to? Its answer is a :class:`MemoryReadout`
of features plus validity masks (an invalid slot gets exactly zero attention).
This module knows nothing about RecBole or federation: only item ids,
sequences and feature tables.
"""

from __future__ import annotations

import time
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


class OfferedWrites(NamedTuple):
    """The interactions one :meth:`LocalDynamicMemory.add_batch` call offers, each field [P]."""

    users: Tensor
    items: Tensor
    surprises: Tensor
    times: Tensor


def rank_within_runs(keys: Tensor) -> Tensor:
    """``keys`` [n] with equal keys adjacent -> each element's rank [n] within its run of equal keys (0, 1, ...)."""
    index = torch.arange(keys.numel(), device=keys.device)
    starts = torch.cat([keys.new_ones(1, dtype=torch.bool), keys[1:] != keys[:-1]])
    return index - torch.where(starts, index, 0).cummax(0).values


class LocalDynamicMemory(nn.Module):
    """FedDMMR's private per-user memory: surprise-gated writes, utility-based eviction.

    Every user owns ``capacity`` slots, stored for all users at once as ``[num_users, capacity]`` tensors, so
    a batch's writes and reads are batched tensor operations on CPU or GPU. A slot holds an item id (-1 =
    empty), the interaction's time, a write count, the training step of its last write and the surprise of
    that write. The item's features are the catalogue's (``features``, which never change): a read gathers
    them by the slots' item ids, so the memory's private state is a few numbers per slot (on ml-100k,
    0.2 MB for every user, where a copy of each slot's 384-d text feature took 72 MB).

    Surprise is computed by the caller; UR4RecV2MoE uses ``1 - sigmoid(s_pos - mean_j s_neg_j)`` in (0, 1):
    0.5 means the positive scored like the average negative, so a threshold of 0.5 writes the
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
    per_user_buffers = ("item_ids", "time", "count", "last_write", "surprise")

    def __init__(
        self,
        num_users: int,
        features: ItemFeatures,
        capacity: int = 50,
        surprise_threshold: float = 0.5,
        *,
        utility_alpha: float = 1.0,
        utility_beta: float = 0.5,
        recency_decay: float = 0.999,
        num_global_prototypes: int = 0,
    ) -> None:
        super().__init__()
        if capacity < 1:
            raise ConfigError(f"memory capacity must be >= 1, got {capacity}")
        if not 0.0 < recency_decay <= 1.0:
            raise ConfigError(f"recency_decay must be in (0, 1], got {recency_decay}")
        self.features = features  # the catalogue's feature tables (shared with the model, not memory state)
        self.capacity = capacity
        self.surprise_threshold = surprise_threshold
        self.utility_alpha = utility_alpha
        self.utility_beta = utility_beta
        self.recency_decay = recency_decay
        shape = (num_users, capacity)
        self.register_buffer("item_ids", torch.full(shape, -1, dtype=torch.long))  # [U, C], -1 = empty
        self.register_buffer("time", torch.zeros(shape, dtype=torch.float64))  # [U, C] interaction time
        self.register_buffer("count", torch.zeros(shape, dtype=torch.long))  # [U, C] writes
        self.register_buffer("last_write", torch.zeros(shape, dtype=torch.long))  # [U, C] training step
        self.register_buffer("surprise", torch.zeros(shape))  # [U, C] surprise of the last write
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # the training clock
        # the modalities the catalogue has (fixed: checked once, not at every read)
        self.store_visual, self.store_text = features.has_visual, features.has_text
        # global prototypes (federated): G extra slots every user reads, invalid until set
        visual_dim = features.visual.size(1) if self.store_visual else 0
        text_dim = features.text.size(1) if self.store_text else 0
        prototypes = num_global_prototypes
        self.register_buffer("prototype_visual", torch.zeros(prototypes, visual_dim))  # [G, Fv]
        self.register_buffer("prototype_text", torch.zeros(prototypes, text_dim))  # [G, Ft]
        self.register_buffer("prototype_valid", torch.zeros(prototypes, dtype=torch.bool))  # [G]
        self.reset_stats()

    # ------------------------------------------------------------------ stats
    def reset_stats(self) -> None:
        """Start counting offered / written interactions, their surprise and the seconds spent in reads and
        writes (e.g. per epoch)."""
        self.offered, self.written, self.surprise_sum, self.seconds = 0, 0, 0.0, 0.0

    def stats(self) -> dict[str, float]:
        """Fill rate (occupied slots / all slots), write rate, mean surprise and seconds of reads and writes
        (host time: on CUDA, what the calls took to enqueue) since :meth:`reset_stats`."""
        return {
            "fill_rate": float((self.item_ids >= 0).float().mean()),
            "write_rate": self.written / self.offered if self.offered else 0.0,
            "mean_surprise": self.surprise_sum / self.offered if self.offered else 0.0,
            "seconds": self.seconds,
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
        self, user_ids: Tensor, item_ids: Tensor, surprises: Tensor, times: Tensor, *, step: int | None = None
    ) -> int:
        """Offer P interactions; those with ``surprise > surprise_threshold`` are written. -> number written.

        ``user_ids``, ``item_ids`` [P] long, ``surprises`` [P], ``times`` [P] interaction times (any increasing
        clock). All writes of one call happen at training step ``step`` (default: one past the last step). A
        user's writes are applied in the given order, so one call equals the same writes made one by one at
        the same step.
        """
        started = time.perf_counter()
        try:
            with torch.no_grad():
                return self._add_batch(user_ids, item_ids, surprises, times, step)
        finally:
            self.seconds += time.perf_counter() - started

    def _add_batch(self, user_ids: Tensor, item_ids: Tensor, surprises: Tensor, times: Tensor, step) -> int:
        self.step.fill_(int(self.step) + 1 if step is None else step)
        self.offered += int(user_ids.numel())
        self.surprise_sum += float(surprises.float().sum())
        keep = torch.nonzero(surprises > self.surprise_threshold).squeeze(1)  # [W]
        if keep.numel() == 0:
            return 0
        offered = OfferedWrites(user_ids, item_ids, surprises, times)
        ordered = self._write_without_eviction(keep, offered)  # [W'] the writes of users who must evict
        if ordered.numel():
            self._write_in_order(ordered, offered)
        self.written += int(keep.numel())
        return int(keep.numel())

    def _write_without_eviction(self, keep: Tensor, offered: OfferedWrites) -> Tensor:
        """The writes ``keep`` [W] (in order) of every user whose new items all fit into their free slots, in
        one batched pass -> the writes of the other users (who must evict), for :meth:`_write_in_order`.

        Without an eviction a user's writes interact only through repeats and free slots, both in closed
        form: the writes of one (user, item) act as one write (count + k, the latest time, the last write's
        surprise and features), and the j-th new item (by first write) takes the j-th free slot, as the
        writes one by one would.
        """
        write_users, write_items = offered.users[keep], offered.items[keep]  # [W]
        key = write_users * (int(write_items.max()) + 1) + write_items  # [W] one per (user, item)
        pairs, group = torch.unique(key, return_inverse=True)  # [G], [W]
        num_groups = pairs.numel()
        order = torch.arange(keep.numel(), device=keep.device)  # [W] position in the write order
        first = torch.full((num_groups,), keep.numel(), device=keep.device).scatter_reduce(0, group, order, "amin")
        last = torch.zeros(num_groups, dtype=torch.long, device=keep.device).scatter_reduce(0, group, order, "amax")
        repeats = torch.bincount(group, minlength=num_groups)  # [G]
        write_times = offered.times[keep].to(self.time.dtype)
        latest = torch.full((num_groups,), float("-inf"), dtype=self.time.dtype, device=keep.device)
        latest = latest.scatter_reduce(0, group, write_times, "amax")  # [G]
        group_users, group_items, last_write = write_users[last], write_items[last], keep[last]  # [G]

        slot_items = self.item_ids[group_users]  # [G, C]
        same_item = slot_items == group_items[:, None]  # [G, C]
        seen = same_item.any(dim=1)  # [G]
        free = slot_items < 0  # [G, C]
        # rank of each new item among its user's new items, by first write
        new_rank = torch.zeros(num_groups, dtype=torch.long, device=keep.device)
        new = torch.nonzero(~seen).squeeze(1)  # [G_new]
        if new.numel():
            by_user = new[torch.sort(first[new]).indices]
            by_user = by_user[torch.sort(group_users[by_user], stable=True).indices]  # by user, then first write
            new_rank[by_user] = rank_within_runs(group_users[by_user])
        fits = seen | (new_rank < free.sum(dim=1))  # [G]
        evicting_users = group_users[~fits]  # [E]
        fast = ~torch.isin(group_users, evicting_users)  # [G] groups of users who need no eviction
        free_slot = (free & (free.cumsum(dim=1) == new_rank[:, None] + 1)).int().argmax(dim=1)  # [G]
        slot = torch.where(seen, same_item.int().argmax(dim=1), free_slot)  # [G]

        rows, slot, seen = group_users[fast], slot[fast], seen[fast]
        source = last_write[fast]  # the write whose surprise and features the slot keeps
        self.count[rows, slot] = torch.where(seen, self.count[rows, slot], 0) + repeats[fast]
        self.time[rows, slot] = torch.where(seen, torch.maximum(self.time[rows, slot], latest[fast]), latest[fast])
        self.item_ids[rows, slot] = group_items[fast]
        self.last_write[rows, slot] = self.step
        self.surprise[rows, slot] = offered.surprises[source].to(self.surprise.dtype)
        return keep[torch.isin(write_users, evicting_users)]

    def _write_in_order(self, keep: Tensor, offered: OfferedWrites) -> None:
        """The writes ``keep`` [W] one per user at a time, in order: a user's n-th writes of all users in one
        batched pass per n (exact with evictions, whose outcome depends on every earlier write)."""
        keep_users = offered.users[keep]
        order = torch.sort(keep_users, stable=True).indices  # group by user, keep each user's write order
        keep, keep_users = keep[order], keep_users[order]
        rank = rank_within_runs(keep_users)  # [W] n-th write of its user
        for round_rank in range(int(rank.max()) + 1):  # each round: at most one write per user, batched
            self._write_distinct_users(keep[rank == round_rank], offered)

    def _write_distinct_users(self, rows: Tensor, offered: OfferedWrites) -> None:
        """Writes ``rows`` [n], one per user: update the item's slot, else a free one, else evict."""
        write_users, write_items = offered.users[rows], offered.items[rows]  # [n] distinct users
        slot_items = self.item_ids[write_users]  # [n, C]
        same_item = slot_items == write_items[:, None]  # [n, C]
        seen = same_item.any(dim=1)  # [n]
        free = slot_items < 0  # [n, C]
        lowest_utility = self.utility(write_users).argmin(dim=1)  # [n]; only used when the memory is full
        slot = torch.where(
            seen, same_item.int().argmax(dim=1), torch.where(free.any(dim=1), free.int().argmax(dim=1), lowest_utility)
        )  # [n]
        write_times = offered.times[rows].to(self.time.dtype)
        self.count[write_users, slot] = torch.where(seen, self.count[write_users, slot] + 1, 1)
        self.time[write_users, slot] = torch.where(
            seen, torch.maximum(self.time[write_users, slot], write_times), write_times
        )
        self.item_ids[write_users, slot] = write_items
        self.last_write[write_users, slot] = self.step
        self.surprise[write_users, slot] = offered.surprises[rows].to(self.surprise.dtype)

    # ------------------------------------------------------------ prototypes
    def entry_features(self, user_ids: Tensor) -> Tensor:
        """The occupied slots of ``user_ids`` as multimodal vectors [n, Fv + Ft] (what k-means prototypes summarise)."""
        items = self.item_ids[user_ids]  # [B, C]
        items = items[items >= 0]  # [n]
        return torch.cat([self._features_of(items, "visual"), self._features_of(items, "text")], dim=-1).float()

    def _features_of(self, items: Tensor, modality: str) -> Tensor:
        """The catalogue's ``modality`` features of ``items`` [...] -> [..., F] (F = 0 without that modality)."""
        table = getattr(self.features, modality)
        if table is None or not getattr(self, f"store_{modality}"):
            return torch.zeros(*items.shape, 0, device=items.device)
        return table[items]

    def set_global_prototypes(self, prototypes: Tensor) -> None:
        """Global prototypes [g, Fv + Ft] (g <= G) become extra slots every user reads; the rest stay invalid."""
        count = prototypes.size(0)
        if count > self.prototype_valid.numel():
            raise ValueError(f"{count} prototypes for {self.prototype_valid.numel()} global prototype slots")
        visual_dim = self.prototype_visual.size(-1)
        with torch.no_grad():
            self.prototype_visual.zero_()
            self.prototype_text.zero_()
            # the server's merged prototypes come from k-means on the CPU: to this memory's device
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
        followed by the G global prototype slots once any is set (prototypes carry no time; before that, and
        always in centralised training, G = 0: columns that every row would mask cost reads for nothing)

        ``user_ids`` [B], ``before`` [B] the sample's prediction time (``None``: every slot is visible)
        -> features [B, K + G, Fv] / [B, K + G, Ft] (``None`` for a modality not stored), masks [B, K + G];
        K = min(top_k, C).
        """
        started = time.perf_counter()
        utility = self.utility(user_ids)  # [B, C]
        if before is not None:
            utility = utility.masked_fill(self.time[user_ids] >= before.to(self.time.dtype)[:, None], float("-inf"))
        top_utility, slots = utility.topk(min(top_k, self.capacity), dim=1)  # [B, K]
        visible = torch.isfinite(top_utility)  # [B, K]
        items = self.item_ids[user_ids[:, None], slots].clamp(min=0)  # [B, K] (an empty slot reads item 0)
        batch = user_ids.numel()
        with_global = bool(self.prototype_valid.any())  # the same for every client of a round (server state)
        # [B, G], or [B, 0] before any prototype is set
        prototype_mask = (
            self.prototype_valid.expand(batch, -1) if with_global else self.prototype_valid.new_zeros(batch, 0)
        )
        features = self.features

        def with_prototypes(table: Tensor, prototypes: Tensor) -> Tensor:
            """``table`` [N, F], ``prototypes`` [G, F] -> [B, K + G, F]: one gather from the catalogue's rows
            followed by the prototypes' (a copy of [N + G, F]), not a gather and then a copy of [B, K + G, F]."""
            if not with_global:
                return table.index_select(0, items.flatten()).view(*items.shape, -1)  # [B, K, F]
            prototype_rows = torch.arange(prototypes.size(0), device=items.device) + table.size(0)  # [G]
            rows = torch.cat([items, prototype_rows.expand(batch, -1)], dim=1)  # [B, K + G]
            return torch.cat([table, prototypes]).index_select(0, rows.flatten()).view(*rows.shape, -1)

        def mask(modality: str) -> Tensor:
            if not getattr(self, f"store_{modality}"):
                return torch.zeros(
                    batch, visible.size(1) + prototype_mask.size(1), dtype=torch.bool, device=items.device
                )
            available = getattr(features, f"{modality}_available")[items]  # [B, K]
            return torch.cat([visible & available, prototype_mask], dim=1)

        readout = MemoryReadout(
            visual=with_prototypes(features.visual, self.prototype_visual) if self.store_visual else None,
            visual_mask=mask("visual"),
            text=with_prototypes(features.text, self.prototype_text) if self.store_text else None,
            text_mask=mask("text"),
        )
        self.seconds += time.perf_counter() - started
        return readout

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
