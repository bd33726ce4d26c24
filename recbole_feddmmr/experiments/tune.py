"""Hyperparameter search with Ray Tune: ASHA on validation NDCG@10, the best trial chosen on validation only.

    python -m recbole_feddmmr.experiments.tune --dataset ml-100k --num_samples 16 --max_epochs 30 \\
        --storage results/tune_ml-100k
    python -m recbole_feddmmr.experiments.tune --dataset ml-100k --federated=True --num_samples 8 --max_epochs 40
    python -m recbole_feddmmr.experiments.tune --storage results/tune_ml-100k --resume   # continue a search
    python run_recbole_feddmmr.py --dataset ml-100k --config_files results/tune_ml-100k/best.yaml

Every trial trains ``--model`` (UR4RecV2MoE by default, or any RecBole model, so models can be tuned
side by side) under the plugin's configuration with the trial's values, and reports validation NDCG@10
to Tune after every epoch (federated runs: every evaluation, i.e. every ``eval_every`` rounds); ASHA
stops the weak trials early, and RecBole's own early stopping (``stopping_step``) still applies within a
trial. When the search ends, the trial with the best validation NDCG@10 is chosen, its configuration is
written to ``best.yaml`` and trained once more in this process, which checks that it reproduces the
trial's validation score and computes its test metrics, once.

The search space is a yaml file (``--space``) of ``option: {distribution: arguments}`` with the
distributions ``choice: [values]``, ``grid: [values]``, ``uniform: [low, high]``, ``loguniform: [low,
high]``, ``randint: [low, high]`` (high exclusive); every option must be a setting of the model's
configuration. Without ``--space``: :data:`DEFAULT_SPACE`, plus :data:`FEDERATED_SPACE` with
``--federated=True``.

Writes to ``--storage`` (default ``results/tune_<model>_<dataset>``): Tune's own experiment state (what
``--resume`` continues from), ``trials.csv`` and ``trials.md`` (one row per trial: its values, best
validation NDCG@10, epochs run, seconds, status) and ``best.yaml`` and ``best.json`` (the best trial's
values, validation score, and the final run's validation and test metrics). Trials are Ray tasks: each
gets absolute paths for the data and its own checkpoint folder inside the storage, since Ray runs trials
in directories of its own. An interrupted trial restarts from its first epoch on ``--resume``; finished
trials are kept.
"""

from __future__ import annotations

import csv
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from recbole_feddmmr.config import parse_overrides
from recbole_feddmmr.errors import ConfigError, run_cli
from recbole_feddmmr.experiments.runner import begin_command, new_report, write_json

MODULE = "recbole_feddmmr.experiments.tune"

VALID_METRIC = "valid_ndcg@10"
DEFAULT_SPACE: dict[str, dict[str, list]] = {
    "router_hidden_dim": {"choice": [64, 128, 256]},
    "load_balance_weight": {"loguniform": [1e-3, 1e-1]},
    "learning_rate": {"loguniform": [3e-4, 3e-3]},
    "dropout": {"choice": [0.1, 0.2, 0.3]},
}
# federated runs search the server's step size and the round's size as well
FEDERATED_SPACE: dict[str, dict[str, list]] = {
    "server_lr": {"loguniform": [1e-3, 3e-2]},
    "clients_per_round": {"choice": [8, 16, 32, 64]},
}
DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")


class SpaceError(ConfigError):
    """A search space that names an unknown option or distribution."""


def read_space(path: str | Path) -> dict[str, dict[str, list]]:
    space = yaml.safe_load(Path(path).read_text())
    if not isinstance(space, dict) or not space:
        raise SpaceError(f"{path}: a search space is a yaml mapping of option: {{distribution: arguments}}")
    return space


def check_space(space: dict[str, Any], known_options: set[str], source: str) -> None:
    """Raise :class:`SpaceError` (one line) for an unknown option or a malformed distribution."""
    for option, spec in space.items():
        if option not in known_options:
            raise SpaceError(f"{source}: unknown option '{option}' (not a setting of this model and dataset)")
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise SpaceError(f"{source}: '{option}' needs one of {', '.join(DISTRIBUTIONS)}, e.g. {{choice: [1, 2]}}")
        kind, arguments = next(iter(spec.items()))
        listed = kind in ("choice", "grid")
        if not isinstance(arguments, list) or not arguments or (not listed and len(arguments) != 2):
            expected = "a list of values" if listed else "[low, high]"
            raise SpaceError(f"{source}: '{option}': {kind} takes {expected}, got {arguments!r}")


def tune_space(space: dict[str, dict[str, list]]) -> dict[str, Any]:
    """The yaml space as Tune's sampling objects."""
    from ray import tune

    samplers = {
        "choice": tune.choice,
        "grid": tune.grid_search,
        "uniform": lambda low, high: tune.uniform(low, high),
        "loguniform": lambda low, high: tune.loguniform(low, high),
        "randint": lambda low, high: tune.randint(low, high),
    }
    result = {}
    for option, spec in space.items():
        kind, arguments = next(iter(spec.items()))
        result[option] = samplers[kind](arguments) if kind in ("choice", "grid") else samplers[kind](*arguments)
    return result


@dataclass
class SearchSetup:
    """What every trial needs besides its sampled values (sent to the Ray workers)."""

    model: str
    dataset: str
    config_files: list[str] | None
    # settings of every trial: the command's overrides, absolute paths and the run length (epochs, rounds)
    fixed: dict[str, Any] = field(default_factory=dict)
    threads: int = 1  # torch threads of a trial (and of the final rerun, so that it computes the same)

    def config_dict(self, values: dict[str, Any], checkpoint_dir: str) -> dict[str, Any]:
        return {**self.fixed, **values, "checkpoint_dir": checkpoint_dir, "show_progress": False}


def train_trial(values: dict[str, Any], setup: SearchSetup) -> None:
    """One trial: train with ``values``, report validation NDCG@10 after every evaluation."""
    import torch
    from ray import tune

    from recbole_feddmmr.quick_start import build_trainer, prepare_run

    torch.set_num_threads(setup.threads)
    trial_dir = Path(tune.get_context().get_trial_dir())
    config, (train_data, valid_data, _), model = prepare_run(
        setup.model, setup.dataset, setup.config_files, setup.config_dict(values, str(trial_dir / "saved"))
    )
    trainer = build_trainer(config, model)
    started = time.perf_counter()
    evaluations = 0

    def report(epoch_idx: int, valid_score: float) -> None:
        nonlocal evaluations
        evaluations += 1
        tune.report({VALID_METRIC: float(valid_score), "epoch": epoch_idx + 1, "evaluations": evaluations,
                     "train_seconds": time.perf_counter() - started})  # fmt: skip

    trainer.fit(train_data, valid_data, saved=False, show_progress=False, callback_fn=report)


def trial_progress(total: int):
    """A Tune callback printing one line per finished trial (built here, so importing this module needs no Ray)."""
    from ray.tune import Callback

    class TrialProgress(Callback):
        def __init__(self) -> None:
            self.done = 0

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            self.done += 1
            result = trial.last_result or {}
            best = trial.metric_analysis.get(VALID_METRIC, {}).get("max", float("nan"))
            values = ", ".join(f"{key}={_short(value)}" for key, value in trial.config.items())
            print(
                f"trial {self.done}/{total} finished ({trial.trial_id}): {values} -> best valid NDCG@10 "
                f"{best:.4f}, {result.get('epoch', 0)} epochs, {result.get('time_total_s', 0):.0f} s",
                flush=True,
            )

    return TrialProgress()


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _plain(value: Any) -> Any:
    """numpy scalars -> Python values (for yaml / json)."""
    return value.item() if hasattr(value, "item") else value


def trial_rows(result_grid, interrupted: bool = False) -> list[dict[str, Any]]:
    """One row per trial; ``interrupted``: the search stopped before every trial ended (unfinished rows)."""
    rows = []
    for result in result_grid:
        history = result.metrics_dataframe
        scores = history[VALID_METRIC] if history is not None and VALID_METRIC in history else []
        last = result.metrics or {}
        rows.append(
            {
                # a trial Ctrl-C caught before it started has neither metrics nor config (nor, maybe, a folder)
                "trial": last.get("trial_id") or (Path(result.path).name if result.path else "not started"),
                **{key: _plain(value) for key, value in (result.config or {}).items()},
                "best_valid_ndcg@10": float(max(scores)) if len(scores) else float("nan"),
                "epochs": int(last.get("epoch", 0)),
                "seconds": float(last.get("time_total_s", 0.0)),
                "status": "error"
                if result.error
                else ("unfinished" if interrupted and not last.get("done") else "done"),
            }
        )
    return sorted(rows, key=lambda row: -row["best_valid_ndcg@10"] if not math.isnan(row["best_valid_ndcg@10"]) else 1)


def write_tables(rows: list[dict[str, Any]], storage: Path) -> None:
    if not rows:
        return
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(storage / "trials.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_short(row.get(column, "")) for column in columns) + " |")
    (storage / "trials.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser, argv = begin_command(MODULE, __doc__, argv)
    parser.add_argument("--model", default="UR4RecV2MoE")
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--config_files", default=None, help="space-separated yaml files")
    parser.add_argument("--space", default=None, help="search space yaml (default: the module's DEFAULT_SPACE)")
    parser.add_argument("--num_samples", type=int, default=16)
    parser.add_argument("--max_epochs", type=int, default=20, help="epochs (federated: evaluations) per trial")
    parser.add_argument("--grace_period", type=int, default=3, help="ASHA: evaluations before a trial may stop")
    parser.add_argument("--cpus_per_trial", type=float, default=1.0)
    parser.add_argument("--gpus_per_trial", type=float, default=0.0)
    parser.add_argument("--max_concurrent", type=int, default=None)
    parser.add_argument("--storage", default=None, help="results folder (default results/tune_<model>_<dataset>)")
    parser.add_argument("--resume", action="store_true", help="continue the search stored at --storage")
    parser.add_argument("--address", default=None, help="ray.init address (default: a local Ray)")
    parser.add_argument("--num_cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    args, extra = parser.parse_known_args(argv)
    overrides = parse_overrides(extra)  # --key=value, as run_recbole_feddmmr.py takes them
    storage = Path(args.storage or f"results/tune_{args.model}_{args.dataset}").resolve()
    config_files = args.config_files.split() if args.config_files else None

    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from recbole_feddmmr.config import Config
    from recbole_feddmmr.datasets import ensure_dataset

    # the driver's view of the configuration: the space's options must exist, the data must be there
    config = Config(model=args.model, dataset=args.dataset, config_file_list=config_files, config_dict=overrides)
    space = read_space(args.space) if args.space else dict(DEFAULT_SPACE)
    if not args.space and config["federated"]:
        space.update(FEDERATED_SPACE)
    if not args.space and args.model != "UR4RecV2MoE":  # RecBole's models have no router
        space = {key: value for key, value in space.items() if key in config.final_config_dict}
    try:
        check_space(space, set(config.final_config_dict), args.space or "the default space")
    except SpaceError as error:
        parser.exit(2, f"error: {error}\n")
    ensure_dataset(config["dataset"], config["data_path"])
    # Config appends the dataset to data_path; a trial runs --max_epochs epochs, or as many evaluations of rounds
    fixed = {**overrides, "data_path": str(Path(config["data_path"]).resolve().parent), "epochs": args.max_epochs}
    if config["federated"]:
        fixed.setdefault("eval_every", config["eval_every"] or 1)
        fixed["rounds"] = args.max_epochs * fixed["eval_every"]
        if (config["federated_backend"] or "auto") == "auto":
            # a trial owns --cpus_per_trial CPUs of Tune's cluster: actors of its own (auto's Ray backend)
            # would ask that cluster for CPUs the trials hold, and wait; a trial runs its clients itself
            fixed["federated_backend"] = "sequential"
    files = [str(Path(name).resolve()) for name in config_files or []] or None
    setup = SearchSetup(args.model, args.dataset, files, fixed, max(1, int(args.cpus_per_trial)))

    ray.init(
        address=args.address,
        num_cpus=None if args.address else args.num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        ignore_reinit_error=True,
    )
    resources = {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial}
    trainable = tune.with_resources(tune.with_parameters(train_trial, setup=setup), resources)
    if args.resume:
        if not tune.Tuner.can_restore(str(storage)):
            parser.exit(2, f"error: no search to resume at {storage}\n")
        tuner = tune.Tuner.restore(str(storage), trainable=trainable, resume_unfinished=True, restart_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=tune_space(space),
            tune_config=tune.TuneConfig(
                metric=VALID_METRIC,
                mode="max",
                num_samples=args.num_samples,
                max_concurrent_trials=args.max_concurrent,
                scheduler=ASHAScheduler(
                    max_t=args.max_epochs, grace_period=min(args.grace_period, args.max_epochs), reduction_factor=2
                ),
            ),
            run_config=tune.RunConfig(
                name=storage.name,
                storage_path=str(storage.parent),
                verbose=0,
                callbacks=[trial_progress(args.num_samples)],
            ),
        )
    result_grid = tuner.fit()
    # Ctrl-C: Tune saves its state and marks the running trials terminated, so a search is interrupted when it
    # holds fewer trials than asked for (a fresh search) or a trial that never reported
    interrupted = (
        result_grid.num_terminated + result_grid.num_errors < len(result_grid)
        or (not args.resume and len(result_grid) < args.num_samples)
        or any(not (result.metrics or {}).get("epoch") for result in result_grid)
    )
    rows = trial_rows(result_grid, interrupted)
    write_tables(rows, storage)
    if interrupted:  # e.g. Ctrl-C: Tune saved its state; no best configuration yet
        print(f"search interrupted: {len(rows)} trials so far in {storage}; continue it with --resume", flush=True)
        return {"interrupted": True, "trials": len(rows)}
    best = result_grid.get_best_result(metric=VALID_METRIC, mode="max", scope="all")
    best_values = {key: _plain(value) for key, value in best.config.items()}
    best_valid = float(best.metrics_dataframe[VALID_METRIC].max())
    # self-contained: the given config files' settings, the command's overrides, the trial's values
    from_files = {}
    for name in setup.config_files or []:
        from_files.update(yaml.safe_load(Path(name).read_text()) or {})
    # the trials' absolute data path only if the command chose one: best.yaml must work from another checkout
    portable = {key: value for key, value in fixed.items() if key != "data_path" or "data_path" in overrides}
    best_yaml = {**from_files, **portable, **best_values}
    header = (
        f"# best trial of `python -m {MODULE} {' '.join(argv)}`:\n"
        f"# validation NDCG@10 {best_valid:.4f}. Reproduce it with\n"
        f"#   python run_recbole_feddmmr.py --model {args.model} --dataset {args.dataset} "
        f"--config_files {storage / 'best.yaml'}\n"
    )
    (storage / "best.yaml").write_text(header + yaml.safe_dump(best_yaml, sort_keys=True))
    print(f"best trial: {best_values} -> valid NDCG@10 {best_valid:.4f}; training it once more for its test metrics")

    # the chosen configuration, trained once more here: its validation score must match, its test is the figure
    import torch

    from recbole_feddmmr.quick_start import run_recbole_feddmmr

    torch.set_num_threads(setup.threads)
    final = run_recbole_feddmmr(
        args.model,
        args.dataset,
        [str(storage / "best.yaml")],
        {"checkpoint_dir": str(storage / "best_saved"), "show_progress": False},
    )
    report = new_report(
        "search",
        MODULE,
        argv,
        best_values=best_values,
        **{"best_trial_valid_ndcg@10": best_valid, "rerun_valid_ndcg@10": float(final["best_valid_score"])},
        rerun_test={key: float(value) for key, value in final["test_result"].items()},
        trials=len(rows),
    )
    write_json(storage / "best.json", report)
    print(
        f"best configuration: valid NDCG@10 {report['rerun_valid_ndcg@10']:.4f} on rerun "
        f"(trial: {best_valid:.4f}), test NDCG@10 {report['rerun_test'].get('ndcg@10', float('nan')):.4f}; "
        f"tables in {storage}"
    )
    return report


if __name__ == "__main__":
    sys.exit(130 if run_cli(main).get("interrupted") else 0)
