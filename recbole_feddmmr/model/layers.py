"""Building blocks of UR4RecV2MoE: backbone, experts, router.

Shapes: B users (or samples), L sequence positions, K memory slots, C candidates
per user, N candidates shared by every user (e.g. all items), H hidden size,
E item-ID embedding size, F feature size (Fv visual, Ft text), X experts.

Candidate-side inputs come either per user ``[B, C, *]`` or shared ``[N, *]``.
Shared candidates are what full ranking uses: every item-only projection is
then computed once per batch, not once per (user, candidate). Per-user
candidates can also be given as shared ``[U, *]`` plus ``index`` [B, C] into
them (training: U = the batch's distinct items), so item-only work still runs
once per distinct item.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recbole_feddmmr.errors import ConfigError
from recbole_feddmmr.model.dropout import FastDropout, KeyedDropout
from recbole_feddmmr.vmapping import in_vmap_mode


def masked_softmax(logits: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    """Softmax over ``dim`` where ``mask == False`` gets exactly zero weight.

    ``logits`` and ``mask`` broadcast against each other. A slice with no True
    entry gets all-zero weights (never NaN), so "no memory" means "no signal".
    """
    filled = torch.where(mask, logits, torch.finfo(logits.dtype).min)
    return torch.softmax(filled, dim=dim) * mask


def candidate_dot(candidate: Tensor, user: Tensor, index: Tensor | None = None) -> Tensor:
    """Dot products of candidates with users [B, H] -> [B, N].

    ``candidate``: shared [N, H] (optionally picked per user by ``index`` [B, N]) or per user [B, N, H].
    Shared candidates take one matrix product, then a gather. The per-user case is an elementwise
    product and sum: its backward is a broadcast multiply, where ``einsum``/``bmm`` would run B outer products.
    """
    if candidate.dim() == 2:
        scores = user @ candidate.T  # [B, N]
        return scores if index is None else scores.gather(1, index)
    return (candidate * user[:, None, :]).sum(dim=-1)


def candidate_einsum(pattern: str, candidate: Tensor, *others: Tensor) -> Tensor:
    """``einsum`` whose first operand is shared ``[N, ...]`` or per user ``[B, N, ...]``.

    ``pattern`` is written for the per-user case with the candidate operand
    starting ``b n``; for shared candidates its leading ``b`` is dropped.
    """
    candidate_spec, rest = pattern.split(",", 1)
    if candidate.dim() == len(candidate_spec) - 1:
        pattern = f"{candidate_spec[1:]},{rest}"
    return torch.einsum(pattern, candidate, *others)


def causal_attention(query: Tensor, key: Tensor, value: Tensor) -> Tensor:
    """``query``, ``key``, ``value`` [B, h, L, d] -> [B, h, L, d]; position t attends to positions <= t."""
    if not in_vmap_mode():
        return F.scaled_dot_product_attention(query, key, value, is_causal=True)
    seq_len = query.size(-2)
    future = torch.ones(seq_len, seq_len, dtype=torch.bool, device=query.device).triu(1)  # [L, L]
    logits = (query @ key.transpose(-2, -1)) / math.sqrt(query.size(-1))  # [B, h, L, L]
    return torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1) @ value


class CausalSelfAttentionBlock(nn.Module):
    """Post-LayerNorm Transformer block of SASRec: causal self-attention, then GELU feed-forward."""

    def __init__(self, hidden_dim: int, num_heads: int, inner_dim: int, dropout: float) -> None:
        super().__init__()
        if hidden_dim % num_heads:
            raise ConfigError(f"sasrec_hidden_dim={hidden_dim} must be divisible by sasrec_num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_dim, 3 * hidden_dim)
        self.out = nn.Linear(hidden_dim, hidden_dim)
        self.norm1 = nn.LayerNorm(hidden_dim, eps=1e-12)
        self.ff_in = nn.Linear(hidden_dim, inner_dim)
        self.ff_out = nn.Linear(inner_dim, hidden_dim)
        self.norm2 = nn.LayerNorm(hidden_dim, eps=1e-12)
        self.dropout = FastDropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` [B, L, H] -> [B, L, H]; position t attends to positions <= t."""
        batch_size, seq_len, hidden = x.shape
        qkv = self.qkv(x).view(batch_size, seq_len, 3, self.num_heads, hidden // self.num_heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4)  # each [B, h, L, d]
        attended = causal_attention(query, key, value)  # [B, h, L, d]
        attended = attended.transpose(1, 2).reshape(batch_size, seq_len, hidden)  # [B, L, H]
        x = self.norm1(x + self.dropout(self.out(attended)))
        return self.norm2(x + self.dropout(self.ff_out(self.dropout(F.gelu(self.ff_in(x))))))


class SASRecBackbone(nn.Module):
    """SASRec: causal Transformer over the item sequence, read at the last valid position.

    Sequences are right-padded (RecBole's layout). With a causal mask, position
    ``len - 1`` never attends to the padding after it, so no key-padding mask is needed.
    """

    def __init__(
        self, hidden_dim: int, num_blocks: int, num_heads: int, inner_dim: int, max_seq_len: int, dropout: float
    ) -> None:
        super().__init__()
        self.max_seq_len = max_seq_len
        self.position_embedding = nn.Embedding(max_seq_len, hidden_dim)
        self.input_norm = nn.LayerNorm(hidden_dim, eps=1e-12)
        self.input_dropout = FastDropout(dropout)
        self.blocks = nn.ModuleList(
            CausalSelfAttentionBlock(hidden_dim, num_heads, inner_dim, dropout) for _ in range(num_blocks)
        )

    def all_positions(self, item_seq_repr: Tensor) -> Tensor:
        """``item_seq_repr`` [B, L, H] -> hidden [B, L, H]; position t summarises items 0..t."""
        seq_len = item_seq_repr.size(1)
        if seq_len > self.max_seq_len:
            raise ValueError(f"sequence length {seq_len} exceeds max_seq_len={self.max_seq_len}")
        positions = torch.arange(seq_len, device=item_seq_repr.device)  # [L]
        hidden = self.input_dropout(self.input_norm(item_seq_repr + self.position_embedding(positions)))  # [B, L, H]
        for block in self.blocks:
            hidden = block(hidden)  # [B, L, H]
        return hidden

    def forward(self, item_seq_repr: Tensor, item_seq_len: Tensor) -> Tensor:
        """``item_seq_repr`` [B, L, H], ``item_seq_len`` [B] -> seq_repr [B, H] at position len - 1."""
        hidden = self.all_positions(item_seq_repr)  # [B, L, H]
        last = (item_seq_len.long() - 1).clamp(min=0)  # [B]
        return hidden[torch.arange(hidden.size(0), device=hidden.device), last]  # [B, H]


class MemoryProfile(nn.Module):
    """The user's sequence representation attends over one modality of the user's memory -> a profile.

    ``profile = W_o concat_h(sum_k a_hk W_v^h m_k)`` with ``a_h = softmax_k(W_q^h s . W_k^h m_k / sqrt(d))`` over
    the valid slots (none valid: a zero profile). The query is the user, not the candidate: reading the memory
    costs ``[B, K]`` per head, whatever the number of candidates, so scoring the whole catalogue never makes
    a ``[B, N, *]`` tensor beyond the scores themselves.
    """

    def __init__(self, feature_dim: int, hidden_dim: int, num_heads: int = 1, dropout: float = 0.1) -> None:
        super().__init__()
        if hidden_dim % num_heads:
            raise ConfigError(f"sasrec_hidden_dim={hidden_dim} must be divisible by the readout's {num_heads} heads")
        self.num_heads = num_heads
        self.query = nn.Linear(hidden_dim, hidden_dim)
        # no key bias: q . b_k is the same for every slot, so the softmax over slots would cancel it (zero gradient)
        self.key = nn.Linear(feature_dim, hidden_dim, bias=False)
        self.value = nn.Linear(feature_dim, hidden_dim)
        self.out = nn.Linear(hidden_dim, hidden_dim)
        self.dropout = KeyedDropout(dropout)

    def attention(self, seq_repr: Tensor, memory: Tensor, memory_mask: Tensor) -> Tensor:
        """``seq_repr`` [B, H], ``memory`` [B, K, F], ``memory_mask`` [B, K] -> weights [B, h, K] (rows sum to 1,
        or to 0 where no slot is valid)."""
        batch = seq_repr.size(0)
        head_dim = self.query.out_features // self.num_heads
        query = self.query(seq_repr).view(batch, self.num_heads, head_dim)  # [B, h, d]
        # q . W_k m = (W_k^T q) . m: the query goes back to feature space ([B, h, F], B rows)
        # instead of every slot to key space ([B, K, H], B x K rows)
        key_weight = self.key.weight.view(self.num_heads, head_dim, -1)  # [h, d, F]
        query_features = torch.einsum("bhd,hdf->bhf", query, key_weight)  # [B, h, F]
        logits = torch.einsum("bhf,bkf->bhk", query_features, memory) / math.sqrt(head_dim)  # [B, h, K]
        return masked_softmax(logits, memory_mask[:, None, :])

    def forward(self, seq_repr: Tensor, memory: Tensor, memory_mask: Tensor) -> Tensor:
        """-> profile [B, H]."""
        batch = seq_repr.size(0)
        weights = self.dropout(self.attention(seq_repr, memory, memory_mask))  # [B, h, K]
        # sum_k a_k (W_v m_k + b_v) = W_v (sum_k a_k m_k) + b_v sum_k a_k: pool the slots first, project B x h rows
        pooled = torch.einsum("bhk,bkf->bhf", weights, memory)  # [B, h, F]
        value_weight = self.value.weight.view(self.num_heads, -1, pooled.size(-1))  # [h, d, F]
        value_bias = self.value.bias.view(self.num_heads, -1)  # [h, d]
        context = torch.einsum("bhf,hdf->bhd", pooled, value_weight) + weights.sum(-1, keepdim=True) * value_bias
        return self.out(context.reshape(batch, -1))  # [B, h, d] -> [B, H]


class ContentExpert(nn.Module):
    """An expert that scores candidates by their content (one feature modality) against the user's memory.

    ``score(b, n) = (W_u s_b + profile_b) . (W_c f_n + c)``: the user vector is the sequence representation
    projected into the content space plus the memory's profile (:class:`MemoryProfile`); the candidate vector
    is the projection of the candidate's own feature. So the candidate's content meets the user directly (a
    candidate unlike the user's memory scores low), and scoring N candidates is one ``[B, H] x [H, N]``
    product. The visual expert reads CLIP features (one head), the semantic expert SBERT text features.
    """

    def __init__(self, feature_dim: int, hidden_dim: int, num_heads: int = 1, dropout: float = 0.1) -> None:
        super().__init__()
        self.profile = MemoryProfile(feature_dim, hidden_dim, num_heads, dropout)
        self.user_proj = nn.Linear(hidden_dim, hidden_dim, bias=False)
        self.candidate_proj = nn.Linear(feature_dim, hidden_dim)

    def user_vector(self, seq_repr: Tensor, memory: Tensor, memory_mask: Tensor) -> Tensor:
        """``seq_repr`` [B, H], ``memory`` [B, K, F], ``memory_mask`` [B, K] -> [B, H]."""
        return self.user_proj(seq_repr) + self.profile(seq_repr, memory, memory_mask)

    def candidate_vector(self, candidate: Tensor) -> Tensor:
        """``candidate`` [U, F] features -> [U, H]."""
        return self.candidate_proj(candidate)

    def forward(
        self, seq_repr: Tensor, candidate: Tensor, memory: Tensor, memory_mask: Tensor, index: Tensor | None = None
    ) -> Tensor:
        """``candidate`` [U, F] features (item-only work, once per distinct item), ``index`` [B, C] into them
        (``None``: every user scores all U) -> scores [B, C] (or [B, U])."""
        user = self.user_vector(seq_repr, memory, memory_mask)  # [B, H]
        return candidate_dot(self.candidate_vector(candidate), user, index)


@dataclass(frozen=True)
class Routing:
    """The router's weights in factored form, never a dense ``[B, N, X]`` tensor unless asked for.

    Whether an expert is live for (user, item) is ``item_live[item] & user_live[user]`` (the item has the
    feature, the user's memory has a slot of it), and the router's logits depend on the item alone, so a
    user's weights depend on the user only through the pattern of experts live for them: one of ``2^X``.
    ``table`` holds the weights of every (pattern, distinct candidate); fusing scores and the balance loss
    read it per user through ``pattern`` and never run a softmax over users x items.
    """

    table: Tensor  # [2^X, U, X] weights, rows sum to 1 over the live experts (0 where none is)
    pattern: Tensor  # [B] long, bit e set where expert e is live for the user
    item_live: Tensor  # [U, X] bool
    user_live: Tensor  # [B, X] bool
    index: Tensor | None  # [B, C] rows of ``table``'s U per user; None: every user scores all U

    def dense(self) -> Tensor:
        """The weights per (user, candidate) -> [B, C, X] (or [B, U, X]); analysis and tests, not training."""
        if self.index is None:
            return self.table[self.pattern]
        return self.table[self.pattern[:, None], self.index]

    def score(self, users: list[Tensor | None], candidates: list[Tensor | None]) -> Tensor:
        """The fused score ``sum_e w_e(user, candidate) * users[e] . candidates[e]`` -> [B, C] (or [B, U]).

        ``users[e]`` [B, H] and ``candidates[e]`` [U, H] are expert e's user and candidate vectors (``None`` for
        an expert live nowhere, which is skipped). Scoring all U candidates folds the weights into the
        candidate side: users of one pattern share ``w_e(candidate)``, so their scores are one matrix product
        ``[B_p, X H] x [X H, U]`` per pattern present, with no elementwise pass over [B, U] per expert.
        """
        experts = [e for e, user in enumerate(users) if user is not None]
        if self.index is not None:  # C candidates per user (sampled losses): few, mix the gathered scores densely
            weights = self.dense()  # [B, C, X]
            return sum(weights[..., e] * candidate_dot(candidates[e], users[e], self.index) for e in experts)
        if in_vmap_mode():  # per-pattern grouping has data-dependent shapes: one [B, U] product per expert
            return sum(
                self.table[:, :, e].index_select(0, self.pattern) * candidate_dot(candidates[e], users[e])
                for e in experts
            )
        user_cat = torch.cat([users[e] for e in experts], dim=1)  # [B, X H]

        def folded(pattern: Tensor) -> Tensor:  # the candidates weighted by that pattern's weights -> [U, X H]
            return torch.cat([self.table[pattern, :, e, None] * candidates[e] for e in experts], dim=1)

        present = self.pattern.unique()  # usually one or two: users with and without memory
        if present.numel() == 1:
            return user_cat @ folded(present[0]).T  # [B, U]
        scores = user_cat.new_empty(user_cat.size(0), self.table.size(1))  # [B, U]
        for pattern in present:  # at most 2^X patterns, never a loop over users or items
            rows = (self.pattern == pattern).nonzero().squeeze(1)  # [B_p]
            scores[rows] = user_cat[rows] @ folded(pattern).T
        return scores

    def load_balance(self, enabled: Tensor, point_weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The sums behind the load-balance loss (see ``losses.load_balance_loss``): over the (user, candidate)
        pairs where every enabled expert is live (the router had the full choice), the summed weights of the
        enabled experts [E] and the number of pairs []. ``point_weight`` [B]: users with weight 0 are left out.
        """
        experts = enabled.nonzero().squeeze(1)  # [E]
        full_user = self.user_live.index_select(1, experts).all(dim=1)  # [B]
        if point_weight is not None:
            full_user = full_user & (point_weight > 0)
        full_item = self.item_live.index_select(1, experts).all(dim=1).to(self.table.dtype)  # [U]
        # a fully live user's pattern has exactly the enabled experts' bits set
        full_pattern = (enabled.long() << torch.arange(enabled.numel(), device=enabled.device)).sum()
        weights = self.table[full_pattern].index_select(1, experts)  # [U, E]
        if self.index is None:
            per_item = full_item * full_user.sum()  # [U] pairs per candidate
        else:
            counted = (full_user[:, None] & torch.ones_like(self.index, dtype=torch.bool)).to(self.table.dtype)
            per_item = torch.zeros_like(full_item).index_add(0, self.index.flatten(), counted.flatten()) * full_item
        return per_item @ weights, per_item.sum()


class ItemCentricRouter(nn.Module):
    """Expert weights from the candidate's ID embedding alone; experts not live for a (user, item) get 0."""

    def __init__(self, item_emb_dim: int, hidden_dim: int = 128, num_experts: int = 3, dropout: float = 0.1) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(item_emb_dim, hidden_dim),
            nn.LayerNorm(hidden_dim),
            nn.ReLU(),
            KeyedDropout(dropout),
            nn.Linear(hidden_dim, hidden_dim // 2),
            nn.ReLU(),
            KeyedDropout(dropout),
            nn.Linear(hidden_dim // 2, num_experts),
        )

    def forward(
        self,
        candidate_id: Tensor,
        item_live: Tensor,
        user_live: Tensor,
        index: Tensor | None = None,
        items: Tensor | None = None,
    ) -> Routing:
        """``candidate_id`` [U, E], ``item_live`` [U, X] and ``user_live`` [B, X] bool (an expert is live for a
        pair where both are), ``index`` [B, C] into the U candidates (None: all U for every user) -> Routing.

        ``items`` [U]: the item ids of the rows of ``candidate_id``, so that keyed dropout masks follow the
        item, not its row (see :func:`keyed_dropout`).
        """
        hidden = candidate_id
        for layer in self.mlp:  # once per item
            hidden = layer(hidden, items) if isinstance(layer, KeyedDropout) else layer(hidden)
        bits = torch.arange(hidden.size(-1), device=hidden.device)  # [X]
        patterns = ((torch.arange(2 ** bits.numel(), device=hidden.device)[:, None] >> bits) & 1).bool()  # [2^X, X]
        table = masked_softmax(hidden, item_live & patterns[:, None, :])  # [2^X, U, X]
        pattern = (user_live.long() << bits).sum(dim=1)  # [B]: the row of ``patterns`` equal to the user's
        return Routing(table, pattern, item_live, user_live, index)
