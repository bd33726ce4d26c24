"""The training objectives of UR4RecV2MoE and the types a training step passes around.

Scores come as ``[P, 1 + N]`` with the positive in column 0 (sampled candidates) or as ``[P, n_items]``
(the whole catalogue); ``weight`` [P] is 1 for a training target and 0 for padding.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from recbole_feddmmr.memory import MemoryReadout, MemoryWrites


class PredictionPoints(NamedTuple):
    """The parameter-free inputs of the training loss at P prediction points of a batch of windows."""

    rows: Tensor  # [P] window (row of the batch) of each point
    positions: Tensor  # [P] position in the window; the point predicts the item after it
    users: Tensor  # [P]
    positives: Tensor  # [P] the target item
    times: Tensor | None  # [P] the target's time
    memory: MemoryReadout  # [P, K, F] what the experts read
    negatives: Tensor | None  # [P, N] (BPR / SSM; None: drawn by the loss)
    weight: Tensor | None  # [P] 1 = a training target, 0 = padding (None: every point is a target)
    dropout_key: Tensor | None = None  # [] the step's dropout masks (see keyed_dropout); None: random masks


class TrainingLoss(NamedTuple):
    """A training batch's loss parts and the memory writes its step should make after the optimizer step."""

    rec_loss: Tensor
    balance_loss: Tensor  # the load-balance loss, weighted
    memory_writes: MemoryWrites | None  # None: nothing to write (no LocalDynamicMemory, or not training)

    @property
    def losses(self) -> tuple[Tensor, Tensor]:
        return self.rec_loss, self.balance_loss


def weighted_mean(values: Tensor, weight: Tensor | None) -> Tensor:
    """Mean of ``values`` [P] over the points whose ``weight`` [P] is 1 (padding has 0); plain mean if no weight."""
    if weight is None:
        return values.mean()
    # a padded point's value may be inf (its target is the padding item, which CE never ranks): 0 * inf is nan
    values = torch.where(weight > 0, values, values.new_zeros(()))
    return (values * weight).sum() / weight.sum().clamp(min=1.0)


def full_softmax_loss(
    scores: Tensor, positives: Tensor, weight: Tensor | None = None, excluded: Tensor | None = None
) -> Tensor:
    """``scores`` [P, n_items] of the whole catalogue (column 0 = the padding item, never a target),
    ``positives`` [P] -> mean cross-entropy of each positive among every item (RecBole's SASRec's CE);
    ``excluded`` [n_items] bool: items left out of the softmax (never a positive)."""
    padding_item = scores.new_zeros(1, dtype=torch.long)
    scores = scores.index_fill(1, padding_item, float("-inf"))  # [P, n_items]
    if excluded is not None:
        scores = scores.masked_fill(excluded, float("-inf"))
    return weighted_mean(F.cross_entropy(scores, positives, reduction="none"), weight)


def bpr_loss(scores: Tensor, weight: Tensor | None = None, valid: Tensor | None = None) -> Tensor:
    """``scores`` [P, 1 + N], positive in column 0 -> mean over the valid negatives of -log sigmoid(pos - neg);
    ``valid`` [P, N] False for a negative that is the positive itself (popularity sampling may draw it)."""
    pairwise = -F.logsigmoid(scores[:, :1] - scores[:, 1:])  # [P, N]
    if valid is not None:
        per_point = (pairwise * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1)  # [P]
        return weighted_mean(per_point, weight)
    return pairwise.mean() if weight is None else weighted_mean(pairwise.mean(dim=1), weight)


def sampled_softmax_loss(
    scores: Tensor, weight: Tensor | None = None, log_q: Tensor | None = None, valid: Tensor | None = None
) -> Tensor:
    """``scores`` [P, 1 + N], positive in column 0 -> mean cross-entropy of the positive among the 1 + N.

    ``log_q`` [P, N]: the log of the expected number of times each negative is drawn (``N q_j``), subtracted
    from its score (the logQ correction of sampled softmax, Jean et al. 2015): each negative then stands for
    the ``1 / (N q_j)`` items of the catalogue it was drawn for, and the loss estimates the full softmax's.
    ``valid`` [P, N]: False for a negative that is the positive itself (its score does not count).
    """
    negatives = scores[:, 1:]
    if log_q is not None:
        negatives = negatives - log_q
    if valid is not None:
        negatives = negatives.masked_fill(~valid, float("-inf"))
    logits = torch.cat([scores[:, :1], negatives], dim=1)  # [P, 1 + N]
    per_point = F.cross_entropy(logits, logits.new_zeros(logits.size(0), dtype=torch.long), reduction="none")
    return weighted_mean(per_point, weight)


def gbce_beta(num_negatives: int, num_items: int, t: float) -> float:
    """gBCE's power of the positive's probability (Petrov & Macdonald, RecSys 2023):
    ``beta = alpha (t (1 - 1/alpha) + 1/alpha)`` with the sampling rate ``alpha = N / (num_items - 1)``;
    ``t`` = 0 gives plain BCE (beta = 1), ``t`` = 1 the calibrated limit (beta = alpha)."""
    alpha = num_negatives / max(num_items - 1, 1)
    return alpha * (t * (1.0 - 1.0 / alpha) + 1.0 / alpha)


def gbce_loss(scores: Tensor, beta: float, weight: Tensor | None = None, valid: Tensor | None = None) -> Tensor:
    """``scores`` [P, 1 + N], positive in column 0 -> mean over points of
    ``-beta log sigmoid(s_pos) - sum_j log(1 - sigmoid(s_j))`` over the valid negatives (generalised binary
    cross-entropy: the positive's probability raised to ``beta`` undoes the overconfidence that sampling
    negatives gives BCE)."""
    positive = -beta * F.logsigmoid(scores[:, 0])  # [P]
    negative = -F.logsigmoid(-scores[:, 1:])  # [P, N]
    if valid is not None:
        negative = negative * valid
    return weighted_mean(positive + negative.sum(dim=1), weight)


def load_balance_loss(router_weights: Tensor, enabled: Tensor, point_weight: Tensor | None = None) -> Tensor:
    """``router_weights`` [B, C, X], ``enabled`` [X] bool -> sum over enabled e of (mean w_e - 1/E)^2.

    The mean runs over the (user, candidate) pairs where every enabled expert is live, i.e. where
    the router had the full choice: elsewhere an expert is off for want of a feature or of memory,
    its weight is exactly 0 (masked softmax), and counting those pairs would push the router to
    overweight that expert wherever it is live. No such pair: the loss is 0. ``point_weight`` [B]
    leaves out padded points (weight 0). The definition on dense weights; training computes the same sums
    from the router's factored weights (``layers.Routing.load_balance``) and calls :func:`balance_penalty`.
    """
    weights = router_weights.index_select(-1, enabled.nonzero().squeeze(1))  # [B, C, E]
    full_choice = (weights > 0).all(dim=-1)  # [B, C]; live experts get weight > 0, switched-off ones exactly 0
    if point_weight is not None:
        full_choice = full_choice & (point_weight[:, None] > 0)
    return balance_penalty((weights * full_choice[..., None]).sum(dim=(0, 1)), full_choice.sum())


def balance_penalty(weight_sums: Tensor, pairs: Tensor) -> Tensor:
    """``weight_sums`` [E] of the enabled experts over ``pairs`` [] (user, candidate) pairs -> the load-balance
    loss ``sum_e (mean w_e - 1/E)^2``, 0 without pairs. Masks only, no data-dependent branch (vmap-safe)."""
    usage = weight_sums / pairs.clamp(min=1)  # [E]
    loss = ((usage - 1.0 / usage.numel()) ** 2).sum()
    return torch.where(pairs > 0, loss, loss * 0.0)


def surprise_of(scores: Tensor) -> Tensor:
    """``scores`` [P, 1 + N], positive in column 0 -> surprise [P] = 1 - sigmoid(s_pos - mean_j s_neg_j), in (0, 1)."""
    return 1.0 - torch.sigmoid(scores[:, 0] - scores[:, 1:].mean(dim=1))


def sample_negatives(positives: Tensor, num_items: int, num_negatives: int, generator=None) -> Tensor:
    """Uniform negatives over items 1..num_items-1 excluding each row's positive: [B] -> [B, N]."""
    draws = torch.randint(
        1, num_items - 1, (positives.size(0), num_negatives), device=positives.device, generator=generator
    )  # [B, N] in 1..num_items-2
    return draws + (draws >= positives[:, None]).long()  # shift past the positive


def sample_by_weight(positives: Tensor, item_weights: Tensor, num_negatives: int, generator=None) -> Tensor:
    """Negatives drawn with probability proportional to ``item_weights`` [n_items] (0 for the padding item),
    with replacement: [P] -> [P, N]. A draw can be the row's positive: the losses take a ``valid`` mask."""
    draws = torch.multinomial(item_weights, positives.size(0) * num_negatives, replacement=True, generator=generator)
    return draws.view(positives.size(0), num_negatives).to(positives.device)
