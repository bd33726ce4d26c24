"""Side by side: RecBole models and UR4RecV2MoE under one protocol, in one command.

    python -m recbole_feddmmr.benchmark --dataset ml-100k --models UR4RecV2MoE SASRec --baseline SASRec \\
        --epochs 15 --stopping_step 5 --out results/ml-100k_ur4rec_vs_sasrec.json

Each model trains with the same epoch budget and early stopping on validation
NDCG@10 (full ranking); the best-validation checkpoint is then evaluated on
test with full ranking and with uni100 (1 positive + 100 sampled negatives).
Training throughput is training targets per second of training-epoch time,
measured for every model in this same process, one model after the other.
Results are written (JSON) after each model, so a cut-off run still reports.

A run may carry its own overrides, ``MODEL[key=value,key=value]``, e.g. the
experts switched off: ``UR4RecV2MoE[feature_id_field=null]``; the whole string
is the run's label (also for ``--baseline``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import torch
from recbole.data import create_dataset, data_preparation
from recbole.utils import init_seed

from recbole_feddmmr.compat import load_trusted
from recbole_feddmmr.config import Config
from recbole_feddmmr.errors import ConfigError, run_cli
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
from recbole_feddmmr.utils import get_trainer

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
    epoch_seconds: list[float] = []
    memory_epochs: list[dict[str, float]] = []
    memory = getattr(model_instance, "memory", None)
    memory_seconds = time_memory_calls(memory) if hasattr(memory, "add_batch") else None
    train_epoch = trainer._train_epoch

    def timed_train_epoch(*args, **kwargs):
        if memory_seconds is not None:
            memory_seconds["training"] = True
        started = time.perf_counter()
        result = train_epoch(*args, **kwargs)
        epoch_seconds.append(time.perf_counter() - started)
        if memory_seconds is not None:
            memory_seconds["training"] = False
            memory_epochs.append(memory.stats())
        return result

    trainer._train_epoch = timed_train_epoch
    fit_started = time.perf_counter()
    best_valid_score, best_valid = trainer.fit(train_data, valid_data, saved=True, show_progress=False)
    fit_seconds = time.perf_counter() - fit_started  # training and validation, as a user waits for them
    test_full = trainer.evaluate(test_data, load_best_model=True)

    uni_overrides = dict(overrides, eval_args=dict(config["eval_args"], mode={"valid": "full", "test": "uni100"}))
    uni_config = Config(model=model, dataset=dataset, config_dict=uni_overrides)
    init_seed(uni_config["seed"], uni_config["reproducibility"])
    _, _, test_uni = data_preparation(uni_config, create_dataset(uni_config))
    test_uni100 = trainer.evaluate(test_uni, load_best_model=True)

    samples = len(train_data._dataset.inter_feat)
    best_epoch = int(load_trusted(trainer.saved_model_file, map_location="cpu")["epoch"])
    rounds = [dataclasses.asdict(report) for report in getattr(trainer, "round_reports", [])]
    if rounds:  # federated: a round plays the part of an epoch
        epoch_seconds = [report["seconds"] for report in rounds]
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
        "train_samples_per_second": samples * len(epoch_seconds) / sum(epoch_seconds),
        "checkpoint": trainer.saved_model_file,
    }
    if hasattr(model_instance, "live_experts"):
        result["live_experts"] = model_instance.live_experts
        result["expert_share"] = expert_share(model_instance, test_data, config["device"])
    if rounds:
        result["rounds"] = rounds
        result["bytes_up_total"] = sum(report["bytes_up"] for report in rounds)
        result["bytes_down_total"] = sum(report["bytes_down"] for report in rounds)
    elif memory_seconds is not None:
        result["memory_per_epoch"] = memory_epochs
        result["memory_share_of_train_time"] = memory_seconds["seconds"] / sum(epoch_seconds)
    return result


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

    checkpoint = load_trusted(path, map_location="cpu")  # written by this project's trainers
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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument(
        "--models", nargs="+", default=["UR4RecV2MoE", "SASRec"], help="MODEL or MODEL[key=value,...], in this order"
    )
    parser.add_argument(
        "--baseline", nargs="+", default=None, help="the run(s) (labels) the ratios are taken against (default SASRec)"
    )
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--stopping_step", type=int, default=5)
    parser.add_argument("--seed", type=int, default=2020)
    parser.add_argument("--out", default="results/benchmark.json")
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra config overrides (yaml values)"
    )
    parser.add_argument("--report", metavar="JSON", help="only print the table of an existing results file")
    parser.add_argument(
        "--evaluate", nargs="+", metavar="CHECKPOINT", help="only evaluate saved checkpoints on test (to --out)"
    )
    args = parser.parse_args(argv)
    if args.evaluate:
        report = new_report(
            "recbole_feddmmr.benchmark", argv, evaluated=[evaluate_checkpoint(path) for path in args.evaluate]
        )
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(format_evaluated(report))
        print(f"\nwrote {args.out}")
        return report
    if args.report:
        report = read_results(args.report)
        for label in args.baseline or []:  # ratios against other runs of the file, printed, not saved
            report["ratios_vs_" + label] = ratios_against(report.get("runs", []), label)
        print(format_results(report))
        return report
    baselines = args.baseline or ["SASRec"]

    overrides = command_overrides(args.set, epochs=args.epochs, stopping_step=args.stopping_step, seed=args.seed)
    report = new_report("recbole_feddmmr.benchmark", argv, dataset=args.dataset, overrides=overrides, runs=[])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    missing = [label for label in baselines if label not in args.models]
    if missing:
        parser.error(f"--baseline {missing} not among --models")
    runs = [(label, *parse_run(label)) for label in args.models]
    for label, model, run_overrides in runs:
        result = run_model(model, args.dataset, {**overrides, **run_overrides})
        report["runs"].append({"label": label, **result, "run_overrides": run_overrides})
        out.write_text(json.dumps(report, indent=2))
    for label in baselines:
        report["ratios_vs_" + label] = ratios_against(report["runs"], label)
    out.write_text(json.dumps(report, indent=2))
    print(format_report(report))
    print(f"\nwrote {out}")
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
            "train_samples_per_second": run["train_samples_per_second"] / baseline["train_samples_per_second"],
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
            f"{test_cells(run)} | {run['train_samples_per_second']:.0f} |"
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
