"""Print any results file the plugin writes as a table.

    python -m recbole_feddmmr.report results/ml-100k_memory_ablation.json results/federated_scale.json

Recognised by their keys: a benchmark (``runs``; over seeds: ``summary``), a federated benchmark
(``runs`` and ``speed``, ``sweep``, or ``interleaved``), a federated scale run (``populations``), evaluated checkpoints
(``evaluated``), the federated accuracy summary (``federated_test_ndcg10``), one run of a study
(``test_full``) and a Tune search's best trial (``best.json``). ``benchmark --report`` and
``federated.benchmark --report`` print through the same function.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from recbole_feddmmr.errors import DataFileError, MissingFileError, run_cli

TEST_COLUMNS = "test HR@10 | test NDCG@10 | test MRR@10 | uni100 HR@10 | uni100 NDCG@10"


def test_cells(run: dict[str, Any]) -> str:
    """The :data:`TEST_COLUMNS` cells of one run (test metrics, full ranking and uni100)."""
    full, uni = run["test_full"], run["test_uni100"]
    values = (full["hit@10"], full["ndcg@10"], full["mrr@10"], uni["hit@10"], uni["ndcg@10"])
    return " | ".join(f"{value:.4f}" for value in values)


def format_evaluated(report: dict[str, Any]) -> str:
    """The table of ``benchmark --evaluate``: one row per checkpoint."""
    lines = [
        f"| checkpoint | model | best epoch | {TEST_COLUMNS} | expert shares |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in report["evaluated"]:
        shares = ", ".join(f"{name} {share:.2f}" for name, share in run.get("expert_share", {}).items()) or "-"
        lines.append(
            f"| {Path(run['checkpoint']).name} | {run['model']} | {run['best_epoch']} | {test_cells(run)} | {shares} |"
        )
    lines.append(provenance(report))
    return "\n".join(lines)


def format_accuracy(report: dict[str, Any]) -> str:
    """The federated / centralised accuracy summary of ``federated.study``."""
    return (
        f"federated test NDCG@10 {report['federated_test_ndcg10']:.4f} / centralised "
        f"{report['centralised_test_ndcg10']:.4f} = x{report['ratio']:.3f} "
        f"(federated run: {report['federated_wall_seconds']:.0f} s; seed {report.get('seed', '?')})"
        + provenance(report)
    )


def new_report(module: str, argv: list[str] | None, **fields: Any) -> dict[str, Any]:
    """A results file's opening: the exact command (``python -m MODULE ARGS``), the commit and the machine."""
    from recbole_feddmmr.utils import git_commit, machine_description

    arguments = " ".join(sys.argv[1:] if argv is None else argv)
    return {
        "command": f"python -m {module} {arguments}",
        "commit": git_commit(),
        "machine": machine_description(),
    } | fields


def format_search(report: dict[str, Any]) -> str:
    """The best trial of a Tune search (``best.json``): its values, validation score and test metrics."""
    values = ", ".join(f"{name}={value:.4g}" for name, value in report["best_values"].items())
    test = report["rerun_test"]
    return (
        f"best of {report['trials']} trials: {values} -> valid NDCG@10 {report['best_trial_valid_ndcg@10']:.4f} "
        f"(rerun {report['rerun_valid_ndcg@10']:.4f}); test NDCG@10 {test['ndcg@10']:.4f}, HR@10 {test['hit@10']:.4f}"
        + provenance(report)
    )


def provenance(report: dict[str, Any]) -> str:
    return (
        f"\ncommand: `{report.get('command', '?')}`; commit {report.get('commit', '?')}; "
        f"machine: {report.get('machine', '?')}"
    )


def format_results(report: dict[str, Any]) -> str:
    """The table of any results file of the plugin (see the module's docstring for the kinds)."""
    from recbole_feddmmr import benchmark
    from recbole_feddmmr.federated import benchmark as federated_benchmark
    from recbole_feddmmr.federated import scale

    if not isinstance(report, dict):
        raise DataFileError(f"a results file holds a JSON object, not a {type(report).__name__}")
    if "sweep" in report:
        return federated_benchmark.format_sweep(report["sweep"]) + provenance(report)
    if "interleaved" in report:
        return federated_benchmark.format_interleaved(report["interleaved"]) + provenance(report)
    if "populations" in report:
        return scale.format_report(report)
    if "evaluated" in report:
        return format_evaluated(report)
    if "federated_test_ndcg10" in report:
        return format_accuracy(report)
    if "speed" in report:
        return federated_benchmark.format_report(report)
    if "best_trial_valid_ndcg@10" in report:
        return format_search(report)
    if "summary" in report:  # a benchmark over seeds
        from recbole_feddmmr.comparison import format_table

        return format_table(report)
    if "runs" in report:
        return benchmark.format_report(report)
    if "test_full" in report:  # one run's file (federated.study writes one per run)
        # a benchmark cell carries its own commit and machine; cells trained before the machine was recorded
        # carry their torch threads only
        machine = report.get("machine") or (
            f"not recorded; {report['torch_threads']} torch threads" if "torch_threads" in report else "?"
        )
        cell = {"runs": [report], "command": report.get("command", "?"), "commit": report.get("commit", "?")}
        return benchmark.format_report(cell | {"machine": machine})
    raise DataFileError(f"not a results file of recbole_feddmmr (its keys: {', '.join(list(report)[:8])})")


def read_results(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"no results file {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DataFileError(f"{path} is not JSON ({error})") from None


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", metavar="JSON")
    tables = []
    for path in parser.parse_args(argv).files:
        try:
            tables.append(f"## {path}\n\n{format_results(read_results(path))}")
        except DataFileError as error:
            raise DataFileError(f"{path}: {error}") from None
    print("\n\n".join(tables))
    return tables


if __name__ == "__main__":
    run_cli(main)
