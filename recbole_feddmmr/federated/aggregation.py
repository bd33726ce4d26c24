"""How client updates are summed into one update: a streaming weighted sum, row-wise for item tables."""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import Tensor

from recbole_feddmmr.errors import ConfigError

AGGREGATIONS = ("mean", "rowwise", "sum")


def sparse_row_updates(
    update: dict[str, Tensor], row_tables: Collection[str]
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Dense client update -> (the message's update, changed rows): each table of ``row_tables`` keeps only
    the rows with a nonzero delta ``[k, D]`` and reports their indices ``[k]``."""
    message, changed = dict(update), {}
    for name in row_tables:
        if name in update:
            delta = update[name]  # [R, D]
            rows = delta.flatten(1).ne(0).any(dim=1).nonzero().squeeze(1)  # [k]
            message[name], changed[name] = delta[rows], rows
    return message, changed


def sum_ready_upload(
    update: dict[str, Tensor], weight: float, aggregation: str, row_tables: Collection[str]
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """A client's upload for secure aggregation, where the server learns only sums: every tensor dense and
    already weighted as :class:`UpdateAccumulator` would weigh it, and, for ``rowwise``, a dense ``[R]`` vector
    per item table holding the client's weight on the rows it changed (the row counts, summed like the rest).
    -> (weighted update, row weights)."""
    weighted, row_weights = {}, {}
    for name, delta in update.items():
        if name in row_tables and aggregation == "sum":
            weighted[name] = delta.detach().double()  # summed unweighted, as the sum aggregation does
        else:
            weighted[name] = delta.detach().double() * weight
        if name in row_tables and aggregation == "rowwise":
            changed = delta.flatten(1).ne(0).any(dim=1)  # [R]
            row_weights[name] = changed.double() * weight
    return weighted, row_weights


class UpdateAccumulator:
    """Streaming aggregation of client updates, one client at a time.

    Dense parameters: the weighted mean ``sum_i n_i * update_i / sum_i n_i``. A row table (``row_shapes``:
    name -> full shape) aggregates by ``aggregation``:

    * ``mean``: as a dense parameter (a row no client changed counts as a zero update from every client,
      so a row few clients touched is diluted by all the others);
    * ``rowwise``: each row by the weighted mean over the clients that changed that row,
      ``sum_{i: r changed} n_i * update_i[r] / sum_{i: r changed} n_i``;
    * ``sum``: each row by the plain sum of the clients' updates of that row (FedRec-style servers).

    A row that no client changed gets a zero update in every mode.
    """

    def __init__(self, aggregation: str = "mean", row_shapes: dict[str, torch.Size] | None = None) -> None:
        if aggregation not in AGGREGATIONS:
            raise ConfigError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        self.aggregation = aggregation
        self.row_shapes = dict(row_shapes or {})
        self.total: dict[str, Tensor] = {}  # name -> sum_i n_i * update_i (float64); row tables: sum_i update_i for sum
        self.row_weight: dict[str, Tensor] = {}  # rowwise: row table -> [R] sum of n_i of the clients that changed it
        self.weight = 0

    def add(self, update: dict[str, Tensor], num_samples: int, changed_rows: dict[str, Tensor] | None = None) -> None:
        if num_samples <= 0:
            return
        changed_rows = changed_rows or {}
        for name, delta in update.items():
            if name in changed_rows:
                rows = changed_rows[name]
                scale = 1.0 if self.aggregation == "sum" else float(num_samples)
                if name not in self.total:
                    self.total[name] = delta.new_zeros(self.row_shapes[name], dtype=torch.float64)
                self.total[name].index_add_(0, rows, delta.detach().double() * scale)
                if self.aggregation == "rowwise":
                    if name not in self.row_weight:
                        self.row_weight[name] = delta.new_zeros(self.row_shapes[name][0], dtype=torch.float64)
                    weights = delta.new_full(rows.shape, num_samples, dtype=torch.float64)  # [k]
                    self.row_weight[name].index_add_(0, rows, weights)
                continue
            weighted = delta.detach().double() * num_samples
            self.total[name] = self.total[name] + weighted if name in self.total else weighted
        self.weight += num_samples

    def add_summable(self, weighted: dict[str, Tensor], weight: float, row_weights: dict[str, Tensor]) -> None:
        """Fold in an upload made by :func:`sum_ready_upload` (dense, weighted): only sums, so the uploads may be
        masked by masks that cancel in the sum (secure aggregation), even a weight that looks negative."""
        for name, tensor in weighted.items():
            self.total[name] = self.total[name] + tensor.double() if name in self.total else tensor.double().clone()
        for name, rows in row_weights.items():
            self.row_weight[name] = self.row_weight[name] + rows.double() if name in self.row_weight else rows.double()
        self.weight += weight

    def add_partial(self, other: UpdateAccumulator) -> None:
        """Merge a pre-aggregated shard (e.g. a worker's many clients)."""
        if other.aggregation != self.aggregation:
            raise ValueError(f"cannot merge a {other.aggregation!r} shard into a {self.aggregation!r} aggregate")
        for name, weighted in other.total.items():
            self.total[name] = self.total[name] + weighted if name in self.total else weighted.clone()
        for name, weight in other.row_weight.items():
            self.row_weight[name] = self.row_weight[name] + weight if name in self.row_weight else weight.clone()
        self.weight += other.weight

    def mean(self) -> dict[str, Tensor]:
        """The aggregated update (the server optimizer's pseudo-gradient), in float32."""
        if not self.weight:
            raise ValueError("no client update with samples to aggregate")
        aggregated = {}
        for name, total in self.total.items():
            if name not in self.row_shapes or self.aggregation == "mean":
                aggregated[name] = (total / self.weight).float()
            elif self.aggregation == "rowwise":
                row_weight = self.row_weight[name].clamp(min=1.0).view(-1, *[1] * (total.dim() - 1))  # [R, 1...]
                aggregated[name] = (total / row_weight).float()  # untouched rows: 0 / 1
            else:  # sum
                aggregated[name] = total.float()
        return aggregated
