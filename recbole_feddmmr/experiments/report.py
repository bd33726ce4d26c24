"""Print any results file the experiments write as a table.

    python -m recbole_feddmmr.experiments.report results/ml-100k/report.json results/ml-100k/runs/SASRec-seed2020.json

Every results file names its kind (``"kind"``), which picks the table: ``benchmark`` (a benchmark over
seeds), ``runs`` (a table of runs), ``run`` (one run: a benchmark cell, a study's run), ``evaluated``
(checkpoints evaluated on test), ``search`` (a Tune search's best trial), ``federated-benchmark``,
``federated-sweep``, ``federated-settings-cost``, ``federated-interleaved``, ``federated-scale``,
``federated-accuracy``, ``privacy-budget``, ``flower-cost``, ``flower-run``. Under each table: the command,
commit and machine the file records ("not recorded" where it has none).

Two sets of benchmark cells, e.g. of two benchmark runs, paired seed by seed (validation and test NDCG@10, best
epochs, each cell's commit; the mean ± standard error of the differences B - A):

    python -m recbole_feddmmr.experiments.report \
        --paired results/ml-100k-ties/runs/UR4RecV2MoE_shuffle_tied_items_true \
        results/ml-100k-ties-next/runs/UR4RecV2MoE_feature_id_field_null
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from recbole_feddmmr.errors import DataFileError, MissingFileError, run_cli
from recbole_feddmmr.experiments import tables
from recbole_feddmmr.experiments.comparison import format_table, metric_of, paired
from recbole_feddmmr.experiments.runner import NOT_RECORDED, provenance


def _one_run(report: dict[str, Any]) -> str:
    """One run's file as a one-row table of runs (a cell carries its own command, commit and machine)."""
    cell = {"runs": [report]} | {key: report.get(key) or NOT_RECORDED for key in ("command", "commit", "machine")}
    return tables.format_runs(cell)


FORMATTERS: dict[str, Callable[[dict[str, Any]], str]] = {
    "benchmark": format_table,
    "runs": tables.format_runs,
    "run": _one_run,
    "evaluated": tables.format_evaluated,
    "search": tables.format_search,
    "federated-benchmark": tables.format_federated_benchmark,
    "federated-sweep": lambda report: tables.format_sweep(report["sweep"]) + provenance(report),
    "privacy-budget": lambda report: tables.format_budget(report["budget"]) + provenance(report),
    "federated-settings-cost": lambda report: tables.format_settings_cost(report["cost"]) + provenance(report),
    "federated-interleaved": lambda report: tables.format_interleaved(report["interleaved"]) + provenance(report),
    "federated-scale": tables.format_scale,
    "federated-accuracy": tables.format_accuracy,
    "flower-cost": lambda report: tables.format_flower_cost(report) + provenance(report),
    "flower-run": lambda report: tables.format_flower_run(report) + provenance(report),
}


def format_results(report: dict[str, Any]) -> str:
    """The table of a results file of the plugin, by its ``kind``."""
    if not isinstance(report, dict):
        raise DataFileError(f"a results file holds a JSON object, not a {type(report).__name__}")
    kind = report.get("kind")
    if kind not in FORMATTERS:
        raise DataFileError(
            f"not a results file of recbole_feddmmr: its kind is {kind!r}, not one of {', '.join(FORMATTERS)}"
        )
    return FORMATTERS[kind](report)


def read_results(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"no results file {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DataFileError(f"{path} is not JSON ({error})") from None


def read_cells(prefix: str) -> list[dict[str, Any]]:
    """The benchmark cells ``<prefix>-seed<N>.json`` (one per seed), in seed order."""
    folder, stem = Path(prefix).parent, Path(prefix).name
    cells = [read_results(path) for path in sorted(folder.glob(f"{stem}-seed*.json"))]
    if not cells:
        raise MissingFileError(f"no benchmark cells {prefix}-seed*.json")
    return cells


def format_paired(prefix_a: str, prefix_b: str) -> str:
    """Markdown: cells B against cells A, seed by seed, with the paired differences B - A over their common seeds."""
    cells = {"A": read_cells(prefix_a), "B": read_cells(prefix_b)}
    runs = [cell | {"label": name} for name, group in cells.items() for cell in group]  # paired() pairs by label
    by_seed = {name: {cell["seed"]: cell for cell in group} for name, group in cells.items()}
    seeds = sorted(set(by_seed["A"]) & set(by_seed["B"]))
    if not seeds:
        raise DataFileError(f"{prefix_a} and {prefix_b} have no seed in common")
    lines = [
        f"A: {prefix_a}", f"B: {prefix_b}", "",
        "| | " + " | ".join(str(seed) for seed in seeds) + " | B - A (mean ± standard error) |",
        "|---|" + "---|" * len(seeds) + "---|",
    ]  # fmt: skip
    for title, column in (("valid NDCG@10", "valid ndcg@10"), ("test NDCG@10", "ndcg@10")):
        comparison = paired(runs, "B", "A", column)
        error = comparison["standard_error"]
        values = [f"{metric_of(by_seed['A'][s], column):.4f} / {metric_of(by_seed['B'][s], column):.4f}" for s in seeds]
        summary = f"{comparison['mean_difference']:+.4f}" + (f" ± {error:.4f}" if error is not None else "")
        lines.append(f"| {title}, A / B | " + " | ".join(values) + f" | {summary} |")
    epochs = [f"{by_seed['A'][s].get('best_epoch')} / {by_seed['B'][s].get('best_epoch')}" for s in seeds]
    lines.append("| best epoch, A / B | " + " | ".join(epochs) + " | |")
    commits = [
        f"{by_seed['A'][s].get('commit', NOT_RECORDED)} / {by_seed['B'][s].get('commit', NOT_RECORDED)}" for s in seeds
    ]
    lines.append("| commit, A / B | " + " | ".join(commits) + " | |")
    # what trained each set (its cells' machines may differ; the commits are in the table)
    for name in cells:
        machines = sorted({cell.get("machine") or NOT_RECORDED for cell in cells[name]})
        lines.append(
            f"\n{name}:" + provenance(cells[name][0] | {"commit": "per cell, above", "machine": "; ".join(machines)})
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(
        prog="python -m recbole_feddmmr.experiments.report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("files", nargs="*", metavar="JSON")
    parser.add_argument(
        "--paired", nargs=2, metavar=("A", "B"), help="two cell prefixes (a path without -seed<N>.json): B against A"
    )
    args = parser.parse_args(argv)
    if not args.files and not args.paired:
        parser.error("give results files, or --paired A B")
    tables_printed = [format_paired(*args.paired)] if args.paired else []
    for path in args.files:
        try:
            tables_printed.append(f"## {path}\n\n{format_results(read_results(path))}")
        except DataFileError as error:
            raise DataFileError(f"{path}: {error}") from None
    print("\n\n".join(tables_printed))
    return tables_printed


if __name__ == "__main__":
    run_cli(main)
