"""Layers of UR4RecV2MoE: shapes, masking, equivalences with reference computations."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from recbole_feddmmr.model.dropout import fast_dropout
from recbole_feddmmr.model.layers import (
    CausalSelfAttentionBlock,
    ContentExpert,
    ItemCentricRouter,
    MemoryProfile,
    SASRecBackbone,
    candidate_dot,
    masked_softmax,
)
from recbole_feddmmr.model.losses import balance_penalty, load_balance_loss
from recbole_feddmmr.vmapping import vmap_mode

B, K, N, H = 3, 5, 7, 16


def test_masked_softmax_gives_exact_zero_to_masked_slots_and_zero_rows_when_nothing_valid():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.5, 0.5]])
    mask = torch.tensor([[True, False, True], [False, False, False]])
    weights = masked_softmax(logits, mask)
    assert weights[0, 1].item() == 0.0
    expected = torch.softmax(torch.tensor([1.0, 3.0]), 0)
    torch.testing.assert_close(weights[0, [0, 2]], expected)
    assert torch.equal(weights[1], torch.zeros(3))


def test_memory_profile_is_the_users_attention_over_the_valid_slots_computed_by_hand():
    profile = MemoryProfile(feature_dim=6, hidden_dim=H, num_heads=2, dropout=0.0).eval()
    seq_repr, memory = torch.randn(B, H), torch.randn(B, K, 6)
    mask = torch.ones(B, K, dtype=torch.bool)
    mask[0, 3:] = False
    mask[2] = False  # no valid slot: a zero context, the output layer's bias alone
    weights = profile.attention(seq_repr, memory, mask)  # [B, h, K]
    assert weights.shape == (B, 2, K) and torch.all(weights[0, :, 3:] == 0) and torch.all(weights[2] == 0)
    torch.testing.assert_close(weights[:2].sum(-1), torch.ones(2, 2))
    # by hand for user 1, head 1: softmax(q_h . k_hk / sqrt(d)), context = sum_k a_k v_hk
    d = H // 2
    q = profile.query(seq_repr[1])[d:]
    k = profile.key(memory[1])[:, d:]
    v = profile.value(memory[1])[:, d:]
    a = torch.softmax(k @ q / math.sqrt(d), 0)
    torch.testing.assert_close(weights[1, 1], a)
    context = torch.cat([(weights[1, 0][:, None] * profile.value(memory[1])[:, :d]).sum(0), a @ v])
    out = profile(seq_repr, memory, mask)
    torch.testing.assert_close(out[1], profile.out(context), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[2], profile.out.bias)


def test_content_expert_scores_the_candidates_content_against_the_user_computed_by_hand():
    expert = ContentExpert(feature_dim=6, hidden_dim=H, num_heads=2, dropout=0.0).eval()
    seq_repr, candidate, memory = torch.randn(B, H), torch.randn(N, 6), torch.randn(B, K, 6)
    mask = torch.rand(B, K) > 0.3
    scores = expert(seq_repr, candidate, memory, mask)  # [B, N]
    user = expert.user_proj(seq_repr) + expert.profile(seq_repr, memory, mask)  # [B, H]
    by_hand = torch.stack(
        [torch.stack([user[b] @ expert.candidate_proj(candidate[n]) for n in range(N)]) for b in range(B)]
    )
    torch.testing.assert_close(scores, by_hand, rtol=1e-5, atol=1e-5)
    # per-user candidates (shared table + index) give the same numbers as gathering afterwards
    index = torch.randint(0, N, (B, 4))
    torch.testing.assert_close(expert(seq_repr, candidate, memory, mask, index), scores.gather(1, index))
    # the candidate's own content reaches the score: one memory slot, yet candidates score differently
    one_slot = expert(seq_repr, candidate, memory[:, :1], torch.ones(B, 1, dtype=torch.bool))
    assert not torch.allclose(one_slot, one_slot[:, :1].expand(B, N))


def test_content_expert_ignores_what_masked_slots_hold():
    expert = ContentExpert(feature_dim=12, hidden_dim=H, num_heads=4, dropout=0.0).eval()
    seq_repr, candidate, memory = torch.randn(B, H), torch.randn(N, 12), torch.randn(B, K, 12)
    mask = torch.ones(B, K, dtype=torch.bool)
    mask[:, -2:] = False
    scrambled = memory.clone()
    scrambled[:, -2:] = 1e3 * torch.randn(B, 2, 12)
    torch.testing.assert_close(expert(seq_repr, candidate, memory, mask), expert(seq_repr, candidate, scrambled, mask))


def test_router_weights_sum_to_one_and_switched_off_experts_get_zero():
    router = ItemCentricRouter(item_emb_dim=8, hidden_dim=16, num_experts=3, dropout=0.0)
    item_live, user_live = torch.ones(N, 3, dtype=torch.bool), torch.ones(B, 3, dtype=torch.bool)
    user_live[0, 1] = False  # visual off for user 0
    item_live[2, 2] = False  # semantic off for item 2
    weights = router(torch.randn(N, 8), item_live, user_live).dense()
    assert weights.shape == (B, N, 3)
    torch.testing.assert_close(weights.sum(-1), torch.ones(B, N))
    assert torch.all(weights[0, :, 1] == 0) and torch.all(weights[:, 2, 2] == 0)
    only_seq = torch.tensor([True, False, False]).expand(B, 3)
    assert torch.equal(router(torch.randn(N, 8), item_live, only_seq).dense()[..., 0], torch.ones(B, N))


def _dense_router(router: ItemCentricRouter, candidate_id, item_live, user_live, index):
    """The router as it was first written: one masked softmax over every (user, candidate) pair."""
    logits = router.mlp(candidate_id)  # [U, X]
    live = item_live[None] & user_live[:, None]  # [B, U, X]
    if index is not None:
        logits, live = logits[index], live[torch.arange(B)[:, None], index]  # [B, C, X]
    return masked_softmax(logits, live)


@pytest.mark.parametrize("indexed", [False, True])
def test_factored_routing_equals_a_softmax_over_every_user_and_candidate(indexed):
    torch.manual_seed(0)
    router = ItemCentricRouter(item_emb_dim=8, hidden_dim=16, num_experts=3, dropout=0.0)
    candidate_id, item_live = torch.randn(N, 8), torch.rand(N, 3) > 0.3
    user_live = torch.rand(B, 3) > 0.4
    item_live[:, 0] = user_live[:, 0] = True  # the sequential expert is live everywhere
    user_live[1] = True  # one user with every expert live, so the balance loss has pairs
    user_live[0, 1:] = False  # and one with the sequential expert alone: two patterns at least
    index = torch.randint(N, (B, 4)) if indexed else None
    routing = router(candidate_id, item_live, user_live, index)
    dense = _dense_router(router, candidate_id, item_live, user_live, index)  # [B, C, X]
    torch.testing.assert_close(routing.dense(), dense)
    users, candidates = [torch.randn(B, H) for _ in range(3)], [torch.randn(N, H) for _ in range(3)]
    scores = [candidate_dot(c, u, index) for u, c in zip(users, candidates, strict=True)]  # [B, C] per expert
    torch.testing.assert_close(routing.score(users, candidates), (dense * torch.stack(scores, dim=-1)).sum(-1))
    skipped = routing.score([users[0], None, users[2]], [candidates[0], None, candidates[2]])
    torch.testing.assert_close(skipped, dense[..., 0] * scores[0] + dense[..., 2] * scores[2])
    with vmap_mode():  # the per-expert form that torch.func.vmap runs gives the same scores
        torch.testing.assert_close(routing.score(users, candidates), (dense * torch.stack(scores, dim=-1)).sum(-1))
    enabled, point_weight = torch.tensor([True, True, True]), torch.tensor([1.0, 1.0, 0.0])
    torch.testing.assert_close(
        balance_penalty(*routing.load_balance(enabled, point_weight)), load_balance_loss(dense, enabled, point_weight)
    )


def test_candidate_dot_shared_indexed_and_per_user_agree():
    shared, user = torch.randn(N, H), torch.randn(B, H)
    index = torch.randint(0, N, (B, 4))
    full = candidate_dot(shared, user)
    assert full.shape == (B, N)
    torch.testing.assert_close(candidate_dot(shared, user, index), full.gather(1, index))
    torch.testing.assert_close(candidate_dot(shared[index], user), full.gather(1, index))


def test_backbone_reads_last_valid_position_and_ignores_padding_after_it():
    backbone = SASRecBackbone(hidden_dim=H, num_blocks=2, num_heads=4, inner_dim=32, max_seq_len=6, dropout=0.0).eval()
    seq = torch.randn(2, 6, H)
    lengths = torch.tensor([3, 6])
    out = backbone(seq, lengths)
    assert out.shape == (2, H)
    changed = seq.clone()
    changed[0, 3:] = torch.randn(3, H)  # user 0's padding region
    torch.testing.assert_close(backbone(changed, lengths), out)
    with pytest.raises(ValueError, match="max_seq_len"):
        backbone(torch.randn(1, 7, H), torch.tensor([7]))


def test_causal_block_matches_torch_transformer_layer_math():
    block = CausalSelfAttentionBlock(hidden_dim=H, num_heads=4, inner_dim=32, dropout=0.0).eval()
    reference = nn.TransformerEncoderLayer(
        H, 4, 32, 0.0, activation="gelu", batch_first=True, layer_norm_eps=1e-12
    ).eval()
    with torch.no_grad():
        reference.self_attn.in_proj_weight.copy_(block.qkv.weight)
        reference.self_attn.in_proj_bias.copy_(block.qkv.bias)
        reference.self_attn.out_proj.load_state_dict(block.out.state_dict())
        reference.linear1.load_state_dict(block.ff_in.state_dict())
        reference.linear2.load_state_dict(block.ff_out.state_dict())
        reference.norm1.load_state_dict(block.norm1.state_dict())
        reference.norm2.load_state_dict(block.norm2.state_dict())
    x = torch.randn(2, 5, H)
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    torch.testing.assert_close(block(x), reference(x, src_mask=causal, is_causal=True), rtol=1e-5, atol=1e-5)


def test_fast_dropout_keep_rate_scaling_and_eval_identity():
    x = torch.ones(200_000)
    assert torch.equal(fast_dropout(x, 0.1, training=False), x)
    dropped = fast_dropout(x, 0.1, training=True)
    kept = dropped != 0
    keep_rate = kept.float().mean().item()
    assert abs(keep_rate - (256 - 26) / 256) < 0.005  # p = 0.1 rounds to 26/256
    torch.testing.assert_close(dropped[kept], torch.full_like(dropped[kept], 256 / 230))
    assert abs(dropped.mean().item() - 1.0) < 0.01  # inverted dropout keeps the expectation


def test_written_out_causal_attention_of_vmap_mode_equals_the_fused_kernel():
    from recbole_feddmmr.model.layers import causal_attention
    from recbole_feddmmr.vmapping import in_vmap_mode, vmap_mode

    generator = torch.Generator().manual_seed(3)
    query, key, value = (torch.randn(2, 4, 6, 8, generator=generator) for _ in range(3))  # [B, h, L, d]
    fused = causal_attention(query, key, value)
    with vmap_mode():
        assert in_vmap_mode()
        written_out = causal_attention(query, key, value)
    assert not in_vmap_mode()
    torch.testing.assert_close(written_out, fused, rtol=1e-5, atol=1e-6)
    changed_future = value.clone()
    changed_future[:, :, 3:] += 1.0  # positions after 2 must not change what positions <= 2 attend to
    with vmap_mode():
        torch.testing.assert_close(causal_attention(query, key, changed_future)[:, :, :3], written_out[:, :, :3])


def test_keyed_dropout_masks_are_a_function_of_key_call_and_element():
    from recbole_feddmmr.model.dropout import KeyedDropout, fast_dropout, keyed_dropout

    x = torch.ones(64, 50)
    with keyed_dropout(torch.tensor(7)):
        first, second = fast_dropout(x, 0.1, True), fast_dropout(x, 0.1, True)  # two calls: two masks
    with keyed_dropout(torch.tensor(7)):
        again = fast_dropout(x, 0.1, True)
    with keyed_dropout(torch.tensor(8)):
        other_key = fast_dropout(x, 0.1, True)
    assert torch.equal(first, again) and not torch.equal(first, second) and not torch.equal(first, other_key)
    torch.testing.assert_close(first.unique(), torch.tensor([0.0, 256 / 230]))  # p rounded to 26/256, kept scaled
    assert abs((first == 0).float().mean().item() - 26 / 256) < 0.02  # 3200 draws at rate 26/256
    # a padded (longer) first dimension keeps every real element's mask
    with keyed_dropout(torch.tensor(7)):
        padded = fast_dropout(torch.ones(80, 50), 0.1, True)
    assert torch.equal(padded[:64], first)
    # masks keyed by row ids (the router's item rows, through KeyedDropout) follow the row's id, not its position
    rows, router_dropout = torch.tensor([5, 9, 2]), KeyedDropout(0.5).train()
    with keyed_dropout(torch.tensor(7)):
        by_id = router_dropout(torch.ones(3, 40), rows)
    with keyed_dropout(torch.tensor(7)):
        permuted = router_dropout(torch.ones(3, 40), rows[[2, 0, 1]])
    assert torch.equal(permuted, by_id[[2, 0, 1]])
    # vmap over a batch of keys gives each key's own masks
    keys = torch.tensor([7, 8])

    def masked(key):
        with keyed_dropout(key):
            return fast_dropout(x, 0.1, True)

    stacked = torch.func.vmap(masked, randomness="different")(keys)
    assert torch.equal(stacked[0], first) and torch.equal(stacked[1], other_key)


def test_keyed_bytes_are_splitmix64_and_uniform():
    from recbole_feddmmr.model.dropout import _mix64, keyed_bytes

    def splitmix64_finaliser(z: int) -> int:  # the reference, in Python's unbounded integers
        full = (1 << 64) - 1
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & full
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & full
        return z ^ (z >> 31)

    values = [0, 1, 12345, -5, 2**62, -(2**63)]
    mixed = [value & (2**64 - 1) for value in _mix64(torch.tensor(values)).tolist()]
    assert mixed == [splitmix64_finaliser(value & (2**64 - 1)) for value in values]
    counts = torch.bincount(keyed_bytes(torch.tensor(3), 0, torch.Size([512, 512])).flatten().long(), minlength=256)
    expected = 512 * 512 / 256  # 1024 per byte value; a binomial spread of about 32
    assert counts.min() > expected - 6 * 32 and counts.max() < expected + 6 * 32
