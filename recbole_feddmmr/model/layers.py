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


def select_candidates(shared: Tensor, index: Tensor | None) -> Tensor:
    """Rows of ``shared`` [U, ...] picked by ``index`` [B, C] -> [B, C, ...]; ``shared`` itself if no index."""
    return shared if index is None else shared[index]


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
        self.key = nn.Linear(feature_dim, hidden_dim)
        self.value = nn.Linear(feature_dim, hidden_dim)
        self.out = nn.Linear(hidden_dim, hidden_dim)
        self.dropout = KeyedDropout(dropout)

    def attention(self, seq_repr: Tensor, memory: Tensor, memory_mask: Tensor) -> Tensor:
        """``seq_repr`` [B, H], ``memory`` [B, K, F], ``memory_mask`` [B, K] -> weights [B, h, K] (rows sum to 1,
        or to 0 where no slot is valid)."""
        batch, slots, _ = memory.shape
        head_dim = self.query.out_features // self.num_heads
        query = self.query(seq_repr).view(batch, self.num_heads, head_dim)  # [B, h, d]
        key = self.key(memory).view(batch, slots, self.num_heads, head_dim)  # [B, K, h, d]
        logits = torch.einsum("bhd,bkhd->bhk", query, key) / math.sqrt(head_dim)  # [B, h, K]
        return masked_softmax(logits, memory_mask[:, None, :])

    def forward(self, seq_repr: Tensor, memory: Tensor, memory_mask: Tensor) -> Tensor:
        """-> profile [B, H]."""
        batch, slots, _ = memory.shape
        weights = self.dropout(self.attention(seq_repr, memory, memory_mask))  # [B, h, K]
        value = self.value(memory).view(batch, slots, self.num_heads, -1)  # [B, K, h, d]
        context = torch.einsum("bhk,bkhd->bhd", weights, value).reshape(batch, -1)  # [B, H]
        return self.out(context)


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

    def forward(
        self, seq_repr: Tensor, candidate: Tensor, memory: Tensor, memory_mask: Tensor, index: Tensor | None = None
    ) -> Tensor:
        """``candidate`` [U, F] features (item-only work, once per distinct item), ``index`` [B, C] into them
        (``None``: every user scores all U) -> scores [B, C] (or [B, U])."""
        user = self.user_vector(seq_repr, memory, memory_mask)  # [B, H]
        return candidate_dot(self.candidate_proj(candidate), user, index)


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
        self, candidate_id: Tensor, expert_live: Tensor, index: Tensor | None = None, items: Tensor | None = None
    ) -> Tensor:
        """``candidate_id`` [N, E] or [B, N, E], ``expert_live`` [B, N, X] bool -> weights [B, N, X], rows sum to 1.

        ``items`` [N]: the item ids of the rows of a shared ``candidate_id`` [N, E], so that keyed dropout
        masks follow the item, not its row (see :func:`keyed_dropout`).
        """
        hidden = candidate_id
        for layer in self.mlp:  # once per item
            hidden = layer(hidden, items) if isinstance(layer, KeyedDropout) else layer(hidden)
        return masked_softmax(select_candidates(hidden, index), expert_live)  # [B, N, X]
