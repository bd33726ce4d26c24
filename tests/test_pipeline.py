"""End to end on the tiny dataset: train, evaluate with RecBole's evaluator, reload checkpoints."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_CONFIG, tiny_config, tiny_run

from recbole_feddmmr.errors import ConfigError
from recbole_feddmmr.quick_start import run_recbole_feddmmr
from recbole_feddmmr.registry import get_model, get_trainer

REPO = Path(__file__).resolve().parents[1]
METRICS = {f"{m}@{k}" for m in ("hit", "ndcg", "mrr") for k in (5, 10, 20)}


def test_tiny_dataset_trains_an_epoch_and_evaluates_with_recbole_evaluator(tmp_path):
    result = run_recbole_feddmmr(
        model="UR4RecV2MoE", dataset="tiny", config_dict=dict(TINY_CONFIG, checkpoint_dir=str(tmp_path / "saved"))
    )
    assert set(result["test_result"]) == METRICS and set(result["best_valid_result"]) == METRICS
    for name, value in result["test_result"].items():
        assert 0.0 <= value <= 1.0, name
    assert result["test_result"]["hit@20"] >= result["test_result"]["hit@5"]
    assert Path(result["checkpoint"]).is_file()


def test_uni100_protocol_runs_through_predict(tmp_path):
    # tiny has 30 items, so sample 20 negatives instead of 100
    result = run_recbole_feddmmr(
        model="UR4RecV2MoE",
        dataset="tiny",
        config_dict=dict(
            TINY_CONFIG,
            checkpoint_dir=str(tmp_path / "saved"),
            eval_args={"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "uni20"},
        ),
    )
    assert set(result["test_result"]) == METRICS


def test_best_checkpoint_reloads_on_torch_2_6_and_gives_identical_scores(tmp_path):
    config, _, (train_data, valid_data, test_data), model = tiny_run(tmp_path)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    trainer.fit(train_data, valid_data, saved=True, show_progress=False)
    # plain torch.load (weights_only=True since torch 2.6) refuses RecBole's pickled Config ...
    with pytest.raises(Exception, match=r"weights_only|Weights only"):
        torch.load(trainer.saved_model_file)
    # ... the plugin's trainer loads it; a fresh model from the checkpoint scores like the trained one
    in_memory = trainer.evaluate(test_data, load_best_model=False)
    reloaded = trainer.evaluate(test_data, load_best_model=True)
    assert reloaded == in_memory

    _, _, _, fresh_model = tiny_run(tmp_path, seed=123)
    fresh = get_trainer(config["MODEL_TYPE"], config["model"])(config, fresh_model)
    assert fresh.evaluate(test_data, load_best_model=True, model_file=trainer.saved_model_file) == in_memory
    # LocalDynamicMemory is part of the checkpoint: the fresh model now holds the trained model's memory
    assert (model.memory.item_ids >= 0).any()
    assert torch.equal(fresh_model.memory.item_ids, model.memory.item_ids)
    torch.testing.assert_close(fresh_model.memory.item_ids, model.memory.item_ids)

    fresh.resume_checkpoint(trainer.saved_model_file)
    assert fresh.start_epoch == 1


def test_model_and_trainer_lookup_prefers_plugin_and_falls_back_to_recbole():
    from recbole.model.sequential_recommender import SASRec
    from recbole.trainer import Trainer
    from recbole.utils import ModelType

    from recbole_feddmmr.checkpoints import TrustedCheckpointMixin
    from recbole_feddmmr.model import UR4RecV2MoE
    from recbole_feddmmr.trainer import UR4RecV2MoETrainer

    assert get_model("UR4RecV2MoE") is UR4RecV2MoE
    assert get_model("SASRec") is SASRec
    assert get_trainer(ModelType.SEQUENTIAL, "UR4RecV2MoE") is UR4RecV2MoETrainer
    sasrec_trainer = get_trainer(ModelType.SEQUENTIAL, "SASRec")
    assert issubclass(sasrec_trainer, Trainer) and issubclass(sasrec_trainer, TrustedCheckpointMixin)
    with pytest.raises(ValueError):
        get_model("NoSuchModel")
    # a training mode is what a package registered: the federated package registers its trainer on import
    from recbole_feddmmr.federated import FederatedTrainer

    assert get_trainer(ModelType.SEQUENTIAL, "UR4RecV2MoE", mode="federated") is FederatedTrainer
    with pytest.raises(ConfigError, match="unknown training mode 'gossip'"):
        get_trainer(ModelType.SEQUENTIAL, "UR4RecV2MoE", mode="gossip")


def test_federated_training_refuses_a_model_without_the_federated_contract(tmp_path):
    # federated training is chosen by what the model supports (recbole_feddmmr.federated.contracts), not its name
    from recbole_feddmmr.federated import FederatedTrainer

    config, _, _, sasrec = tiny_run(tmp_path, model="SASRec", federated=True, hidden_size=16, inner_size=32)
    with pytest.raises(ConfigError, match="window loss"):
        FederatedTrainer(config, sasrec)


def test_config_layers_plugin_yaml_and_reads_dataset_atomic(tmp_path):
    config = tiny_config(tmp_path, learning_rate=0.005)
    assert config["item_emb_dim"] == 8  # the dataset's own yaml beats the plugin's model yaml
    assert config["load_balance_weight"] == 0.01  # plugin model yaml
    assert config["valid_metric"] == "NDCG@10" and config["topk"] == [5, 10, 20]  # plugin overall.yaml
    assert config["learning_rate"] == 0.005
    from recbole_feddmmr.config import Config

    ml = Config(model="SASRec", dataset="ml-100k", config_dict={"state": "WARNING"})
    assert ml["data_path"] == str(Path.cwd() / "dataset_atomic" / "ml-100k")  # not RecBole's bundled folder
    assert ml["normalize_all"] is False and ml["additional_feat_suffix"] == ["itememb"]


def test_sasrec_runs_through_the_plugin_entry_point(tmp_path):
    overrides = [
        f"--{key}={value}"
        for key, value in {
            "data_path": TINY_CONFIG["data_path"],
            "MAX_ITEM_LIST_LENGTH": 10,
            "epochs": 1,
            "show_progress": False,
            "checkpoint_dir": tmp_path / "saved",
            "hidden_size": 16,
            "inner_size": 32,
            "train_batch_size": 16,
        }.items()
    ]
    load_col = "--load_col={'inter':['user_id','item_id','rating','timestamp']}"
    completed = subprocess.run(
        [
            sys.executable,
            str(REPO / "run_recbole_feddmmr.py"),
            "--model",
            "SASRec",
            "--dataset",
            "tiny",
            load_col,
            "--additional_feat_suffix=None",
            "--alias_of_item_id=[]",  # the tiny dataset's own yaml aliases the .itememb's iid, not loaded here
            *overrides,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    log = completed.stdout + completed.stderr
    assert "SASRec(" in log and "SASRec on tiny: best epoch 0" in log and "ndcg@10" in log


@pytest.mark.parametrize("model_name", ["UR4RecV2MoE", "SASRec"])
def test_runs_started_in_the_same_second_never_share_a_checkpoint(tmp_path, monkeypatch, model_name):
    import recbole.utils

    monkeypatch.setattr(recbole.utils, "get_local_time", lambda: "Nov-28-2026_12-00-00")  # the same second
    files = []
    for _ in range(2):
        config, _, _, model = tiny_run(tmp_path, model=model_name)
        files.append(get_trainer(config["MODEL_TYPE"], config["model"])(config, model).saved_model_file)
    assert files[0] != files[1]
    assert all(Path(name).name.startswith(f"{model_name}-tiny-Nov-28-2026_12-00-00-") for name in files)


def test_a_run_refuses_to_evaluate_a_checkpoint_another_run_wrote(tmp_path):
    config, _, (train_data, valid_data, test_data), model = tiny_run(tmp_path)
    first = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    first.fit(train_data, valid_data, saved=True)
    assert first.evaluate(test_data, load_best_model=True)  # its own checkpoint: fine

    config, _, (_, _, test_data), model = tiny_run(tmp_path, learning_rate=0.01)  # another run's settings
    other = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    other.saved_model_file = first.saved_model_file  # as if both had been given one name
    with pytest.raises(RuntimeError, match="not written by this run"):
        other.evaluate(test_data, load_best_model=True)


def test_a_run_started_beside_another_never_loses_the_race_to_create_its_folders(tmp_path, monkeypatch):
    import os

    from recbole.utils import init_logger

    from recbole_feddmmr.quick_start import prepare_run

    real_makedirs = os.makedirs

    def sibling_creates_it_first(name, mode=0o777, exist_ok=False):  # between this run's check and its create
        real_makedirs(name, mode, exist_ok=True)
        if not exist_ok:
            raise FileExistsError(name)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(os, "makedirs", sibling_creates_it_first)
    with pytest.raises(FileExistsError):  # RecBole alone: check, then create
        init_logger(tiny_config(tmp_path / "recbole"))
    settings = dict(TINY_CONFIG, checkpoint_dir=str(tmp_path / "saved"))
    config, _, model = prepare_run("UR4RecV2MoE", "tiny", config_dict=settings)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    assert (tmp_path / "log" / "UR4RecV2MoE").is_dir() and any((tmp_path / "log" / "UR4RecV2MoE").iterdir())
    assert Path(trainer.checkpoint_dir) == tmp_path / "saved" and (tmp_path / "saved").is_dir()


@pytest.mark.parametrize(("epochs", "eval_step", "validated"), [(2, 5, [1]), (3, 2, [1, 2]), (2, 1, [0, 1])])
def test_the_last_epoch_is_always_validated_whatever_eval_step(tmp_path, epochs, eval_step, validated):
    config, _, (train_data, valid_data, test_data), model = tiny_run(tmp_path, epochs=epochs, eval_step=eval_step)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    seen = []
    trainer.fit(train_data, valid_data, saved=True, callback_fn=lambda epoch, score: seen.append(epoch))
    assert seen == validated and trainer.best_epoch in validated
    assert "ndcg@10" in trainer.evaluate(test_data, load_best_model=True)  # its best checkpoint exists
