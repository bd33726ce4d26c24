"""LocalDynamicMemory on hand-built interactions whose outcome is known."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_run

from recbole_feddmmr.memory import ItemFeatures, LocalDynamicMemory
from recbole_feddmmr.model.layers import ContentExpert

FV, FT, ITEMS = 3, 2, 100


def catalogue(visual_available: torch.Tensor | None = None) -> ItemFeatures:
    """Visual [ITEMS, 3] and text [ITEMS, 2] features that encode the item id, so reads can be checked by value."""
    ids = torch.arange(ITEMS, dtype=torch.float32)[:, None]
    return ItemFeatures(
        visual=ids.expand(-1, FV).clone(), text=-ids.expand(-1, FT).clone(), visual_available=visual_available
    )


def write(
    memory: LocalDynamicMemory, user: int, items: list[int], surprises: list[float], times: list[float], step=None
):
    users = torch.full((len(items),), user)
    return memory.add_batch(users, torch.tensor(items), torch.tensor(surprises), torch.tensor(times), step=step)


def make(capacity=4, features: ItemFeatures | None = None, **kwargs) -> LocalDynamicMemory:
    return LocalDynamicMemory(3, features or catalogue(), capacity=capacity, **kwargs)


def stored(memory: LocalDynamicMemory, user: int) -> set[int]:
    return set(memory.user_table(user)["item_id"].tolist())


def test_threshold_gates_writes_strictly_above_it():
    memory = make(surprise_threshold=0.5)
    written = write(memory, 1, [10, 11, 12, 13], [0.2, 0.6, 0.5, 0.9], [1, 2, 3, 4])
    assert written == 2 and stored(memory, 1) == {11, 13}
    assert stored(memory, 0) == set() and stored(memory, 2) == set()
    stats = memory.stats()
    assert stats.pop("seconds") > 0  # the time spent in writes is counted
    assert stats == pytest.approx(
        {"fill_rate": 2 / (3 * 4), "write_rate": 0.5, "mean_surprise": (0.2 + 0.6 + 0.5 + 0.9) / 4}
    )


def test_a_reseen_item_updates_its_slot_instead_of_duplicating():
    memory = make(surprise_threshold=0.0)
    write(memory, 1, [10, 11], [0.7, 0.7], [1, 2], step=1)
    write(memory, 1, [10], [0.9], [5], step=2)
    table = memory.user_table(1)
    assert sorted(table["item_id"].tolist()) == [10, 11]
    row = table["item_id"].tolist().index(10)
    assert table["count"][row] == 2 and table["last_write"][row] == 2
    assert table["time"][row] == 5 and table["surprise"][row] == pytest.approx(0.9)
    write(memory, 1, [10], [0.9], [3], step=3)  # an older interaction of the same item keeps the later time
    assert memory.user_table(1)["time"][memory.user_table(1)["item_id"].tolist().index(10)] == 5


def test_eviction_removes_the_lowest_utility_slot_computed_by_hand():
    alpha, beta, decay = 1.0, 0.5, 0.9
    memory = make(capacity=3, surprise_threshold=0.0, utility_alpha=alpha, utility_beta=beta, recency_decay=decay)
    write(memory, 0, [1], [1.0], [1], step=1)
    write(memory, 0, [2], [1.0], [2], step=2)
    write(memory, 0, [3], [1.0], [3], step=3)
    write(memory, 0, [1], [1.0], [4], step=4)  # item 1 re-seen: count 2, fresh
    # at step 5: u(1) = 0.9 + 0.5 ln 3, u(2) = 0.9^3 + 0.5 ln 2, u(3) = 0.9^2 + 0.5 ln 2 -> item 2 is lowest
    memory.step.fill_(5)
    table = memory.user_table(0)
    expected = {1: decay + beta * math.log(3), 2: decay**3 + beta * math.log(2), 3: decay**2 + beta * math.log(2)}
    for item, utility in zip(table["item_id"].tolist(), table["utility"].tolist(), strict=True):
        assert utility == pytest.approx(expected[item])
    write(memory, 0, [4], [1.0], [5], step=5)
    assert stored(memory, 0) == {1, 3, 4}


def test_retrieval_hides_the_target_and_everything_after_it():
    memory = make(capacity=8, surprise_threshold=0.0)
    items, times = [20, 21, 22, 23, 24, 25], [10.0, 20.0, 30.0, 40.0, 50.0, 60.0]
    write(memory, 2, items, [0.9] * 6, times)
    for target_time, target_item in zip(times, items, strict=True):
        readout = memory.retrieve_multimodal_memory(torch.tensor([2]), top_k=8, before=torch.tensor([target_time]))
        visible = set(readout.visual[0, readout.visual_mask[0], 0].long().tolist())
        assert visible == {item for item, t in zip(items, times, strict=True) if t < target_time}
        assert target_item not in visible
        assert torch.equal(readout.visual_mask, readout.text_mask)
    everything = memory.retrieve_multimodal_memory(torch.tensor([2]), top_k=8)
    assert int(everything.text_mask.sum()) == 6


def test_reads_rank_by_utility_and_respect_top_k():
    memory = make(capacity=4, surprise_threshold=0.0, recency_decay=0.5, utility_beta=0.0)
    for step, item in enumerate([30, 31, 32, 33], start=1):
        write(memory, 0, [item], [1.0], [step], step=step)
    readout = memory.retrieve_multimodal_memory(torch.tensor([0]), top_k=2, before=torch.tensor([100.0]))
    assert readout.visual.shape == (1, 2, FV) and readout.text.shape == (1, 2, FT)
    assert readout.visual[0, :, 0].tolist() == [33.0, 32.0]  # most recently written first


@pytest.mark.parametrize("capacity", [4, 6, 64])  # every user evicts / some do / nobody does
def test_batched_writes_equal_the_same_writes_one_by_one(capacity):
    generator = torch.Generator().manual_seed(capacity)
    count = 60
    users = torch.randint(0, 3, (count,), generator=generator)
    items = torch.randint(1, 9 + 2 * (users == 2).long().sum().item() // 4, (count,), generator=generator)
    items = torch.where(users == 0, items % 5 + 1, items)  # user 0 repeats few items: fits 6 slots, not 4
    surprises = torch.rand(count, generator=generator)
    times = torch.randperm(count, generator=generator).double()  # a repeat may be older than the slot's time
    batched, single = make(capacity=capacity, surprise_threshold=0.3), make(capacity=capacity, surprise_threshold=0.3)
    single.add_batch(users[:5], items[:5], surprises[:5], times[:5], step=6)  # earlier slots
    batched.load_state_dict(single.state_dict())
    batched.add_batch(users, items, surprises, times, step=7)
    for i in range(count):
        row = slice(i, i + 1)
        single.add_batch(users[row], items[row], surprises[row], times[row], step=7)
    for name, tensor in batched.state_dict().items():
        assert torch.equal(tensor, single.state_dict()[name]), name
    assert batched.written == single.written - int((surprises[:5] > 0.3).sum())


def test_masked_memory_slots_get_zero_attention_and_a_slot_without_a_feature_is_masked():
    available = torch.ones(ITEMS, dtype=torch.bool)
    available[41] = False  # item 41 has no image
    memory = make(capacity=5, surprise_threshold=0.0, features=catalogue(visual_available=available))
    write(memory, 1, [40, 41, 42, 43], [0.9] * 4, [1, 2, 3, 4])
    readout = memory.retrieve_multimodal_memory(torch.tensor([1, 0]), top_k=5, before=torch.tensor([3.0, 9.0]))
    assert readout.text_mask.tolist() == [[True, True, False, False, False], [False] * 5]
    assert int(readout.visual_mask[0].sum()) == 1  # 40 only: 41 has no visual feature
    expert = ContentExpert(FT, 4, num_heads=2, dropout=0.0)
    weights = expert.profile.attention(torch.randn(2, 4), readout.text, readout.text_mask)  # [B, h, K]
    assert torch.all(weights[0, :, 2:] == 0) and torch.all(weights[1] == 0)


def test_the_memory_holds_item_ids_and_reads_the_catalogues_features_by_them():
    memory = make(surprise_threshold=0.0)
    write(memory, 1, [5, 6], [0.9, 0.9], [1, 2])
    assert set(memory.state_dict()) == {
        *memory.per_user_buffers,
        "step",
        "prototype_visual",
        "prototype_text",
        "prototype_valid",
    }  # no copy of any feature: the catalogue holds them
    copy = make(surprise_threshold=0.0)
    copy.load_state_dict(memory.state_dict())
    users, before = torch.tensor([1, 2]), torch.tensor([5.0, 5.0])
    for left, right in zip(
        memory.retrieve_multimodal_memory(users, 4, before),
        copy.retrieve_multimodal_memory(users, 4, before),
        strict=True,
    ):
        assert torch.equal(left, right)
    readout = memory.retrieve_multimodal_memory(users, 4, before)
    assert sorted(readout.text[0, readout.text_mask[0], 0].tolist()) == [-6.0, -5.0]


@pytest.mark.gpu
def test_cpu_and_cuda_retrieval_agree():
    memory = make(surprise_threshold=0.0)
    write(memory, 1, [5, 6, 7], [0.9, 0.8, 0.7], [1, 2, 3])
    on_gpu = make(surprise_threshold=0.0).cuda()
    on_gpu.load_state_dict(memory.state_dict())
    users, before = torch.tensor([1, 0]), torch.tensor([3.0, 3.0])
    cpu = memory.retrieve_multimodal_memory(users, 4, before)
    gpu = on_gpu.retrieve_multimodal_memory(users.cuda(), 4, before.cuda())
    for left, right in zip(cpu, gpu, strict=True):
        assert torch.equal(left, right.cpu())


def test_training_writes_memory_that_never_shows_a_sample_its_own_future(tmp_path):
    config, _, (train_data, _, _), model = tiny_run(tmp_path, memory_surprise_threshold=-1.0)  # write everything
    from recbole_feddmmr.trainer import UR4RecV2MoETrainer

    trainer = UR4RecV2MoETrainer(config, model)
    trainer._train_epoch(train_data, 0)
    feat = train_data._dataset.inter_feat
    memory = model.memory
    # every training interaction was offered once and written (threshold -1); no slot duplicates an item
    assert memory.offered == len(feat) == memory.written
    for user in feat["user_id"].unique().tolist():
        table = memory.user_table(user)
        assert len(set(table["item_id"].tolist())) == len(table["item_id"])
    # a second epoch reads that memory: every visible slot is an item the user met strictly before the target
    users, times = feat["user_id"], feat["timestamp"]
    readout = model.read_memory(users, feat["item_id_list"], feat["item_length"], times)
    assert readout.text_mask.any()
    text_table = model.item_features.text  # [n_items, Ft], distinct rows in the tiny dataset
    for sample in range(len(feat)):
        earlier = {int(i) for i in feat["item_id"][(users == users[sample]) & (times < times[sample])]}
        for vector in readout.text[sample, readout.text_mask[sample]]:
            item = int((text_table == vector).all(dim=1).nonzero()[0])
            assert item in earlier and item != int(feat["item_id"][sample])


def test_recboles_own_trainer_fills_the_memory_too(tmp_path):
    from recbole.trainer import Trainer

    config, _, (train_data, _, _), model = tiny_run(tmp_path, memory_surprise_threshold=-1.0)  # write everything
    Trainer(config, model)._train_epoch(train_data, 0)
    assert model.memory.written == model.memory.offered == len(train_data._dataset.inter_feat)
    assert (model.memory.item_ids >= 0).any()


def test_memory_table_lists_a_users_items_with_titles_by_utility(tmp_path):
    from recbole_feddmmr.recommend import memory_table
    from recbole_feddmmr.trainer import UR4RecV2MoETrainer

    config, dataset, (train_data, _, _), model = tiny_run(tmp_path, memory_surprise_threshold=-1.0)
    UR4RecV2MoETrainer(config, model)._train_epoch(train_data, 0)
    feat = train_data._dataset.inter_feat
    uid = int(feat["user_id"][0])
    token = dataset.id2token(dataset.uid_field, uid)
    table = memory_table(model, dataset, token)
    trained_items = set(dataset.id2token(dataset.iid_field, feat["item_id"][feat["user_id"] == uid].numpy()))
    assert set(table["item"]) == trained_items  # threshold -1: every training interaction was written
    assert table["utility"].is_monotonic_decreasing
    assert list(table["title"]) == [f"Movie {item}" for item in table["item"]]  # tiny.item: "Movie <id>"


@pytest.mark.parametrize("enabled", [True, False])
def test_global_prototypes_change_the_scores_of_a_user_with_empty_memory(tmp_path, enabled):
    _, _, _, model = tiny_run(tmp_path, enable_prototype_aggregation=enabled, num_memory_prototypes=3)
    model.eval()
    user, seq, length, time = torch.tensor([2]), torch.tensor([[3, 4, 5]]), torch.tensor([3]), torch.tensor([1e9])
    assert not (model.memory.item_ids[2] >= 0).any()  # nothing written: the user's own memory is empty

    def scores() -> torch.Tensor:
        memory = model.read_memory(user, seq, length, time)
        return model.score_candidates(model.encode_sequence(seq, length, user), memory)[0]

    no_prototypes = scores()
    dim = model.memory.prototype_visual.size(-1) + model.memory.prototype_text.size(-1)
    if not enabled:
        assert model.memory.prototype_valid.numel() == 0
        with pytest.raises(ValueError, match="global prototype slots"):
            model.memory.set_global_prototypes(torch.randn(3, dim))
        return
    model.memory.set_global_prototypes(torch.randn(3, dim))
    first = scores()
    readout = model.read_memory(user, seq, length, time)
    assert readout.text_mask[0].tolist() == [False] * model.memory_top_k_eval + [True] * 3
    model.memory.set_global_prototypes(torch.randn(3, dim))
    second = scores()
    assert not torch.allclose(first, no_prototypes) and not torch.allclose(second, first)
    model.memory.clear_global_prototypes()
    torch.testing.assert_close(scores(), no_prototypes)


def test_entry_features_are_what_prototypes_summarise():
    memory = make(surprise_threshold=0.0)
    write(memory, 1, [5, 6], [0.9, 0.9], [1, 2])
    ids = torch.tensor([5.0, 6.0])[:, None]
    visual, text = ids.expand(-1, FV), -ids.expand(-1, FT)  # the catalogue's rows of items 5 and 6
    torch.testing.assert_close(memory.entry_features(torch.tensor([1])), torch.cat([visual, text], 1))
    assert memory.entry_features(torch.tensor([0])).shape == (0, FV + FT)


def test_prototype_columns_appear_once_a_prototype_is_set_and_unset_ones_change_no_profile():
    memory = make(capacity=4, surprise_threshold=0.0, num_global_prototypes=2)
    write(memory, 1, [40, 41], [0.9, 0.9], [1, 2])
    users, before = torch.tensor([1, 0]), torch.tensor([9.0, 9.0])
    unset = memory.retrieve_multimodal_memory(users, top_k=3, before=before)
    assert unset.text.shape == (2, 3, FT) and unset.text_mask.shape == (2, 3)  # no column for an unset prototype
    # the same read with the two invalid prototype columns that earlier reads carried: the profile is unchanged
    padded_text = torch.cat([unset.text, torch.full((2, 2, FT), 7.0)], dim=1)
    padded_mask = torch.cat([unset.text_mask, torch.zeros(2, 2, dtype=torch.bool)], dim=1)
    expert = ContentExpert(FT, 4, num_heads=2, dropout=0.0)
    seq_repr = torch.randn(2, 4)
    assert torch.allclose(
        expert.user_vector(seq_repr, unset.text, unset.text_mask),
        expert.user_vector(seq_repr, padded_text, padded_mask),
        atol=1e-6,
    )
    memory.set_global_prototypes(torch.tensor([[5.0, 5.0, 5.0, -5.0, -5.0]]))  # one of two: [g, Fv + Ft]
    read = memory.retrieve_multimodal_memory(users, top_k=3, before=before)
    assert read.text.shape == (2, 5, FT)
    assert read.text_mask[:, 3:].tolist() == [[True, False], [True, False]]  # every user reads the set one
    assert read.text[0, 3].tolist() == [-5.0, -5.0]
