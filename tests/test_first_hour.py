"""What a new user meets first: a clean start-up, a readable end of run, checkpoints that load, settings
checked before training, every results file reportable, and one clear line for each bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, TEST_DATA, TINY_CONFIG, TINY_YAML, command, tiny_config, tiny_run

from recbole_feddmmr.errors import CheckpointError, ConfigError, DataFileError
from recbole_feddmmr.quick_start import load_checkpoint, run_recbole_feddmmr
from recbole_feddmmr.registry import get_trainer

FEDERATED = {"federated": True, "rounds": 2, "eval_every": 1, "clients_per_round": None, "num_memory_prototypes": 2}


def tiny_yaml(tmp_path: Path, **overrides) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({**TINY_CONFIG, "checkpoint_dir": str(tmp_path / "saved"), **overrides}))
    return path


def test_a_run_starts_clean_and_ends_with_a_summary_and_results_json(tmp_path):
    completed = command(
        tmp_path,
        "-W",
        "default",  # show every warning, as a user with warnings enabled would see them
        str(REPO / "run_recbole_feddmmr.py"),
        "--dataset",
        "tiny",
        "--config_files",
        str(tiny_yaml(tmp_path, state="INFO")),
        "--learning_rate",
        "0.002",  # the --key value form is an override too
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-3000:]
    assert "will not be used" not in output
    assert "FutureWarning" not in output
    assert "use_gpu = False" in output or torch.cuda.is_available()
    assert "rec_loss:" in output and "balance_loss:" in output and "train_loss1" not in output
    assert "UR4RecV2MoE on tiny: best epoch 0" in output and "OrderedDict" not in output
    summary = dict(
        line.split(":", 1) for line in output.splitlines() if line.split(":")[0] in ("checkpoint", "log", "results")
    )
    assert Path(summary["checkpoint"].strip()).is_file() and Path(summary["log"].strip()).is_file()
    results = json.loads(Path(summary["results"].strip()).read_text())
    assert set(results) >= {"config", "best_valid_result", "test_result", "seconds", "commit", "checkpoint", "log"}
    assert results["config"]["learning_rate"] == 0.002
    assert results["test_result"]["ndcg@10"] == pytest.approx(float(output.split("ndcg@10")[-1].split()[1]), abs=1e-4)
    # the checkpoint, evaluated again by the benchmark: its own flags are never taken for RecBole's
    evaluated = command(
        tmp_path, "-m", "recbole_feddmmr.experiments.benchmark", "--evaluate", summary["checkpoint"].strip(),
        "--out", str(tmp_path / "evaluated.json"),
    )  # fmt: skip
    output = evaluated.stdout + evaluated.stderr
    assert evaluated.returncode == 0, output[-3000:]
    assert "will not be used" not in output and "| checkpoint | model |" in output
    again = json.loads((tmp_path / "evaluated.json").read_text())["evaluated"][0]["test_full"]["ndcg@10"]
    assert again == pytest.approx(results["test_result"]["ndcg@10"], abs=1e-6)  # the same model, the same test


@pytest.mark.parametrize(
    "model, overrides",
    [
        ("UR4RecV2MoE", {}),
        ("UR4RecV2MoE", FEDERATED),
        ("SASRec", {"hidden_size": 16, "inner_size": 32, "load_col": {"inter": ["user_id", "item_id", "timestamp"]}}),
    ],
    ids=["ur4rec", "federated", "sasrec"],
)
def test_load_checkpoint_gives_back_the_trained_model(tmp_path, model, overrides):
    settings = dict(TINY_CONFIG, checkpoint_dir=str(tmp_path / "saved"), **overrides)
    if model == "SASRec":  # no item features
        settings.update(additional_feat_suffix=None, alias_of_item_id=None)
    result = run_recbole_feddmmr(model=model, dataset="tiny", config_dict=settings)
    name = Path(result["checkpoint"]).name
    assert name.startswith(f"{model}-tiny-federated-" if overrides.get("federated") else f"{model}-tiny-")

    config, loaded, dataset, _, _, test_data = load_checkpoint(result["checkpoint"])
    assert config["model"] == model and not loaded.training and dataset.dataset_name == "tiny"
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, loaded)
    assert trainer.evaluate(test_data, load_best_model=False) == pytest.approx(result["test_result"], abs=1e-12)


def test_unknown_settings_are_warned_about_with_the_closest_name(tmp_path):
    config = tiny_config(tmp_path, learnign_rate=0.1, n_layers=3)
    assert "unknown setting 'learnign_rate' is ignored; did you mean 'learning_rate'?" in config.setting_warnings
    assert any("'n_layers' is not used by UR4RecV2MoE" in warning for warning in config.setting_warnings)
    assert tiny_config(tmp_path).setting_warnings == []


def test_topk_beyond_the_catalogue_is_refused_before_training(tmp_path):
    settings = dict(TINY_CONFIG, checkpoint_dir=str(tmp_path / "saved"), topk=[5, 40])  # tiny has 30 items
    with pytest.raises(ConfigError, match=r"topk=\[5, 40\] asks for 40 items, but tiny ranks 30 candidates"):
        run_recbole_feddmmr(model="UR4RecV2MoE", dataset="tiny", config_dict=settings)
    assert not (tmp_path / "saved").exists()  # no epoch ran


def test_one_sequence_length_setting(tmp_path):
    with pytest.raises(ConfigError, match="max_seq_len=20 disagrees with MAX_ITEM_LIST_LENGTH=10"):
        tiny_config(tmp_path, max_seq_len=20)
    _, _, _, model = tiny_run(tmp_path, max_seq_len=10)  # the same value: accepted
    assert model.backbone.position_embedding.num_embeddings == 10


def test_report_prints_a_table_for_every_committed_results_file():
    from recbole_feddmmr.experiments.report import format_results, read_results

    files = sorted((REPO / "results").rglob("*.json"))
    assert len(files) > 10
    for path in files:
        lines = format_results(read_results(path)).strip().splitlines()
        assert len(lines) >= 2 and lines[-1].startswith("command: `"), path
        assert "?" not in lines[-1], path  # what a file does not record is said: "not recorded"
    unrecorded = format_results({"kind": "run", **read_results(files[0])} | {"machine": None, "commit": None})
    assert unrecorded.endswith("commit not recorded; machine: not recorded")


def test_a_results_file_names_its_kind_or_is_refused():
    from recbole_feddmmr.experiments.report import format_results

    with pytest.raises(DataFileError, match="its kind is None"):
        format_results({"runs": [], "summary": {}})  # no guessing from the keys


def test_the_feature_commands_printed_yaml_loads_the_new_file(tmp_path, capsys):
    from recbole.data import create_dataset

    from recbole_feddmmr.config import Config
    from recbole_feddmmr.features.__main__ import main
    from recbole_feddmmr.model import UR4RecV2MoE

    data = tmp_path / "data"
    shutil.copytree(TEST_DATA / "tiny", data / "tiny")
    (data / "tiny" / "tiny.itememb").unlink()
    main(["--dataset", "tiny", "--data-path", str(data), "--text-columns", "movie_title"])
    printed = capsys.readouterr().out.split("# settings that load it: add them to a yaml given with --config_files\n")
    settings = yaml.safe_load(printed[1])
    assert settings["load_col"]["itememb"] == ["iid", "sbert_emb"] and settings["text_dim"] == 384
    model_settings = {key: value for key, value in TINY_CONFIG.items() if key not in settings and key != "text_dim"}
    config = Config("UR4RecV2MoE", "tiny", config_dict={**model_settings, **settings, "data_path": str(data)})
    model = UR4RecV2MoE(config, create_dataset(config))
    assert model.live_experts == ["sequential", "semantic"]  # the new 384-d text features are read


def write_tiny(tmp_path: Path, suffix: str, edit) -> Path:
    """A copy of the tiny dataset whose ``tiny.<suffix>`` is ``edit(lines)``; -> its data folder."""
    data = tmp_path / "data"
    shutil.copytree(TEST_DATA / "tiny", data / "tiny")
    path = data / "tiny" / f"tiny.{suffix}"
    path.write_text("\n".join(edit(path.read_text().splitlines())) + "\n")
    return data


@pytest.mark.parametrize(
    "suffix, edit, message",
    [
        ("inter", lambda lines: [lines[0].replace("rating:float", "rating"), *lines[1:]], r"tiny.inter:1: .*'rating'"),
        ("inter", lambda lines: [*lines[:3], lines[3] + "\t7", *lines[4:]], r"tiny.inter:4: 5 tab-separated cells"),
        (
            "inter",
            lambda lines: [*lines[:2], lines[2].rsplit("\t", 1)[0] + "\tnoon", *lines[3:]],
            r"tiny.inter:3: .*'noon'",
        ),
        (
            "itememb",
            lambda lines: [lines[0].replace("sbert_emb", "text_emb").replace("clip_emb", "image_emb"), *lines[1:]],
            r"feature columns \['image_emb', 'text_emb'\], but the model reads text_feature_field=sbert_emb",
        ),
    ],
    ids=["header-without-type", "extra-cell", "non-numeric-timestamp", "no-configured-feature-column"],
)
def test_malformed_dataset_files_are_refused_with_file_line_and_fix(tmp_path, suffix, edit, message):
    data = write_tiny(tmp_path, suffix, edit)
    load_col = {**TINY_YAML["load_col"], "itememb": ["iid", "text_emb", "image_emb"]}
    settings = dict(TINY_CONFIG, data_path=str(data), checkpoint_dir=str(tmp_path / "saved"), load_col=load_col)
    with pytest.raises(DataFileError, match=message):
        run_recbole_feddmmr(model="UR4RecV2MoE", dataset="tiny", config_dict=settings)
    assert not (tmp_path / "saved").exists()


def test_a_dataset_without_item_features_trains_the_sequential_expert_with_a_warning(tmp_path, caplog):
    from recbole_feddmmr.quick_start import prepare_run

    data = write_tiny(tmp_path, "item", lambda lines: [*lines, "99\tNever Seen\t1999\tDrama"])
    (data / "tiny" / "tiny.itememb").unlink()
    _, _, model = prepare_run("UR4RecV2MoE", "tiny", config_dict=dict(TINY_CONFIG, data_path=str(data)))
    assert model.live_experts == ["sequential"]
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert any("tiny.itememb" in text and "sequential expert only" in text for text in warnings)
    assert any("1 items of tiny.item never occur in tiny.inter" in text for text in warnings)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"clip_grad_norm": {"max_norm": 1.0}}, "clip_grad_norm=.* is not supported with federated=True"),
        ({"enable_amp": True}, "enable_amp=True is not supported with federated=True"),
        ({"memory_type": "history"}, "memory_type=history has no memory to summarise into prototypes"),
        ({"num_memory_prototypes": 0}, "num_memory_prototypes=0: at least 1 prototype"),
        ({"server_lr": 0}, "server_lr must be > 0, got 0"),  # once silently 1.0
        ({"server_optimizer": "fedsgd"}, "server_optimizer must be one of fedavg, fedavgm, fedadam, fedyogi"),
        ({"local_optimizer": "rmsprop"}, "local_optimizer must be one of adam, sgd, got 'rmsprop'"),
        ({"eval_every": 0}, "eval_every must be > 0"),  # a run that never validates keeps no model to test
        ({"partition": "random"}, "partition=random needs num_clients"),
    ],
)
def test_settings_a_federated_run_cannot_honour_are_refused_before_training(tmp_path, overrides, message):
    from recbole_feddmmr.federated.settings import FederatedSettings

    with pytest.raises(ConfigError, match=message):
        FederatedSettings.from_config(tiny_config(tmp_path, **{**FEDERATED, **overrides}))
    allowed = tiny_config(tmp_path, **{**FEDERATED, "memory_type": "history", "enable_prototype_aggregation": False})
    assert FederatedSettings.from_config(allowed).local.num_prototypes == 0


def test_federated_defaults_come_from_the_yaml_alone(tmp_path):
    from recbole_feddmmr.federated.settings import FederatedSettings, default_local_settings, yaml_defaults

    settings = FederatedSettings.from_config(tiny_config(tmp_path, **FEDERATED))
    yaml = yaml_defaults()
    assert (settings.server_optimizer, settings.server_lr) == (yaml["server_optimizer"], yaml["server_lr"])
    local = default_local_settings()
    assert (local.local_optimizer, local.local_lr, local.local_batch_size) == (
        yaml["local_optimizer"], yaml["local_lr"], yaml["local_batch_size"]
    )  # fmt: skip


def test_more_clients_than_users_is_refused(tmp_path):
    settings = dict(TINY_CONFIG, checkpoint_dir=str(tmp_path / "saved"), **FEDERATED)
    settings.update(partition="random", num_clients=100)
    with pytest.raises(ConfigError, match=r"needs 1 <= num_clients <= 12 users, got 100"):
        run_recbole_feddmmr(model="UR4RecV2MoE", dataset="tiny", config_dict=settings)


def test_corrupt_or_foreign_checkpoints_and_resume_files_are_named(tmp_path):
    garbage = tmp_path / "broken.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"broken\.pth is not a readable checkpoint"):
        load_checkpoint(garbage)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pth")
    with pytest.raises(CheckpointError, match=r"foreign\.pth is not a model checkpoint of recbole_feddmmr"):
        load_checkpoint(tmp_path / "foreign.pth")

    config, _, (train_data, valid_data, _), model = tiny_run(tmp_path, **FEDERATED)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"], "federated")(config, model)
    trainer.resume_file.parent.mkdir(parents=True, exist_ok=True)
    trainer.resume_file.write_bytes(b"\x80\x04truncated")
    with pytest.raises(CheckpointError, match=r"\.resume\.pth is not a readable checkpoint"):
        trainer.fit(train_data, valid_data)


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    config, _, (train_data, valid_data, test_data), model = tiny_run(tmp_path)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    trainer.fit(train_data, valid_data, saved=True)
    before = trainer.evaluate(test_data, load_best_model=True)

    def killed_mid_write(state, path, **kwargs):
        Path(path).write_bytes(b"half a checkp")
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(torch, "save", killed_mid_write)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # the model moved on
    with pytest.raises(KeyboardInterrupt):
        trainer._save_checkpoint(5)
    monkeypatch.undo()
    _, loaded, _, _, _, test_data = load_checkpoint(trainer.saved_model_file)
    reloaded = get_trainer(config["MODEL_TYPE"], config["model"])(config, loaded)
    assert reloaded.evaluate(test_data, load_best_model=False) == before


def test_a_refused_synthetic_dataset_leaves_no_folder(tmp_path):
    from recbole_feddmmr.synthetic import main

    out = tmp_path / "planted"
    with pytest.raises(ConfigError, match="interactions_per_user must be at most half"):
        main(["--out", str(out), "--num-items", "100", "--num-factors", "50"])
    assert not out.exists()


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["-m", "recbole_feddmmr.features", "--dataset", "tiny", "--data-path", "DATA"], "--text-columns"),
        ([str(REPO / "run_recbole_feddmmr.py"), "--model", "SASRecc", "--dataset", "tiny"], "unknown model 'SASRecc'"),
        ([str(REPO / "run_recbole_feddmmr.py"), "--config_files", "a.yaml b.yaml"], "config file a.yaml does not"),
    ],
    ids=["features-without-text-columns", "unknown-model", "missing-config-file"],
)
def test_commands_report_a_deliberate_error_in_one_line(tmp_path, arguments, message):
    data = write_tiny(tmp_path, "item", lambda lines: lines)
    (data / "tiny" / "tiny.itememb").unlink()
    completed = command(tmp_path, *[str(data) if argument == "DATA" else argument for argument in arguments])
    assert completed.returncode == 2
    assert "Traceback" not in completed.stderr
    error_lines = [line for line in completed.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and message in error_lines[0], completed.stderr[-2000:]
