"""The project's server algorithm as a Flower ``Strategy``.

:class:`FedDMMRStrategy` selects clients with :meth:`FedMemStrategy.configure_fit` (the in-house sampler and
seed), sends each SuperNode one message naming its selected clients, and folds the replies with
:meth:`FedMemStrategy.aggregate_fit` (server optimizer, row-wise aggregation, DP noise, robust rules and the
prototype merge as they are in-house), in client id order whatever order the replies came in. Evaluation
messages go to every node; the replies' metric sums are divided by their users.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from torch import Tensor

from recbole_feddmmr.errors import ConfigError
from recbole_feddmmr.federated.messages import RoundAggregate
from recbole_feddmmr.federated.server import FedMemServer
from recbole_feddmmr.flower.records import client_results, tensors_record

logger = logging.getLogger(__name__)
REPLY_TIMEOUT_S = 3600  # how long the server waits for one exchange's replies


class FedDMMRStrategy(Strategy):
    """:class:`FedMemStrategy` over Flower's messages (see the module docstring). ``server``: the in-house
    server of the same settings, whose strategy, clients, local settings and global parameters this uses;
    ``node_of_client``: which SuperNode hosts each client id (what the nodes said they host)."""

    def __init__(self, server: FedMemServer, node_of_client: dict[int, int]) -> None:
        missing = sorted({client.client_id for client in server.clients} - set(node_of_client))
        if missing:
            raise ConfigError(f"no SuperNode hosts clients {missing[:5]} ({len(missing)} in all)")
        self.server = server
        self.node_of_client = node_of_client
        self.prototypes: Tensor | None = None  # the merged prototypes every client reads next
        self.memory_clock = 0  # the memory clock at the end of the last round

    def summary(self) -> None:
        strategy = self.server.strategy
        logger.info(
            f"FedDMMRStrategy: {len(self.server.clients)} clients on {len(set(self.node_of_client.values()))} "
            f"SuperNodes, {strategy.round_size(len(self.server.clients))} per round, aggregation "
            f"{strategy.aggregation}, server optimizer {strategy.server_optimizer.name}"
        )

    def _content(self, arrays: ArrayRecord, config: dict) -> RecordDict:
        content = RecordDict({"parameters": arrays, "config": ConfigRecord(config)})
        if self.prototypes is not None:
            content["prototypes"] = tensors_record({"prototypes": self.prototypes})
        return content

    # ------------------------------------------------------------- training
    def plan_round(self, server_round: int) -> tuple[dict[str, int], dict[int, list[int]]]:
        """Round ``server_round`` (Flower counts from 1; the project's round index is one less): what every node
        is told (round index, memory clock) and the selected clients of each node that hosts one."""
        server, round_idx = self.server, server_round - 1
        selected_idx, instructions = server.strategy.configure_fit(
            round_idx,
            len(server.clients),
            server.global_params,
            server.settings,
            len(server.windows),
            server.row_shapes,
        )
        selected = server.availability.answering(round_idx, [server.clients[i] for i in selected_idx])
        self.memory_clock = instructions.clock_at(server.settings.local_epochs)
        per_node: dict[int, list[int]] = {}
        for client in selected:
            per_node.setdefault(self.node_of_client[client.client_id], []).append(client.client_id)
        settings = {"round": round_idx, "memory_clock": instructions.memory_clock,
                    "memory_clock_per_epoch": instructions.memory_clock_per_epoch}  # fmt: skip
        return settings, dict(sorted(per_node.items()))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        """One message per SuperNode that hosts a client selected for round ``server_round``."""
        settings, per_node = self.plan_round(server_round)
        return [
            Message(self._content(arrays, {**settings, **dict(config), "clients": clients}), dst_node_id=node,
                    message_type="train", group_id=str(server_round))
            for node, clients in per_node.items()
        ]  # fmt: skip

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord, MetricRecord]:
        """The in-house aggregation of every client's upload in the replies -> new global arrays."""
        results = []
        for reply in replies:
            if reply.has_error():
                raise RuntimeError(f"a SuperNode failed in round {server_round}: {reply.error.reason}")
            results.extend(client_results(reply.content))
        results.sort(key=lambda result: result.client_id)  # the in-house order: the sum is order-exact
        server = self.server
        outcome = server.strategy.aggregate_fit(server.global_params, results, server.row_shapes, server_round - 1)
        self.apply(outcome)
        return tensors_record(outcome.parameters), round_metrics(outcome)

    def apply(self, outcome: RoundAggregate) -> None:
        """A round's outcome becomes the global model (and the prototypes, when clients sent any)."""
        self.server.global_params = outcome.parameters
        if outcome.prototypes is not None:
            self.prototypes = outcome.prototypes

    # ----------------------------------------------------------- evaluation
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        """Every node evaluates its users (``config``: split valid or test, rows current or best)."""
        content = {"memory_clock": self.memory_clock, **dict(config)}
        return [
            Message(
                self._content(arrays, content),
                dst_node_id=node,
                message_type="evaluate",
                group_id=f"eval-{server_round}",
            )
            for node in sorted(set(self.node_of_client.values()))
        ]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord:
        """The nodes' metric sums -> means over all their users."""
        totals: dict[str, float] = {}
        for reply in replies:
            if reply.has_error():
                raise RuntimeError(f"a SuperNode failed to evaluate in round {server_round}: {reply.error.reason}")
            for name, value in reply.content["metrics"].items():
                totals[name] = totals.get(name, 0.0) + float(value)
        users = totals.pop("users", 0.0)
        if not users:
            raise RuntimeError("no SuperNode evaluated any user")
        return MetricRecord({name: value / users for name, value in totals.items()} | {"users": int(users)})


def round_metrics(outcome: RoundAggregate) -> MetricRecord:
    """What the server reports of a round."""
    return MetricRecord({"clients": outcome.clients, "samples": outcome.samples, "mean_loss": outcome.mean_loss,
                         "bytes_up": outcome.bytes_up})  # fmt: skip


def global_arrays(server: FedMemServer) -> ArrayRecord:
    """The server's global parameters as the ArrayRecord the strategy starts from."""
    return tensors_record(server.global_params)
