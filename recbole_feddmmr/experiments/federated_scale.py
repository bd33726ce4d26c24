"""How a federated round's cost grows with the population: planted datasets of N users, one client each,
the same number of sampled clients per round.

    python -m recbole_feddmmr.experiments.federated_scale --users 1000 100000 --clients_per_round 256 --rounds 3 \\
        --out results/federated_scale.json

For each population, in a fresh process: the planted dataset with N users (``python -m
recbole_feddmmr.synthetic``'s generator, 16 interactions each) is written to a temporary folder, the
federated server of UR4RecV2MoE is built (one client per user, the client state store), and one
warm-up round and ``--rounds`` timed rounds run. Each timed round starts from a cleared peak-RSS mark
(Linux: ``/proc/self/clear_refs``), so its peak is the round's own; reported are the median seconds per
round, the resident memory before the round, its peak during the round and the difference, and every
figure's ratio to the first population's. Building the datasets and evaluation are not timed:
evaluation scores every user, so it grows with all of them by design.
"""

from __future__ import annotations

import logging
import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from recbole_feddmmr.errors import run_cli
from recbole_feddmmr.experiments.runner import begin_command, command_settings, new_report, write_json
from recbole_feddmmr.experiments.tables import format_scale
from recbole_feddmmr.provenance import peak_rss_mb

MODULE = "recbole_feddmmr.experiments.federated_scale"

INTERACTIONS_PER_USER = 16


def resident_memory_mb() -> tuple[float, float]:
    """(current, peak since the last :func:`clear_peak_memory`) resident memory of this process in MB
    (Linux /proc; elsewhere the peak is the process's lifetime peak)."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        return float(fields["VmRSS"].split()[0]) / 1024, float(fields["VmHWM"].split()[0]) / 1024
    except (OSError, KeyError):
        return peak_rss_mb(), peak_rss_mb()


def clear_peak_memory() -> bool:
    """Reset the process's peak-RSS mark to its current RSS (Linux); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure_population(num_users: int, overrides: dict[str, Any], rounds: int) -> dict[str, Any]:
    """Build the federated server on a planted dataset of ``num_users`` users and time its rounds."""
    logging.basicConfig(level=logging.WARNING)
    from recbole_feddmmr.federated.trainer import FederatedTrainer
    from recbole_feddmmr.quick_start import prepare_run
    from recbole_feddmmr.synthetic import PLANTED, PlantedSpec, write_planted

    with tempfile.TemporaryDirectory(prefix="feddmmr-scale-") as folder:
        spec = PlantedSpec(num_users=num_users, interactions_per_user=INTERACTIONS_PER_USER)
        write_planted(Path(folder) / PLANTED, spec)
        config_dict = {
            "federated": True,
            "data_path": folder,
            "checkpoint_dir": str(Path(folder) / "saved"),
            "MAX_ITEM_LIST_LENGTH": INTERACTIONS_PER_USER,
            "show_progress": False,
            **overrides,
        }
        config, (train_data, _, _), model = prepare_run("UR4RecV2MoE", PLANTED, config_dict=config_dict)
        server = FederatedTrainer(config, model).build_server(train_data)
        server.run_round(0)  # warm-up: first-touch allocations, lazy initialisation
        timed = []
        peaks_cleared = True
        for round_idx in range(1, rounds + 1):
            peaks_cleared &= clear_peak_memory()
            before, _ = resident_memory_mb()
            started = time.perf_counter()
            report = server.run_round(round_idx)
            seconds = time.perf_counter() - started
            _, peak = resident_memory_mb()
            timed.append({"seconds": seconds, "rss_before_mb": before, "peak_rss_mb": peak, "clients": report.clients})
    return {
        "users": num_users,
        "clients": len(server.clients),
        "clients_per_round": timed[0]["clients"],
        "seconds_per_round": statistics.median(entry["seconds"] for entry in timed),
        "rss_before_round_mb": statistics.median(entry["rss_before_mb"] for entry in timed),
        "round_peak_rss_mb": max(entry["peak_rss_mb"] for entry in timed),
        "round_peak_growth_mb": max(entry["peak_rss_mb"] - entry["rss_before_mb"] for entry in timed),
        "peak_is_per_round": peaks_cleared,
        "rounds": timed,
        "backend": server.backend.name,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser, argv = begin_command(MODULE, __doc__, argv)
    parser.add_argument("--users", type=int, nargs="+", default=[1000, 100_000], help="populations; first = base")
    parser.add_argument("--clients_per_round", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per population (after one warm-up)")
    parser.add_argument("--seed", type=int, default=2020)
    parser.add_argument("--out", default="results/federated_scale.json")
    args, settings = parser.parse_known_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    overrides = command_settings(settings, clients_per_round=args.clients_per_round, seed=args.seed)
    report = new_report("federated-scale", MODULE, argv, populations=[])
    context = multiprocessing.get_context("spawn")  # a fresh process per population: its memory is its own
    for num_users in args.users:
        print(f"population of {num_users:,} users ...", flush=True)
        with context.Pool(1) as pool:
            row = pool.apply(measure_population, (num_users, overrides, args.rounds))
        report["populations"].append(row)
        print(f"  {row['seconds_per_round']:.2f} s per round, round peak RSS {row['round_peak_rss_mb']:.0f} MB")
        write_json(args.out, report)  # after each population: a cut-off run keeps what finished
    print(format_scale(report))
    return report


if __name__ == "__main__":
    run_cli(main)
