"""The same federated run on the in-house sequential backend and on Flower's simulation engine, one after
the other in one command: seconds per round of each (and their ratio), wall time with start-up, and test
NDCG@10 of both, and how far apart the two runs' final global parameters are (needs the flower extra).

With ``--secure_aggregation=true`` the in-house run sums the sum-ready uploads as they are and the Flower run
sums them through SecAgg+: with ``--rounds=1`` the parameters' difference is one round's quantisation error,
printed beside the bound the Flower run reports for it.

    python -m recbole_feddmmr.experiments.flower_benchmark --dataset ml-100k --supernodes 2 \\
        --out results/flower_ml-100k.json --rounds=50 --eval_every=25

``--key=value`` items are the run's settings (federated training is implied). A round's seconds are the
server's wall time from selecting its clients to the aggregated model (Flower: messages to the SuperNodes,
their training, the replies and the aggregation), validations excluded.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

from recbole_feddmmr.errors import ConfigError, run_cli
from recbole_feddmmr.experiments.runner import begin_command, command_settings, new_report, write_json

MODULE = "recbole_feddmmr.experiments.flower_benchmark"


def in_house_run(model: str, dataset: str, config: dict[str, Any]) -> dict[str, Any]:
    """The run on the in-house sequential backend -> its per-round seconds, best round, test metrics, wall time."""
    from recbole_feddmmr.federated.trainer import FederatedTrainer
    from recbole_feddmmr.quick_start import prepare_run

    started = time.perf_counter()
    settings = {**config, "federated": True, "federated_backend": "sequential"}
    run_config, (train_data, valid_data, test_data), model_instance = prepare_run(model, dataset, config_dict=settings)
    trainer = FederatedTrainer(run_config, model_instance)
    trainer.fit(train_data, valid_data, saved=True)
    test = trainer.evaluate(test_data, load_best_model=True)
    return {
        "final_parameters": trainer.server.global_params,  # compared, not written
        "round_seconds": [report.seconds for report in trainer.round_reports],
        "valid_scores": {
            report.round_idx: report.valid_score for report in trainer.round_reports if report.valid_score is not None
        },
        "best_round": trainer.best_epoch,
        "test_result": {name: float(value) for name, value in test.items()},
        "wall_seconds": time.perf_counter() - started,
    }


def flower_run(
    model: str, dataset: str, config: dict[str, Any], supernodes: int, out: Path, command: str
) -> dict[str, Any]:
    """The run on Flower's simulation engine -> the same fields (``command``: this benchmark's, for its record)."""
    from recbole_feddmmr.flower.app import simulate

    started = time.perf_counter()
    settings = {"dataset": dataset, "model": model, "config": config, "command": command,
                "out": str(out.with_suffix(".flower-run.json"))}  # fmt: skip
    result = simulate(settings, supernodes)
    return {
        "final_parameters": torch.load(out.with_suffix(".flower-run.pth"), weights_only=True)["final"],
        "secagg_error_bounds": [
            record["secagg_error_bound"] for record in result["rounds"] if "secagg_error_bound" in record
        ],
        "round_seconds": [record["seconds"] for record in result["rounds"]],
        "valid_scores": {
            record["round"]: record["valid_score"] for record in result["rounds"] if "valid_score" in record
        },
        "best_round": result["best_round"],
        "test_result": {name: value for name, value in result["test_result"].items() if name != "users"},
        "wall_seconds": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser, argv = begin_command(MODULE, __doc__, argv)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--model", default="UR4RecV2MoE")
    parser.add_argument("--supernodes", type=int, default=2)
    parser.add_argument("--out", default="results/flower_ml-100k.json")
    arguments, rest = parser.parse_known_args(argv)
    if arguments.supernodes < 1:
        raise ConfigError(f"--supernodes must be >= 1, got {arguments.supernodes}")
    config = command_settings(rest)
    out = Path(arguments.out)
    report = new_report("flower-cost", MODULE, argv, dataset=arguments.dataset, supernodes=arguments.supernodes)
    runs = {
        "in-house sequential": in_house_run(arguments.model, arguments.dataset, config),
        "flower simulation": flower_run(
            arguments.model, arguments.dataset, config, arguments.supernodes, out, report["command"]
        ),
    }
    for run in runs.values():
        run["mean_round_seconds"] = statistics.fmean(run["round_seconds"])
    baseline, flower = runs["in-house sequential"], runs["flower simulation"]
    flower_final, baseline_final = flower.pop("final_parameters"), baseline.pop("final_parameters")
    report |= {
        "final_parameters_max_abs_difference": max(
            float((flower_final[name] - value).abs().max()) for name, value in baseline_final.items()
        ),
        "runs": runs,
        "round_time_ratio": flower["mean_round_seconds"] / baseline["mean_round_seconds"],
        "test_ndcg@10": {label: run["test_result"]["ndcg@10"] for label, run in runs.items()},
    }
    write_json(out, report)
    for label, run in runs.items():
        print(
            f"{label:<20} {run['mean_round_seconds']:.3f} s per round over {len(run['round_seconds'])} rounds, "
            f"wall {run['wall_seconds']:.0f} s, best round {run['best_round']}, "
            f"test NDCG@10 {run['test_result']['ndcg@10']:.4f}"
        )
    print(f"final global parameters, largest difference: {report['final_parameters_max_abs_difference']:.3g}")
    if flower["secagg_error_bounds"]:
        print(f"SecAgg+ quantisation bound of round 0: {flower['secagg_error_bounds'][0]:.3g}")
    print(f"Flower / in-house seconds per round: x{report['round_time_ratio']:.2f}  ({out})")
    return report


if __name__ == "__main__":
    run_cli(main)
