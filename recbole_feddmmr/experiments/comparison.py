"""Many seeds of many models, compared: means and spreads, a paired test, tables and plots.

Works on the runs ("cells") of :mod:`recbole_feddmmr.experiments.benchmark`: one result per (model label, seed), as
:func:`recbole_feddmmr.experiments.runner.run_model` returns it plus ``label`` and ``seed``.
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from pathlib import Path
from statistics import mean, stdev
from typing import Any

from recbole_feddmmr.experiments.runner import provenance

# (column, how to read it from a run: its split's dict, "" for the run itself); test metrics are full ranking
# unless named uni100 / cold; "valid ndcg@10" is the best epoch's validation score, the criterion runs are chosen on
METRICS: dict[str, tuple[str, str]] = {
    "valid ndcg@10": ("", "best_valid_ndcg@10"),
    **{f"{m}@{k}": ("test_full", f"{m}@{k}") for m in ("hit", "ndcg", "mrr") for k in (5, 10, 20)},
    "uni100 hit@10": ("test_uni100", "hit@10"),
    "uni100 ndcg@10": ("test_uni100", "ndcg@10"),
    "cold hit@10": ("test_cold", "hit@10"),
    "cold ndcg@10": ("test_cold", "ndcg@10"),
    # the router's mean weight per expert over every (test user, item) pair (UR4RecV2MoE only)
    **{f"share {expert}": ("expert_share", expert) for expert in ("sequential", "visual", "semantic")},
}
SHARES = ("share sequential", "share visual", "share semantic")
COSTS = ("parameters", "seconds_to_best", "train_samples_per_second", "seconds_per_epoch", "peak_memory_mb")
PLUGIN_MODEL = "UR4RecV2MoE"


def train_samples_per_second(run: dict[str, Any]) -> float:
    """A run's training targets per second of training. A federated round trains its sampled clients' targets
    only, so a run with rounds counts them from the rounds' own reports (run files written before the benchmark
    did so stored the whole training split per round)."""
    if run.get("rounds"):
        return sum(report["samples"] for report in run["rounds"]) / run["train_seconds"]
    return run["train_samples_per_second"]


def metric_of(run: dict[str, Any], column: str) -> float | None:
    if column == "seconds_per_epoch":  # training only, no validation; a federated run's epoch is its round
        return run["train_seconds"] / run["epochs_trained"] if run.get("epochs_trained") else None
    if column == "train_samples_per_second":
        return train_samples_per_second(run) if "train_samples_per_second" in run else None
    if column in COSTS:
        return run.get(column)
    split, name = METRICS[column]
    return (run.get(split, {}) if split else run).get(name)


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """label -> {column: [mean, std over seeds (None for one seed: one value has no spread)], "seeds": n}, labels
    in first-seen order."""
    labels = list(dict.fromkeys(run["label"] for run in runs))
    summary = {}
    for label in labels:
        mine = [run for run in runs if run["label"] == label]
        row: dict[str, Any] = {"seeds": len(mine)}
        for column in [*METRICS, *COSTS]:
            values = [value for run in mine if (value := metric_of(run, column)) is not None]
            if values:
                row[column] = [mean(values), stdev(values) if len(values) > 1 else None]
        summary[label] = row
    return summary


def best_baseline(summary: dict[str, dict[str, Any]], column: str = "ndcg@10") -> str | None:
    """The RecBole model (a label whose model is not the plugin's) with the highest mean ``column``."""
    baselines = {label: row[column][0] for label, row in summary.items() if not label.startswith(PLUGIN_MODEL)}
    return max(baselines, key=baselines.get) if baselines else None


def paired(runs: list[dict[str, Any]], ours: str, theirs: str, column: str = "ndcg@10") -> dict[str, Any] | None:
    """Seed-by-seed differences ``ours - theirs`` of ``column``: mean, standard error, and whether the mean
    exceeds seed noise (|mean| > 2 standard errors; needs 2+ common seeds), and the ratio of means (``None`` where
    the baseline's mean is 0). ``None`` without common seeds."""
    by_seed = {(run["label"], run["seed"]): metric_of(run, column) for run in runs}
    seeds = sorted(
        {seed for label, seed in by_seed if label == ours} & {seed for label, seed in by_seed if label == theirs}
    )
    if not seeds:
        return None
    differences = [by_seed[(ours, seed)] - by_seed[(theirs, seed)] for seed in seeds]
    error = stdev(differences) / math.sqrt(len(differences)) if len(differences) > 1 else None
    baseline_mean = mean(by_seed[(theirs, s)] for s in seeds)
    return {
        "ours": ours,
        "baseline": theirs,
        "metric": column,
        "seeds": seeds,
        "differences": differences,
        "mean_difference": mean(differences),
        "standard_error": error,
        "exceeds_seed_noise": error is not None and abs(mean(differences)) > 2 * error,
        # None where the baseline scores 0 (an ID-only model on cold items): no ratio, not a crash
        "ratio_of_means": mean(by_seed[(ours, s)] for s in seeds) / baseline_mean if baseline_mean else None,
    }


def _cell(value: list[float] | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    average, spread = value
    return f"{average:.{digits}f}" if spread is None else f"{average:.{digits}f} ± {spread:.{digits}f}"


def format_table(report: dict[str, Any]) -> str:
    """Markdown: the mean ± std table over seeds, costs, the cold-item slice and the paired comparison."""
    summary = report["summary"]
    accuracy = ["valid ndcg@10", "hit@10", "ndcg@10", "mrr@10", "ndcg@5", "ndcg@20", "uni100 hit@10", "uni100 ndcg@10"]
    missing = report.get("missing")
    seeds = f"each row's seeds of {report['seeds']}" if missing else f"seeds {report['seeds']}"
    lines = [
        f"Validation NDCG@10 of the best epoch (what runs are chosen on), then test metrics, mean ± std over {seeds} "
        "(full ranking unless uni100):\n",
        "| model | seeds | " + " | ".join(accuracy) + " |",
        "|---|---|" + "---|" * len(accuracy),
    ]
    for label, row in summary.items():
        lines.append(f"| {label} | {row['seeds']} | " + " | ".join(_cell(row.get(c)) for c in accuracy) + " |")
    # seconds per epoch against the speed baseline (RecBole's SASRec by default), as one machine measured both
    reference = report.get("speed_baseline", "SASRec")
    reference_epoch = summary.get(reference, {}).get("seconds_per_epoch", [math.nan])[0]
    lines += [
        "\nCosts (mean over seeds; an epoch's seconds are training only, a federated run's epoch is a round; "
        "peak memory: process RSS on CPU, allocated CUDA memory on a GPU):\n",
        "| model | parameters | seconds to best epoch | training samples / s | seconds per epoch "
        f"| x {reference} | peak memory MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, row in summary.items():
        cost = {column: row.get(column, [math.nan, 0.0])[0] for column in COSTS}
        ratio = cost["seconds_per_epoch"] / reference_epoch
        lines.append(
            f"| {label} | {cost['parameters']:,.0f} | {cost['seconds_to_best']:.0f} "
            f"| {cost['train_samples_per_second']:.0f} | {cost['seconds_per_epoch']:.1f} "
            f"| {f'{ratio:.2f}' if math.isfinite(ratio) else '-'} | {cost['peak_memory_mb']:.0f} |"
        )
    cold_users = {run["label"]: run.get("cold_users") for run in report["runs"]}
    lines += [
        f"\nCold items: test users whose target item has at most {report.get('cold_max', 5)} training "
        "interactions (full ranking):\n",
        "| model | users | cold hit@10 | cold ndcg@10 |",
        "|---|---|---|---|",
    ]
    for label, row in summary.items():
        lines.append(
            f"| {label} | {cold_users.get(label, '-')} | {_cell(row.get('cold hit@10'))} "
            f"| {_cell(row.get('cold ndcg@10'))} |"
        )
    shared = [label for label, row in summary.items() if any(row.get(column) for column in SHARES)]
    if shared:
        lines += [
            "\nExpert shares: the router's mean weight per expert over every (test user, item) pair (a switched-off "
            "expert has 0):\n",
            "| model | sequential | visual | semantic |",
            "|---|---|---|---|",
        ]
        for label in shared:
            lines.append(f"| {label} | " + " | ".join(_cell(summary[label].get(c), 3) for c in SHARES) + " |")
    comparison = report.get("paired")
    if comparison:
        error = comparison["standard_error"]
        noise = (
            "exceeds seed noise (|mean| > 2 standard errors)"
            if comparison["exceeds_seed_noise"]
            else "within seed noise"
            if error is not None
            else "one seed: no standard error"
        )
        lines.append(
            f"\nPaired over seeds {comparison['seeds']}: {comparison['ours']} - {comparison['baseline']} "
            f"(best RecBole baseline) test {comparison['metric']} {comparison['mean_difference']:+.4f}"
            + (f" ± {error:.4f} (standard error)" if error is not None else "")
            + (
                f", x{comparison['ratio_of_means']:.3f} of its mean"
                if comparison["ratio_of_means"] is not None
                else ", no ratio (its mean is 0)"
            )
            + f"; {noise}"
        )
    if missing:
        lines.append(f"\nNot trained yet, so not in this table ({len(missing)}): {', '.join(missing)}")
    commits = Counter(run.get("commit", "not recorded") for run in report["runs"])
    if set(commits) != {report.get("commit")}:  # cells trained by earlier commands than this table's
        lines.append("\nCells trained at commit: " + ", ".join(f"{c} ({n})" for c, n in commits.items()))
    machines = Counter(run.get("machine", "not recorded") for run in report["runs"])
    if set(machines) != {report.get("machine")}:  # seconds and memory compare only between cells of one machine
        lines.append(
            "\nCells trained on: "
            + "; ".join(f"{m} ({n})" for m, n in machines.items())
            + (" (the costs above mix these machines)" if len(machines) > 1 else "")
        )
    threads = report.get("threads_per_run")
    lines.append(
        provenance(report)
        + (f"; {report.get('jobs', 1)} runs side by side, {threads} torch thread(s) each" if threads else "")
    )
    return "\n".join(lines)


def write_csv(path: Path, report: dict[str, Any]) -> None:
    columns = [*METRICS, *COSTS]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["model", "seeds", *(f"{c} {part}" for c in columns for part in ("mean", "std"))])
        for label, row in report["summary"].items():
            cells = [value for c in columns for value in row.get(c, ["", ""])]
            writer.writerow([label, row["seeds"], *cells])


def plot(folder: Path, report: dict[str, Any]) -> list[Path]:
    """curves.png (validation NDCG@10 by epoch or round, first seed), test_ndcg.png (mean ± std) and, when
    UR4RecV2MoE runs report them, expert_shares.png (the router's mean weight per expert)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    first_seed = min(run["seed"] for run in report["runs"])
    figure, axes = plt.subplots(figsize=(8, 5))
    for run in report["runs"]:
        if run["seed"] == first_seed and run.get("valid_curve"):
            epochs, scores = zip(*run["valid_curve"], strict=True)
            axes.plot(epochs, scores, label=run["label"], marker="." if len(epochs) < 30 else None)
    axes.set(xlabel="epoch (federated: round)", ylabel="validation NDCG@10", title=f"seed {first_seed}")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(folder / "curves.png", dpi=120)
    written.append(folder / "curves.png")

    summary = report["summary"]
    labels = list(summary)
    figure, axes = plt.subplots(figsize=(8, 0.5 * len(labels) + 1.5))
    averages = [summary[label]["ndcg@10"][0] for label in labels]
    spreads = [summary[label]["ndcg@10"][1] or 0.0 for label in labels]  # no bar for a one-seed row
    axes.barh(labels, averages, xerr=spreads, capsize=3)
    axes.set(xlabel="test NDCG@10 (mean ± std over seeds)")
    axes.invert_yaxis()
    figure.tight_layout()
    figure.savefig(folder / "test_ndcg.png", dpi=120)
    written.append(folder / "test_ndcg.png")

    shares = {run["label"]: run["expert_share"] for run in report["runs"] if run.get("expert_share")}
    if shares:
        figure, axes = plt.subplots(figsize=(8, 0.5 * len(shares) + 1.5))
        left = [0.0] * len(shares)
        for expert in next(iter(shares.values())):
            widths = [share[expert] for share in shares.values()]
            axes.barh(list(shares), widths, left=left, label=expert)
            left = [a + b for a, b in zip(left, widths, strict=True)]
        axes.set(xlabel="router weight on test (mean over user-item pairs), last seed of each model")
        axes.invert_yaxis()
        axes.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(folder / "expert_shares.png", dpi=120)
        written.append(folder / "expert_shares.png")
    plt.close("all")
    return written
