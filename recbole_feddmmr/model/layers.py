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
from recbole_feddmmr.model.dropout import FastDropout, KeyedDropout, fast_dropout
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


class LightweightAttention(nn.Module):
    """Single-head attention: queries from candidates, keys from memory, softmax(QK^T / sqrt(d))."""

    def __init__(self, feature_dim: int, attention_dim: int) -> None:
        super().__init__()
        self.query_proj = nn.Linear(feature_dim, attention_dim)
        self.key_proj = nn.Linear(feature_dim, attention_dim)
        self.scale = math.sqrt(attention_dim)

    def forward(self, candidate: Tensor, memory: Tensor, memory_mask: Tensor, index: Tensor | None = None) -> Tensor:
        """``candidate`` [N, F] or [B, N, F], ``memory`` [B, K, F], ``memory_mask`` [B, K] -> weights [B, N, K]."""
        query = select_candidates(self.query_proj(candidate), index)  # item-only projection, once per item
        key = self.key_proj(memory)  # [B, K, d]
        logits = candidate_einsum("bnd,bkd->bnk", query, key) / self.scale  # [B, N, K]
        return masked_softmax(logits, memory_mask[:, None, :])


class VisualExpert(nn.Module):
    """Visual expert: the candidate's visual feature attends over the memory's visual features.

    ``vis_emb = W_o (sum_k a_k m_k + c) + b_o`` with ``c`` the candidate's own feature (the residual,
    ``candidate_residual``; without it, the seed's form) and the expert's score is ``seq_repr . vis_emb``.
    Because the projection is linear, the score equals ``(sum_k a_k m_k + c) . W_o^T seq_repr + b_o . seq_repr``:
    :meth:`forward` computes that, which never materialises ``[B, N, H]``.

    Why the residual: softmax attention normalises away *how well* the candidate matches the memory
    (a candidate unlike every slot still gets weights summing to 1), so without it the candidate's
    content only reorders memory slots and never meets the user's representation directly.
    """

    def __init__(
        self, visual_dim: int, hidden_dim: int, attention_dim: int = 128, candidate_residual: bool = True
    ) -> None:
        super().__init__()
        self.attention = LightweightAttention(visual_dim, min(visual_dim, attention_dim))
        self.output_proj = nn.Linear(visual_dim, hidden_dim)
        self.candidate_residual = candidate_residual

    def embed(self, candidate: Tensor, memory: Tensor, memory_mask: Tensor, index: Tensor | None = None) -> Tensor:
        """The expert's item representation vis_emb [B, N, H] (reference path, used by tests and analysis)."""
        weights = self.attention(candidate, memory, memory_mask, index)  # [B, N, K]
        aggregated = torch.einsum("bnk,bkf->bnf", weights, memory)  # [B, N, Fv]
        if self.candidate_residual:
            aggregated = aggregated + select_candidates(candidate, index)
        return self.output_proj(aggregated)  # [B, N, H]

    def forward(
        self, seq_repr: Tensor, candidate: Tensor, memory: Tensor, memory_mask: Tensor, index: Tensor | None = None
    ) -> Tensor:
        """``seq_repr`` [B, H], ``candidate`` [N, Fv] or [B, N, Fv], ``memory`` [B, K, Fv] -> scores [B, N]."""
        weights = self.attention(candidate, memory, memory_mask, index)  # [B, N, K]
        user_in_feature_space = seq_repr @ self.output_proj.weight  # [B, Fv]
        slot_scores = torch.einsum("bkf,bf->bk", memory, user_in_feature_space)  # [B, K]
        bias_score = seq_repr @ self.output_proj.bias  # [B]
        scores = torch.einsum("bnk,bk->bn", weights, slot_scores) + bias_score[:, None]  # [B, N]
        if self.candidate_residual:
            scores = scores + candidate_dot(candidate, user_in_feature_space, index)  # [B, N]
        return scores


class SemanticExpert(nn.Module):
    """Semantic expert: the candidate's ID embedding attends (multi-head) over the memory's text features.

    ``sem_emb = LayerNorm(q + MHA(q, text, text))`` with ``q = W_q id_emb (+ W_t text)``; score
    ``seq_repr . sem_emb``. The seed's query is the ID embedding alone; with ``candidate_text`` the
    candidate's own text feature is added to it (see :class:`VisualExpert` for why the candidate's
    content must reach the score directly). The parameters are those of an
    ``nn.MultiheadAttention(kdim=vdim=text_dim)``; the forward pass is written out so that the
    candidates' query projection runs once per item, not once per user.
    """

    def __init__(
        self,
        id_dim: int,
        text_dim: int,
        hidden_dim: int,
        num_heads: int = 4,
        dropout: float = 0.1,
        candidate_text: bool = True,
    ) -> None:
        super().__init__()
        if hidden_dim % num_heads:
            raise ConfigError(f"sasrec_hidden_dim={hidden_dim} must be divisible by semantic_num_heads={num_heads}")
        self.num_heads = num_heads
        self.query_proj = nn.Linear(id_dim, hidden_dim)
        self.text_query_proj = nn.Linear(text_dim, hidden_dim, bias=False) if candidate_text else None
        self.cross_attention = nn.MultiheadAttention(
            hidden_dim, num_heads, dropout=dropout, kdim=text_dim, vdim=text_dim, batch_first=True
        )
        self.norm = nn.LayerNorm(hidden_dim)

    def attention_weights(
        self,
        candidate_id: Tensor,
        memory: Tensor,
        memory_mask: Tensor,
        index: Tensor | None = None,
        candidate_text: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """-> (query input [N, H] or [B, N, H], weights [B, heads, N, K], values [B, K, heads, H/heads]).

        ``candidate_text`` [N, Ft] or [B, N, Ft] is required when the expert was built with ``candidate_text``.
        """
        mha = self.cross_attention
        batch_size, num_slots, _ = memory.shape
        head_dim = mha.head_dim
        bias_q, bias_k, bias_v = mha.in_proj_bias.chunk(3)
        query_in = self.query_proj(candidate_id)  # [N, H] or [B, N, H]: item-only, once per item
        if self.text_query_proj is not None:
            if candidate_text is None:
                raise ValueError("this SemanticExpert adds the candidate's text to its query: pass candidate_text")
            query_in = query_in + self.text_query_proj(candidate_text)
        query = F.linear(query_in, mha.q_proj_weight, bias_q).unflatten(-1, (self.num_heads, head_dim))  # [.., h, d]
        query_in, query = select_candidates(query_in, index), select_candidates(query, index)
        key = F.linear(memory, mha.k_proj_weight, bias_k).view(batch_size, num_slots, self.num_heads, head_dim)
        value = F.linear(memory, mha.v_proj_weight, bias_v).view(batch_size, num_slots, self.num_heads, head_dim)
        logits = candidate_einsum("bnhd,bkhd->bhnk", query, key) / math.sqrt(head_dim)  # [B, h, N, K]
        weights = masked_softmax(logits, memory_mask[:, None, None, :])
        return query_in, weights, value

    def embed(
        self,
        candidate_id: Tensor,
        memory: Tensor,
        memory_mask: Tensor,
        index: Tensor | None = None,
        candidate_text: Tensor | None = None,
    ) -> Tensor:
        """``candidate_id`` [N, E] or [B, N, E], ``memory`` [B, K, Ft], ``memory_mask`` [B, K] -> sem_emb [B, N, H]."""
        query_in, weights, value = self.attention_weights(candidate_id, memory, memory_mask, index, candidate_text)
        weights = fast_dropout(weights, self.cross_attention.dropout, self.training)
        context = torch.einsum("bhnk,bkhd->bnhd", weights, value).flatten(-2)  # [B, N, H]
        return self.norm(query_in + self.cross_attention.out_proj(context))  # [B, N, H]

    def forward(
        self,
        seq_repr: Tensor,
        candidate_id: Tensor,
        memory: Tensor,
        memory_mask: Tensor,
        index: Tensor | None = None,
        candidate_text: Tensor | None = None,
    ) -> Tensor:
        """-> scores [B, N]."""
        return candidate_dot(self.embed(candidate_id, memory, memory_mask, index, candidate_text), seq_repr)


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
