"""The benchmark command: runs with their own overrides, ratios taken from the reported values."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import TEST_DATA, TINY_CONFIG

from recbole_feddmmr.errors import ConfigError
from recbole_feddmmr.experiments.benchmark import main
from recbole_feddmmr.experiments.runner import parse_run


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
    overrides = [f"--{key}={yaml.safe_dump(value, default_flow_style=True).strip()}" for key, value in settings.items()]
    runs = ["UR4RecV2MoE", "UR4RecV2MoE[memory_type=history]"]
    arguments = ["--dataset", "tiny", "--models", *runs, "--baseline", runs[1], "--epochs", "2", "--seeds", "1"]
    arguments += ["--out", str(out)]
    report = main([*arguments, *overrides])
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
    overrides = [f"--{key}={yaml.safe_dump(value, default_flow_style=True).strip()}" for key, value in settings.items()]
    arguments = ["--dataset", "tiny", "--models", "UR4RecV2MoE", "--baseline", "UR4RecV2MoE", "--epochs", "2"]
    arguments += ["--seeds", "1"]
    (run,) = main([*arguments, "--out", str(out), *overrides])["runs"]
    evaluated = main(["--evaluate", run["checkpoint"], "--out", str(tmp_path / "evaluated.json")])["evaluated"][0]
    assert evaluated["test_full"] == pytest.approx(run["test_full"])
    assert evaluated["test_uni100"] == pytest.approx(run["test_uni100"])
    assert evaluated["best_epoch"] == run["best_epoch"] and evaluated["expert_share"] == pytest.approx(
        run["expert_share"]
    )


def test_seeds_are_summarised_compared_in_pairs_tabulated_plotted_and_resumed(tmp_path, capsys):
    from statistics import mean, stdev

    from recbole_feddmmr.experiments.report import format_results, read_results

    settings = dict(TINY_CONFIG, checkpoint_dir=str(tmp_path / "saved"))
    settings.pop("epochs")
    overrides = [f"--{key}={yaml.safe_dump(value, default_flow_style=True).strip()}" for key, value in settings.items()]
    models = ["UR4RecV2MoE", "SASRec"]
    sasrec = ["--hidden_size=16", "--inner_size=32"]  # SASRec reads these; UR4RecV2MoE warns and ignores them
    arguments = ["--dataset", "tiny", "--models", *models, "--seeds", "2", "--epochs", "1", "--name", "bench"]
    report = main([*arguments, "--jobs", "2", *overrides, *sasrec])
    folder = tmp_path / "results" / "bench"
    assert sorted(path.name for path in (folder / "runs").iterdir()) == [
        "SASRec-seed2020.json", "SASRec-seed2021.json", "UR4RecV2MoE-seed2020.json", "UR4RecV2MoE-seed2021.json"
    ]  # fmt: skip
    runs = {(run["label"], run["seed"]): run for run in report["runs"]}
    assert runs[("UR4RecV2MoE", 2020)]["test_full"] != runs[("UR4RecV2MoE", 2021)]["test_full"]  # seeds differ
    ndcg = {key: run["test_full"]["ndcg@10"] for key, run in runs.items()}
    ours, theirs = [ndcg[("UR4RecV2MoE", s)] for s in (2020, 2021)], [ndcg[("SASRec", s)] for s in (2020, 2021)]
    assert report["summary"]["UR4RecV2MoE"]["ndcg@10"] == pytest.approx([mean(ours), stdev(ours)])
    comparison = report["paired"]
    differences = [a - b for a, b in zip(ours, theirs, strict=True)]
    assert comparison["baseline"] == "SASRec" and comparison["differences"] == pytest.approx(differences)
    assert comparison["standard_error"] == pytest.approx(stdev(differences) / 2**0.5)
    assert comparison["exceeds_seed_noise"] == (abs(mean(differences)) > 2 * comparison["standard_error"])
    for run in runs.values():  # what the costs and the cold slice report
        assert run["parameters"] > 0 and run["peak_memory_mb"] > 0 and run["train_samples_per_second"] > 0
        assert run["valid_curve"][0][0] == 0 and 0 < run["seconds_to_best"] <= run["fit_seconds"]
        assert run["cold_users"] == 12 and set(run["test_cold"]) == set(run["test_full"])  # tiny: every item is rare
    assert {p.name for p in folder.iterdir()} >= {"report.json", "table.md", "table.csv", "curves.png", "test_ndcg.png"}
    table = (folder / "table.md").read_text()
    assert f"{mean(ours):.4f} ± {stdev(ours):.4f}" in table and "Paired over seeds [2020, 2021]" in table
    shares = [run["expert_share"] for key, run in runs.items() if key[0] == "UR4RecV2MoE"]
    share_row = table.split("Expert shares")[1].split("| UR4RecV2MoE |")[1].split("\n")[0]
    assert f"{mean(share['semantic'] for share in shares):.3f}" in share_row  # the router's mean weight, per expert
    assert all(sum(share.values()) == pytest.approx(1.0) for share in shares)
    assert (folder / "table.csv").read_text().count("\n") == 3  # header and two models
    # a rerun with the same arguments trains nothing and reports the same
    capsys.readouterr()
    again = main([*arguments, *overrides, *sasrec])
    assert "4 runs (4 already in" in capsys.readouterr().out
    assert again["summary"] == report["summary"]
    with pytest.raises(ConfigError, match="was written with other settings: pass another --name"):
        main([*arguments, *overrides, "--hidden_size=32"])  # another benchmark into the same folder
    # --no-train: a table of the cells there are, the missing ones listed and left untrained
    assert all(run["commit"] == report["commit"] for run in report["runs"])  # each cell keeps its provenance
    assert all(run["command"] == report["command"] for run in report["runs"])  # the benchmark that trained it
    assert all(f"{run['torch_threads']} torch threads" in run["machine"] for run in report["runs"])
    cell = format_results(read_results(folder / "runs" / "SASRec-seed2021.json"))
    machine = runs[("SASRec", 2021)]["machine"]
    assert cell.endswith(f"\ncommand: `{report['command']}`; commit {report['commit']}; machine: {machine}")
    (folder / "runs" / "SASRec-seed2021.json").unlink()
    partial = main([*arguments, *overrides, *sasrec, "--no-train"])
    assert not (folder / "runs" / "SASRec-seed2021.json").exists() and partial["missing"] == ["SASRec seed 2021"]
    assert partial["summary"]["SASRec"]["seeds"] == 1 and partial["summary"]["UR4RecV2MoE"]["seeds"] == 2
    assert partial["paired"]["seeds"] == [2020]  # only the seeds both models have are paired
    table = (folder / "table.md").read_text()
    assert "over each row's seeds of [2020, 2021]" in table and "Not trained yet, so not in this table (1)" in table
    sasrec_ndcg = f"{ndcg[('SASRec', 2020)]:.4f}"
    assert f"| {sasrec_ndcg} |" in table and f"{sasrec_ndcg} ±" not in table  # one seed: a value, no spread
    with pytest.raises(ConfigError, match="--no-train: no finished run of these models and seeds"):
        main([*arguments[:-1], "empty", *overrides, *sasrec, "--no-train"])


def test_training_counts_per_item_and_the_cold_slice_follow_the_inter_file(tmp_path):
    import pandas as pd
    from conftest import TEST_DATA, tiny_run

    from recbole_feddmmr.experiments.runner import cold_item_slice, item_train_counts

    config, dataset, (train_data, _, test_data), _ = tiny_run(tmp_path)
    inter = pd.read_csv(TEST_DATA / "tiny" / "tiny.inter", sep="\t")
    inter.columns = [column.split(":")[0] for column in inter.columns]
    inter = inter.sort_values(["user_id", "timestamp"], kind="stable")
    training = inter.groupby("user_id").head(-2)  # leave-one-out by time: the last two are validation and test
    expected = training["item_id"].astype(str).value_counts()
    counts = item_train_counts(train_data)
    tokens = dataset.id2token(dataset.iid_field, range(1, dataset.item_num))
    assert {token: int(counts[i + 1]) for i, token in enumerate(tokens) if counts[i + 1]} == expected.to_dict()
    test_items = test_data._dataset.inter_feat[dataset.iid_field]
    sizes = {}
    for limit in (0, 2, 3):
        cold = cold_item_slice(config, train_data, test_data, max_count=limit)
        sizes[limit] = 0 if cold is None else len(cold._dataset)
        assert sizes[limit] == int((counts[test_items] <= limit).sum())
    assert sizes[0] == 0 and 0 < sizes[2] < sizes[3] < 12  # proper, growing subsets of the 12 test users


def test_quick_writes_a_row_for_every_requested_model_with_one_seed_and_its_short_budget(tmp_path):
    from recbole_feddmmr.experiments.benchmark import QUICK

    settings = dict(TINY_CONFIG, checkpoint_dir=str(tmp_path / "saved"), hidden_size=16, inner_size=32)
    settings.pop("epochs")
    overrides = [f"--{key}={yaml.safe_dump(value, default_flow_style=True).strip()}" for key, value in settings.items()]
    federated = "UR4RecV2MoE[federated=True,rounds=2,eval_every=1,clients_per_round=4]"
    models = ["SASRec", "SASRecFText", "UR4RecV2MoE", federated]
    report = main(["--dataset", "tiny", "--quick", "--models", *models, "--jobs", "2", *overrides])
    assert [run["label"] for run in report["runs"]] == models and report["seeds"] == [2020]
    folder = tmp_path / "results" / "tiny-quick"
    table = (folder / "table.md").read_text()
    assert all(f"| {label} |" in table for label in models)
    for run in report["runs"]:
        assert run["settings"]["user_inter_num_interval"] == QUICK["user_inter_num_interval"]
        assert run["epochs_trained"] == (2 if "federated" in run["label"] else QUICK["epochs"])  # rounds, epochs
    federated_run = report["runs"][-1]  # a round trains its sampled clients' targets, not the whole training split
    trained = sum(r["samples"] for r in federated_run["rounds"])
    assert 0 < trained < 2 * federated_run["train_samples_per_epoch"]  # 2 rounds of 4 of tiny's 12 users
    assert federated_run["train_samples_per_second"] == pytest.approx(trained / federated_run["train_seconds"])


def test_the_cost_table_gives_seconds_per_epoch_and_their_ratio_to_the_speed_baseline():
    from recbole_feddmmr.experiments.comparison import format_table, summarize

    def run(label: str, seed: int, train_seconds: float, epochs: int) -> dict:
        metrics = {f"{m}@{k}": 0.1 for m in ("hit", "ndcg", "mrr") for k in (5, 10, 20)}
        return {"label": label, "seed": seed, "train_seconds": train_seconds, "epochs_trained": epochs,
                "test_full": metrics, "test_uni100": metrics, "parameters": 10, "seconds_to_best": 1.0,
                "train_samples_per_second": 1.0, "peak_memory_mb": 1.0}  # fmt: skip

    # SASRec: 100 s / 4 epochs and 90 s / 3 epochs -> 27.5 s; the other 2 s / 1 and 6 s / 2 epochs -> 2.5 s
    runs = [run("SASRec", 1, 100.0, 4), run("SASRec", 2, 90.0, 3), run("Other", 1, 2.0, 1), run("Other", 2, 6.0, 2)]
    report = {"runs": runs, "seeds": [1, 2], "summary": summarize(runs), "speed_baseline": "SASRec"}
    assert report["summary"]["SASRec"]["seconds_per_epoch"][0] == pytest.approx(27.5)
    assert report["summary"]["Other"]["seconds_per_epoch"][0] == pytest.approx(2.5)
    table = format_table(report)  # parameters, seconds to best, samples / s, s per epoch, ratio, memory
    assert "| SASRec | 10 | 1 | 1 | 27.5 | 1.00 | 1 |" in table and "| Other | 10 | 1 | 1 | 2.5 | 0.09 | 1 |" in table
    del report["speed_baseline"], report["summary"]["SASRec"]  # no SASRec in the table: no ratio
    assert "| Other | 10 | 1 | 1 | 2.5 | - | 1 |" in format_table(report)
    assert "\nCells trained on: not recorded (4)\n" in format_table(report)  # one machine: its costs compare
    runs[0]["machine"] = "CPU A"  # cells of two machines: the table says which, and that its costs mix them
    mixed = "\nCells trained on: CPU A (1); not recorded (3) (the costs above mix these machines)\n"
    assert mixed in format_table(report)
    report["machine"] = "CPU A"
    for cell in runs:
        cell["machine"] = "CPU A"
    assert "Cells trained on" not in format_table(report)  # every cell on the table's own machine


def test_a_federated_runs_throughput_counts_the_samples_its_rounds_trained():
    from recbole_feddmmr.experiments.benchmark import ratios_against
    from recbole_feddmmr.experiments.comparison import metric_of

    # 3 rounds of 100 + 120 + 80 targets in 6 s: 50 samples / s, whatever the stored figure says (runs written
    # before the benchmark counted rounds stored the whole training split, 1,000 targets, per round)
    rounds = [{"samples": 100}, {"samples": 120}, {"samples": 80}]
    federated = {"rounds": rounds, "train_seconds": 6.0, "epochs_trained": 3, "train_samples_per_second": 500.0}
    assert metric_of(federated, "train_samples_per_second") == pytest.approx(50.0)
    assert metric_of({"train_seconds": 6.0, "train_samples_per_second": 500.0}, "train_samples_per_second") == 500.0

    scores = {"test_full": {"ndcg@10": 0.1}, "test_uni100": {"ndcg@10": 0.1}}
    epochs = {"label": "epochs", "model": "SASRec", **scores, "train_seconds": 6.0, "train_samples_per_second": 500.0}
    federated.update(label="federated", model="UR4RecV2MoE", **scores)
    assert ratios_against([epochs, federated], "epochs")["federated"]["train_samples_per_second"] == pytest.approx(0.1)
    # a baseline that scores 0 (an ID-only model on cold items) gives no ratio rather than a crash
    epochs["test_full"] = {"ndcg@10": 0.0}
    against_zero = ratios_against([epochs, federated], "epochs")["federated"]
    assert against_zero["test_full_ndcg@10"] is None and against_zero["test_uni100_ndcg@10"] == pytest.approx(1.0)


def test_paired_differences_by_hand_and_no_ratio_against_a_baseline_that_scores_zero():
    from recbole_feddmmr.experiments.comparison import format_table, paired, summarize

    def run(label: str, seed: int, ndcg: float) -> dict:
        return {"label": label, "seed": seed, "test_full": {"ndcg@10": ndcg}}

    runs = [run("ours", 1, 0.12), run("ours", 2, 0.10), run("theirs", 1, 0.10), run("theirs", 2, 0.10)]
    comparison = paired(runs, "ours", "theirs")
    # differences 0.02 and 0.00: mean 0.01, std 0.0141, standard error 0.01 -> not beyond 2 standard errors
    assert comparison["differences"] == pytest.approx([0.02, 0.0])
    assert comparison["standard_error"] == pytest.approx(0.01)
    assert not comparison["exceeds_seed_noise"] and comparison["ratio_of_means"] == pytest.approx(1.1)
    zero = [run("ours", 1, 0.01), run("theirs", 1, 0.0)]  # an ID-only model on cold items scores 0
    comparison = paired(zero, "ours", "theirs")
    assert comparison["ratio_of_means"] is None and comparison["mean_difference"] == pytest.approx(0.01)
    report = {"runs": zero, "seeds": [1], "summary": summarize(zero), "paired": comparison}
    assert "no ratio (its mean is 0); one seed: no standard error" in format_table(report)


def test_the_cold_item_protocol_trains_and_validates_on_no_cold_item_and_tests_on_one(tmp_path):
    from recbole_feddmmr.experiments.cold_items import MIN_HISTORY, write_cold_dataset
    from recbole_feddmmr.features.atomic import read_atomic

    cold = write_cold_dataset(TEST_DATA / "tiny", "tiny", 0.3, seed=1, data_root=tmp_path)
    original = read_atomic(TEST_DATA / "tiny" / "tiny.inter")
    written = read_atomic(cold.folder / f"{cold.name}.inter")
    assert len(cold.cold_item_ids) == round(0.3 * original["item_id"].nunique())
    tested = 0
    for user, rows in written.groupby("user_id"):
        ordered = rows.assign(t=rows["timestamp"].astype(float)).sort_values("t", kind="stable")["item_id"].tolist()
        assert not set(ordered[:-1]) & set(cold.cold_item_ids)  # never trained on, never the validation target
        if ordered[-1] in cold.cold_item_ids:  # tested on a cold item, after enough warm history
            tested += 1
            assert len(ordered) - 1 >= MIN_HISTORY
            mine = original[original["user_id"] == user].assign(t=lambda frame: frame["timestamp"].astype(float))
            warm_before = mine[(mine["t"] < float(rows["timestamp"].astype(float).max()))]
            assert ordered[:-1] == [
                i for i in warm_before.sort_values("t", kind="stable")["item_id"] if i not in cold.cold_item_ids
            ]
    assert tested == cold.cold_users > 0 and cold.users == written["user_id"].nunique()
    itememb = read_atomic(cold.folder / f"{cold.name}.itememb")
    assert set(itememb["iid"]) == set(written["item_id"])  # no feature row makes an unseen item a candidate
    assert "load_col" in (cold.folder / f"{cold.name}.yaml").read_text()  # the settings tiny runs with
    again = write_cold_dataset(TEST_DATA / "tiny", "tiny", 0.3, seed=1, data_root=tmp_path)
    assert again.cold_item_ids == cold.cold_item_ids  # the same seed, the same cold items


def test_report_pairs_two_sets_of_cells_seed_by_seed(tmp_path, capsys):
    """B - A over the common seeds 1 and 2 (seed 3 is only in A): valid +0.01, +0.03 -> +0.0200 ± 0.0100;
    test -0.02, 0.00 -> -0.0100 ± 0.0100 (standard error = stdev / sqrt(2))."""
    from recbole_feddmmr.errors import DataFileError, MissingFileError
    from recbole_feddmmr.experiments.report import main as report

    def cell(name: str, seed: int, valid: float, test: float) -> None:
        record = {"kind": "run", "seed": seed, "best_valid_ndcg@10": valid, "test_full": {"ndcg@10": test}}
        (tmp_path / f"{name}-seed{seed}.json").write_text(json.dumps(record | {"best_epoch": seed, "commit": "abc"}))

    for seed, valid, test in ((1, 0.05, 0.06), (2, 0.06, 0.05), (3, 0.07, 0.07)):
        cell("A", seed, valid, test)
    for seed, valid, test in ((1, 0.06, 0.04), (2, 0.09, 0.05)):
        cell("B", seed, valid, test)
    (table,) = report(["--paired", str(tmp_path / "A"), str(tmp_path / "B")])
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert rows["valid NDCG@10, A / B"].endswith("| 0.0500 / 0.0600 | 0.0600 / 0.0900 | +0.0200 ± 0.0100 |")
    assert rows["test NDCG@10, A / B"].endswith("| 0.0600 / 0.0400 | 0.0500 / 0.0500 | -0.0100 ± 0.0100 |")
    assert rows["best epoch, A / B"].startswith("| best epoch, A / B | 1 / 1 | 2 / 2 |")
    with pytest.raises(MissingFileError, match="no benchmark cells"):
        report(["--paired", str(tmp_path / "A"), str(tmp_path / "C")])
    cell("D", 9, 0.1, 0.1)
    with pytest.raises(DataFileError, match="no seed in common"):
        report(["--paired", str(tmp_path / "A"), str(tmp_path / "D")])
