"""The federated accuracy study: server optimizers, aggregation, clients per round, local epochs, ablations.

    python -m recbole_feddmmr.experiments.federated_study --dataset ml-100k --jobs 2 --time_budget 3600 \\
        --out results/federated_study

Every run is a ``MODEL[key=value,...]`` label (as in ``recbole_feddmmr.experiments.benchmark``): federated runs of
UR4RecV2MoE under settings of ``properties/federated.yaml``, and the centralised UR4RecV2MoE under the same
protocol and seed. Each trains with early stopping on validation NDCG@10 (full ranking), federated runs
also stop when their time budget (``time_budget_s``, evaluation included) is spent, and the
best-validation checkpoint is evaluated on test once. The round (or epoch) kept is chosen on validation
only.

Writes to ``--out``: ``runs/<label>.json`` per finished run (a rerun of the same command skips them, so
an interrupted study continues), ``table.md`` and ``table.csv`` (best validation NDCG@10, its round, test
HR@10 / NDCG@10 of that round, wall seconds, MB up+down per round), ``curves.png`` (validation NDCG@10
against rounds and against wall seconds), and, when both the ``--defaults`` run and the ``--centralised``
run finished, ``federated_accuracy.json`` with their test NDCG@10 and its ratio.
"""

from __future__ import annotations

import csv
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from recbole_feddmmr.errors import run_cli
from recbole_feddmmr.experiments.runner import (
    begin_command,
    command_settings,
    new_report,
    parse_run,
    run_in_pool,
    run_model,
    start_worker,
    write_json,
)

MODULE = "recbole_feddmmr.experiments.federated_study"

CENTRALISED = "UR4RecV2MoE"
# the defaults of properties/federated.yaml, whatever they are
DEFAULTS = "UR4RecV2MoE[federated=True]"
# every other run spells out what it varies, so its meaning does not change with the yaml's defaults
_FEDAVG = "local_optimizer=adam,local_lr=0.001,server_optimizer=fedavg,server_lr=1.0"  # the FedAvg of before
_FEDAVGM = "local_optimizer=sgd,local_lr=0.1,server_optimizer=fedavgm,server_lr=1.0"
_FEDADAM = "local_optimizer=sgd,local_lr=0.1,server_optimizer=fedadam,server_lr=0.003"
DEFAULT_RUNS = (
    CENTRALISED,
    DEFAULTS,
    # server optimizer x aggregation, 64 sampled one-user clients per round
    *(
        f"UR4RecV2MoE[federated=True,clients_per_round=64,{server},aggregation={aggregation}]"
        for server in (_FEDAVG, _FEDAVGM, _FEDADAM)
        for aggregation in ("mean", "rowwise")
    ),
    # clients per round and local epochs
    f"UR4RecV2MoE[federated=True,clients_per_round=256,{_FEDADAM}]",
    f"UR4RecV2MoE[federated=True,clients_per_round=null,client_fraction=1.0,{_FEDADAM}]",
    "UR4RecV2MoE[federated=True,local_epochs=2]",
    # what memory prototypes and the experts add, with the defaults
    "UR4RecV2MoE[federated=True,enable_prototype_aggregation=false]",
    "UR4RecV2MoE[federated=True,feature_id_field=null]",
)


def run_file(out: Path, label: str) -> Path:
    """``out/runs/<readable prefix>-<hash>.json``: labels hold brackets, commas and '=' (not file-name safe)."""
    digest = hashlib.sha256(label.encode()).hexdigest()[:10]
    readable = "".join(c if c.isalnum() else "_" for c in label)[:80]
    return out / "runs" / f"{readable}-{digest}.json"


def _run(label: str, dataset: str, overrides: dict[str, Any], checkpoint_dir: str) -> dict[str, Any]:
    start_worker(None)
    model, run_overrides = parse_run(label)
    # a folder of its own: RecBole names checkpoints by model and second, so side-by-side runs could collide
    result = run_model(model, dataset, {**overrides, "checkpoint_dir": checkpoint_dir, **run_overrides})
    return {"label": label, **result, "run_overrides": run_overrides}


def summary_row(run: dict[str, Any], compare_at: float | None = None) -> dict[str, Any]:
    """One table row of a finished run (federated or centralised). ``compare_at``: also the best validation
    NDCG@10 reached within that many wall seconds (federated runs), so runs of other budgets, or slowed by
    a shared machine, compare at equal time."""
    rounds = run.get("rounds") or []
    wall = run.get("fit_seconds") or (rounds[-1]["elapsed_seconds"] if rounds else run["train_seconds"])
    traffic = (run["bytes_up_total"] + run["bytes_down_total"]) / len(rounds) / 1e6 if rounds else None
    return {
        "run": run["label"],
        "best_valid_ndcg@10": run["best_valid_ndcg@10"],
        "best_round": run["best_epoch"],
        "rounds_run": run["epochs_trained"],
        "test_hit@10": run["test_full"]["hit@10"],
        "test_ndcg@10": run["test_full"]["ndcg@10"],
        "wall_seconds": wall,
        "mb_up_down_per_round": traffic,
        # under attack: the targets' exposure among the clean test users; under DP: the epsilon spent
        "target_exposure@10": run.get("target_exposure@10"),
        "epsilon": next((r["epsilon"] for r in reversed(rounds) if r.get("epsilon") is not None), None),
        "best_valid_within_s": max(
            (
                entry["valid_score"]
                for entry in rounds
                if entry.get("valid_score") is not None and entry["elapsed_seconds"] <= compare_at
            ),
            default=None,
        )
        if compare_at and rounds
        else None,
    }


def write_table(rows: list[dict[str, Any]], out: Path, footer: str, compare_at: float | None = None) -> str:
    with (out / "table.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    within = f" | best valid within {compare_at:.0f} s" if compare_at else ""
    # columns only some studies have (attacks, DP) appear when one of their runs has them
    optional = [
        (key, title, form)
        for key, title, form in (("target_exposure@10", "target ER@10", ".4f"), ("epsilon", "epsilon", ".2f"))
        if any(row.get(key) is not None for row in rows)
    ]
    extra_titles = "".join(f" | {title}" for _, title, _ in optional)
    lines = [
        "| run | best valid NDCG@10 | best round/epoch | test HR@10 | test NDCG@10 | wall s (training + validation) "
        f"| MB up+down per round{extra_titles}{within} |",
        "|---|---|---|---|---|---|---|" + "---|" * len(optional) + ("---|" if compare_at else ""),
    ]
    for row in rows:
        traffic = "-" if row["mb_up_down_per_round"] is None else f"{row['mb_up_down_per_round']:.0f}"
        extras = "".join(" | -" if row.get(key) is None else f" | {row[key]:{form}}" for key, _, form in optional)
        early = row.get("best_valid_within_s")
        early_text = (" | -" if early is None else f" | {early:.4f}") if compare_at else ""
        lines.append(
            f"| {row['run']} | {row['best_valid_ndcg@10']:.4f} | {row['best_round']} of {row['rounds_run']} "
            f"| {row['test_hit@10']:.4f} | {row['test_ndcg@10']:.4f} | {row['wall_seconds']:.0f} | {traffic}"
            f"{extras}{early_text} |"
        )
    text = "\n".join(lines) + "\n\n" + footer + "\n"
    (out / "table.md").write_text(text)
    return text


def short_labels(labels: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """The settings all runs share, and each run label reduced to the settings that set it apart:
    ``MODEL[a=1,b=2]`` and ``MODEL[a=1,b=3]`` -> ``{a: 1}`` and ``b=2`` / ``b=3``."""
    parsed = {label: dict(parse_run(label)[1]) for label in labels}
    shared = set.intersection(*(set(o.items()) for o in parsed.values())) if parsed else set()
    names = {
        label: ",".join(f"{k}={v}" for k, v in overrides.items() if (k, v) not in shared) or "(shared settings)"
        for label, overrides in parsed.items()
    }
    ordered = next(iter(parsed.values()), {})  # the shared settings in the order the labels write them
    return {k: v for k, v in ordered.items() if (k, v) in shared}, names


def plot_curves(runs: list[dict[str, Any]], out: Path) -> Path | None:
    """Validation NDCG@10 against rounds and against wall seconds, one line per federated run."""
    federated = [run for run in runs if run.get("rounds")]
    if not federated:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shared, names = short_labels([run["label"] for run in federated])
    figure, (by_round, by_time) = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
    for run in federated:
        points = [
            (r["round_idx"] + 1, r["elapsed_seconds"], r["valid_score"])
            for r in run["rounds"]
            if r["valid_score"] is not None
        ]
        if not points:
            continue
        rounds, seconds, scores = zip(*points, strict=True)
        by_round.plot(rounds, scores, marker=".", label=names[run["label"]])
        by_time.plot(seconds, scores, marker=".", label=names[run["label"]])
    central = next((run for run in runs if not run.get("rounds")), None)
    for axis in (by_round, by_time):
        if central is not None:
            axis.axhline(
                central["best_valid_ndcg@10"], color="black", linestyle="--", label="centralised, best validation"
            )
        axis.grid(alpha=0.3)
    by_round.set_xlabel("round")
    by_time.set_xlabel("wall seconds (validation included)")
    by_round.set_ylabel("validation NDCG@10 (full ranking)")
    title = ", ".join(f"{k}={v}" for k, v in shared.items())
    figure.suptitle(f"federated runs ({title})" if title else "federated runs", fontsize=9)
    handles, labels = by_round.get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=2, fontsize=8)
    figure.tight_layout(rect=(0, 0.06 + 0.03 * (len(labels) // 2), 1, 0.95))
    path = out / "curves.png"
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser, argv = begin_command(MODULE, __doc__, argv)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS), help="MODEL[key=value,...] labels")
    parser.add_argument("--centralised", default=CENTRALISED, help="the run the federated defaults are compared to")
    parser.add_argument("--defaults", default=DEFAULTS, help="the federated run with the chosen defaults")
    parser.add_argument("--time_budget", type=float, default=3600.0, help="seconds per federated run")
    parser.add_argument("--rounds", type=int, default=2000, help="round cap of federated runs")
    parser.add_argument("--eval_every", type=int, default=5, help="rounds between validations")
    parser.add_argument("--stopping_step", type=int, default=10, help="validations without improvement")
    parser.add_argument("--epochs", type=int, default=200, help="epoch cap of centralised runs")
    parser.add_argument("--seed", type=int, default=2020)
    parser.add_argument("--jobs", type=int, default=1, help="runs side by side in this many processes")
    parser.add_argument("--out", default="results/federated_study")
    parser.add_argument(
        "--compare_at", type=float, default=None, help="a column: best validation within this many seconds"
    )
    args, settings = parser.parse_known_args(argv)

    overrides = command_settings(
        settings,
        rounds=args.rounds,
        time_budget_s=args.time_budget,
        eval_every=args.eval_every,
        epochs=args.epochs,
        stopping_step=args.stopping_step,
        seed=args.seed,
    )
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    opening = new_report("run", MODULE, argv, seed=args.seed)  # the code the runs execute: HEAD may move later
    done = {label: json.loads(run_file(out, label).read_text()) for label in args.runs if run_file(out, label).exists()}
    pending = [label for label in args.runs if label not in done]
    if done:
        print(f"{len(done)} runs already in {out / 'runs'}, {len(pending)} to go", flush=True)
    failed = []
    tasks = [(label, args.dataset, overrides, str(run_file(out, label).with_suffix(".saved"))) for label in pending]
    for (label, *_), result, error in run_in_pool(_run, tasks, args.jobs):
        if error is not None:  # one failed run must not take the others' results with it
            failed.append({"run": label, "error": error})
            print(f"FAILED {label}: {error.strip().splitlines()[-1]}", flush=True)
            continue
        result = opening | result
        write_json(run_file(out, label), result)
        done[label] = result
        row = summary_row(result)
        print(
            f"finished {label}: best valid NDCG@10 {row['best_valid_ndcg@10']:.4f} at {row['best_round']}, "
            f"test NDCG@10 {row['test_ndcg@10']:.4f}, {row['wall_seconds']:.0f} s ({len(done)}/{len(args.runs)})",
            flush=True,
        )
    runs = [done[label] for label in args.runs if label in done]
    rows = [summary_row(run, args.compare_at) for run in runs]
    report: dict[str, Any] = {"command": opening["command"], "runs": rows, "failed": failed}
    if not runs:
        return report
    commits = sorted({run.get("commit") or "not recorded" for run in runs})
    machine = runs[-1].get("machine") or "not recorded"
    footer = f"command: `{opening['command']}`; seed {args.seed}; commit(s) {', '.join(commits)}; machine: {machine}"
    print(write_table(report["runs"], out, footer, args.compare_at))
    plot_curves(runs, out)
    if args.defaults in done and args.centralised in done:
        federated, central = done[args.defaults], done[args.centralised]
        accuracy = new_report(
            "federated-accuracy",
            MODULE,
            argv,
            federated_test_ndcg10=federated["test_full"]["ndcg@10"],
            centralised_test_ndcg10=central["test_full"]["ndcg@10"],
            ratio=federated["test_full"]["ndcg@10"] / central["test_full"]["ndcg@10"],
            federated_run=args.defaults,
            centralised_run=args.centralised,
            federated_wall_seconds=summary_row(federated)["wall_seconds"],
            seed=args.seed,
        ) | {"commit": federated.get("commit"), "machine": federated.get("machine")}
        write_json(out / "federated_accuracy.json", accuracy)
        report["accuracy"] = accuracy
        print(f"federated / centralised test NDCG@10: x{accuracy['ratio']:.3f}")
    return report


if __name__ == "__main__":
    sys.exit(1 if run_cli(main).get("failed") else 0)
