"""RecBole's training split as sequence windows: tensors built once, served in shuffled mini-batches.

RecBole trains a sequential model on one augmented sample per training target (the target's prefix, up
to MAX_ITEM_LIST_LENGTH items), each run through the Transformer on its own. Here the same training
targets are held as whole sequence windows: one causal pass gives the prediction point of every target
in a window, as in the original SASRec. Each training target is trained exactly once per epoch. A user's
first window starts at the first item, so its targets see exactly RecBole's input; later windows overlap
the previous one by half and train only their second half, so such targets see between L/2 + 1 and L
items of history (RecBole: L). The centralised trainer and the federated clients both read these windows.

Interactions with the same timestamp have no order of their own: RecBole's split by time keeps the order
of the atomic file among them (in ml-100k half of the interactions have the timestamp of the user's previous one).
With ``shuffle_ties`` every epoch trains a fresh random order of each such run of tied items (the same
order for every reader of that epoch), so the model is not fitted to an order the data does not have.
Their times are equal, so the targets' times, and what the memory may show each target, do not change.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def rows_by_user(user_ids: np.ndarray) -> list[np.ndarray]:
    """Row indices of each user, users in increasing order, each user's rows in their original order."""
    order = np.argsort(user_ids, kind="stable")
    return np.split(order, np.flatnonzero(np.diff(user_ids[order])) + 1)


def user_sequences(user_ids: np.ndarray, item_lists: np.ndarray, item_lengths: np.ndarray, targets: np.ndarray):
    """Each user's full training sequence from RecBole's augmented samples (rows in time order per user).

    -> {user: int64 array of items}; the first sample's input plus every target in order.
    Raises if the rows are not consecutive prefixes (they always are for RecBole's augmentation).
    """
    sequences = {}
    for rows in rows_by_user(user_ids):
        first = rows[0]
        sequence = np.concatenate([item_lists[first, : item_lengths[first]], targets[rows]])
        last = rows[-1]
        length = item_lengths[last]
        if not np.array_equal(item_lists[last, :length], sequence[len(sequence) - 1 - length : len(sequence) - 1]):
            raise ValueError(f"training samples of user {user_ids[first]} are not consecutive prefixes")
        sequences[int(user_ids[first])] = sequence
    return sequences


def tie_runs(times: np.ndarray) -> np.ndarray:
    """Run id [T] of each element of one user's time sequence ``times`` [T]: consecutive equal times share
    a run, ids increase along the sequence. The first element's time is unknown (-inf): a run of its own."""
    starts = np.ones(len(times), dtype=bool)
    starts[1:] = times[1:] != times[:-1]
    return np.cumsum(starts) - 1


def cut_windows(sequence: np.ndarray, max_len: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Windows (inputs [<=L], next items [<=L], train mask [<=L]) covering each target of ``sequence`` once.

    Targets are ``sequence[1:]``. Window starts 0, L/2, L, ...; a window after the first trains
    only positions >= L - L/2, which the previous window did not reach.
    """
    stride = max(1, max_len // 2)
    windows, start, covered = [], 0, 0  # covered: targets 1..covered are done
    while covered < len(sequence) - 1:
        inputs = sequence[start : start + max_len]
        nexts = sequence[start + 1 : start + 1 + max_len]
        inputs = inputs[: len(nexts)]
        target_index = start + 1 + np.arange(len(nexts))  # index of each position's target in sequence
        windows.append((inputs, nexts, target_index > covered))
        covered = int(target_index[-1])
        start += stride if start + max_len < len(sequence) - 1 else max_len
    return windows


class SequenceWindows:
    """The training split as device tensors of sequence windows, served in shuffled mini-batches.

    A batch holds about ``train_batch_size`` training targets, so an epoch takes about as many
    optimizer steps as RecBole's per-sample epoch.
    """

    def __init__(
        self, train_data, model, batch_size: int, device: torch.device, seed: int, shuffle_ties: bool = False
    ) -> None:
        feat = train_data._dataset.inter_feat
        max_len = feat[model.ITEM_SEQ].size(1)
        user_ids = feat[model.USER_ID].numpy()
        sequences = user_sequences(
            user_ids, feat[model.ITEM_SEQ].numpy(), feat[model.ITEM_SEQ_LEN].numpy(), feat[model.ITEM_ID].numpy()
        )
        time_field = train_data._dataset.time_field
        # each target's time, aligned with the sequence (its first item is no target): cut like the items
        target_times = feat[time_field].numpy().astype(np.float64) if time_field in feat else np.zeros(len(feat))
        time_sequences = {
            int(user_ids[rows[0]]): np.concatenate([[-np.inf], target_times[rows]]) for rows in rows_by_user(user_ids)
        }
        # every user's sequence end to end ([T]), its times and each element's run of tied times; a window is
        # the positions it reads in that flat sequence, so its items, targets and times are one gather each,
        # and an epoch that reorders tied items re-reads every window with one gather
        users, position_windows, masks = [], [], []
        flat_items, flat_times, flat_runs, offset, runs_before = [], [], [], 0, 0
        for user, sequence in sequences.items():
            for positions, _, mask in cut_windows(offset + np.arange(len(sequence)), max_len):
                users.append(user)
                position_windows.append(positions)
                masks.append(mask)
            runs = tie_runs(time_sequences[user])
            flat_items.append(sequence)
            flat_times.append(time_sequences[user])
            flat_runs.append(runs_before + runs)
            offset, runs_before = offset + len(sequence), runs_before + int(runs[-1]) + 1
        count = len(position_windows)
        window_positions = torch.full((count, max_len), -1, dtype=torch.long)  # [W, L], -1 = padding
        self.target_mask = torch.zeros(count, max_len, dtype=torch.bool)  # [W, L]
        for index, (positions, mask) in enumerate(zip(position_windows, masks, strict=True)):
            window_positions[index, : len(positions)] = torch.from_numpy(positions)
            self.target_mask[index, : len(mask)] = torch.from_numpy(mask)
        self.user_ids = torch.tensor(users, dtype=torch.long, device=device)  # [W]
        self._window_positions = window_positions.to(device)  # [W, L]
        self._flat_items = torch.from_numpy(np.concatenate(flat_items)).to(device)  # [T]
        self._flat_runs = torch.from_numpy(np.concatenate(flat_runs)).to(device)  # [T], ascending
        self.target_mask = self.target_mask.to(device)
        # a target's time is the next element's; padding reads time 0 (no target there)
        flat_times = torch.from_numpy(np.concatenate(flat_times)).to(device)  # [T], float64
        self.target_times = self._next_of(flat_times).masked_fill(self._window_positions < 0, 0.0)  # [W, L]
        self.windows, self.targets = self._read_windows(self._flat_items)  # [W, L] each
        self.num_targets = int(self.target_mask.sum())
        if self.num_targets != len(feat):
            raise ValueError(f"windows cover {self.num_targets} targets, the training split has {len(feat)}")
        self.windows_per_batch = max(1, round(batch_size * count / self.num_targets))
        self.shuffle = train_data.shuffle
        self.seed = seed
        self.shuffle_ties = shuffle_ties
        self._tie_order: tuple[int, Tensor, Tensor] | None = None  # (epoch, windows, targets) last built

    def _next_of(self, flat: Tensor) -> Tensor:
        """``flat`` [T] read at each window position's next element -> [W, L] (padding reads element 0)."""
        return flat[(self._window_positions + 1).clamp(min=0, max=len(flat) - 1)]

    def _read_windows(self, items: Tensor) -> tuple[Tensor, Tensor]:
        """The windows' inputs and targets [W, L] in the flat item sequence ``items`` [T]; padding is item 0.
        A position's target is the next element of the user's sequence: a window's targets never pass its end."""
        padding = self._window_positions < 0  # [W, L]
        windows = items[self._window_positions.clamp(min=0)].masked_fill(padding, 0)
        return windows, self._next_of(items).masked_fill(padding, 0)

    def __len__(self) -> int:
        return -(-len(self.user_ids) // self.windows_per_batch)

    def windows_of(self, users: Tensor) -> Tensor:
        """Indices [w] of the windows that belong to ``users`` (e.g. one federated client's)."""
        return torch.isin(self.user_ids, users.to(self.user_ids.device)).nonzero().squeeze(1)

    def windows_of_groups(self, groups: list[Tensor]) -> list[Tensor]:
        """Window indices [w_i] (ascending, on the windows' device) of each group of users, e.g. of every
        federated client: one sort of all windows, instead of one scan of all windows per group."""
        owners = self.user_ids.cpu()  # [W]
        order = torch.argsort(owners, stable=True)  # [W] windows grouped by user, ascending within a user
        counts = torch.bincount(owners)  # [max user + 1]
        ends = counts.cumsum(0)
        starts = (ends - counts).tolist()
        ends, num_users = ends.tolist(), len(counts)
        result = []
        for group in groups:
            users = [user for user in group.cpu().tolist() if user < num_users]
            pieces = [order[starts[user] : ends[user]] for user in users]
            index = torch.cat(pieces).sort().values if pieces else order[:0]
            result.append(index.to(self.user_ids.device))
        return result

    def windows_per_batch_for(self, batch_size: int) -> int:
        """Windows per batch for about ``batch_size`` training targets."""
        return max(1, round(batch_size * len(self.user_ids) / self.num_targets))

    def reordered_ties(self, epoch_idx: int) -> tuple[Tensor, Tensor]:
        """(windows [W, L], targets [W, L]) with every run of tied items in the random order of (seed, epoch):
        the same for every caller of that epoch (e.g. every federated client of a round, on any backend)."""
        if self._tie_order is not None and self._tie_order[0] == epoch_idx:
            return self._tie_order[1:]
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch_idx + 50_021)  # not the batch order's
        jitter = torch.rand(len(self._flat_runs), generator=generator, dtype=torch.float64)  # [T] in [0, 1)
        # runs keep their place (ids ascend by at least 1), elements within a run take a random order
        order = torch.argsort(self._flat_runs.to(torch.float64) + 0.5 * jitter.to(self._flat_runs.device))
        windows, targets = self._read_windows(self._flat_items[order])  # [W, L] each
        self._tie_order = (epoch_idx, windows, targets)
        return windows, targets

    def epoch(self, epoch_idx: int, subset: Tensor | None = None, windows_per_batch: int | None = None):
        """Yield (user_ids [b], windows [b, L], targets [b, L], target_mask [b, L], target_times [b, L]).

        The order is set by (seed, epoch), and with ``shuffle_ties`` the order of tied items too.
        ``subset``: only these window indices (a client's data).
        """
        count = len(self.user_ids) if subset is None else len(subset)
        if self.shuffle:
            order = torch.randperm(count, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch_idx))
        else:
            order = torch.arange(count)
        order = order.to(self.user_ids.device)
        if subset is not None:
            order = subset[order]
        step = windows_per_batch or self.windows_per_batch
        windows, targets = self.reordered_ties(epoch_idx) if self.shuffle_ties else (self.windows, self.targets)
        for start in range(0, count, step):
            index: Tensor = order[start : start + step]
            yield (
                self.user_ids[index],
                windows[index],
                targets[index],
                self.target_mask[index],
                self.target_times[index],
            )
