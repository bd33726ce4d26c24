"""The ServerApp and ClientApp of FedDMMR, and a run on Flower's simulation engine.

The server's loop is the in-house federated trainer's: rounds of :class:`FedDMMRStrategy`, a federated
validation every ``eval_every`` rounds with RecBole's early stopping on ``valid_metric``, and a federated
test of the best-validation round (its global parameters and prototypes, and every client's private rows
as they were then, which each node keeps in its state). What the run did goes to ``out`` as JSON.

Settings reach both apps as ``{"dataset", "model", "config": {...}}``: given to :func:`make_apps`, or read
from the run config (keys ``dataset``, ``model``, ``config-json``) when a Flower command loads the apps
by name (``app = ...``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from recbole.utils import early_stopping

from recbole_feddmmr.atomic_write import replaced_when_whole
from recbole_feddmmr.errors import ConfigError
from recbole_feddmmr.flower.node import SuperNode, build_federation, federation_of
from recbole_feddmmr.flower.records import record_tensors
from recbole_feddmmr.flower.secagg import (
    SecAggSettings,
    is_secagg_fit,
    quantisation_bounds,
    run_secure_round,
    secagg_train,
    secure_aggregation_mod,
)
from recbole_feddmmr.flower.strategy import REPLY_TIMEOUT_S, FedDMMRStrategy, global_arrays, round_metrics
from recbole_feddmmr.provenance import git_commit, machine_description

logger = logging.getLogger(__name__)
NODE_WAIT_S = 300  # how long the server waits for its SuperNodes to connect


def settings_from(run_config: dict[str, Any], settings: dict[str, Any] | None) -> dict[str, Any]:
    """The run's settings: those given, else the run config's ``dataset``, ``model``, ``config-json``."""
    if settings is not None:
        return settings
    if "dataset" not in run_config:
        raise ConfigError("the Flower run config needs dataset (and optionally model, config-json)")
    return {
        "dataset": run_config["dataset"],
        "model": run_config.get("model", "UR4RecV2MoE"),
        "config": json.loads(str(run_config.get("config-json", "{}"))),
        "out": run_config.get("out"),
    }


def make_client_app(settings: dict[str, Any] | None = None) -> ClientApp:
    """A ClientApp whose node hosts the clients of its ``partition-id`` (node config) of ``num-partitions``."""
    app = ClientApp()

    def node(context: Context) -> SuperNode:
        federation = federation_of(settings_from(context.run_config, settings), context.run_id)
        config = context.node_config
        return SuperNode(federation, int(config["partition-id"]), int(config["num-partitions"]))

    @app.query()
    def query(message: Message, context: Context) -> Message:
        supernode = node(context)
        if message.content["config"]["action"] == "keep_best":
            supernode.keep_best(context.state)
            return Message(RecordDict(), reply_to=message)
        return Message(supernode.describe(), reply_to=message)

    @app.train(mods=[secure_aggregation_mod])
    def train(message: Message, context: Context) -> Message:
        supernode = node(context)
        if is_secagg_fit(message.content):  # a SecAgg+ round (secure_aggregation: true)
            return Message(secagg_train(supernode, message.content, context.state), reply_to=message)
        return Message(supernode.train(message.content, context.state), reply_to=message)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        return Message(node(context).evaluate(message.content, context.state), reply_to=message)

    return app


def make_server_app(settings: dict[str, Any] | None = None, num_nodes: int | None = None) -> ServerApp:
    """A ServerApp running :func:`serve` (``num_nodes``: the SuperNodes to wait for; default the run config's
    ``num-supernodes``, else 2)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_settings = settings_from(context.run_config, settings)
        nodes = num_nodes or int(context.run_config.get("num-supernodes", 2))
        result, parameters = serve(grid, run_settings, nodes, context)
        if run_settings.get("out"):
            out = Path(run_settings["out"])
            with replaced_when_whole(out.with_suffix(".pth")) as temporary:
                torch.save(parameters, temporary)
            with replaced_when_whole(out) as temporary:
                temporary.write_text(json.dumps(result, indent=1))

    return app


def _query(grid: Grid, nodes: list[int], action: str) -> list[Message]:
    messages = [
        Message(
            RecordDict({"config": ConfigRecord({"action": action})}),
            dst_node_id=node,
            message_type="query",
            group_id=action,
        )
        for node in nodes
    ]
    replies = list(grid.send_and_receive(messages, timeout=REPLY_TIMEOUT_S))
    failed = [reply.error.reason for reply in replies if reply.has_error()]
    if failed or len(replies) != len(nodes):
        raise RuntimeError(f"query {action}: {len(replies)} of {len(nodes)} SuperNodes answered; errors: {failed}")
    return replies


def wait_for_nodes(grid: Grid, count: int, wait_s: float = NODE_WAIT_S) -> list[int]:
    """The ids of ``count`` connected SuperNodes (they connect after the ServerApp starts)."""
    deadline = time.monotonic() + wait_s
    while len(nodes := sorted(grid.get_node_ids())) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(nodes)} of {count} SuperNodes connected within {wait_s} s")
        time.sleep(0.2)
    return nodes[:count]


def serve(
    grid: Grid, settings: dict[str, Any], num_nodes: int, context: Context | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Federated training and evaluation of ``settings`` over ``num_nodes`` SuperNodes (module docstring) ->
    (what the run did, the shared parameters: ``final`` after the last round, ``best`` of the best-validation
    round, ``best_prototypes``). Users' private rows stay on their nodes. With ``secure_aggregation: true``
    every training round runs Flower's SecAgg+ (:mod:`recbole_feddmmr.flower.secagg`); ``context``: the
    ServerApp's, for its run id."""
    federation = build_federation(settings)  # the server's own, fresh
    server, trainer, config = federation.server, federation.trainer, federation.config
    if server.availability.deadline_s is not None:
        raise ConfigError(
            "round_deadline_s is not supported in a Flower run: a round waits for every selected SuperNode "
            "(client_dropout is)"
        )
    nodes = wait_for_nodes(grid, num_nodes)
    node_of_client = {}
    for reply in _query(grid, nodes, "describe"):
        for client_id in reply.content["node"]["clients"]:
            node_of_client[int(client_id)] = reply.metadata.src_node_id
    strategy = FedDMMRStrategy(server, node_of_client)
    strategy.summary()
    secagg = SecAggSettings.from_config(config) if server.settings.secure_aggregation else None
    if secagg is not None:
        logger.info(f"secure_aggregation: every round runs Flower's SecAgg+ over {len(nodes)} SuperNodes, {secagg}")
        context = context or Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
    arrays = global_arrays(server)
    valid_metric, bigger = config["valid_metric"].lower(), config["valid_metric_bigger"]
    best_score, cur_step, best, history = (-float("inf") if bigger else float("inf")), 0, None, []
    budget = trainer.federated.time_budget_s
    started = time.perf_counter()
    for server_round in range(1, trainer.rounds + 1):
        if trainer._privacy_spent(server_round - 1):  # the next round would spend more than dp_target_epsilon
            break
        round_started = time.perf_counter()
        if secagg is not None:
            outcome, total_weight = run_secure_round(grid, context, strategy, server_round, nodes, secagg)
            arrays, metrics = global_arrays(server), round_metrics(outcome)
            bounds = quantisation_bounds(secagg, len(nodes), total_weight)  # flower/secagg.py says which applies
            metrics["secagg_error_bound"], metrics["secagg_sum_error_bound"] = bounds["mean"], bounds["sum"]
        else:
            replies = grid.send_and_receive(strategy.configure_train(server_round, arrays, ConfigRecord(), grid),
                                            timeout=REPLY_TIMEOUT_S)  # fmt: skip
            arrays, metrics = strategy.aggregate_train(server_round, replies)
        record = {"round": server_round - 1, "seconds": time.perf_counter() - round_started, **dict(metrics)}
        if trainer.accountant is not None:  # user-level DP: epsilon spent after this round
            record["epsilon"] = trainer.accountant.step()
        last = server_round == trainer.rounds or bool(budget and time.perf_counter() - started >= budget)
        stop = False
        if server_round % trainer.eval_every == 0 or last:  # every run ends on a validated round
            valid = strategy.aggregate_evaluate(server_round, grid.send_and_receive(
                strategy.configure_evaluate(server_round, arrays, ConfigRecord({"split": "valid"}), grid),
                timeout=REPLY_TIMEOUT_S))  # fmt: skip
            record["valid_score"] = valid[valid_metric]
            best_score, cur_step, stop, improved = early_stopping(
                valid[valid_metric], best_score, cur_step, trainer.stopping_step, bigger
            )
            if improved:
                best = (server_round, arrays, strategy.prototypes, strategy.memory_clock, dict(valid))
                _query(grid, nodes, "keep_best")  # every node keeps its clients' rows of this round
            logger.info(f"round {server_round - 1}: {record}")
        history.append(record)
        if stop or last:
            break
    if best is None:
        raise RuntimeError("no validation ran: rounds must be >= 1")
    best_round, best_arrays, strategy.prototypes, strategy.memory_clock, best_valid = best
    test = strategy.aggregate_evaluate(best_round, grid.send_and_receive(
        strategy.configure_evaluate(best_round, best_arrays, ConfigRecord({"split": "test", "rows": "best"}), grid),
        timeout=REPLY_TIMEOUT_S))  # fmt: skip
    result = {
        "kind": "flower-run",
        "command": settings.get("command"),  # what started the run, when the caller said
        "settings": settings,
        "supernodes": num_nodes,
        "clients": len(server.clients),
        "best_round": best_round - 1,
        "best_valid_result": best_valid,
        "test_result": dict(test),
        "rounds": history,
        "seconds": time.perf_counter() - started,
        "commit": git_commit(),
        "machine": machine_description(),
    }
    parameters = {
        "final": server.global_params,
        "best": record_tensors(best_arrays),
        "best_prototypes": strategy.prototypes,
    }
    return result, parameters


def simulate(settings: dict[str, Any], num_supernodes: int = 2, cpus_per_node: float = 1.0) -> dict[str, Any]:
    """Run the apps on Flower's simulation engine (Ray; one virtual SuperNode per partition group) ->
    what the ServerApp wrote to ``settings["out"]``."""
    from flwr.simulation import run_simulation

    if not settings.get("out"):
        raise ConfigError("simulate needs settings['out'], the JSON file the ServerApp writes")
    Path(settings["out"]).unlink(missing_ok=True)  # a result after the run is this run's
    # Flower's Ray backend sets this process's PYTHONPATH to its sys.path for the actors and leaves it so: put
    # it back, or every later subprocess of the caller would import from wherever this process did
    pythonpath = os.environ.get("PYTHONPATH")
    try:
        run_simulation(
            make_server_app(settings, num_supernodes),
            make_client_app(settings),
            num_supernodes=num_supernodes,
            backend_config={"client_resources": {"num_cpus": cpus_per_node, "num_gpus": 0.0}},
        )
    finally:
        if pythonpath is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = pythonpath
    if not Path(settings["out"]).exists():  # the ServerApp failed: Flower logs its error and returns
        raise RuntimeError("the Flower simulation ended without a result (see its log above)")
    return json.loads(Path(settings["out"]).read_text())


# the apps a Flower command loads by name (``recbole_feddmmr.flower.app:server_app``), settings from its run config
server_app = make_server_app()
client_app = make_client_app()
