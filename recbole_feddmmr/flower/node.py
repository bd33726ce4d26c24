"""What runs on a SuperNode: the project's clients hosted there, trained and evaluated on Flower's messages.

Both sides of the app build the same simulation from the same settings (:func:`build_federation`: RecBole's
dataset, the model with its seeded initial weights, and :meth:`FederatedTrainer.build_server`'s clients,
strategy and local settings), so the clients, their windows and the strategy are the in-house ones, not a
second copy. A SuperNode hosts the clients whose id is its partition id modulo the number of partitions.

A client's private rows (user rows, memory) live in the node's ``Context.state``, which Flower keeps on the
node between rounds: the process that runs a node's ClientApp (in simulation, any of Ray's actors) holds
them only while it trains or evaluates them. Nothing private is in a reply.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from recbole.evaluator import metrics as recbole_metrics
from torch import Tensor

from recbole_feddmmr.errors import ConfigError
from recbole_feddmmr.federated.backends import SequentialBackend
from recbole_feddmmr.federated.client import FedMemClient, load_parameters, train_in_turn
from recbole_feddmmr.federated.messages import ClientResult, FitInstructions
from recbole_feddmmr.federated.server import FedMemServer
from recbole_feddmmr.federated.trainer import FederatedTrainer
from recbole_feddmmr.flower.records import add_client_result, record_tensors, tensors_record

# RecBole's top-k metrics a node can return as sums over its users: (class, whether it takes pos_len)
TOPK_METRICS = {"hit": (recbole_metrics.Hit, False), "mrr": (recbole_metrics.MRR, False),
                "ndcg": (recbole_metrics.NDCG, True), "recall": (recbole_metrics.Recall, True),
                "precision": (recbole_metrics.Precision, False)}  # fmt: skip
PRIVATE, BEST = "private.", "best."  # Context.state keys of a client's current and best-validation rows


@dataclass
class Federation:
    """One simulation's parts, the same on the server and on every node."""

    config: Any
    splits: tuple  # RecBole's (train, valid, test) dataloaders
    trainer: FederatedTrainer
    server: FedMemServer  # its clients, windows, strategy, local settings, client state store


def build_federation(settings: dict[str, Any]) -> Federation:
    """The simulation of ``settings`` ({"model", "dataset", "config": {...}}), built as the in-house federated
    run builds it (sequential execution: a node runs its clients one after another)."""
    from recbole_feddmmr.quick_start import prepare_run  # the entry point's run setup (logging, dataset checks)

    config_dict = {**settings.get("config", {}), "federated": True, "show_progress": False}
    config, splits, model = prepare_run(
        settings.get("model", "UR4RecV2MoE"), settings["dataset"], config_dict=config_dict
    )
    trainer = FederatedTrainer(config, model)
    server = trainer.build_server(splits[0], backend=SequentialBackend())
    return Federation(config, splits, trainer, server)


@cache
def _cached_federation(key: str, run_id: int) -> Federation:
    return build_federation(json.loads(key))


def federation_of(settings: dict[str, Any], run_id: int) -> Federation:
    """``build_federation(settings)``, built once per process and run (a Ray actor runs many nodes' ClientApps;
    a new run starts from a fresh model, never from one an earlier run in this process trained)."""
    return _cached_federation(json.dumps(settings, sort_keys=True), run_id)


class SuperNode:
    """The clients one SuperNode hosts, and what it does with the server's messages."""

    def __init__(self, federation: Federation, partition_id: int, num_partitions: int) -> None:
        if not 0 <= partition_id < num_partitions:
            raise ConfigError(f"partition-id must be in [0, {num_partitions}), got {partition_id}")
        self.federation = federation
        self.partition_id = partition_id
        self.clients: dict[int, FedMemClient] = {
            client.client_id: client
            for client in federation.server.clients
            if client.client_id % num_partitions == partition_id
        }

    def describe(self) -> RecordDict:
        """Which clients this node hosts (the server's map from client ids to nodes)."""
        return RecordDict({"node": ConfigRecord({"partition_id": self.partition_id, "clients": sorted(self.clients)})})

    # ------------------------------------------------------------- training
    def train(self, content: RecordDict, state: RecordDict) -> RecordDict:
        """Train the clients the message names from its global parameters -> their uploads."""
        self._set_prototypes(content)
        config = content["config"]
        results = self.train_clients(
            [int(client_id) for client_id in config["clients"]],
            record_tensors(content["parameters"]),
            config,
            state,
        )
        reply = RecordDict()
        for result in results:
            add_client_result(reply, result)
        return reply

    def train_clients(
        self, client_ids: list[int], parameters: dict[str, Tensor], config: Mapping[str, Any], state: RecordDict
    ) -> list[ClientResult]:
        """Train these hosted clients from the global ``parameters`` in the round ``config`` names (``round``,
        ``memory_clock``, ``memory_clock_per_epoch``) -> their uploads; their new private rows go to ``state``."""
        server = self.federation.server
        model, store = server.model, server.store
        unknown = [client_id for client_id in client_ids if client_id not in self.clients]
        if unknown:
            raise ConfigError(f"node {self.partition_id} hosts no client {unknown[:5]}")
        clients = [self.clients[client_id] for client_id in client_ids]
        instructions = FitInstructions(
            round_idx=int(config["round"]),
            parameters=parameters,
            settings=server.settings,
            memory_clock=int(config["memory_clock"]),
            memory_clock_per_epoch=int(config["memory_clock_per_epoch"]),
            aggregation=server.strategy.aggregation,
            row_shapes=server.row_shapes,
        )
        self._restore(store, state, client_ids, PRIVATE)
        results = list(train_in_turn(model, clients, instructions, server.windows, store))
        store.release(model)
        for client_id in client_ids:  # the trained clients' rows go back to the node's state, and only there
            state[f"{PRIVATE}{client_id}"] = tensors_record(store.states.pop(client_id))
        return results

    def keep_best(self, state: RecordDict) -> None:
        """The clients' current rows become their best-validation rows (the test evaluates those)."""
        for client_id in self.clients:
            if f"{PRIVATE}{client_id}" in state:
                state[f"{BEST}{client_id}"] = state[f"{PRIVATE}{client_id}"].copy()

    # ----------------------------------------------------------- evaluation
    def evaluate(self, content: RecordDict, state: RecordDict) -> RecordDict:
        """RecBole's top-k metrics of this node's users on the split the message names (full ranking over
        the catalogue), as sums over the users, with their count: the server divides the totals."""
        federation = self.federation
        server, trainer = federation.server, federation.trainer
        model, store = server.model, server.store
        config = content["config"]
        split = str(config["split"])
        if split not in ("valid", "test"):
            raise ConfigError(f"split must be valid or test, got {split!r}")
        load_parameters(model, record_tensors(content["parameters"]))
        self._set_prototypes(content)
        model.set_memory_clock(int(config["memory_clock"]))
        self._restore(store, state, list(self.clients), BEST if config.get("rows") == "best" else PRIVATE)
        store.assemble(model)  # every user's rows by user id, as RecBole's evaluator reads them
        model.eval()
        users = torch.cat([client.user_ids for client in self.clients.values()]).cpu()  # [u]
        with torch.no_grad():
            sums = metric_sums(trainer, federation.splits[1 if split == "valid" else 2], users, federation.config)
        store.release(model)
        store.states.clear()
        return RecordDict({"metrics": MetricRecord(sums)})

    def _set_prototypes(self, content: RecordDict) -> None:
        memory = self.federation.server.model.prototype_memory()
        if "prototypes" in content and memory is not None:
            memory.set_global_prototypes(record_tensors(content["prototypes"])["prototypes"])

    @staticmethod
    def _restore(store, state: RecordDict, client_ids: list[int], prefix: str) -> None:
        """The store holds exactly these clients' rows from the node's state (a client never trained has none:
        the store gives it the initial rows)."""
        store.states = {
            client_id: record_tensors(state[f"{prefix}{client_id}"])
            for client_id in client_ids
            if f"{prefix}{client_id}" in state
        }


def metric_sums(trainer, eval_data, users: Tensor, config) -> dict[str, float]:
    """Sums over ``users`` [u] of RecBole's top-k metrics on ``eval_data`` (a full-sort dataloader), and
    ``users``: the evaluated users. Each batch is cut to ``users`` before it is scored, with its history and
    positives re-indexed to the kept rows; the scores are the trainer's own (``_full_sort_batch_eval``)."""
    topk = list(config["topk"])
    names = [name.lower() for name in config["metrics"]]
    unsupported = sorted(set(names) - set(TOPK_METRICS))
    if unsupported:
        raise ConfigError(f"federated evaluation sums top-k metrics ({', '.join(TOPK_METRICS)}), not {unsupported}")
    metric_objects = {name: TOPK_METRICS[name][0](config) for name in names}
    sums = {f"{name}@{k}": 0.0 for name in names for k in topk}
    count = 0
    uid_field = eval_data._dataset.uid_field
    trainer.tot_item_num = eval_data._dataset.item_num  # what RecBole's evaluate sets before scoring
    for interaction, history_index, positive_u, positive_i in eval_data:
        keep = torch.isin(interaction[uid_field], users)  # [b]
        if not keep.any():
            continue
        kept = keep.nonzero().squeeze(1)  # [b']
        new_row = torch.full((len(keep),), -1, dtype=torch.long)
        new_row[kept] = torch.arange(len(kept))
        history = None
        if history_index is not None:
            history_users, history_items = history_index
            mine = keep[history_users]
            history = (new_row[history_users[mine]], history_items[mine])
        mine = keep[positive_u]
        batch = (interaction[kept], history, new_row[positive_u[mine]], positive_i[mine])
        _, scores, batch_u, batch_i = trainer._full_sort_batch_eval(batch)  # [b', items]
        # RecBole's Collector: positions of the positives in the top max(k), and each user's positives
        _, topk_idx = torch.topk(scores, max(topk), dim=-1)  # [b', K]
        positives = torch.zeros_like(scores, dtype=torch.int)
        positives[batch_u, batch_i] = 1
        pos_index = torch.gather(positives, 1, topk_idx).bool().cpu().numpy()  # [b', K]
        pos_len = positives.sum(dim=1).cpu().numpy()  # [b']
        for name, metric in metric_objects.items():
            values = metric.metric_info(pos_index, pos_len) if TOPK_METRICS[name][1] else metric.metric_info(pos_index)
            for k in topk:
                sums[f"{name}@{k}"] += float(np.sum(values[:, k - 1], dtype=np.float64))
        count += len(kept)
    return {**sums, "users": count}
