"""Train and evaluate FedDMMR as a Flower app on Flower's simulation engine, one virtual SuperNode per
partition group of clients (needs the flower extra).

    python -m recbole_feddmmr.flower --dataset ml-100k --supernodes 2 --out flower-ml-100k.json [--key=value ...]

``--key=value`` items are the main command's settings (``--rounds=200``, ``--clients_per_round=16``, ...);
federated training is implied. The run writes what it did to ``--out`` (JSON) and the shared parameters of
its last and best rounds next to it (``.pth``); users' private rows stay on their SuperNodes.
"""

from __future__ import annotations

import json
import sys

from recbole_feddmmr.config import parse_overrides
from recbole_feddmmr.errors import ConfigError, run_cli


def main(argv: list[str] | None = None) -> dict:
    import argparse

    from recbole_feddmmr import compat
    from recbole_feddmmr.flower.app import simulate

    compat.install()
    parser = argparse.ArgumentParser(prog="python -m recbole_feddmmr.flower", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--model", default="UR4RecV2MoE")
    parser.add_argument("--supernodes", type=int, default=2, help="virtual SuperNodes (partition groups)")
    parser.add_argument("--cpus_per_node", type=float, default=1.0, help="CPUs Ray gives each ClientApp")
    parser.add_argument("--out", required=True, help="the run's JSON (its parameters go next to it as .pth)")
    argv = sys.argv[1:] if argv is None else argv
    arguments, rest = parser.parse_known_args(argv)
    if arguments.supernodes < 1:
        raise ConfigError(f"--supernodes must be >= 1, got {arguments.supernodes}")
    command = " ".join(["python -m recbole_feddmmr.flower", *argv])
    settings = {"dataset": arguments.dataset, "model": arguments.model, "config": parse_overrides(rest),
                "out": arguments.out, "command": command}  # fmt: skip
    result = simulate(settings, arguments.supernodes, arguments.cpus_per_node)
    summary = {key: result[key] for key in ("best_round", "best_valid_result", "test_result", "seconds")}
    print(json.dumps(summary, indent=1))
    return result


if __name__ == "__main__":
    run_cli(main)
