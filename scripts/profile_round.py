"""Where a federated round's time goes: cProfile of a few rounds on a dataset, the top costs as a table.

    OMP_NUM_THREADS=1 python scripts/profile_round.py --dataset ml-100k --clients 64 --rounds 3 \\
        --out results/profile_round.md

The round runs as in training (properties/federated.yaml's defaults plus any --key=value settings), after one
warm-up round that is not profiled. The table lists the functions with the largest cumulative time.
"""

from __future__ import annotations

import sys
from pathlib import Path

# the checkout this script belongs to, before any installed copy of the package (which may be older)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import cProfile
import io
import pstats
import time
from pathlib import Path

from recbole_feddmmr.experiments.runner import command_settings
from recbole_feddmmr.federated.trainer import FederatedTrainer
from recbole_feddmmr.provenance import git_commit, machine_description
from recbole_feddmmr.quick_start import prepare_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--clients", type=int, default=64, help="clients per round")
    parser.add_argument("--rounds", type=int, default=3, help="profiled rounds")
    parser.add_argument("--top", type=int, default=25, help="rows of the table")
    parser.add_argument("--out", default=None, help="also write the table (markdown) here")
    args, settings = parser.parse_known_args()  # any other --key=value: a setting of the run
    overrides = command_settings(settings, federated=True, clients_per_round=args.clients)
    overrides["state"] = "WARNING"
    config, (train_data, _, _), model = prepare_run("UR4RecV2MoE", args.dataset, config_dict=overrides)
    server = FederatedTrainer(config, model).build_server(train_data)
    server.run_round(0)  # warm-up: first-touch allocations, lazy initialisation
    profile = cProfile.Profile()
    started = time.perf_counter()
    profile.enable()
    for round_idx in range(1, args.rounds + 1):
        server.run_round(round_idx)
    profile.disable()
    total = time.perf_counter() - started
    stream = io.StringIO()
    stats = pstats.Stats(profile, stream=stream).sort_stats("cumulative")
    rows = []
    for (filename, line, name), (_, calls, _, cumulative, _) in stats.stats.items():
        where = f"{Path(filename).name}:{line}({name})" if line else name
        rows.append((cumulative, calls, where))
    rows.sort(reverse=True)
    lines = [
        f"{args.rounds} rounds of {args.clients} clients on {args.dataset}: {total:.1f} s "
        f"({total / args.rounds:.2f} s per round)",
        "",
        "| function | calls | cumulative s | share of the rounds |",
        "|---|---|---|---|",
    ]
    for cumulative, calls, where in rows[: args.top]:
        lines.append(f"| `{where}` | {calls} | {cumulative:.2f} | {cumulative / total:.0%} |")
    lines += [
        "",
        f"command: `python scripts/profile_round.py {' '.join(__import__('sys').argv[1:])}`; "
        f"commit {git_commit()}; machine: {machine_description()}",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
