"""Rounds under Flower's SecAgg+: the server learns only the sum of the SuperNodes' uploads.

With ``secure_aggregation: true`` everything the project's server computes from a round's uploads is a sum
(:func:`recbole_feddmmr.federated.aggregation.sum_ready_upload`: dense, pre-weighted updates and, for
row-wise aggregation, dense row counts). In a Flower run such rounds go through Flower's SecAgg+ protocol
(``SecAggPlusWorkflow`` on the server, ``secaggplus_mod`` on every node), which Flower 1.42 offers through its
legacy workflow API only. That workflow drives a legacy fit-style strategy; :class:`SecAggPlusRound` is that
strategy for one round, over :class:`~recbole_feddmmr.flower.strategy.FedDMMRStrategy`'s client selection and
:class:`~recbole_feddmmr.federated.strategy.FedMemStrategy`'s aggregation.

What a node uploads. SecAgg+ computes the weighted mean ``sum_i w_i p_i / sum_i w_i`` of the nodes' float
vectors ``p_i`` with weights ``w_i`` (each node's ``num_examples``), quantising every ``(w_i / max_weight) p_i``
to an integer in ``[0, quantization_range]`` over ``[-clipping_range, clipping_range]`` before masking it. A
node sums its trained clients' sum-ready uploads into ``s_i`` with total weight ``w_i`` and sends
``p_i = s_i / w_i``, a per-sample mean whose entries are of the size of one update (bounded by
``secagg_clipping_range``; row-wise row counts per sample reach 1); the server multiplies the mean back by
``sum_i w_i`` to get the sum it aggregates in-house. Every node takes part in every round, a node without a
selected client with a zero upload and weight 0: SecAgg+ needs two parties, and the server then cannot tell
a node that trained from one that did not by its upload.

What the server still sees, as with SecAgg+ in any Flower app: each node's weight and its clients' count,
samples and summed loss (the legacy ``FitRes`` fields), never an upload.

Precision: stochastic rounding makes the quantisation unbiased (it draws from numpy's global generator, so a
SecAgg+ run is not bit-reproducible). One round's error on an entry of the summed uploads is below
``nodes * 2 * clipping_range / quantization_range * max_weight``; on an entry of the aggregated update that is
a mean over the round's weight (every parameter under ``mean`` aggregation, all but the item tables under
``rowwise`` and ``sum``) it is below that over ``sum_i w_i`` (:func:`quantisation_bounds`); a ``rowwise`` item
row divides the error by the row's count instead, and a ``sum`` item table keeps the error of the sum. The
weights themselves are quantised with a relative error below ``max_weight / (2 * w_i * quantization_range)``,
and exactly when ``max_weight`` is a power of 2 that divides ``quantization_range``, as by default (every
integer weight then maps to a level). Under DP every client weighs 1, so a node's weight is its client count
and a smaller ``secagg_max_weight`` gives a finer step.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitIns, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE
from flwr.compat.common import recorddict_compat as compat
from flwr.server import ClientManager, ServerConfig, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid
from torch import Tensor

from recbole_feddmmr.errors import ConfigError
from recbole_feddmmr.federated.aggregation import UpdateAccumulator
from recbole_feddmmr.federated.messages import ClientResult, RoundAggregate, ShardResult
from recbole_feddmmr.flower.node import SuperNode
from recbole_feddmmr.flower.records import tensors_record
from recbole_feddmmr.flower.strategy import REPLY_TIMEOUT_S, FedDMMRStrategy


@dataclass(frozen=True)
class SecAggSettings:
    """SecAgg+'s parameters (Flower's ``SecAggPlusWorkflow`` arguments): ``properties/federated.yaml``'s
    ``secagg_*`` settings, which say why they are what they are; the modulus is Flower's default."""

    clipping_range: float
    quantization_range: int
    max_weight: float
    num_shares: int | float
    reconstruction_threshold: int | float
    modulus_range: int = 2**32

    @classmethod
    def from_config(cls, config: Any) -> SecAggSettings:
        names = ("clipping_range", "quantization_range", "max_weight", "num_shares", "reconstruction_threshold")
        missing = [f"secagg_{name}" for name in names if config[f"secagg_{name}"] is None]
        if missing:
            raise ConfigError(f"SecAgg+ needs the settings {missing} (properties/federated.yaml sets them)")
        return cls(
            clipping_range=float(config["secagg_clipping_range"]),
            quantization_range=int(config["secagg_quantization_range"]),
            max_weight=float(config["secagg_max_weight"]),
            num_shares=config["secagg_num_shares"],
            reconstruction_threshold=config["secagg_reconstruction_threshold"],
        )

    def check(self, nodes: int) -> None:
        """Refuse what SecAgg+ would get wrong without a word: a level past numpy's int32 cast, an odd number of
        levels (zero would not be a level), or a sum of ``nodes`` quantised entries (each in ``[0, levels]``) that
        wraps around the modulus."""
        levels = self.quantization_range
        if not 2 <= levels < 2**31 or levels % 2:
            raise ConfigError(f"secagg_quantization_range must be even and in [2, 2^31), got {levels}")
        if nodes * levels >= self.modulus_range:
            raise ConfigError(
                f"{nodes} SuperNodes x secagg_quantization_range={levels} overflow SecAgg+'s modulus 2^32: lower it "
                f"below {self.modulus_range // nodes}"
            )

    def workflow(self) -> SecAggPlusWorkflow:
        """Flower's workflow with these parameters; a round waits ``timeout`` seconds at most for each exchange."""
        return SecAggPlusWorkflow(
            self.num_shares,
            self.reconstruction_threshold,
            max_weight=self.max_weight,
            clipping_range=self.clipping_range,
            quantization_range=self.quantization_range,
            modulus_range=self.modulus_range,
            timeout=REPLY_TIMEOUT_S,
        )


@dataclass(frozen=True)
class UploadLayout:
    """The order of a node's upload vector, the same on the server and on every node (both build the same
    run): every shared parameter, dense, then, for row-wise aggregation, each item table's ``[R]`` row counts."""

    shapes: dict[str, torch.Size]  # shared parameter -> shape
    row_tables: tuple[str, ...]  # item tables whose row counts follow (row-wise aggregation only)
    row_counts: dict[str, int]

    @classmethod
    def of(cls, global_params: dict[str, Tensor], row_shapes: dict[str, torch.Size], aggregation: str) -> UploadLayout:
        row_tables = tuple(name for name in global_params if name in row_shapes) if aggregation == "rowwise" else ()
        return cls(
            {name: value.shape for name, value in global_params.items()},
            row_tables,
            {name: int(row_shapes[name][0]) for name in row_tables},
        )

    @property
    def elements(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes.values()) + sum(self.row_counts.values())

    def encode(self, accumulator: UpdateAccumulator) -> list[np.ndarray]:
        """A node's summed uploads -> its per-sample mean as float64 arrays (zeros for a node that trained none)."""
        weight = float(accumulator.weight)
        arrays = []
        for name, shape in self.shapes.items():
            total = accumulator.total.get(name)
            arrays.append(np.zeros(shape) if total is None or not weight else (total / weight).numpy())
        for name in self.row_tables:
            counts = accumulator.row_weight.get(name)
            arrays.append(
                np.zeros(self.row_counts[name]) if counts is None or not weight else (counts / weight).numpy()
            )
        return arrays

    def decode(self, arrays: list[np.ndarray], total_weight: float) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The secure weighted mean of the nodes' arrays -> (summed weighted updates, summed row counts)."""
        expected = len(self.shapes) + len(self.row_tables)
        if len(arrays) != expected:
            raise RuntimeError(
                f"SecAgg+ returned {len(arrays)} arrays, the upload layout has {expected}: "
                "do the server and the nodes run the same settings?"
            )
        tensors = [torch.from_numpy(np.asarray(array, dtype=np.float64)) * total_weight for array in arrays]
        update = dict(zip(self.shapes, tensors[: len(self.shapes)], strict=True))
        row_weights = dict(zip(self.row_tables, tensors[len(self.shapes) :], strict=True))
        return {name: value.view(self.shapes[name]) for name, value in update.items()}, row_weights


def quantisation_bounds(settings: SecAggSettings, nodes: int, total_weight: float) -> dict[str, float]:
    """The largest error SecAgg+'s quantisation can put on one round -> ``sum``: on an entry of the summed uploads
    (each node's ``(w_i / max_weight) p_i`` is rounded to one of ``quantization_range`` levels over
    ``2 * clipping_range``, and the sum is scaled back by ``max_weight``); ``mean``: on an entry of the update
    that is the sum over the round's total weight ``total_weight``."""
    step = 2 * settings.clipping_range / settings.quantization_range
    summed = nodes * step * settings.max_weight
    return {"sum": summed, "mean": summed / total_weight if total_weight else 0.0}


# ------------------------------------------------------------------ node side
def node_upload(
    results: list[ClientResult],
    layout: UploadLayout,
    accumulator: UpdateAccumulator,
    clipping_range: float,
    max_weight: float,
) -> RecordDict:
    """A node's trained clients' sum-ready uploads, summed into the empty ``accumulator`` -> the legacy
    ``FitRes`` that ``secaggplus_mod`` masks: their per-sample mean, their total weight as ``num_examples``, and
    counts in clear."""
    for result in results:
        if not result.sum_ready:
            raise ConfigError("SecAgg+ rounds need secure_aggregation: true (dense, pre-weighted uploads)")
        accumulator.add_summable(result.update, result.aggregation_weight, result.row_weights)
    weight = float(accumulator.weight)
    if weight != round(weight):
        raise ConfigError(f"SecAgg+ weighs a node by an integer number of examples, got weight {weight}")
    if weight > max_weight:
        raise ConfigError(
            f"a SuperNode's weight {weight:.0f} (its clients' training targets this round) exceeds "
            f"secagg_max_weight={max_weight:g}: raise it"
        )
    arrays = layout.encode(accumulator)
    if not all(np.isfinite(array).all() for array in arrays):  # SecAgg+'s int cast would turn a NaN into a number
        raise RuntimeError("a SuperNode's upload is not finite (NaN or inf): training diverged")
    largest = max((float(np.abs(array).max()) for array in arrays if array.size), default=0.0)
    if largest > clipping_range:  # SecAgg+ would clip it silently: refuse instead
        raise ConfigError(
            f"a SuperNode's per-sample upload reaches {largest:.3g}, beyond secagg_clipping_range="
            f"{clipping_range:g}: raise it (the quantisation step grows with it)"
        )
    fit_result = FitRes(
        status=Status(Code.OK, ""),
        parameters=ndarrays_to_parameters(arrays),
        num_examples=int(weight),
        metrics={
            "clients": len(results),
            "samples": sum(result.num_samples for result in results),
            "loss_sum": math.fsum(result.mean_loss for result in results),
        },
    )
    return compat.fitres_to_recorddict(fit_result, keep_input=False)


def secagg_train(node: SuperNode, content: RecordDict, state: RecordDict) -> RecordDict:
    """A node's part of a SecAgg+ round: train its selected clients -> the ``FitRes`` ``secaggplus_mod`` masks."""
    server = node.federation.server
    layout = UploadLayout.of(server.global_params, server.row_shapes, server.strategy.aggregation)
    client_ids, parameters, config = fit_instructions(content, layout)
    results = node.train_clients(client_ids, parameters, config, state)
    protocol = state.config_records[RECORD_KEY_STATE]  # what the server sent at this round's setup stage
    return node_upload(
        results,
        layout,
        server.strategy.new_accumulator(server.row_shapes),
        float(protocol["clipping_range"]),
        float(protocol["max_weight"]),
    )


def secure_aggregation_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """The ClientApp's mod: SecAgg+'s messages go through Flower's ``secaggplus_mod``, the rest straight on."""
    if message.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in message.content.config_records:
        return secaggplus_mod(message, context, call_next)
    return call_next(message, context)


def is_secagg_fit(content: RecordDict) -> bool:
    """Whether a train message is SecAgg+'s legacy ``FitIns`` (rather than the Message-API round's)."""
    return "fitins.parameters" in content.array_records


def fit_instructions(content: RecordDict, layout: UploadLayout) -> tuple[list[int], dict[str, Tensor], dict[str, Any]]:
    """SecAgg+'s ``FitIns`` -> (the node's selected clients, the global parameters, the round config)."""
    fit_ins = compat.recorddict_to_fitins(content, keep_input=True)
    arrays = parameters_to_ndarrays(fit_ins.parameters)
    parameters = {name: torch.from_numpy(np.array(array)) for name, array in zip(layout.shapes, arrays, strict=True)}
    config = dict(fit_ins.config)
    return [int(client_id) for client_id in json.loads(str(config["clients"]))], parameters, config


# ---------------------------------------------------------------- server side
class SecAggPlusRound:
    """The legacy fit-style strategy ``SecAggPlusWorkflow`` drives (it calls only ``configure_fit`` and
    ``aggregate_fit``): the project's client selection for the round, every node asked, and the in-house
    aggregation of the securely summed uploads."""

    def __init__(self, strategy: FedDMMRStrategy, nodes: list[int], settings: SecAggSettings) -> None:
        server = strategy.server
        if server.strategy.robust.on:
            raise ConfigError("SecAgg+ hides each upload: a robust rule, which needs them, cannot run with it")
        if len(nodes) < 2:
            raise ConfigError("SecAgg+ needs at least 2 SuperNodes")
        settings.check(len(nodes))
        self.strategy, self.nodes, self.settings = strategy, nodes, settings
        self.layout = UploadLayout.of(server.global_params, server.row_shapes, server.strategy.aggregation)
        self.outcome: RoundAggregate | None = None
        self.total_weight = 0.0

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Every node's ``FitIns``: the server's own global parameters (``parameters``, the workflow's copy, is
        unused) and the node's selected clients of the round, none for some."""
        round_config, per_node = self.strategy.plan_round(server_round)
        global_params = self.strategy.server.global_params
        shared = ndarrays_to_parameters([global_params[name].detach().cpu().numpy() for name in self.layout.shapes])
        proxies = {proxy.node_id: proxy for proxy in client_manager.all().values()}
        return [
            (proxies[node], FitIns(shared, {**round_config, "clients": json.dumps(per_node.get(node, []))}))
            for node in self.nodes
        ]

    def aggregate_fit(
        self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list[BaseException]
    ) -> tuple[None, dict]:
        """The securely summed uploads as one pre-aggregated shard -> ``FedMemStrategy.aggregate_fit`` (server
        optimizer, row-wise division, DP noise); a failed node fails the round rather than drop out of it."""
        if failures:  # Flower lists a node that failed to upload twice
            reasons = sorted({str(failure) for failure in failures})
            raise RuntimeError(f"SecAgg+ round {server_round}: SuperNodes failed: {reasons[:3]}")
        if len(results) != len(self.nodes):  # a node that did not answer in time is unmasked as dropped
            raise RuntimeError(f"SecAgg+ round {server_round}: {len(results)} of {len(self.nodes)} SuperNodes uploaded")
        server = self.strategy.server
        fit_results = [fit_result for _, fit_result in results]
        total_weight = float(sum(fit_result.num_examples for fit_result in fit_results))
        clients = sum(int(fit_result.metrics["clients"]) for fit_result in fit_results)
        folded = ShardResult(server.strategy.new_accumulator(server.row_shapes))
        if total_weight:  # every node's upload is the secure mean (SecAgg+ gives each result the aggregate)
            update, row_weights = self.layout.decode(parameters_to_ndarrays(fit_results[0].parameters), total_weight)
            folded.accumulator.add_summable(update, total_weight, row_weights)
            # the nodes sent their clients' summed losses: the round's mean over clients, as one entry
            folded.losses = [math.fsum(float(r.metrics["loss_sum"]) for r in fit_results) / max(clients, 1)]
            folded.clients = clients
        folded.samples = sum(int(fit_result.metrics["samples"]) for fit_result in fit_results)
        folded.bytes_up = len(fit_results) * (self.layout.elements + 1) * 8  # the masked int64 vectors
        self.outcome = server.strategy.aggregate_fit(
            server.global_params, [folded], server.row_shapes, server_round - 1
        )
        self.total_weight = total_weight
        return None, {}  # the new parameters are the server's own (the caller reads them), not the workflow's


class ReplyErrors:
    """The grid the SecAgg+ workflow talks through: Flower's, keeping the reasons of its error replies (the
    workflow itself logs only that it lost a node)."""

    def __init__(self, grid: Grid) -> None:
        self.grid, self.reasons = grid, []

    def send_and_receive(self, messages: list[Message], *, timeout: float | None = None) -> list[Message]:
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.reasons += [reply.error.reason for reply in replies if reply.has_error()]
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)


def run_secure_round(
    grid: Grid,
    context: Context,
    strategy: FedDMMRStrategy,
    server_round: int,
    nodes: list[int],
    settings: SecAggSettings,
) -> tuple[RoundAggregate, float]:
    """Round ``server_round`` through SecAgg+ -> what the strategy made of it and the round's total weight.
    The server's global parameters are the round's result."""
    round_strategy = SecAggPlusRound(strategy, nodes, settings)
    grid = ReplyErrors(grid)
    manager = SimpleClientManager()
    for node in nodes:
        manager.register(GridClientProxy(node, grid, context.run_id))
    fresh = Context(run_id=context.run_id, node_id=context.node_id, node_config={}, state=RecordDict(), run_config={})
    legacy = LegacyContext(  # the workflow calls only configure_fit and aggregate_fit of its "strategy"
        fresh,
        config=ServerConfig(num_rounds=1),
        strategy=round_strategy,
        client_manager=manager,  # type: ignore[arg-type]
    )
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round})
    legacy.state.array_records[MAIN_PARAMS_RECORD] = tensors_record({})  # unread: the parameters are the server's
    settings.workflow()(grid, legacy)
    if round_strategy.outcome is None:
        reasons = sorted(set(grid.reasons)) or ["see Flower's log above"]
        raise RuntimeError(f"SecAgg+ round {server_round} halted before aggregating: {reasons[:3]}")
    strategy.apply(round_strategy.outcome)
    return round_strategy.outcome, round_strategy.total_weight
