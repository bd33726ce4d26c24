"""Side by side: RecBole models and UR4RecV2MoE under one protocol, over seeds, in one command.

    python -m recbole_feddmmr.experiments.benchmark --dataset ml-100k          # the default models, 3 seeds
    python -m recbole_feddmmr.experiments.benchmark --dataset ml-100k --quick  # one epoch, one seed, few users
    python -m recbole_feddmmr.experiments.benchmark --models UR4RecV2MoE SASRec --seeds 5 --jobs 2 --dropout=0.3

Every (model, seed) trains under the protocol of ``properties/overall.yaml`` with the same budget
(``--epochs`` 200 at most) and early stopping on validation NDCG@10 (``--stopping_step`` 10); its
best-validation checkpoint is evaluated on test with full ranking, with uni100 (1 positive + 100 sampled
negatives) and on the cold-item slice (test users whose target item has at most 5 training
interactions). Each run also records its parameter count, seconds to its best epoch, training
samples per second, training seconds and epochs (the table divides them into seconds per epoch, with
their ratio to the first ``--baseline``'s) and peak memory, in a fresh process of its own (``--jobs``
side by side). Any other ``--key=value`` is a setting of every run (as on the main command).

Writes ``results/NAME/``: ``runs/<label>-seed<k>.json`` (one per finished run: a rerun with the same
arguments skips them, so an interrupted benchmark resumes), ``report.json``, ``table.md`` /
``table.csv`` (mean ± std over seeds), a paired comparison of UR4RecV2MoE with the best RecBole
baseline over seeds, and the plots ``curves.png``, ``test_ndcg.png``, ``expert_shares.png``.

A run may carry its own settings, ``MODEL[key=value,key=value]``, e.g. the
experts switched off: ``UR4RecV2MoE[feature_id_field=null]``; the whole string
is the run's label (also for ``--baseline``).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from recbole.data import create_dataset, data_preparation
from recbole.utils import init_seed

from recbole_feddmmr.checkpoints import read_checkpoint
from recbole_feddmmr.config import Config
from recbole_feddmmr.datasets import ensure_dataset
from recbole_feddmmr.errors import ConfigError, run_cli
from recbole_feddmmr.experiments.cold_items import write_cold_dataset
from recbole_feddmmr.experiments.comparison import (
    best_baseline,
    format_table,
    paired,
    plot,
    summarize,
    train_samples_per_second,
    write_csv,
)
from recbole_feddmmr.experiments.report import format_results, read_results
from recbole_feddmmr.experiments.runner import (
    COLD_MAX_TRAIN_INTERACTIONS,
    begin_command,
    command_settings,
    expert_share,
    new_report,
    parse_run,
    run_in_pool,
    run_model,
    start_worker,
    threads_per_job,
    write_json,
)
from recbole_feddmmr.experiments.tables import format_evaluated
from recbole_feddmmr.registry import get_model, get_trainer

MODULE = "recbole_feddmmr.experiments.benchmark"
DEFAULT_MODELS = (
    "SASRec",
    "GRU4Rec",
    "BERT4Rec",
    "SASRecFText",  # RecBole's SASRecF and FDSA given the SBERT vector UR4RecV2MoE reads (model/baselines.py)
    "FDSAText",
    "UR4RecV2MoE",
    "UR4RecV2MoE[feature_id_field=null]",  # the sequential expert only
    "UR4RecV2MoE[memory_type=history]",  # the history stand-in memory instead of LocalDynamicMemory
    "UR4RecV2MoE[federated=True]",  # the defaults of federated.yaml
)
# --quick: every model and row in minutes, not a comparison: one epoch (federated: 25 rounds, one validation)
# on the users with fewer than 40 interactions (ml-100k: 298 users, 8.1k interactions)
QUICK = {"epochs": 1, "stopping_step": 1, "rounds": 25, "eval_every": 25, "user_inter_num_interval": "[0,40)"}


# entries RecBole's Config derives from the others (giving them back would contradict its checks)
DERIVED_CONFIG_KEYS = (
    "MODEL_TYPE", "MODEL_INPUT_TYPE", "eval_type", "device", "valid_neg_sample_args", "test_neg_sample_args",
    "eval_neg_sample_args", "single_spec", "local_rank", "is_distributed",
)  # fmt: skip


def evaluate_checkpoint(path: str) -> dict[str, Any]:
    """A checkpoint saved by a run (RecBole's format: config, state_dict, epoch) evaluated on test as
    :func:`run_model` does: full ranking and uni100, plus the router's expert shares."""
    checkpoint = read_checkpoint(path)  # written by this project's trainers
    settings = dict(checkpoint["config"].final_config_dict)
    model_name, dataset = settings.pop("model"), settings.pop("dataset")
    for derived in DERIVED_CONFIG_KEYS:  # Config computes these again from the rest
        settings.pop(derived, None)
    settings["data_path"] = str(Path(settings["data_path"]).parent)  # Config appends the dataset's name again
    if (settings.get("train_neg_sample_args") or {}).get("distribution") == "none":
        settings["train_neg_sample_args"] = None  # RecBole's normalised form of "no sampling"
    results: dict[str, Any] = {"checkpoint": str(path), "model": model_name, "best_epoch": int(checkpoint["epoch"])}
    for protocol in ("full", "uni100"):
        eval_args = dict(settings["eval_args"], mode={"valid": "full", "test": protocol})
        config = Config(model=model_name, dataset=dataset, config_dict=dict(settings, eval_args=eval_args))
        init_seed(config["seed"], config["reproducibility"])
        train_data, _, test_data = data_preparation(config, create_dataset(config))
        model = get_model(model_name)(config, train_data._dataset).to(config["device"])
        model.load_state_dict(checkpoint["state_dict"])
        model.load_other_parameter(checkpoint.get("other_parameter"))
        trainer = get_trainer(config["MODEL_TYPE"], model_name)(config, model)
        results[f"test_{protocol}"] = {
            k: float(v) for k, v in trainer.evaluate(test_data, load_best_model=False).items()
        }
        if protocol == "full" and hasattr(model, "live_experts"):
            results["live_experts"] = model.live_experts
            results["expert_share"] = expert_share(model, test_data, config["device"])
    return results


def cell_name(label: str, seed: int) -> str:
    """A run's file name: its label with every character outside [A-Za-z0-9._-] replaced, and its seed."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") + f"-seed{seed}.json"


def run_cell(
    label: str,
    dataset: str,
    overrides: dict[str, Any],
    seed: int,
    path: str,
    threads: int | None,
    argv: list[str],
    cold_max: int = COLD_MAX_TRAIN_INTERACTIONS,
) -> dict[str, Any]:
    """One (model label, seed) run in a worker process, written to ``path``; ``argv``: the benchmark's
    arguments, recorded as the cell's command (a table can gather cells trained by several commands)."""
    import torch

    start_worker(threads)
    model, run_overrides = parse_run(label)
    settings = {**overrides, **run_overrides, "seed": seed}
    result = new_report("run", MODULE, argv, label=label, seed=seed, settings=settings)
    result |= run_model(model, dataset, settings, cold_max) | {"torch_threads": torch.get_num_threads()}
    write_json(path, result)
    return result


def finished_cells(folder: Path, cells: list[tuple[str, int]], overrides: dict[str, Any]) -> dict[tuple, dict]:
    """The cells already in ``folder/runs`` (an interrupted benchmark resumes); a cell written under other
    settings is an error, never overwritten nor mixed in."""
    done = {}
    for label, seed in cells:
        path = folder / "runs" / cell_name(label, seed)
        if path.exists():
            saved = json.loads(path.read_text())
            settings = json.loads(json.dumps({**overrides, **parse_run(label)[1], "seed": seed}, default=str))
            if saved.get("settings") != settings:
                raise ConfigError(f"{path} was written with other settings: pass another --name (or delete {folder})")
            done[(label, seed)] = saved
    return done


def tabulate(report: dict[str, Any], folder: Path, models: list[str], baselines: list[str]) -> str:
    """The summary over seeds, the paired comparison, ratios, tables and plots of ``report``'s runs, written to
    ``folder`` -> the table."""
    report["summary"] = summarize(report["runs"])
    if baselines:  # the cost table's seconds per epoch are also shown as ratios against it
        report["speed_baseline"] = baselines[0]
    theirs = best_baseline(report["summary"])
    if "UR4RecV2MoE" in report["summary"] and theirs:
        report["paired"] = paired(report["runs"], "UR4RecV2MoE", theirs)
    for label in baselines:
        report["ratios_vs_" + label] = ratios_against(report["runs"], label)
    write_json(folder / "report.json", report)
    table = format_table(report)
    (folder / "table.md").write_text(table + "\n")
    write_csv(folder / "table.csv", report)
    plot(folder, report)
    return table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument(
        "--models", nargs="+", default=list(DEFAULT_MODELS), help="MODEL or MODEL[key=value,...], in this order"
    )
    parser.add_argument(
        "--baseline", nargs="+", default=None, help="the run(s) (labels) the ratios are taken against (default SASRec)"
    )
    parser.add_argument("--epochs", type=int, default=200, help="epochs at most (early stopping on validation)")
    parser.add_argument("--stopping_step", type=int, default=10)
    parser.add_argument("--seed", type=int, default=2020, help="the first seed")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per model: --seed, --seed + 1, ...")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="one seed, one epoch (federated: 25 rounds) on the users with < 40 interactions: minutes, a smoke run",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: RecBole's choice")
    parser.add_argument("--jobs", type=int, default=1, help="runs side by side, each in a fresh process")
    parser.add_argument(
        "--name", default=None, help="results/NAME/ (default: --out's stem, else the dataset, -quick with --quick)"
    )
    parser.add_argument("--out", default=None, help="also write the whole report to this JSON file")
    parser.add_argument(
        "--no-train",
        action="store_true",
        help="train nothing: tabulate the cells already in results/NAME/runs/ and list the missing ones",
    )
    parser.add_argument(
        "--cold_items",
        type=float,
        default=None,
        metavar="SHARE",
        help="the cold-item protocol: this share of the items never trained on, users tested on them "
        "(experiments/cold_items.py); the cold slice is then the targets with no training interaction",
    )
    parser.add_argument("--cold_seed", type=int, default=0, help="the seed that draws the cold items")
    parser.add_argument("--report", metavar="JSON", help="only print the table of an existing results file")
    parser.add_argument(
        "--evaluate", nargs="+", metavar="CHECKPOINT", help="only evaluate saved checkpoints on test (to --out)"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    command, argv = begin_command(MODULE, __doc__, argv)  # argv: the command every report and cell records
    add_arguments(command)
    args, settings = command.parse_known_args(argv)
    if args.evaluate:
        out = Path(args.out or "results/benchmark.json")
        evaluated = [evaluate_checkpoint(path) for path in args.evaluate]
        report = write_json(out, new_report("evaluated", MODULE, argv, evaluated=evaluated))
        print(format_evaluated(json.loads(report.read_text())) + f"\n\nwrote {out}")
        return json.loads(report.read_text())
    if args.report:
        report = read_results(args.report)
        for label in args.baseline or []:  # ratios against other runs of the file, printed, not saved
            report["ratios_vs_" + label] = ratios_against(report.get("runs", []), label)
        print(format_results(report))
        return report
    baselines = args.baseline or (["SASRec"] if "SASRec" in args.models else [])
    missing = [label for label in baselines if label not in args.models]
    if missing:
        command.error(f"--baseline {missing} not among --models")
    budget = {"epochs": args.epochs, "stopping_step": args.stopping_step}
    if args.quick:
        budget, args.seeds = QUICK, 1
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device here (torch.cuda.is_available() is False)")
    device = {"cpu": {"gpu_id": ""}, "cuda": {"gpu_id": "0"}, None: {}}[args.device]
    overrides = command_settings(settings, **budget, **device)
    seeds = [args.seed + offset for offset in range(args.seeds)]
    cold_max, protocol = COLD_MAX_TRAIN_INTERACTIONS, {}
    data_root = Path(overrides.get("data_path", "dataset_atomic"))
    if not args.no_train or args.cold_items is not None:
        # built here once: jobs side by side would otherwise all build it on first use, at the same time
        ensure_dataset(args.dataset, data_root / args.dataset)
    if args.cold_items is not None:
        cold = write_cold_dataset(data_root / args.dataset, args.dataset, args.cold_items, args.cold_seed, data_root)
        tested = f"{cold.cold_users} of {cold.users} users tested on one"
        print(f"cold-item protocol: {cold.name}, {len(cold.cold_item_ids)} cold items, {tested}", flush=True)
        args.dataset, cold_max = cold.name, 0
        protocol = {"cold_items": args.cold_items, "cold_seed": args.cold_seed, "cold_users": cold.cold_users}
    default_name = Path(args.out).stem if args.out else f"{args.dataset}-quick" if args.quick else args.dataset
    folder = Path("results") / (args.name or default_name)
    (folder / "runs").mkdir(parents=True, exist_ok=True)
    report = new_report("benchmark", MODULE, argv, dataset=args.dataset, overrides=overrides, seeds=seeds, runs=[])
    report["cold_max"] = cold_max
    report |= protocol

    cells = [(label, seed) for seed in seeds for label in args.models]  # seed-major: first seeds finish first
    done = finished_cells(folder, cells, overrides)
    todo = [cell for cell in cells if cell not in done]
    if args.no_train:  # a table of the cells so far, e.g. while the seeds of a long benchmark are still to come
        report["missing"] = [f"{label} seed {seed}" for label, seed in todo]
        todo = []
    print(f"{len(cells)} runs ({len(done)} already in {folder / 'runs'}), {len(todo)} to train", flush=True)
    threads = threads_per_job(args.jobs)
    if not args.no_train:  # with --no-train the cells' own commits and threads tell how they ran
        report["jobs"] = args.jobs
    tasks = [
        (label, args.dataset, overrides, seed, str(folder / "runs" / cell_name(label, seed)), threads, argv, cold_max)
        for label, seed in todo
    ]
    for (label, _, _, seed, *_), result, error in run_in_pool(run_cell, tasks, args.jobs):
        if error is not None:
            report.setdefault("failed", []).append({"task": f"{label} seed {seed}", "error": error})
            continue
        done[(label, seed)] = result
        print(f"finished {label} seed {seed} ({len(done)} of {len(cells)})", flush=True)
    report["runs"] = [done[cell] for cell in sorted(done, key=lambda cell: (args.models.index(cell[0]), cell[1]))]
    if not report["runs"] and args.no_train:
        raise ConfigError(f"--no-train: no finished run of these models and seeds in {folder / 'runs'}")
    if not report["runs"]:
        write_json(folder / "report.json", report)  # the errors are kept where the message points
        raise ConfigError(f"no run finished; see the errors in {folder / 'report.json'}")
    table = tabulate(report, folder, args.models, baselines)
    if args.out:
        write_json(args.out, report)
    for failure in report.get("failed", []):
        print(f"FAILED {failure['task']}: {failure['error'].strip().splitlines()[-1]}")
    print(table)
    print(f"\nwrote {folder}/: report.json, table.md, table.csv and the plots")
    return report


def ratio(value: float, baseline: float) -> float | None:
    """``value / baseline``; ``None`` where the baseline is 0 (e.g. an ID-only model on cold items), not a crash."""
    return value / baseline if baseline else None


def ratios_against(runs: list[dict[str, Any]], label: str) -> dict[str, dict[str, float | None]]:
    """Every other run's test NDCG@10 (full, uni100) and throughput divided by those of run ``label``."""
    matches = [run for run in runs if run.get("label", run["model"]) == label]
    if not matches:
        raise ConfigError(f"no run labelled {label!r}")
    baseline = matches[0]
    return {
        run.get("label", run["model"]): {
            "test_full_ndcg@10": ratio(run["test_full"]["ndcg@10"], baseline["test_full"]["ndcg@10"]),
            "test_uni100_ndcg@10": ratio(run["test_uni100"]["ndcg@10"], baseline["test_uni100"]["ndcg@10"]),
            "train_samples_per_second": ratio(train_samples_per_second(run), train_samples_per_second(baseline)),
        }
        for run in runs
        if run is not baseline
    }


if __name__ == "__main__":
    run_cli(main)
