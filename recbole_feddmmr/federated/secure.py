"""Pairwise masking, the core of secure aggregation (Bonawitz et al., CCS 2017), for the sum-ready uploads.

Every pair of clients (i, j), i < j, agrees on a random mask m_ij (from a seed they share); client i adds
m_ij to its upload, client j subtracts it. Each masked upload alone looks random to the server, and the
masks cancel in the sum, which is all the server computes under ``secure_aggregation: true``
(:func:`recbole_feddmmr.federated.aggregation.sum_ready_upload`). This module masks uploads as the clients
would; the tests check that a round aggregated from masked uploads equals the plain round. Key agreement,
dropout recovery and the quantisation of a real SecAgg+ deployment are Flower's (issue: the Flower app).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from recbole_feddmmr.federated.messages import ClientResult


def pair_mask(seed: int, round_idx: int, first: int, second: int, like: Tensor, scale: float) -> Tensor:
    """The mask clients ``first`` < ``second`` share in round ``round_idx`` for one tensor of ``like``'s shape."""
    state = int(np.random.SeedSequence([seed, round_idx, first, second]).generate_state(1)[0])
    generator = torch.Generator().manual_seed(state)
    return scale * torch.randn(like.shape, generator=generator, dtype=torch.float64)


def mask_uploads(results: Sequence[ClientResult], seed: int, round_idx: int, scale: float = 1e3) -> list[ClientResult]:
    """Each sum-ready upload of ``results`` plus its pairwise masks (the update, the row counts and the weight
    alike), in any order: the masks of every pair of these clients cancel in their sum."""
    ids = [result.client_id for result in results]
    masked = []
    for result in results:
        me = result.client_id
        update = {name: tensor.double().clone() for name, tensor in result.update.items()}
        row_weights = {name: tensor.double().clone() for name, tensor in result.row_weights.items()}
        weight = float(result.aggregation_weight)
        for other in ids:
            if other == me:
                continue
            sign, first, second = (1.0, me, other) if me < other else (-1.0, other, me)
            for tensor in update.values():
                tensor += sign * pair_mask(seed, round_idx, first, second, tensor, scale)
            for tensor in row_weights.values():
                tensor += sign * pair_mask(seed, round_idx, first, second + 10**9, tensor, scale)
            weight += sign * float(pair_mask(seed, round_idx, first, second + 2 * 10**9, torch.zeros(()), scale))
        masked.append(
            ClientResult(
                update,
                result.num_samples,
                result.prototypes,
                result.prototype_counts,
                result.mean_loss,
                me,
                weight=weight,
                sum_ready=True,
                row_weights=row_weights,
            )
        )
    return masked
