"""The Ray Tune search on the tiny dataset: tables, a best.yaml that reproduces its trial, resume, bad spaces."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml
from conftest import TINY_CONFIG

from recbole_feddmmr.experiments.tune import VALID_METRIC, SpaceError, check_space, trial_rows

pytestmark = pytest.mark.ray
ROOT = Path(__file__).parents[1]


def search_args(tmp_path: Path, storage: Path, *extra: str) -> list[str]:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY_CONFIG, "state": "ERROR"}))
    space = tmp_path / "space.yaml"
    space.write_text("learning_rate: {loguniform: [0.0003, 0.003]}\ndropout: {choice: [0.1, 0.3]}\n")
    return ["--dataset", "tiny", "--config_files", str(config), "--space", str(space), "--num_samples", "2",
            "--max_concurrent", "1", "--storage", str(storage), *extra]  # fmt: skip


def run_search(args: list[str], cwd: Path, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "recbole_feddmmr.experiments.tune", "--num_cpus", "2", *args],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs,
    )  # fmt: skip


def trials(storage: Path) -> list[dict[str, str]]:
    with open(storage / "trials.csv") as handle:
        return list(csv.DictReader(handle))


def test_a_search_writes_its_tables_and_a_best_yaml_that_reproduces_the_best_trial(tmp_path):
    storage = tmp_path / "search"
    search = run_search(search_args(tmp_path, storage, "--max_epochs", "1"), tmp_path)
    output, _ = search.communicate(timeout=600)
    assert search.returncode == 0, output[-3000:]
    assert output.count("trial ") >= 2 and "finished" in output  # a progress line per finished trial
    rows = trials(storage)
    assert len(rows) == 2 and all(row["status"] == "done" for row in rows)
    assert {"learning_rate", "dropout", "best_valid_ndcg@10", "epochs", "seconds"} <= set(rows[0])
    assert (storage / "trials.md").read_text().count("\n") == 4  # header, rule, two trials
    best = yaml.safe_load((storage / "best.yaml").read_text())
    top = max(rows, key=lambda row: float(row["best_valid_ndcg@10"]))
    assert best["learning_rate"] == pytest.approx(float(top["learning_rate"]))
    assert best["state"] == "ERROR"  # self-contained: the config file's settings are in it
    # best.yaml alone, run by the README's command, reproduces the chosen trial's validation score
    report = json.loads((storage / "best.json").read_text())
    assert report["rerun_valid_ndcg@10"] == pytest.approx(report["best_trial_valid_ndcg@10"], abs=1e-4)
    assert report["best_trial_valid_ndcg@10"] == pytest.approx(float(top["best_valid_ndcg@10"]))
    assert "ndcg@10" in report["rerun_test"]


def test_an_interrupted_search_resumes_and_keeps_its_finished_trials(tmp_path):
    storage = tmp_path / "search"
    # three trials one at a time: the interrupt lands while trials remain, however fast a tiny trial is
    args = search_args(tmp_path, storage, "--max_epochs", "2", "--num_samples", "3")
    search = run_search(args, tmp_path)
    deadline = time.monotonic() + 600
    finished = []
    while not finished and time.monotonic() < deadline and search.poll() is None:
        time.sleep(0.2)
        finished = [p for p in storage.glob("train_trial_*/result.json") if p.read_text().count("\n") >= 2]
    assert finished, "no trial finished"
    search.send_signal(signal.SIGINT)  # as Ctrl-C: Tune saves its state and stops
    interrupted_output, _ = search.communicate(timeout=300)
    assert "search interrupted" in interrupted_output  # no best configuration chosen from a partial search
    assert not (storage / "best.yaml").exists()
    first_result = finished[0].read_text()

    resumed = run_search([*args, "--resume"], tmp_path)
    output, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, output[-3000:]
    rows = trials(storage)
    assert len(rows) == 3 and all(row["status"] == "done" for row in rows)
    assert finished[0].read_text() == first_result  # the finished trial was not trained again


def test_an_unknown_option_in_the_space_is_a_one_line_error(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("learnign_rate: {loguniform: [0.0003, 0.003]}\n")
    search = run_search(["--dataset", "tiny", "--space", str(space), "--storage", str(tmp_path / "s")], tmp_path)
    output, _ = search.communicate(timeout=300)
    assert search.returncode == 2
    assert "unknown option 'learnign_rate'" in output and "Traceback" not in output


def test_space_checks_name_the_bad_entry():
    known = {"learning_rate", "dropout"}
    check_space({"learning_rate": {"loguniform": [1e-4, 1e-2]}, "dropout": {"choice": [0.1]}}, known, "s.yaml")
    with pytest.raises(SpaceError, match="'dropout' needs one of"):
        check_space({"dropout": {"normal": [0, 1]}}, known, "s.yaml")
    with pytest.raises(SpaceError, match=r"loguniform takes \[low, high\]"):
        check_space({"learning_rate": {"loguniform": [1e-4]}}, known, "s.yaml")


def test_a_trial_interrupted_before_it_started_is_an_unfinished_row():
    started = SimpleNamespace(
        metrics={"trial_id": "a", "epoch": 2, "time_total_s": 3.0, "done": True},
        metrics_dataframe=pd.DataFrame({VALID_METRIC: [0.1, 0.2]}),
        config={"dropout": 0.1},
        path="/s/train_trial_a",
        error=None,
    )
    never = SimpleNamespace(metrics=None, metrics_dataframe=None, config=None, path=None, error=None)
    rows = trial_rows([never, started], interrupted=True)
    assert [row["trial"] for row in rows] == ["a", "not started"]
    assert rows[0]["best_valid_ndcg@10"] == 0.2 and rows[0]["status"] == "done" and rows[0]["dropout"] == 0.1
    assert rows[1]["status"] == "unfinished" and rows[1]["epochs"] == 0
