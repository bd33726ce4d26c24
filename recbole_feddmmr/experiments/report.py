"""Print any results file the experiments write as a table.

    python -m recbole_feddmmr.experiments.report results/ml-100k/report.json results/ml-100k/runs/SASRec-seed2020.json

Every results file names its kind (``"kind"``), which picks the table: ``benchmark`` (a benchmark over
seeds), ``runs`` (a table of runs), ``run`` (one run: a benchmark cell, a study's run), ``evaluated``
(checkpoints evaluated on test), ``search`` (a Tune search's best trial), ``federated-benchmark``,
``federated-sweep``, ``federated-settings-cost``, ``federated-interleaved``, ``federated-scale``,
``federated-accuracy``, ``privacy-budget``, ``flower-cost``, ``flower-run``. Under each table: the command,
commit and machine the file records ("not recorded" where it has none).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from recbole_feddmmr.errors import DataFileError, MissingFileError, run_cli
from recbole_feddmmr.experiments import tables
from recbole_feddmmr.experiments.comparison import format_table
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


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(
        prog="python -m recbole_feddmmr.experiments.report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("files", nargs="+", metavar="JSON")
    tables_printed = []
    for path in parser.parse_args(argv).files:
        try:
            tables_printed.append(f"## {path}\n\n{format_results(read_results(path))}")
        except DataFileError as error:
            raise DataFileError(f"{path}: {error}") from None
    print("\n\n".join(tables_printed))
    return tables_printed


if __name__ == "__main__":
    run_cli(main)
