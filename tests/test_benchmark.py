"""The benchmark command: runs with their own overrides, ratios taken from the reported values."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import TINY_CONFIG

from recbole_feddmmr.benchmark import main, parse_run


def test_run_specs_parse_into_model_and_yaml_overrides():
    assert parse_run("SASRec") == ("SASRec", {})
    assert parse_run("UR4RecV2MoE[feature_id_field=null,dropout=0.3,memory_type=history]") == (
        "UR4RecV2MoE",
        {"feature_id_field": None, "dropout": 0.3, "memory_type": "history"},
    )
    with pytest.raises(ValueError, match="key=value"):
        parse_run("UR4RecV2MoE[dropout]")


def test_benchmark_reports_each_run_and_ratios_against_the_baseline(tmp_path):
    out = tmp_path / "report.json"
    settings = dict(TINY_CONFIG, checkpoint_dir=str(tmp_path / "saved"))
    settings.pop("epochs")
    overrides = [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip()}" for key, value in settings.items()]
    runs = ["UR4RecV2MoE", "UR4RecV2MoE[memory_type=history]"]
    arguments = ["--dataset", "tiny", "--models", *runs, "--baseline", runs[1], "--epochs", "2", "--out", str(out)]
    report = main([*arguments, "--set", *overrides])
    assert json.loads(out.read_text()) == report
    assert main(["--report", str(out)]) == report  # tables for the README come from the saved file
    dynamic, history = report["runs"]
    reversed_ratios = main(["--report", str(out), "--baseline", runs[0]])[f"ratios_vs_{runs[0]}"][runs[1]]
    assert reversed_ratios["train_samples_per_second"] == pytest.approx(
        history["train_samples_per_second"] / dynamic["train_samples_per_second"]
    )
    dynamic, history = report["runs"]
    assert [dynamic["label"], history["label"]] == runs
    assert dynamic["epochs_trained"] == 2 and len(dynamic["memory_per_epoch"]) == 2
    assert 0 < dynamic["memory_share_of_train_time"] < 1
    assert 0 < dynamic["memory_per_epoch"][-1]["fill_rate"] <= 1
    assert "memory_per_epoch" not in history  # the stand-in has no store to report
    assert dynamic["live_experts"] == ["sequential", "visual", "semantic"]  # the tiny dataset has both modalities
    ratios = report[f"ratios_vs_{runs[1]}"][runs[0]]
    assert ratios["train_samples_per_second"] == pytest.approx(
        dynamic["train_samples_per_second"] / history["train_samples_per_second"]
    )
    assert ratios["test_full_ndcg@10"] == pytest.approx(
        dynamic["test_full"]["ndcg@10"] / history["test_full"]["ndcg@10"]
    )


def test_a_saved_checkpoint_evaluates_to_the_runs_own_test_figures(tmp_path):
    out = tmp_path / "report.json"
    settings = dict(TINY_CONFIG, checkpoint_dir=str(tmp_path / "saved"))
    settings.pop("epochs")
    overrides = [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip()}" for key, value in settings.items()]
    arguments = ["--dataset", "tiny", "--models", "UR4RecV2MoE", "--baseline", "UR4RecV2MoE", "--epochs", "2"]
    (run,) = main([*arguments, "--out", str(out), "--set", *overrides])["runs"]
    evaluated = main(["--evaluate", run["checkpoint"], "--out", str(tmp_path / "evaluated.json")])["evaluated"][0]
    assert evaluated["test_full"] == pytest.approx(run["test_full"])
    assert evaluated["test_uni100"] == pytest.approx(run["test_uni100"])
    assert evaluated["best_epoch"] == run["best_epoch"] and evaluated["expert_share"] == pytest.approx(
        run["expert_share"]
    )
