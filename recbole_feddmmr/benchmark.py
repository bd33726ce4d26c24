"""Side by side: RecBole models and UR4RecV2MoE under one protocol, over seeds, in one command.

    python -m recbole_feddmmr.benchmark --dataset ml-100k                 # the default models, 3 seeds
    python -m recbole_feddmmr.benchmark --dataset ml-100k --quick         # 2 epochs, one seed
    python -m recbole_feddmmr.benchmark --models UR4RecV2MoE SASRec --seeds 5 --device cuda --jobs 2

Every (model, seed) trains under the protocol of ``properties/overall.yaml`` with the same budget
(``--epochs`` 200 at most) and early stopping on validation NDCG@10 (``--stopping_step`` 10); its
best-validation checkpoint is evaluated on test with full ranking, with uni100 (1 positive + 100 sampled
negatives) and on the cold-item slice (test users whose target item has at most 5 training
interactions). Each run also records its parameter count, seconds to its best epoch, training
samples per second, training seconds and epochs (the table divides them into seconds per epoch, with
their ratio to the first ``--baseline``'s) and peak memory, in a fresh process of its own (``--jobs``
side by side).

Writes ``results/NAME/``: ``runs/<label>-seed<k>.json`` (one per finished run: a rerun with the same
arguments skips them, so an interrupted benchmark resumes), ``report.json``, ``table.md`` /
``table.csv`` (mean ± std over seeds), a paired comparison of UR4RecV2MoE with the best RecBole
baseline over seeds, and the plots ``curves.png``, ``test_ndcg.png``, ``expert_shares.png``.

A run may carry its own overrides, ``MODEL[key=value,key=value]``, e.g. the
experts switched off: ``UR4RecV2MoE[feature_id_field=null]``; the whole string
is the run's label (also for ``--baseline``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import multiprocessing
import os
import re
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch
from recbole.data import create_dataset, data_preparation
from recbole.utils import ModelType, init_seed
from torch import Tensor

from recbole_feddmmr.comparison import (
    best_baseline,
    format_table,
    paired,
    plot,
    summarize,
    train_samples_per_second,
    write_csv,
)
from recbole_feddmmr.compat import read_checkpoint
from recbole_feddmmr.config import Config
from recbole_feddmmr.errors import ConfigError, run_cli
from recbole_feddmmr.federated.server import peak_rss_mb
from recbole_feddmmr.quick_start import prepare_run
from recbole_feddmmr.report import (
    TEST_COLUMNS,
    format_evaluated,
    format_results,
    new_report,
    provenance,
    read_results,
    test_cells,
)
from recbole_feddmmr.utils import get_trainer, usable_cpus

REPORTED = ("hit@10", "ndcg@10", "mrr@10")


def parse_run(spec: str) -> tuple[str, dict[str, Any]]:
    """``"MODEL[key=value,...]"`` -> (MODEL, {key: yaml value}); a plain ``"MODEL"`` has no overrides."""
    import yaml

    match = re.fullmatch(r"([\w-]+)(?:\[(.*)\])?", spec.strip())
    if not match:
        raise ConfigError(f"run '{spec}' is not MODEL or MODEL[key=value,...]")
    model, body = match.groups()
    overrides = {}
    for item in filter(None, (body or "").split(",")):
        if "=" not in item:
            raise ConfigError(f"run '{spec}': '{item}' is not key=value")
        key, value = item.split("=", 1)
        overrides[key.strip()] = yaml.safe_load(value)
    return model, overrides


def command_overrides(settings: list[str], **base: Any) -> dict[str, Any]:
    """A benchmark command's config: ``base`` plus quiet progress and INFO logs, then ``--set KEY=VALUE``
    items (yaml values), which win."""
    import yaml

    overrides = {**base, "show_progress": False, "state": "INFO"}
    for item in settings:
        if "=" not in item:
            raise ConfigError(f"--set takes KEY=VALUE items, got '{item}'")
        key, value = item.split("=", 1)
        overrides[key] = yaml.safe_load(value)
    return overrides


def run_model(model: str, dataset: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Train ``model`` with early stopping, evaluate its best checkpoint on test (full and uni100)."""
    config, (train_data, valid_data, test_data), model_instance = prepare_run(model, dataset, config_dict=overrides)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"], config["federated"])(config, model_instance)
    # kept by the trainer, so that a killed cell resumed by the same command (resumable.py) keeps the epochs
    # its earlier processes trained: seconds per epoch, memory statistics and memory seconds per epoch, and
    # the validation curve as (epoch or round, validation NDCG@10, seconds of fit until then)
    records = trainer.run_records
    for name in ("epoch_seconds", "memory_epochs", "memory_epoch_seconds", "curve"):
        records[name] = []
    memory = getattr(model_instance, "memory", None)
    memory_seconds = time_memory_calls(memory) if hasattr(memory, "add_batch") else None
    train_epoch = trainer._train_epoch

    def timed_train_epoch(*args, **kwargs):
        if memory_seconds is not None:
            memory_seconds["training"] = True
            memory_before = memory_seconds["seconds"]
        started = time.perf_counter()
        result = train_epoch(*args, **kwargs)
        records["epoch_seconds"].append(time.perf_counter() - started)
        if memory_seconds is not None:
            memory_seconds["training"] = False
            records["memory_epochs"].append(memory.stats())
            records["memory_epoch_seconds"].append(memory_seconds["seconds"] - memory_before)
        return result

    trainer._train_epoch = timed_train_epoch
    on_cuda = config["device"].type == "cuda"
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()

    def record_validation(epoch_idx: int, valid_score: float) -> None:
        records["curve"].append((int(epoch_idx), float(valid_score), trainer.fit_elapsed()))

    best_valid_score, best_valid = trainer.fit(
        train_data, valid_data, saved=True, show_progress=False, callback_fn=record_validation
    )
    fit_seconds = trainer.fit_elapsed()  # training and validation, as a user waits for them
    epoch_seconds, curve = records["epoch_seconds"], records["curve"]
    test_full = trainer.evaluate(test_data, load_best_model=True)
    cold = cold_item_slice(config, train_data, test_data)
    test_cold = trainer.evaluate(cold, load_best_model=False) if cold is not None else {}

    uni_overrides = dict(overrides, eval_args=dict(config["eval_args"], mode={"valid": "full", "test": "uni100"}))
    uni_config = Config(model=model, dataset=dataset, config_dict=uni_overrides)
    init_seed(uni_config["seed"], uni_config["reproducibility"])
    _, _, test_uni = data_preparation(uni_config, create_dataset(uni_config))
    test_uni100 = trainer.evaluate(test_uni, load_best_model=True)

    samples = len(train_data._dataset.inter_feat)
    best_epoch = trainer.best_epoch  # the epoch of the checkpoint just evaluated (saved=True)
    rounds = [dataclasses.asdict(report) for report in getattr(trainer, "round_reports", [])]
    trained_samples = samples * len(epoch_seconds)
    if rounds:  # federated: a round plays the part of an epoch, and trains only its sampled clients' targets
        epoch_seconds = [report["seconds"] for report in rounds]
        trained_samples = sum(report["samples"] for report in rounds)
    result = {
        "model": model,
        "epochs_trained": len(epoch_seconds),
        "best_epoch": best_epoch,
        "best_valid_ndcg@10": float(best_valid_score),
        "valid_full": {k: float(v) for k, v in best_valid.items()},
        "test_full": {k: float(v) for k, v in test_full.items()},
        "test_uni100": {k: float(v) for k, v in test_uni100.items()},
        "train_samples_per_epoch": samples,
        "train_seconds": sum(epoch_seconds),
        "fit_seconds": fit_seconds,
        "train_samples_per_second": trained_samples / sum(epoch_seconds),
        "checkpoint": trainer.saved_model_file,
        "parameters": sum(p.numel() for p in model_instance.parameters() if p.requires_grad),
        # until the best epoch's validation ended: what early stopping on validation needed to find it
        "seconds_to_best": next((seconds for epoch, _, seconds in curve if epoch == best_epoch), fit_seconds),
        "valid_curve": [[epoch, score] for epoch, score, _ in curve],
        "peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if on_cuda else peak_rss_mb(),
        "peak_memory_kind": "CUDA allocated" if on_cuda else "process RSS",
        "test_cold": {k: float(v) for k, v in test_cold.items()},
        "cold_users": 0 if cold is None else len(cold._dataset),
    }
    if hasattr(model_instance, "live_experts"):
        result["live_experts"] = model_instance.live_experts
        result["expert_share"] = expert_share(model_instance, test_data, config["device"])
    if rounds:
        result["rounds"] = rounds
        result["bytes_up_total"] = sum(report["bytes_up"] for report in rounds)
        result["bytes_down_total"] = sum(report["bytes_down"] for report in rounds)
    elif memory_seconds is not None:
        result["memory_per_epoch"] = records["memory_epochs"]
        result["memory_share_of_train_time"] = sum(records["memory_epoch_seconds"]) / sum(epoch_seconds)
    if len(trainer.segments) > 1:  # resumed: where each process took over, with its commit and machine
        result["segments"] = trainer.segments
    return result


COLD_MAX_TRAIN_INTERACTIONS = 5


def item_train_counts(train_data) -> Tensor:
    """Training interactions of every item [n_items]: each training target once, plus each user's first item
    (the only interaction of the training split that is never a target)."""
    feat, dataset = train_data._dataset.inter_feat, train_data._dataset
    targets = feat[dataset.iid_field]
    first = feat[dataset.item_id_list_field][feat[dataset.item_list_length_field] == 1, 0]
    return torch.bincount(torch.cat([targets, first]), minlength=dataset.item_num)


def cold_item_slice(config, train_data, test_data, max_count: int = COLD_MAX_TRAIN_INTERACTIONS):
    """The test users whose target item has at most ``max_count`` training interactions, as a full-ranking
    dataloader for RecBole's evaluator (``None`` when there is no such user). The case the content experts
    exist for: an item the ID embedding has barely seen."""
    from recbole.data.dataloader import FullSortEvalDataLoader

    dataset = test_data._dataset
    if not isinstance(test_data, FullSortEvalDataLoader) or config["MODEL_TYPE"] != ModelType.SEQUENTIAL:
        return None  # training targets are counted from the sequential split's augmented samples
    counts = item_train_counts(train_data)
    cold = counts[dataset.inter_feat[dataset.iid_field]] <= max_count  # [test users]
    if not bool(cold.any()):
        return None
    return FullSortEvalDataLoader(config, dataset.copy(dataset.inter_feat[cold]), test_data._sampler, shuffle=False)


def expert_share(model, eval_data, device) -> dict[str, float]:
    """The router's mean weight per expert over every (user, item) pair of ``eval_data``'s users
    (all items but the padding item), with the model as it is (e.g. the best checkpoint)."""
    from recbole_feddmmr.model.ur4rec_v2_moe import EXPERTS

    model.eval()
    total, pairs = torch.zeros(len(EXPERTS), dtype=torch.float64), 0
    with torch.no_grad():
        for batch in eval_data:
            weights = model.router_weights_for(batch[0].to(device))[:, 1:]  # [B, n_items - 1, X]
            total += weights.sum(dim=(0, 1)).double().cpu()
            pairs += weights.shape[0] * weights.shape[1]
    return dict(zip(EXPERTS, (total / max(pairs, 1)).tolist(), strict=True))


# entries RecBole's Config derives from the others (giving them back would contradict its checks)
DERIVED_CONFIG_KEYS = (
    "MODEL_TYPE", "MODEL_INPUT_TYPE", "eval_type", "device", "valid_neg_sample_args", "test_neg_sample_args",
    "eval_neg_sample_args", "single_spec", "local_rank", "is_distributed",
)  # fmt: skip


def evaluate_checkpoint(path: str) -> dict[str, Any]:
    """A checkpoint saved by a run (RecBole's format: config, state_dict, epoch) evaluated on test as
    :func:`run_model` does: full ranking and uni100, plus the router's expert shares."""
    from recbole_feddmmr.utils import get_model

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


def time_memory_calls(memory) -> dict[str, Any]:
    """Wrap the memory's read and write so their time inside training epochs is summed (``["seconds"]``)."""
    timer: dict[str, Any] = {"seconds": 0.0, "training": False}
    for name in ("add_batch", "retrieve_multimodal_memory"):
        method = getattr(memory, name)

        def timed(*args, _method=method, **kwargs):
            started = time.perf_counter()
            try:
                return _method(*args, **kwargs)
            finally:
                if timer["training"]:
                    timer["seconds"] += time.perf_counter() - started

        setattr(memory, name, timed)
    return timer


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
# on the users with fewer than 40 interactions (ml-100k: 298 users, 8.1k interactions). One epoch of every user
# took 2-5 minutes per RecBole model on the 2-core CPU (nine models: ~30 minutes with --jobs 2); the users
# below 50 interactions, 9.7 minutes: too close to ten
QUICK = {"epochs": 1, "stopping_step": 1, "rounds": 25, "eval_every": 25, "user_inter_num_interval": "[0,40)"}


def cell_name(label: str, seed: int) -> str:
    """A run's file name: its label with every character outside [A-Za-z0-9._-] replaced, and its seed."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") + f"-seed{seed}.json"


def run_cell(
    label: str,
    dataset: str,
    overrides: dict[str, Any],
    seed: int,
    path: str,
    threads: int | None = None,
    benchmark_argv: list[str] | None = None,
) -> dict[str, Any]:
    """One (model label, seed) run, written to ``path`` (to a temporary name, then renamed); ``threads``: torch's
    CPU threads (``--jobs`` runs side by side share the cores instead of each taking all of them);
    ``benchmark_argv``: the arguments of the benchmark that started it, recorded as the cell's command."""
    logging.basicConfig(level=logging.INFO)
    if threads:
        torch.set_num_threads(threads)
    sys.argv = sys.argv[:1]  # a spawned worker inherits the benchmark's arguments, which RecBole's Config would read
    model, run_overrides = parse_run(label)
    settings = {**overrides, **run_overrides, "seed": seed}
    result = {"label": label, "seed": seed, "settings": settings, **run_model(model, dataset, settings)}
    # a cell's own provenance: a table can gather cells trained by several commands (resumed, --no-train)
    result |= new_report("recbole_feddmmr.benchmark", benchmark_argv or [], torch_threads=torch.get_num_threads())
    partial = Path(f"{path}.partial")
    partial.write_text(json.dumps(result, indent=1, default=str))
    partial.replace(path)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra config overrides (yaml values)"
    )
    parser.add_argument(
        "--no-train",
        action="store_true",
        help="train nothing: tabulate the cells already in results/NAME/runs/ and list the missing ones",
    )
    parser.add_argument("--report", metavar="JSON", help="only print the table of an existing results file")
    parser.add_argument(
        "--evaluate", nargs="+", metavar="CHECKPOINT", help="only evaluate saved checkpoints on test (to --out)"
    )
    argv = sys.argv[1:] if argv is None else argv  # the command every report and cell records
    args = parser.parse_args(argv)
    if args.evaluate:
        out = Path(args.out or "results/benchmark.json")
        report = new_report(
            "recbole_feddmmr.benchmark", argv, evaluated=[evaluate_checkpoint(path) for path in args.evaluate]
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        print(format_evaluated(report))
        print(f"\nwrote {out}")
        return report
    if args.report:
        report = read_results(args.report)
        for label in args.baseline or []:  # ratios against other runs of the file, printed, not saved
            report["ratios_vs_" + label] = ratios_against(report.get("runs", []), label)
        print(format_results(report))
        return report
    baselines = args.baseline or (["SASRec"] if "SASRec" in args.models else [])
    missing = [label for label in baselines if label not in args.models]
    if missing:
        parser.error(f"--baseline {missing} not among --models")
    budget = {"epochs": args.epochs, "stopping_step": args.stopping_step}
    if args.quick:
        budget, args.seeds = QUICK, 1
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device here (torch.cuda.is_available() is False)")
    device = {"cpu": {"gpu_id": ""}, "cuda": {"gpu_id": "0"}, None: {}}[args.device]
    overrides = command_overrides(args.set, **budget, **device)
    seeds = [args.seed + offset for offset in range(args.seeds)]
    default_name = Path(args.out).stem if args.out else f"{args.dataset}-quick" if args.quick else args.dataset
    folder = Path("results") / (args.name or default_name)
    (folder / "runs").mkdir(parents=True, exist_ok=True)
    report = new_report(
        "recbole_feddmmr.benchmark", argv, dataset=args.dataset, overrides=overrides, seeds=seeds, runs=[]
    )
    report["cold_max"] = COLD_MAX_TRAIN_INTERACTIONS

    # seed-major: every model's first seed finishes before any second seed starts
    cells = [(label, seed) for seed in seeds for label in args.models]
    done: dict[tuple[str, int], dict[str, Any]] = {}
    for label, seed in cells:
        path = folder / "runs" / cell_name(label, seed)
        if path.exists():
            saved = json.loads(path.read_text())
            settings = json.loads(json.dumps({**overrides, **parse_run(label)[1], "seed": seed}, default=str))
            if saved.get("settings") != settings:  # never overwrite (nor mix in) another benchmark's run
                raise ConfigError(f"{path} was written with other settings: pass another --name (or delete {folder})")
            done[(label, seed)] = saved  # resumable: a finished (model, seed) is not run again
    todo = [cell for cell in cells if cell not in done]
    if args.no_train:  # a table of the cells so far, e.g. while the seeds of a long benchmark are still to come
        report["missing"] = [f"{label} seed {seed}" for label, seed in todo]
        todo = []
    print(f"{len(cells)} runs ({len(done)} already in {folder / 'runs'}), {len(todo)} to train", flush=True)
    # runs side by side split the cores (unless OMP_NUM_THREADS says otherwise): with every run taking all
    # cores, their threads oversubscribe the machine and wait on each other
    threads = None if "OMP_NUM_THREADS" in os.environ or args.jobs <= 1 else max(1, usable_cpus() // args.jobs)
    if not args.no_train:  # with --no-train the cells' own commits and threads tell how they ran
        report["jobs"], report["threads_per_run"] = args.jobs, threads or torch.get_num_threads()
    context = multiprocessing.get_context("spawn")  # fresh interpreters: each run's peak memory is its own
    with ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=context, max_tasks_per_child=1) as pool:
        futures = {
            pool.submit(
                run_cell,
                label,
                args.dataset,
                overrides,
                seed,
                str(folder / "runs" / cell_name(label, seed)),
                threads,
                argv,
            ): (label, seed)
            for label, seed in todo
        }
        for future in as_completed(futures):
            label, seed = futures[future]
            try:
                done[(label, seed)] = future.result()
            except Exception:  # one failed run must not take the others with it
                report.setdefault("failed", []).append(
                    {"task": f"{label} seed {seed}", "error": traceback.format_exc()}
                )
                continue
            print(f"finished {label} seed {seed} ({len(done)} of {len(cells)})", flush=True)
    report["runs"] = [done[cell] for cell in sorted(done, key=lambda cell: (args.models.index(cell[0]), cell[1]))]
    if not report["runs"] and args.no_train:
        raise ConfigError(f"--no-train: no finished run of these models and seeds in {folder / 'runs'}")
    if not report["runs"]:  # the errors are kept where the message points
        (folder / "report.json").write_text(json.dumps(report, indent=1, default=str))
        raise ConfigError(f"no run finished; see the errors in {folder / 'report.json'}")
    report["summary"] = summarize(report["runs"])
    if baselines:  # the cost table's seconds per epoch are also shown as ratios against it
        report["speed_baseline"] = baselines[0]
    theirs = best_baseline(report["summary"])
    if "UR4RecV2MoE" in report["summary"] and theirs:
        report["paired"] = paired(report["runs"], "UR4RecV2MoE", theirs)
    for label in baselines:
        report["ratios_vs_" + label] = ratios_against(report["runs"], label)
    (folder / "report.json").write_text(json.dumps(report, indent=1, default=str))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    table = format_table(report)
    (folder / "table.md").write_text(table + "\n")
    write_csv(folder / "table.csv", report)
    plots = plot(folder, report)
    for failure in report.get("failed", []):
        print(f"FAILED {failure['task']}: {failure['error'].strip().splitlines()[-1]}")
    print(table)
    print(f"\nwrote {folder}/: report.json, table.md, table.csv, {', '.join(p.name for p in plots)}")
    return report


def ratios_against(runs: list[dict[str, Any]], label: str) -> dict[str, dict[str, float]]:
    """Every other run's test NDCG@10 (full, uni100) and throughput divided by those of run ``label``."""
    matches = [run for run in runs if run.get("label", run["model"]) == label]
    if not matches:
        raise ConfigError(f"no run labelled {label!r}")
    baseline = matches[0]
    return {
        run.get("label", run["model"]): {
            "test_full_ndcg@10": run["test_full"]["ndcg@10"] / baseline["test_full"]["ndcg@10"],
            "test_uni100_ndcg@10": run["test_uni100"]["ndcg@10"] / baseline["test_uni100"]["ndcg@10"],
            "train_samples_per_second": train_samples_per_second(run) / train_samples_per_second(baseline),
        }
        for run in runs
        if run is not baseline
    }


def format_report(report: dict[str, Any]) -> str:
    """A markdown table of the report (what the README shows)."""
    lines = [
        f"| model | live experts | best epoch | {TEST_COLUMNS} | train samples/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in report["runs"]:
        experts = ", ".join(run["live_experts"]) if "live_experts" in run else "-"
        lines.append(
            f"| {run.get('label', run['model'])} | {experts} | {run['best_epoch']} of {run['epochs_trained']} | "
            f"{test_cells(run)} | {train_samples_per_second(run):.0f} |"
        )
    for run in report["runs"]:
        if run.get("memory_per_epoch"):
            epochs = run["memory_per_epoch"]
            best = epochs[min(run["best_epoch"], len(epochs) - 1)]
            write_rates = " ".join(f"{epoch['write_rate']:.2f}" for epoch in epochs)
            lines.append(
                f"\n{run.get('label', run['model'])} memory at the kept epoch: fill rate {best['fill_rate']:.3f}, "
                f"write rate {best['write_rate']:.3f}, mean surprise {best['mean_surprise']:.3f}; write rate by "
                f"epoch {write_rates}; memory reads + writes "
                f"{100 * run['memory_share_of_train_time']:.1f}% of training time"
            )
    for key, ratios in report.items():
        if key.startswith("ratios_vs_"):
            for model, values in ratios.items():
                lines.append(
                    f"\n{model} / {key[len('ratios_vs_') :]}: test NDCG@10 x{values['test_full_ndcg@10']:.3f} (full), "
                    f"x{values['test_uni100_ndcg@10']:.3f} (uni100); "
                    f"training throughput x{values['train_samples_per_second']:.2f}"
                )
    lines.append(provenance(report))
    return "\n".join(lines)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    run_cli(main)
