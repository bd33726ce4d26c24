"""UR4RecV2MoE on the tiny dataset: features, losses by hand, gradients, predict vs full sort."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TEST_DATA, tiny_run

from recbole_feddmmr.errors import ConfigError
from recbole_feddmmr.memory import ItemFeatures, RecentHistoryMemory
from recbole_feddmmr.model.losses import (
    bpr_loss,
    gbce_beta,
    gbce_loss,
    load_balance_loss,
    sample_negatives,
    sampled_softmax_loss,
)


def _batch(splits, size=8):
    train_data = splits[0]
    return train_data._dataset.inter_feat[:size]


def test_features_land_on_the_right_item_rows(tiny):
    _, dataset, _, model = tiny
    rows = {}
    for line in (TEST_DATA / "tiny" / "tiny.itememb").read_text().splitlines()[1:]:
        token, text, visual = line.split("\t")
        rows[token] = (np.array(text.split(), dtype=np.float32), visual)
    features = model.item_features
    for token, (text, visual) in rows.items():
        item = dataset.token2id("item_id", token)
        np.testing.assert_allclose(features.text[item].numpy(), text, rtol=1e-6)
        assert bool(features.visual_available[item]) == bool(visual)
    assert not features.text_available[0] and not features.visual_available[0]  # padding row
    assert features.text.dtype == torch.float32 and features.text.shape == (dataset.item_num, 8)
    assert features.visual.shape == (dataset.item_num, 6)
    assert model.live_experts == ["sequential", "visual", "semantic"]


def test_bpr_and_load_balance_losses_equal_hand_computation():
    scores = torch.tensor([[2.0, 1.0, 3.0], [0.0, -1.0, -2.0]])
    by_hand = (
        -(
            np.log(1 / (1 + np.exp(-1.0)))
            + np.log(1 / (1 + np.exp(1.0)))
            + np.log(1 / (1 + np.exp(-1.0)))
            + np.log(1 / (1 + np.exp(-2.0)))
        )
        / 4
    )
    assert bpr_loss(scores).item() == pytest.approx(by_hand, rel=1e-6)

    softmax_by_hand = (
        -(2.0 - np.log(np.exp(2.0) + np.exp(1.0) + np.exp(3.0))) - (0.0 - np.log(1.0 + np.exp(-1.0) + np.exp(-2.0)))
    ) / 2
    assert sampled_softmax_loss(scores).item() == pytest.approx(softmax_by_hand, rel=1e-6)

    all_on = torch.tensor([True, True, True])
    live_everywhere = torch.tensor([[[0.5, 0.25, 0.25], [0.6, 0.1, 0.3]]])  # [B=1, C=2, X=3]
    usage = np.array([0.55, 0.175, 0.275])
    assert load_balance_loss(live_everywhere, all_on).item() == pytest.approx(((usage - 1 / 3) ** 2).sum(), rel=1e-6)
    weights = torch.tensor([[[0.5, 0.25, 0.25], [0.7, 0.0, 0.3]]])
    visual_off = torch.tensor([True, False, True])
    expected = (0.6 - 0.5) ** 2 + (0.275 - 0.5) ** 2  # E = 2 enabled experts
    assert load_balance_loss(weights, visual_off).item() == pytest.approx(expected, rel=1e-6)
    # a pair where an enabled expert is off (weight exactly 0) is left out of the balance
    partly_live = torch.tensor([[[0.5, 0.25, 0.25], [0.7, 0.0, 0.3], [0.2, 0.4, 0.4]]])
    usage = np.array([0.35, 0.325, 0.325])  # mean of rows 1 and 3 only
    assert load_balance_loss(partly_live, all_on).item() == pytest.approx(((usage - 1 / 3) ** 2).sum(), rel=1e-6)
    assert load_balance_loss(torch.tensor([[[1.0, 0.0, 0.0]]]), all_on).item() == 0.0


def test_sampled_softmax_logq_correction_and_gbce_equal_hand_computation():
    scores = torch.tensor([[2.0, 1.0, 3.0], [0.0, -1.0, -2.0]])  # positive in column 0, two negatives
    log_q = torch.log(torch.tensor([[0.5, 2.0], [1.0, 1.0]]))  # log(N q_j): how often each negative is expected
    first = -(2.0 - np.log(np.exp(2.0) + np.exp(1.0) / 0.5 + np.exp(3.0) / 2.0))
    second = -(0.0 - np.log(1.0 + np.exp(-1.0) + np.exp(-2.0)))
    assert sampled_softmax_loss(scores, log_q=log_q).item() == pytest.approx((first + second) / 2, rel=1e-6)
    valid = torch.tensor([[True, False], [True, True]])  # the first row's second draw was its positive
    first_valid = -(2.0 - np.log(np.exp(2.0) + np.exp(1.0)))
    assert sampled_softmax_loss(scores, valid=valid).item() == pytest.approx((first_valid + second) / 2, rel=1e-6)

    # gBCE: beta = alpha (t (1 - 1/alpha) + 1/alpha), alpha = N / (items - 1)
    assert gbce_beta(num_negatives=2, num_items=11, t=0.0) == pytest.approx(1.0)  # plain BCE
    assert gbce_beta(num_negatives=2, num_items=11, t=1.0) == pytest.approx(0.2)  # alpha
    beta = gbce_beta(num_negatives=2, num_items=11, t=0.75)
    assert beta == pytest.approx(0.2 * (0.75 * (1 - 5) + 5))
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    by_hand = [-beta * np.log(sig(2.0)) - np.log(1 - sig(1.0)) - np.log(1 - sig(3.0)),
               -beta * np.log(sig(0.0)) - np.log(1 - sig(-1.0)) - np.log(1 - sig(-2.0))]  # fmt: skip
    assert gbce_loss(scores, beta).item() == pytest.approx(np.mean(by_hand), rel=1e-6)


def test_popularity_negatives_follow_the_training_counts_and_carry_their_logq(tmp_path):
    _, _, splits, model = tiny_run(tmp_path, loss_type="SSM", train_neg_distribution="popularity", train_neg_num=4)
    counts = torch.bincount(splits[0]._dataset.inter_feat["item_id"], minlength=model.n_items).float()
    expected = counts.clone()
    expected[1:] += 1  # every item stays drawable
    torch.testing.assert_close(model.negative_weights, expected)
    generator = torch.Generator().manual_seed(0)
    positives = torch.full((20000,), 3)
    draws = model.sample_negatives(positives, generator)  # [P, 4]
    frequency = torch.bincount(draws.flatten(), minlength=model.n_items).float() / draws.numel()
    torch.testing.assert_close(frequency, expected / expected.sum(), atol=3e-3, rtol=0)
    probability = expected / expected.sum()
    torch.testing.assert_close(model.log_expected_draws(draws[:2]), torch.log(4 * probability[draws[:2]]))


def test_negatives_are_uniform_over_other_items_and_never_the_positive():
    positives = torch.tensor([1, 5, 9] * 2000)
    negatives = sample_negatives(positives, num_items=10, num_negatives=7)
    assert negatives.shape == (6000, 7)
    assert not (negatives == positives[:, None]).any()
    assert negatives.min() >= 1 and negatives.max() <= 9
    counts = torch.bincount(negatives[positives == 5].flatten(), minlength=10)[1:]
    others = torch.cat([counts[:4], counts[5:]]).float()
    assert counts[4] == 0 and others.min() > 0.9 * others.mean()


@pytest.mark.parametrize(
    ("loss_type", "reference"),
    [
        ("BPR", lambda model, scores, negatives: bpr_loss(scores)),
        (
            "SSM",
            lambda model, scores, negatives: sampled_softmax_loss(scores, log_q=model.log_expected_draws(negatives)),
        ),
        ("gBCE", lambda model, scores, negatives: gbce_loss(scores, model.gbce_beta)),
    ],
)
def test_calculate_loss_is_the_sampled_loss_plus_weighted_load_balance(tmp_path, loss_type, reference):
    _, _, splits, model = tiny_run(tmp_path, loss_type=loss_type)
    model.eval()  # no dropout: the two passes below see the same network
    batch = _batch(splits)
    torch.manual_seed(3)
    rec_loss, weighted_lb = model.calculate_loss(batch)
    torch.manual_seed(3)
    negatives = sample_negatives(batch["item_id"], model.n_items, model.train_neg_num)
    candidates = torch.cat([batch["item_id"][:, None], negatives], 1)
    user, seq, length = batch["user_id"], batch["item_id_list"], batch["item_length"]
    memory = model.read_memory(user, seq, length, batch["timestamp"])
    scores, routing = model.score_candidates(model.encode_sequence(seq, length, user), memory, candidates)
    torch.testing.assert_close(rec_loss, reference(model, scores, negatives))
    torch.testing.assert_close(
        weighted_lb, model.load_balance_weight * load_balance_loss(routing.dense(), model.expert_enabled)
    )


@pytest.mark.parametrize("memory_type", ["history", "dynamic"])
def test_gradients_reach_every_trainable_parameter(tmp_path, memory_type):
    _, _, splits, model = tiny_run(tmp_path, memory_type=memory_type, memory_surprise_threshold=-1.0)
    model.train()
    if memory_type == "dynamic":  # one step writes every positive (threshold -1), so the experts have memory
        model.calculate_loss(_batch(splits, 32))  # RecBole's interface writes the batch's memory itself
        assert model.memory.written == 32
    rec_loss, lb = model.calculate_loss(_batch(splits, 32))
    (rec_loss + lb).backward()
    missing = [
        name
        for name, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)
    ]
    assert missing == []


def test_ce_loss_is_full_softmax_cross_entropy(tmp_path):
    _, _, splits, model = tiny_run(tmp_path, loss_type="CE")
    model.eval()
    batch = _batch(splits)
    rec_loss, _ = model.calculate_loss(batch)
    scores = model.full_sort_predict(batch)
    scores[:, 0] = float("-inf")
    torch.testing.assert_close(rec_loss, F.cross_entropy(scores, batch["item_id"]))


@pytest.mark.parametrize("loss_type", ["SSM", "CE"])
def test_memory_surprise_is_one_minus_sigmoid_of_positive_minus_mean_negative(tmp_path, loss_type):
    _, _, splits, model = tiny_run(tmp_path, loss_type=loss_type, dropout=0.0)
    model.train()  # writes are prepared in training only; dropout 0 keeps the passes identical
    batch = _batch(splits)
    torch.manual_seed(5)
    users, items, surprise, times = model.training_loss(batch).memory_writes
    assert torch.equal(users, batch["user_id"]) and torch.equal(items, batch["item_id"])
    assert torch.equal(times, batch["timestamp"])
    full = model.full_sort_predict(batch)  # [B, n_items], same memory and weights
    positive = full.gather(1, batch["item_id"][:, None]).squeeze(1)
    if loss_type == "CE":  # negatives: every item but the positive and the padding item
        keep = torch.ones_like(full, dtype=torch.bool)
        keep[:, 0] = False
        keep[torch.arange(len(positive)), batch["item_id"]] = False
        mean_negative = torch.stack([row[mask].mean() for row, mask in zip(full, keep, strict=True)])
    else:  # the same sampled negatives as the loss drew
        torch.manual_seed(5)
        negatives = sample_negatives(batch["item_id"], model.n_items, model.train_neg_num)
        mean_negative = full.gather(1, negatives).mean(dim=1)
    torch.testing.assert_close(surprise, 1 - torch.sigmoid(positive - mean_negative), rtol=1e-4, atol=1e-5)


def test_predict_and_full_sort_predict_agree(tiny):
    _, _, splits, model = tiny
    model.eval()
    batch = _batch(splits, 12)
    full = model.full_sort_predict(batch)
    assert full.shape == (12, model.n_items)
    torch.testing.assert_close(model.predict(batch), full[torch.arange(12), batch["item_id"]], rtol=1e-5, atol=1e-5)
    model.eval_user_chunk = 5  # chunking users changes nothing
    torch.testing.assert_close(model.full_sort_predict(batch), full)


def test_items_without_visual_feature_get_zero_visual_weight_and_weights_sum_to_one(tmp_path):
    _, _, splits, model = tiny_run(tmp_path, memory_type="history")  # memory = the input history, known here
    model.eval()
    batch = _batch(splits, 12)
    weights = model.router_weights_for(batch)  # [B, n_items, 3]
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:2]))
    no_visual = ~model.item_features.visual_available
    assert no_visual[1:].any()
    assert torch.all(weights[:, no_visual, 1] == 0)
    # users whose memory holds a visual slot use the visual expert on items that have an image
    has_visual_memory = model.memory.retrieve(
        batch["user_id"], batch["item_id_list"], batch["item_length"]
    ).visual_mask.any(1)
    assert has_visual_memory.any() and not has_visual_memory.all()
    assert torch.all(weights[has_visual_memory][:, ~no_visual, 1] > 0)
    assert torch.all(weights[~has_visual_memory][..., 1] == 0)


def test_dataset_without_features_switches_experts_off_and_says_so(tmp_path, caplog):
    _, _, splits, model = tiny_run(
        tmp_path,
        load_col={"inter": ["user_id", "item_id", "rating", "timestamp"]},
        additional_feat_suffix=None,
        alias_of_item_id=None,
        state="INFO",
    )
    assert model.live_experts == ["sequential"]
    model.eval()
    weights = model.router_weights_for(_batch(splits, 4))
    assert torch.equal(weights[..., 0], torch.ones(weights.shape[:2]))


def test_memory_stand_in_holds_recent_history_before_the_prediction_point():
    table = torch.arange(10, dtype=torch.float32)[:, None].repeat(1, 3)  # item i -> [i, i, i]
    features = ItemFeatures(text=table)
    memory = RecentHistoryMemory(features, top_k=3)
    seq = torch.tensor([[4, 5, 6, 7, 0], [8, 0, 0, 0, 0]])
    readout = memory.retrieve(torch.tensor([1, 2]), seq, torch.tensor([4, 1]))
    assert readout.visual is None and not readout.visual_mask.any()
    assert readout.text[0, :, 0].tolist() == [7.0, 6.0, 5.0]  # most recent first, never the target
    assert readout.text_mask.tolist() == [[True, True, True], [True, False, False]]
    assert readout.text[1, 1:].abs().sum() == 0


@pytest.mark.parametrize("backbone_item_features", [False, True])
def test_backbone_reads_history_features_only_when_asked(tmp_path, backbone_item_features):
    _, _, _, model = tiny_run(tmp_path, backbone_item_features=backbone_item_features)
    model.eval()
    seq, length = torch.tensor([[3, 4, 5, 0], [7, 8, 0, 0]]), torch.tensor([3, 2])
    before = model.encode_sequence(seq, length)
    model.item_features.text[4] += 1.0  # item 4 is only in the first user's history
    after = model.encode_sequence(seq, length)
    torch.testing.assert_close(after[1], before[1])
    assert torch.allclose(after[0], before[0]) != backbone_item_features
    assert sorted(model.backbone_feature_proj) == (["text", "visual"] if backbone_item_features else [])


def test_input_item_dropout_zeroes_whole_input_items_in_training_only(tmp_path):
    _, _, _, model = tiny_run(tmp_path, input_item_dropout=0.25)
    seq = torch.randint(1, model.n_items, (64, 4))  # [B, L]
    model.eval()
    reference = model.sequence_item_repr(seq)  # [B, L, H]
    torch.testing.assert_close(model.sequence_item_repr(seq), reference)  # evaluation: nothing dropped
    model.train()
    dropped_share = []
    for _ in range(20):
        masked = model.sequence_item_repr(seq)
        dropped = (masked == 0).all(dim=-1)  # [B, L]: an item is dropped whole, its vector zero
        kept_rows = ~dropped
        # a kept item's input is exactly its evaluation input (no rescaling, unlike dropout of units)
        torch.testing.assert_close(masked[kept_rows], reference[kept_rows])
        dropped_share.append(dropped.float().mean().item())
    # fast_dropout rounds the rate to 1/256: 0.25 stays 0.25; 20 x 256 draws put the mean within +-0.02
    assert abs(np.mean(dropped_share) - 0.25) < 0.02


def test_input_item_dropout_outside_zero_one_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="input_item_dropout"):
        tiny_run(tmp_path, input_item_dropout=1.0)


def test_padded_points_of_weight_zero_change_no_loss():
    scores = torch.tensor([[2.0, 1.0, 3.0], [0.0, -1.0, -2.0]])
    padded = torch.cat([scores, torch.tensor([[9.0, -9.0, 40.0]])])  # a padding row with extreme scores
    weight = torch.tensor([1.0, 1.0, 0.0])
    assert bpr_loss(padded, weight).item() == pytest.approx(bpr_loss(scores).item(), rel=1e-6)
    assert sampled_softmax_loss(padded, weight).item() == pytest.approx(sampled_softmax_loss(scores).item(), rel=1e-6)
    all_on = torch.tensor([True, True, True])
    router = torch.tensor([[[0.5, 0.25, 0.25]], [[0.6, 0.1, 0.3]], [[0.1, 0.1, 0.8]]])  # [B=3, C=1, X], all live
    assert load_balance_loss(router, all_on, weight).item() == pytest.approx(
        load_balance_loss(router[:2], all_on).item(), rel=1e-6
    )
    assert load_balance_loss(router, all_on, torch.zeros(3)).item() == 0.0  # no real point: no balance to keep


def _loss_and_its_parts(tmp_path, **overrides):
    """A batch's rec loss under ``overrides`` (history memory: every user has memory; eval: no dropout, so a
    loss by hand sees the same vectors) -> (model, rec_loss, target [B], seq_repr [B, H], memory, the fused CE)."""
    _, _, splits, model = tiny_run(tmp_path, memory_type="history", **overrides)
    batch = _batch(splits)
    model.eval()
    rec_loss, _ = model.calculate_loss(batch)
    user, seq, length, target = batch["user_id"], batch["item_id_list"], batch["item_length"], batch["item_id"]
    memory = model.read_memory(user, seq, length, batch["timestamp"])
    seq_repr = model.encode_sequence(seq, length, user)  # [B, H]
    fused, routing = model.score_candidates(seq_repr, memory)  # [B, n_items]
    assert routing is not None  # the content experts are live: an own-CE term is not the fused CE again
    fused_ce = torch.nn.functional.cross_entropy(fused.index_fill(1, torch.tensor([0]), float("-inf")), target)
    return model, rec_loss, target, seq_repr, memory, fused_ce


def test_expert_loss_adds_each_content_experts_own_cross_entropy(tmp_path):
    model, rec_loss, target, seq_repr, memory, expected = _loss_and_its_parts(tmp_path, expert_loss_weight=0.5)
    features, terms = model.item_features, 0
    for expert, table, available, feats, mask in (
        (model.visual_expert, features.visual, features.visual_available, memory.visual, memory.visual_mask),
        (model.semantic_expert, features.text, features.text_available, memory.text, memory.text_mask),
    ):
        if table is None or feats is None:
            continue
        own = expert.user_vector(seq_repr, feats, mask) @ expert.candidate_vector(table).T  # [B, n_items]
        own = own.masked_fill(~available, float("-inf"))  # the padding item has no feature either
        points = mask.any(dim=1) & available[target]  # users with memory of the modality, positives with the feature
        assert points.any()
        expected = expected + 0.5 * torch.nn.functional.cross_entropy(own[points], target[points])
        terms += 1
    assert terms >= 1  # the tiny dataset has text features
    torch.testing.assert_close(rec_loss, expected)
    for bad, match in (({"expert_loss_weight": -1.0}, ">= 0"), ({"expert_loss_weight": 0.5, "loss_type": "SSM"}, "CE")):
        with pytest.raises(ConfigError, match=match):
            tiny_run(tmp_path / "bad", **bad)


def test_sequential_loss_adds_the_sequential_experts_own_cross_entropy(tmp_path):
    """fused CE + 0.5 x CE of seq_repr . item vectors alone (the catalogue but the padding item), by hand."""
    model, rec_loss, target, seq_repr, _, expected = _loss_and_its_parts(tmp_path, sequential_loss_weight=0.5)
    sequential = seq_repr @ model.item_proj(model.item_embedding.weight).T  # [B, n_items]
    expected = expected + 0.5 * torch.nn.functional.cross_entropy(
        sequential.index_fill(1, torch.tensor([0]), float("-inf")), target
    )
    torch.testing.assert_close(rec_loss, expected)
    bad_settings = (
        ({"sequential_loss_weight": -1.0}, ">= 0"),
        ({"sequential_loss_weight": 0.5, "loss_type": "SSM"}, "CE"),
    )
    for bad, match in bad_settings:
        with pytest.raises(ConfigError, match="sequential_loss_weight.*" + match):
            tiny_run(tmp_path / "bad", **bad)


@pytest.mark.parametrize("detached", [False, True])
def test_a_detached_router_trains_its_own_weights_and_not_the_item_embeddings(tmp_path, detached):
    """The balance loss depends on the item table only through the router: its gradient reaches the item ID
    embeddings unless the router reads them detached; the router's own weights learn either way."""
    _, _, splits, model = tiny_run(
        tmp_path, router_detached_items=detached, load_balance_weight=1.0, memory_type="history"
    )  # the history: every user has memory, so the router has a choice to balance
    model.eval()
    _, balance = model.calculate_loss(_batch(splits))
    assert balance.item() > 0
    balance.backward()
    item_grad = model.item_embedding.weight.grad
    reaches_items = item_grad is not None and bool(item_grad.abs().sum() > 0)
    assert reaches_items is not detached
    assert model.router.mlp[0].weight.grad.abs().sum() > 0


def test_excluded_unseen_items_leave_the_softmax_and_get_no_gradient(tmp_path):
    _, _, splits, model = tiny_run(tmp_path, exclude_unseen_items=True, memory_type="history")  # no writes
    counts = torch.bincount(splits[0]._dataset.inter_feat["item_id"], minlength=model.n_items)
    assert torch.equal(model.unseen_items, counts == 0)  # the training split's items with no interaction
    batch = _batch(splits)
    in_batch = set(batch["item_id"].tolist()) | set(batch["item_id_list"].flatten().tolist())
    # pretend two more items were never seen in training (the tiny data may have none): in no input, no target
    unseen = [item for item in range(1, model.n_items) if item not in in_batch][:2]
    assert len(unseen) == 2
    model.unseen_items[unseen] = True
    model.eval()
    model.zero_grad()
    rec_loss, _ = model.calculate_loss(batch)
    rec_loss.backward()
    assert torch.equal(model.item_embedding.weight.grad[unseen], torch.zeros(2, model.item_emb_dim))
    # the same loss by hand: cross-entropy over the seen items
    user, seq, length = batch["user_id"], batch["item_id_list"], batch["item_length"]
    memory = model.read_memory(user, seq, length, batch["timestamp"])
    scores, _ = model.score_candidates(model.encode_sequence(seq, length, user), memory)  # [B, n_items]
    scores = scores.masked_fill(model.unseen_items, float("-inf"))
    scores[:, 0] = float("-inf")
    torch.testing.assert_close(rec_loss, torch.nn.functional.cross_entropy(scores, batch["item_id"]))
    # at scoring time the sequential expert is off for them: the content experts alone weigh
    weights = model.router_weights_for(batch)  # [B, n_items, X]
    assert torch.equal(weights[:, unseen, 0], torch.zeros(len(batch["item_id"]), 2))
    assert weights[:, 1:][..., 0].max() > 0  # and on for the items seen in training
    with pytest.raises(ConfigError, match="exclude_unseen_items"):
        tiny_run(tmp_path / "ssm", exclude_unseen_items=True, loss_type="SSM")
