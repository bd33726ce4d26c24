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
    return (values * weight).sum() / weight.sum().clamp(min=1.0)


def bpr_loss(scores: Tensor, weight: Tensor | None = None) -> Tensor:
    """``scores`` [B, 1 + N], positive in column 0 -> mean over B x N of -log sigmoid(pos - neg)."""
    pairwise = -F.logsigmoid(scores[:, :1] - scores[:, 1:])  # [B, N]
    return pairwise.mean() if weight is None else weighted_mean(pairwise.mean(dim=1), weight)


def sampled_softmax_loss(scores: Tensor, weight: Tensor | None = None) -> Tensor:
    """``scores`` [B, 1 + N], positive in column 0 -> mean cross-entropy of the positive among the 1 + N."""
    per_point = F.cross_entropy(scores, scores.new_zeros(scores.size(0), dtype=torch.long), reduction="none")  # [B]
    return weighted_mean(per_point, weight)


def load_balance_loss(router_weights: Tensor, enabled: Tensor, point_weight: Tensor | None = None) -> Tensor:
    """``router_weights`` [B, C, X], ``enabled`` [X] bool -> sum over enabled e of (mean w_e - 1/E)^2.

    The mean runs over the (user, candidate) pairs where every enabled expert is live, i.e. where
    the router had the full choice: elsewhere an expert is off for want of a feature or of memory,
    its weight is exactly 0 (masked softmax), and counting those pairs would push the router to
    overweight that expert wherever it is live. No such pair: the loss is 0. ``point_weight`` [B]
    leaves out padded points (weight 0). Written with masks only (no data-dependent shapes), so it
    runs under ``torch.func.vmap``.
    """
    weights = router_weights.index_select(-1, enabled.nonzero().squeeze(1))  # [B, C, E]
    full_choice = (weights > 0).all(dim=-1)  # [B, C]; live experts get weight > 0, switched-off ones exactly 0
    if point_weight is not None:
        full_choice = full_choice & (point_weight[:, None] > 0)
    pairs = full_choice.sum()
    usage = (weights * full_choice[..., None]).sum(dim=(0, 1)) / pairs.clamp(min=1)  # [E]
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
