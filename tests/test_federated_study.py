"""The federated study command on the tiny dataset: table, curves and the accuracy ratio agree with its runs."""

from __future__ import annotations

import csv
import json

import pytest
import yaml
from conftest import TINY_CONFIG

from recbole_feddmmr.experiments.federated_study import main, run_file


def test_study_writes_table_curves_and_the_federated_over_centralised_ratio(tmp_path):
    out = tmp_path / "study"
    settings = dict(TINY_CONFIG, num_memory_prototypes=2)
    settings.pop("epochs")
    overrides = [f"--{key}={yaml.safe_dump(value, default_flow_style=True).strip()}" for key, value in settings.items()]
    sampled = "UR4RecV2MoE[federated=True,clients_per_round=4,server_optimizer=fedadam,server_lr=0.01]"
    runs = ["UR4RecV2MoE", "UR4RecV2MoE[federated=True]", sampled]
    arguments = ["--dataset", "tiny", "--runs", *runs, "--rounds", "3", "--eval_every", "1", "--epochs", "2"]
    arguments += ["--jobs", "2", "--out", str(out), *overrides]
    report = main(arguments)
    assert not report["failed"]

    results = {label: json.loads(run_file(out, label).read_text()) for label in runs}
    with (out / "table.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["run"] for row in rows] == runs
    for row in rows:  # each row is its run's best-validation figures
        run = results[row["run"]]
        assert float(row["test_ndcg@10"]) == pytest.approx(run["test_full"]["ndcg@10"])
        assert float(row["best_valid_ndcg@10"]) == pytest.approx(run["best_valid_ndcg@10"])
    federated = results[runs[1]]
    assert [r["clients"] for r in federated["rounds"]] == [12, 12, 12]  # the defaults: every client
    assert [r["clients"] for r in results[sampled]["rounds"]] == [4, 4, 4]
    valid = [r["valid_score"] for r in federated["rounds"]]
    assert federated["best_valid_ndcg@10"] == pytest.approx(max(valid))  # kept on validation
    elapsed = [r["elapsed_seconds"] for r in federated["rounds"]]
    assert elapsed == sorted(elapsed) and elapsed[0] > 0
    assert rows[0]["mb_up_down_per_round"] == "" and float(rows[1]["mb_up_down_per_round"]) > 0  # centralised: none

    accuracy = json.loads((out / "federated_accuracy.json").read_text())
    central = results["UR4RecV2MoE"]["test_full"]["ndcg@10"]
    assert accuracy["centralised_test_ndcg10"] == central
    assert accuracy["federated_test_ndcg10"] == federated["test_full"]["ndcg@10"]
    assert accuracy["ratio"] == pytest.approx(federated["test_full"]["ndcg@10"] / central)
    assert (
        accuracy["command"].startswith("python -m recbole_feddmmr.experiments.federated_study") and accuracy["commit"]
    )
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| run | best valid NDCG@10" in (out / "table.md").read_text()

    # the same command again continues the study: finished runs are read, not trained again
    before = {label: run_file(out, label).stat().st_mtime_ns for label in runs}
    again = main(arguments)
    assert again["runs"] == report["runs"]
    assert {label: run_file(out, label).stat().st_mtime_ns for label in runs} == before


def test_the_table_compares_runs_at_equal_wall_time():
    from recbole_feddmmr.experiments.federated_study import summary_row

    rounds = [
        {"valid_score": 0.02, "elapsed_seconds": 50.0, "bytes_up": 1, "bytes_down": 1},
        {"valid_score": None, "elapsed_seconds": 80.0, "bytes_up": 1, "bytes_down": 1},
        {"valid_score": 0.05, "elapsed_seconds": 120.0, "bytes_up": 1, "bytes_down": 1},
    ]
    run = {
        "label": "UR4RecV2MoE[federated=True]", "best_valid_ndcg@10": 0.05, "best_epoch": 2, "epochs_trained": 3,
        "test_full": {"hit@10": 0.1, "ndcg@10": 0.04}, "train_seconds": 1.0, "bytes_up_total": 3,
        "bytes_down_total": 3, "rounds": rounds,
    }  # fmt: skip
    assert summary_row(run, compare_at=100)["best_valid_within_s"] == 0.02  # 0.05 came after 120 s
    assert summary_row(run, compare_at=120)["best_valid_within_s"] == 0.05
    assert summary_row(run)["best_valid_within_s"] is None
    assert summary_row(run)["target_exposure@10"] is None and summary_row(run)["epsilon"] is None


def test_the_table_shows_exposure_and_epsilon_only_when_a_run_has_them(tmp_path):
    from recbole_feddmmr.experiments.federated_study import summary_row, write_table

    def run(label, exposure=None, epsilons=(None, None)):
        rounds = [
            {"valid_score": 0.02, "elapsed_seconds": 5.0 * i, "bytes_up": 1, "bytes_down": 1, "epsilon": e}
            for i, e in enumerate(epsilons)
        ]
        result = {
            "label": label, "best_valid_ndcg@10": 0.02, "best_epoch": 0, "epochs_trained": 2,
            "test_full": {"hit@10": 0.1, "ndcg@10": 0.04}, "train_seconds": 1.0, "bytes_up_total": 2,
            "bytes_down_total": 2, "rounds": rounds,
        }  # fmt: skip
        return result | ({"target_exposure@10": exposure} if exposure is not None else {})

    plain = summary_row(run("plain"))
    assert "ER@10" not in write_table([plain], tmp_path, "footer")
    attacked = summary_row(run("attacked", exposure=0.25))
    private = summary_row(run("private", epsilons=(1.5, 2.25)))
    assert private["epsilon"] == 2.25  # the budget spent after the last round
    table = write_table([plain, attacked, private], tmp_path, "footer").splitlines()
    assert table[0].endswith("| target ER@10 | epsilon |")
    assert table[2].endswith("| - | - |")
    assert table[3].endswith("| 0.2500 | - |")
    assert table[4].endswith("| - | 2.25 |")
