"""The trainer's window data path covers RecBole's training targets exactly once, with RecBole's inputs."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from conftest import TEST_DATA, tiny_run

from recbole_feddmmr.data import SequenceWindows, cut_windows, tie_runs, user_sequences


def test_windows_cover_every_target_once_with_at_least_half_a_window_of_history():
    sequence = np.arange(100, 221)  # 121 items -> 120 targets
    windows = cut_windows(sequence, max_len=50)
    covered = []
    for inputs, nexts, mask in windows:
        assert len(inputs) == len(nexts) <= 50
        start = int(np.flatnonzero(sequence == inputs[0])[0])
        np.testing.assert_array_equal(nexts, sequence[start + 1 : start + 1 + len(nexts)])
        for position in np.flatnonzero(mask):
            covered.append(start + 1 + position)
            assert start == 0 or position + 1 >= 26  # history seen by this target inside its window
    assert sorted(covered) == list(range(1, 121))
    assert windows[0][2].all() and len(windows[0][0]) == 50  # first window: RecBole's exact prefixes

    short = cut_windows(np.array([5, 6, 7]), max_len=50)
    assert len(short) == 1 and short[0][0].tolist() == [5, 6] and short[0][1].tolist() == [6, 7]


def test_user_sequences_rebuilds_each_training_sequence(tiny):
    _, dataset, (train_data, _, _), _ = tiny
    feat = train_data._dataset.inter_feat
    sequences = user_sequences(
        feat["user_id"].numpy(), feat["item_id_list"].numpy(), feat["item_length"].numpy(), feat["item_id"].numpy()
    )
    samples = dataset.inter_feat  # every augmented sample, time-ordered per user; the last two are valid and test
    assert len(sequences) == len(set(samples["user_id"].tolist()))
    for user, sequence in sequences.items():
        mine = samples["user_id"] == user
        targets = samples["item_id"][mine].numpy()
        np.testing.assert_array_equal(sequence[1:], targets[:-2])
        assert sequence[0] == samples["item_id_list"][mine][0, 0]


def test_window_positions_equal_recbole_samples_in_representation_memory_and_time(tmp_path):
    _, _, (train_data, _, _), model = tiny_run(tmp_path, memory_type="history")
    model.eval()
    windows = SequenceWindows(train_data, model, batch_size=16, device=torch.device("cpu"), seed=1)
    assert windows.num_targets == len(train_data._dataset.inter_feat)
    hidden = model.backbone.all_positions(model.item_proj(model.item_embedding(windows.windows)))  # [W, L, H]
    row, position = windows.target_mask.nonzero(as_tuple=True)
    by_target = {
        (int(windows.user_ids[r]), int(windows.windows[r, : p + 1].sum()), int(windows.targets[r, p])): (r, p)
        for r, p in zip(row.tolist(), position.tolist(), strict=True)
    }
    feat = train_data._dataset.inter_feat
    seq_repr = model.backbone(model.item_proj(model.item_embedding(feat["item_id_list"])), feat["item_length"])
    memory = model.memory.retrieve(feat["user_id"], feat["item_id_list"], feat["item_length"])
    for sample in range(len(feat)):
        key = (int(feat["user_id"][sample]), int(feat["item_id_list"][sample].sum()), int(feat["item_id"][sample]))
        r, p = by_target[key]
        torch.testing.assert_close(hidden[r, p], seq_repr[sample], rtol=1e-5, atol=1e-5)
        window_memory = model.memory.retrieve(
            windows.user_ids[r : r + 1], windows.windows[r : r + 1], torch.tensor([p + 1])
        )
        torch.testing.assert_close(window_memory.text[0], memory.text[sample])
        assert torch.equal(window_memory.visual_mask[0], memory.visual_mask[sample])
        assert windows.target_times[r, p].item() == feat["timestamp"][sample].item()


def test_epochs_are_reproducible_and_batches_hold_about_train_batch_size_targets(tiny):
    _, _, (train_data, _, _), model = tiny
    windows = SequenceWindows(train_data, model, batch_size=16, device=torch.device("cpu"), seed=1)
    first = [batch[0].tolist() for batch in windows.epoch(3)]
    again = [batch[0].tolist() for batch in windows.epoch(3)]
    other = [batch[0].tolist() for batch in windows.epoch(4)]
    assert first == again and first != other
    sizes = [int(batch[3].sum()) for batch in windows.epoch(0)]
    assert sum(sizes) == windows.num_targets
    assert abs(np.mean(sizes) - 16) < 16


def test_windows_of_groups_finds_each_groups_windows_as_a_scan_would(tiny):
    _, _, (train_data, _, _), model = tiny
    windows = SequenceWindows(train_data, model, batch_size=16, device=torch.device("cpu"), seed=1)
    users = windows.user_ids.unique()
    groups = [users[:1], users[1:4], users[4:], torch.tensor([10_000]), users[:0]]  # unknown and empty groups too
    found = windows.windows_of_groups(groups)
    for group, index in zip(groups, found, strict=True):
        assert torch.equal(index, windows.windows_of(group))
        assert set(windows.user_ids[index].tolist()) == set(group.tolist()) - {10_000}
    assert sum(len(index) for index in found) == len(windows.user_ids)  # every window in exactly one group


def test_tie_runs_group_consecutive_equal_times():
    times = np.array([-np.inf, 5.0, 5.0, 6.0, 7.0, 7.0, 7.0, 5.0])
    assert tie_runs(times).tolist() == [0, 1, 1, 2, 3, 3, 3, 4]


def tied_copy_of_tiny(tmp_path: Path) -> Path:
    """The tiny dataset with every two consecutive timestamps of a user made equal (1000, 1010 -> 1000, 1000)."""
    root = tmp_path / "tied"
    shutil.copytree(TEST_DATA / "tiny", root / "tiny")
    inter = root / "tiny" / "tiny.inter"
    header, *rows = inter.read_text().splitlines()
    fields = [row.split("\t") for row in rows]
    for row in fields:
        row[3] = str(float(row[3]) // 20 * 20)
    inter.write_text("\n".join([header] + ["\t".join(row) for row in fields]) + "\n")
    return root


def test_shuffled_ties_reorder_only_tied_items_the_same_way_within_an_epoch(tmp_path):
    _, _, (train_data, _, _), model = tiny_run(tmp_path, data_path=str(tied_copy_of_tiny(tmp_path)))
    plain = SequenceWindows(train_data, model, batch_size=16, device=torch.device("cpu"), seed=1)
    tied = SequenceWindows(train_data, model, batch_size=16, device=torch.device("cpu"), seed=1, shuffle_ties=True)
    # the time of each (user, item) interaction, from the windows as RecBole ordered them
    time_of = {}
    for r, p in plain.target_mask.nonzero().tolist():
        time_of[(int(plain.user_ids[r]), int(plain.targets[r, p]))] = float(plain.target_times[r, p])
    changed = 0
    for epoch in range(3):
        windows, targets = tied.reordered_ties(epoch)
        again = tied.reordered_ties(epoch)
        assert torch.equal(windows, again[0]) and torch.equal(targets, again[1])  # one order per epoch
        assert torch.equal(windows == 0, plain.windows == 0)  # padding stays padding
        # a target moves only among items of its own time, and the next position's input is that target
        for r, p in plain.target_mask.nonzero().tolist():
            assert time_of[(int(plain.user_ids[r]), int(targets[r, p]))] == float(plain.target_times[r, p])
        following = plain.windows[:, 1:] != 0
        assert torch.equal(windows[:, 1:][following], targets[:, :-1][following])
        # every training target is still trained exactly once per epoch
        assert sorted(targets[plain.target_mask].tolist()) == sorted(plain.targets[plain.target_mask].tolist())
        changed += int((targets != plain.targets).sum())
        # the epoch's batches serve exactly these windows and targets, in the plain epoch's window order
        for (users, served, served_targets, *_), (plain_users, plain_windows, *_) in zip(
            tied.epoch(epoch), plain.epoch(epoch), strict=True
        ):
            assert torch.equal(users, plain_users)
            order = [int(torch.nonzero((plain.windows == row).all(dim=1))[0]) for row in plain_windows]
            assert torch.equal(served, windows[order]) and torch.equal(served_targets, targets[order])
    assert changed > 0
    assert not torch.equal(tied.reordered_ties(0)[1], tied.reordered_ties(1)[1])


def test_shuffled_ties_change_nothing_without_ties(tiny):
    _, _, (train_data, _, _), model = tiny
    plain = SequenceWindows(train_data, model, batch_size=16, device=torch.device("cpu"), seed=1)
    tied = SequenceWindows(train_data, model, batch_size=16, device=torch.device("cpu"), seed=1, shuffle_ties=True)
    for a, b in zip(plain.epoch(2), tied.epoch(2), strict=True):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)
