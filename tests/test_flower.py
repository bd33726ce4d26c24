"""The Flower integration (recbole_feddmmr.flower; needs the flower extra, part of the dev install): its
rounds equal the in-house sequential backend's, its federated evaluation equals RecBole's evaluator, uploads
survive the trip through Flower's records, and the base package never imports flwr."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, TINY_CONFIG, tiny_run

pytest.importorskip("flwr")

from flwr.app import Context, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from recbole_feddmmr.errors import ConfigError
from recbole_feddmmr.federated.aggregation import UpdateAccumulator, sum_ready_upload
from recbole_feddmmr.federated.messages import ClientResult
from recbole_feddmmr.federated.trainer import FederatedTrainer
from recbole_feddmmr.flower.app import make_client_app, serve, simulate
from recbole_feddmmr.flower.node import build_federation
from recbole_feddmmr.flower.records import add_client_result, client_results
from recbole_feddmmr.flower.secagg import SecAggSettings, UploadLayout, node_upload

# five of the twelve one-user clients a round (so the sampler matters), a validation after every round
FEDERATED = {
    "federated": True,
    "federated_backend": "sequential",
    "rounds": 3,
    "local_batch_size": 8,
    "num_memory_prototypes": 2,
    "memory_surprise_threshold": 0.0,  # every positive written: memories large enough for prototypes
    "stopping_step": 5,
    "clients_per_round": 5,
    "eval_every": 1,
    "resume_every_s": 0,
    "metric_decimal_place": 10,  # RecBole rounds its metrics; the comparison wants them whole
}


class InProcessGrid:
    """Flower's Grid in this process: a message goes to the ClientApp of its node with that node's Context,
    whose state persists between messages as a SuperNode's does."""

    def __init__(self, client_app, num_nodes: int) -> None:
        self.client_app = client_app
        self.contexts = {
            100 + index: Context(
                run_id=1, node_id=100 + index, node_config={"partition-id": index, "num-partitions": num_nodes},
                state=RecordDict(), run_config={},
            )
            for index in range(num_nodes)
        }  # fmt: skip

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        # each node gets its own copy, as over a wire (SecAgg+'s server sends one content object to every node)
        return [
            self.client_app(copy.deepcopy(message), self.contexts[message.metadata.dst_node_id]) for message in messages
        ]


@pytest.fixture
def task_identity(monkeypatch):
    """What a ServerApp run sets before it builds messages (Flower's Message needs a run id)."""
    for name, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


def settings_of(tmp_path, **overrides) -> dict:
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = {**TINY_CONFIG, "checkpoint_dir": str(tmp_path / "saved"), **FEDERATED, **overrides}
    return {"dataset": "tiny", "model": "UR4RecV2MoE", "config": config, "out": str(tmp_path / "flower.json")}


def in_house_run(tmp_path, **overrides):
    """The same run on the in-house sequential backend -> (trainer, test result)."""
    config, _, (train_data, valid_data, test_data), model = tiny_run(tmp_path, **{**FEDERATED, **overrides})
    trainer = FederatedTrainer(config, model)
    trainer.fit(train_data, valid_data, saved=True)
    return trainer, trainer.evaluate(test_data, load_best_model=True)


def assert_same_run(flower_result: dict, parameters: dict, trainer: FederatedTrainer, test_result: dict) -> None:
    in_house_valid = [report.valid_score for report in trainer.round_reports]
    assert [record["valid_score"] for record in flower_result["rounds"]] == pytest.approx(in_house_valid, abs=1e-6)
    assert [record["clients"] for record in flower_result["rounds"]] == [r.clients for r in trainer.round_reports]
    assert flower_result["best_round"] == trainer.best_epoch
    for name, value in trainer.server.global_params.items():  # the global model after the last round
        torch.testing.assert_close(parameters["final"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    for name, value in test_result.items():  # federated test of the best round = RecBole's test of its checkpoint
        assert flower_result["test_result"][name] == pytest.approx(value, abs=1e-6), name
    assert flower_result["test_result"]["users"] == 12


def test_rounds_on_two_supernodes_equal_the_in_house_sequential_backend(tmp_path, task_identity):
    trainer, test_result = in_house_run(tmp_path / "in-house")
    settings = settings_of(tmp_path / "flower")
    result, parameters = serve(InProcessGrid(make_client_app(settings), 2), settings, 2)
    assert_same_run(result, parameters, trainer, test_result)
    assert result["clients"] == 12 and all(record["clients"] == 5 for record in result["rounds"])


def test_rowwise_fedadam_runs_as_in_house(tmp_path, task_identity):
    # the strategy is the in-house one: its server optimizer and row-wise aggregation come with it; 3 nodes
    overrides = {"server_optimizer": "fedadam", "server_lr": 0.01, "aggregation": "rowwise", "rounds": 2}
    trainer, test_result = in_house_run(tmp_path / "in-house", **overrides)
    settings = settings_of(tmp_path / "flower", **overrides)
    result, parameters = serve(InProcessGrid(make_client_app(settings), 3), settings, 3)
    assert_same_run(result, parameters, trainer, test_result)


class RecordingGrid(InProcessGrid):
    """An in-process grid that keeps every reply the server received."""

    def __init__(self, client_app, num_nodes: int) -> None:
        super().__init__(client_app, num_nodes)
        self.replies = []

    def send_and_receive(self, messages, *, timeout=None):
        replies = super().send_and_receive(messages, timeout=timeout)
        self.replies.extend(replies)
        return replies


# SecAgg+ on the tiny dataset: a node's weight (its clients' training targets) stays below 64, so the
# quantisation step, scaled by max_weight / total weight, is small enough to compare with the plain round
SECURE = {"secure_aggregation": True, "secagg_max_weight": 64.0}


def test_a_secagg_plus_round_equals_the_plain_secure_round_within_the_quantisation_bound(tmp_path, task_identity):
    # one round from the same initial model: the only difference is SecAgg+'s quantisation of the uploads
    trainer, _ = in_house_run(tmp_path / "in-house", rounds=1, **SECURE)
    settings = settings_of(tmp_path / "flower", rounds=1, **SECURE)
    grid = RecordingGrid(make_client_app(settings), 2)
    result, parameters = serve(grid, settings, 2)
    (record,) = result["rounds"]
    bound = record["secagg_error_bound"]
    assert record["clients"] == 5 and 0 < bound < 1e-6  # 2 nodes * 2 / 2^24 * 64 / (the round's 34 targets)
    for name, value in trainer.server.global_params.items():  # FedAvg, server lr 1: the update's error itself
        assert (parameters["final"][name] - value).abs().max() <= bound + 1e-6, name
    initial = build_federation(settings).server.global_params
    moved = sum(int((parameters["final"][name] - value).abs().gt(1e-4).sum()) for name, value in initial.items())
    assert moved > 100  # the round moved the model by far more than the bound
    # what crossed from the nodes to the server: SecAgg+'s keys, shares and masked integer vectors, no array
    secagg_replies = [reply.content for reply in grid.replies if "secaggplus_configs" in reply.content]
    assert all(not len(record) for content in secagg_replies for record in content.array_records.values())
    masked = [content["secaggplus_configs"]["masked_params"] for content in secagg_replies
              if "masked_params" in content["secaggplus_configs"]]  # fmt: skip
    assert len(masked) == 2  # both nodes took part (a node without a selected client uploads zeros, masked)


def test_secagg_plus_rounds_track_the_in_house_secure_run(tmp_path, task_identity):
    overrides = {"rounds": 3, "aggregation": "rowwise", **SECURE}  # row counts travel masked too
    trainer, test_result = in_house_run(tmp_path / "in-house", **overrides)
    settings = settings_of(tmp_path / "flower", **overrides)
    result, parameters = serve(InProcessGrid(make_client_app(settings), 3), settings, 3)
    in_house_valid = [report.valid_score for report in trainer.round_reports]
    assert [record["valid_score"] for record in result["rounds"]] == pytest.approx(in_house_valid, abs=1e-3)
    for name, value in trainer.server.global_params.items():
        torch.testing.assert_close(parameters["final"][name], value, rtol=0, atol=1e-4, msg=name)
    assert result["test_result"]["ndcg@10"] == pytest.approx(test_result["ndcg@10"], abs=1e-3)


def test_the_secagg_upload_layout_turns_the_secure_mean_back_into_the_sums():
    # two nodes' sums (mean and rowwise), as SecAgg+ would combine them: sum_i w_i p_i / sum_i w_i
    shapes = {"item_embedding.weight": torch.Size([4, 2]), "router.bias": torch.Size([3])}
    layout = UploadLayout.of({name: torch.zeros(shape) for name, shape in shapes.items()},
                             {"item_embedding.weight": shapes["item_embedding.weight"]}, "rowwise")  # fmt: skip
    accumulators, weights = [], [3.0, 5.0]
    for seed, weight in zip((1, 2), weights, strict=True):
        accumulator = UpdateAccumulator("rowwise", {"item_embedding.weight": shapes["item_embedding.weight"]})
        update = {
            name: torch.randn(shape, generator=torch.Generator().manual_seed(seed)) for name, shape in shapes.items()
        }
        update["item_embedding.weight"][seed] = 0.0  # a row this node's client did not change
        weighted, row_weights = sum_ready_upload(update, weight, "rowwise", ["item_embedding.weight"])
        accumulator.add_summable(weighted, weight, row_weights)
        accumulators.append(accumulator)
    node_arrays = [layout.encode(accumulator) for accumulator in accumulators]
    assert layout.elements == 8 + 3 + 4 and [array.shape for array in node_arrays[0]] == [(4, 2), (3,), (4,)]
    secure_mean = [sum(w * arrays[k] for w, arrays in zip(weights, node_arrays, strict=True)) / sum(weights)
                   for k in range(3)]  # fmt: skip
    update, row_weights = layout.decode(secure_mean, sum(weights))
    for name in shapes:
        torch.testing.assert_close(update[name], accumulators[0].total[name] + accumulators[1].total[name])
    row_counts = row_weights["item_embedding.weight"]
    assert row_counts.tolist() == [8.0, 5.0, 3.0, 8.0]  # row 1 changed by the weight-5 node only, row 2 by the other
    empty = layout.encode(UpdateAccumulator("rowwise", {"item_embedding.weight": shapes["item_embedding.weight"]}))
    assert all(not array.any() for array in empty)  # a node that trained no client uploads zeros


def test_a_node_refuses_what_secagg_plus_would_corrupt_and_the_settings_refuse_an_overflow():
    shapes = {"router.bias": torch.Size([3])}
    layout = UploadLayout.of({"router.bias": torch.zeros(3)}, {}, "mean")

    def upload(values, num_samples=4, clipping_range=1.0, max_weight=64.0):
        weighted, _ = sum_ready_upload({"router.bias": torch.tensor(values)}, num_samples, "mean", [])
        result = ClientResult(weighted, num_samples, torch.zeros(0, 0), torch.zeros(0), client_id=1,
                              weight=num_samples, sum_ready=True)  # fmt: skip
        return node_upload([result], layout, UpdateAccumulator("mean", shapes), clipping_range, max_weight)

    content = upload([0.5, -0.25, 0.0])
    assert content["fitres.num_examples"]["num_examples"] == 4  # the node's weight, in clear
    assert upload([0.5, -0.25, 0.0], num_samples=64) is not None  # the largest weight allowed
    with pytest.raises(ConfigError, match="secagg_max_weight"):
        upload([0.5, -0.25, 0.0], num_samples=65)
    with pytest.raises(ConfigError, match="secagg_clipping_range"):
        upload([1.5, 0.0, 0.0])
    with pytest.raises(RuntimeError, match="not finite"):
        upload([float("nan"), 0.0, 0.0])
    settings = SecAggSettings(clipping_range=1.0, quantization_range=2**24, max_weight=2.0**16, num_shares=3,
                              reconstruction_threshold=2)  # fmt: skip
    settings.check(255)
    with pytest.raises(ConfigError, match="overflow"):
        settings.check(256)  # 256 x 2^24 quantised levels wrap around 2^32
    with pytest.raises(ConfigError, match="even"):
        dataclasses.replace(settings, quantization_range=2**24 + 1).check(2)


def test_secagg_plus_refuses_an_upload_it_would_clip(tmp_path, task_identity):
    settings = settings_of(tmp_path, rounds=1, **SECURE, secagg_clipping_range=1e-6)
    with pytest.raises(ConfigError, match="secagg_clipping_range"):
        serve(InProcessGrid(make_client_app(settings), 2), settings, 2)
    settings = settings_of(tmp_path, rounds=1, **SECURE)
    with pytest.raises(ConfigError, match="at least 2 SuperNodes"):
        serve(InProcessGrid(make_client_app(settings), 1), settings, 1)


def test_a_client_upload_survives_flowers_records():
    upload = ClientResult(
        update={"item_embedding.weight": torch.randn(3, 4), "router.bias": torch.randn(2)},
        num_samples=7,
        prototypes=torch.randn(2, 5),
        prototype_counts=torch.tensor([3.0, 4.0]),
        mean_loss=1.25,
        client_id=9,
        changed_rows={"item_embedding.weight": torch.tensor([1, 5, 8])},
        weight=None,
    )
    private = ClientResult(
        {"router.bias": torch.ones(2)}, 2, torch.zeros(0, 0), torch.zeros(0), client_id=3, weight=1.0
    )
    content = RecordDict()
    add_client_result(content, upload)
    add_client_result(content, private)
    back = client_results(content)
    assert [result.client_id for result in back] == [3, 9]  # client id order, whatever the insertion order
    assert back[0].weight == 1.0 and back[1].weight is None and back[1].num_samples == 7
    for name in ("update", "changed_rows"):
        assert set(getattr(back[1], name)) == set(getattr(upload, name))
        for key, value in getattr(upload, name).items():
            assert torch.equal(getattr(back[1], name)[key], value)
    assert torch.equal(back[1].prototypes, upload.prototypes) and back[1].mean_loss == 1.25
    assert back[1].num_bytes() == upload.num_bytes()  # the item table travels as its 3 changed rows only


def test_the_base_package_does_not_import_flwr(tmp_path):
    code = (
        "import sys, recbole_feddmmr.quick_start, recbole_feddmmr.federated, recbole_feddmmr.experiments.benchmark; "
        "assert not [m for m in sys.modules if m.split('.')[0] == 'flwr'], 'flwr imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


@pytest.mark.ray
def test_flowers_simulation_engine_runs_the_same_rounds(tmp_path):
    # the real engine: Ray actors run the ClientApps, each SuperNode's state kept by Flower between rounds
    overrides = {"rounds": 2}
    trainer, test_result = in_house_run(tmp_path / "in-house", **overrides)
    pythonpath = os.environ.get("PYTHONPATH")
    result = simulate(settings_of(tmp_path / "flower", **overrides), num_supernodes=2)
    assert os.environ.get("PYTHONPATH") == pythonpath  # Flower's Ray backend changed it; simulate puts it back
    parameters = torch.load(tmp_path / "flower" / "flower.pth", weights_only=True)
    assert_same_run(result, parameters, trainer, test_result)


def test_the_app_deployed_on_a_superlink_and_two_supernodes_trains_and_evaluates(tmp_path):
    # scripts/flower_deploy.sh: real processes talking over loopback; the ServerApp and ClientApps run as
    # Flower launches them (flwr-serverapp / flwr-clientapp), loading the apps by name from flower_app/
    config = {**settings_of(tmp_path / "deployed", rounds=2)["config"]}
    out = tmp_path / "deployed" / "run.json"
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "flower_deploy.sh"), "tiny", str(out), "2", json.dumps(config)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    assert result["supernodes"] == 2 and result["clients"] == 12
    assert [record["clients"] for record in result["rounds"]] == [5, 5]
    assert result["test_result"]["users"] == 12 and 0.0 <= result["test_result"]["ndcg@10"] <= 1.0
    assert not subprocess.run(["pgrep", "-f", str(out)], capture_output=True).stdout  # nothing left running
