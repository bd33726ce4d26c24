"""Federated FedDMMR against centralised RecBole SASRec and the federated plain model, in one command.

    python -m recbole_feddmmr.experiments.federated_benchmark --dataset ml-100k --rounds 20 --stopping_step 5 \\
        --sasrec_epochs 6 --jobs 2 --out results/ml-100k_federated.json

Accuracy: federated UR4RecV2MoE, the same federated loop with the experts (and so the memory's
features and prototypes) off (``feature_id_field=null``), and centralised RecBole SASRec; each trains
with early stopping on validation NDCG@10 (full ranking) and its best-validation checkpoint is
evaluated on test, full ranking and uni100 (:func:`recbole_feddmmr.experiments.runner.run_model`).

Speed, in one process from the same initial model: one centralised training epoch of UR4RecV2MoE,
then one full-participation round with each backend (sequential, vectorized; ``--backends`` picks);
peak RSS after each, and peak CUDA memory on a GPU. ``--speed_only`` runs only this part, e.g. on a GPU:

    python -m recbole_feddmmr.experiments.federated_benchmark --dataset ml-100k --speed_only --backends vectorized

The cost of the privacy and robustness options, in one process from the same initial model and client sample
(``--compare_settings``): seconds and bytes per round of each setting, with ratios to the first:

    python -m recbole_feddmmr.experiments.federated_benchmark --dataset ml-100k --compare_rounds 3 \
        --compare_settings "FedAvg[]" "DP[dp_clip_norm=1.0,dp_noise_multiplier=1.0]" "median[robust_aggregation=median]"

With ``--jobs 2`` the tasks run in two processes side by side (one torch thread each, set
``OMP_NUM_THREADS=1``); the speed ratios are always taken inside one process. Results are written
after each task, so a cut-off run still reports what finished.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from recbole.utils import init_seed

from recbole_feddmmr.errors import ConfigError, run_cli
from recbole_feddmmr.experiments.report import format_results, read_results
from recbole_feddmmr.experiments.runner import (
    begin_command,
    command_settings,
    new_report,
    parse_run,
    provenance,
    run_in_pool,
    run_model,
    start_worker,
    write_json,
)
from recbole_feddmmr.experiments.tables import (
    FEDERATED_SPEED_BACKENDS,
    format_federated_benchmark,
    format_interleaved,
    format_settings_cost,
    format_sweep,
    sweep_seconds,
)
from recbole_feddmmr.federated.backends import default_chunk_targets, make_backend
from recbole_feddmmr.provenance import peak_rss_mb

MODULE = "recbole_feddmmr.experiments.federated_benchmark"

BACKENDS = FEDERATED_SPEED_BACKENDS
DEFAULT_RUNS = (
    "UR4RecV2MoE[federated=True]",
    "UR4RecV2MoE[federated=True,feature_id_field=null]",
    "SASRec",
)


def measure_speed(
    dataset: str,
    overrides: dict[str, Any],
    chunk_targets: int | None,
    backends: tuple[str, ...] = BACKENDS,
    sampled_clients: int | None = 64,
) -> dict[str, Any]:
    """Seconds of one centralised epoch, of one full-participation round per backend and of one round of
    ``sampled_clients`` clients with the first backend (same process, same initial model)."""
    import torch

    from recbole_feddmmr.federated.trainer import FederatedTrainer
    from recbole_feddmmr.quick_start import prepare_run
    from recbole_feddmmr.trainer import UR4RecV2MoETrainer

    config, (train_data, _, _), model = prepare_run("UR4RecV2MoE", dataset, config_dict=overrides)
    on_cuda = config["device"].type == "cuda"

    def cuda_peak_mb() -> dict[str, float]:  # peak CUDA memory since the last reset (kernels finished)
        if not on_cuda:
            return {}
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
        return {"cuda_peak_mb": peak}

    initial = copy.deepcopy(model.state_dict())

    def timed_epoch() -> tuple[float, dict[str, float]]:
        """One centralised epoch from ``initial`` -> (seconds, its CUDA peak)."""
        model.load_state_dict(initial)
        init_seed(config["seed"], config["reproducibility"])
        centralised = UR4RecV2MoETrainer(config, model)
        cuda_peak_mb()
        started = time.perf_counter()
        centralised._train_epoch(train_data, 0)
        peak = cuda_peak_mb()  # synchronises first: the epoch's last kernels are part of its time
        return time.perf_counter() - started, peak

    seconds, peak = timed_epoch()
    result: dict[str, Any] = {
        "device": str(config["device"]),
        "centralised_epoch_seconds": seconds,
        "centralised_peak_rss_mb": peak_rss_mb(),
        **{f"centralised_{key}": value for key, value in peak.items()},
        "rounds": {},
    }
    chunk_targets = chunk_targets or default_chunk_targets(config["device"])
    timed = [(name, name, None) for name in backends]  # (result key, backend, clients per round: None = all)
    if sampled_clients:
        timed.append(("sampled", backends[0], sampled_clients))
    pools: dict[str, Any] = {}  # each backend built once: a process pool (Ray) starts once, the sampled round reuses it
    for key, name, clients_per_round in timed:
        model.load_state_dict(initial)
        init_seed(config["seed"], config["reproducibility"])
        trainer = FederatedTrainer(config, model)
        if name not in pools:
            # auto: what a run of these settings picks
            backend = (
                trainer.build_server(train_data).backend
                if name == "auto"
                else sweep_backend(name, chunk_targets, os.cpu_count())
            )
            pool_start = start_pool(trainer, train_data, backend)
            if pool_start is not None:
                result.setdefault("pool_start_seconds", {})[name] = pool_start
                model.load_state_dict(initial)
                init_seed(config["seed"], config["reproducibility"])
            pools[name] = backend
        settings = dataclasses.replace(trainer.federated, clients_per_round=clients_per_round, client_fraction=1.0)
        server = trainer.build_server(train_data, settings, backend=pools[name])
        result.setdefault("backend_classes", {})[name] = type(pools[name]).__name__
        report = server.run_round(0)
        server.assemble_private_state()  # full per-user tables again, so the next run can start from `initial`
        values = {
            "clients": report.clients,
            "seconds": report.seconds,
            "mean_local_loss": report.mean_loss,
            "bytes_up": report.bytes_up,
            "bytes_down": report.bytes_down,
            "peak_rss_mb": report.peak_rss_mb,
            **cuda_peak_mb(),
        }
        if key == "sampled":  # what a sampled round costs next to a full one, same backend, same process
            result["sampled_round"] = {"backend": name, **values}
            result["sampled_over_full"] = values["seconds"] / result["rounds"][name]["seconds"]
            result["sampled_clients_over_all"] = values["clients"] / result["rounds"][name]["clients"]
        else:
            result["rounds"][key] = values
    for backend in pools.values():
        if hasattr(backend, "shutdown"):
            backend.shutdown()
    # the epoch once more, from the same initial model, after the rounds: on a shared machine the speed drifts
    # over minutes, so each round is compared with the mean of an epoch timed before it and one after it
    result["centralised_epoch_seconds_after"], _ = timed_epoch()
    rounds = result["rounds"]
    epoch = (result["centralised_epoch_seconds"] + result["centralised_epoch_seconds_after"]) / 2
    result["centralised_epoch_seconds_mean"] = epoch
    result["round_over_epoch"] = {name: values["seconds"] / epoch for name, values in rounds.items()}
    if "sequential" in rounds and "vectorized" in rounds:
        result["vectorized_over_sequential"] = rounds["vectorized"]["seconds"] / rounds["sequential"]["seconds"]
    if "vectorized" in rounds:
        result["vectorized_chunk_targets"] = chunk_targets
    return result


def start_pool(trainer, train_data, backend) -> float | None:
    """Start a process-pool backend (Ray) on an untimed 16-client round, as a run pays its start once and the
    timed rounds should not -> its seconds (``None``: the backend has no pool). The model ends as it was
    (every user's rows assembled), its weights changed by the round: reload them before timing."""
    if not hasattr(backend, "shutdown"):
        return None
    settings = dataclasses.replace(trainer.federated, clients_per_round=16, client_fraction=1.0)
    server = trainer.build_server(train_data, settings, backend=backend)
    started = time.perf_counter()
    server.run_round(0)
    seconds = time.perf_counter() - started
    server.assemble_private_state()
    return seconds


def interleaved_round_over_epoch(
    dataset: str, overrides: dict[str, Any], backend: str, segments: int, chunk_targets: int | None = None
) -> dict[str, Any]:
    """One centralised epoch and one full-participation round, each cut into ``segments`` parts that run in
    turn (epoch part 1, round part 1, epoch part 2, ...), so that a machine whose speed drifts over minutes
    (a shared one: this 2-core CPU ran the same epoch in 209 s and in 115 s ten minutes apart) slows both
    alike. Epoch part k: the k-th slice of the epoch's batches; round part k: the backend runs the k-th slice
    of the round's clients (their state from the store); the strategy folds every part's results as they
    arrive and aggregates once, which the round's time includes. The centralised model and the server's
    start from the same initial weights; a process pool (Ray) is started by an untimed 16-client round."""
    import numpy as np

    from recbole_feddmmr.federated.trainer import FederatedTrainer
    from recbole_feddmmr.quick_start import prepare_run
    from recbole_feddmmr.trainer import UR4RecV2MoETrainer, train_steps

    config, (train_data, _, _), model = prepare_run("UR4RecV2MoE", dataset, config_dict=overrides)
    central_model = copy.deepcopy(model)  # the server's store takes the per-user rows out of `model`
    centralised = UR4RecV2MoETrainer(config, central_model)
    central_model.train()
    batches = list(centralised.sequence_windows(train_data).epoch(0))
    trainer = FederatedTrainer(config, model)
    chosen = None
    if backend != "auto":
        chosen = sweep_backend(backend, chunk_targets or default_chunk_targets(config["device"]), os.cpu_count())
    chosen = chosen or trainer.build_server(train_data).backend
    initial = copy.deepcopy(model.state_dict())
    pool_start = start_pool(trainer, train_data, chosen)
    model.load_state_dict(initial)
    every_client = dataclasses.replace(trainer.federated, clients_per_round=None, client_fraction=1.0)
    server = trainer.build_server(train_data, every_client, backend=chosen)
    _, instructions = server.strategy.configure_fit(
        1, len(server.clients), server.global_params, server.settings, len(server.windows), server.row_shapes
    )
    client_parts = np.array_split(np.arange(len(server.clients)), segments)
    batch_parts = np.array_split(np.arange(len(batches)), segments)
    epoch_seconds: list[float] = []

    def interleaved_results():
        for clients, steps in zip(client_parts, batch_parts, strict=True):
            started = time.perf_counter()
            train_steps(
                central_model, centralised.optimizer, [batches[i] for i in steps], central_model.calculate_window_loss
            )
            epoch_seconds.append(time.perf_counter() - started)
            part = [server.clients[i] for i in clients]
            yield from server.backend.run(server.model, part, instructions, server.windows, server.store)

    started = time.perf_counter()
    server.strategy.aggregate_fit(server.global_params, interleaved_results(), server.row_shapes)
    round_seconds = time.perf_counter() - started - sum(epoch_seconds)
    if hasattr(server.backend, "shutdown"):
        server.backend.shutdown()
    return {
        "device": str(config["device"]),
        "backend": backend,
        "backend_class": type(server.backend).__name__,
        "segments": segments,
        "clients": len(server.clients),
        "epoch_part_seconds": epoch_seconds,
        "epoch_seconds": sum(epoch_seconds),
        "round_seconds": round_seconds,
        "round_over_epoch": round_seconds / sum(epoch_seconds),
        "pool_start_seconds": pool_start,
    }


def sweep_backend(spec: str, chunk_targets: int, cpus: int | None):
    """``sequential``, ``vectorized`` or ``ray:N`` (N actors sharing the ``cpus`` CPUs) -> a backend."""
    import torch

    if spec in ("sequential", "vectorized"):
        return make_backend(spec, torch.device("cpu"), chunk_targets=chunk_targets)
    if spec.startswith("ray:") and spec[4:].isdigit() and int(spec[4:]) >= 1:
        actors = int(spec[4:])
        return make_backend(
            "ray",
            torch.device("cpu"),
            cpus=cpus,
            ray_num_actors=actors,
            ray_cpus_per_actor=min(1.0, (cpus or 1) / actors),
        )
    raise ConfigError(f"sweep backend {spec!r}: use sequential, vectorized or ray:N (N actors)")


def round_from_start(config, model, initial: dict[str, Any], train_data, backend, **settings: Any):
    """Round 0 of a federated server built from ``initial`` (the model's state) and the run's seed, with
    ``settings`` replacing fields of the federated settings of ``config`` -> its ``RoundReport``. Every call
    starts from the same model and draws the same clients, so the rounds of a sweep differ only by
    ``settings`` or ``backend``."""
    from recbole_feddmmr.federated.trainer import FederatedTrainer

    model.load_state_dict(initial)
    init_seed(config["seed"], config["reproducibility"])
    trainer = FederatedTrainer(config, model)
    server = trainer.build_server(train_data, dataclasses.replace(trainer.federated, **settings), backend=backend)
    report = server.run_round(0)
    server.assemble_private_state()
    return report


def measure_round_sweep(
    dataset: str, overrides: dict[str, Any], backends: list[str], client_counts: list[int], chunk_targets: int | None
) -> dict[str, Any]:
    """Seconds of one round per backend and clients per round (0 = all), in one process from the same initial
    model and client sample. Each backend first runs one untimed round of the smallest count, so a Ray
    pool's start (actors, model replicas) is not billed to the first timed round."""
    from recbole_feddmmr.quick_start import prepare_run

    config, (train_data, _, _), model = prepare_run("UR4RecV2MoE", dataset, config_dict=overrides)
    initial = copy.deepcopy(model.state_dict())
    chunk_targets = chunk_targets or default_chunk_targets(config["device"])
    rows = []
    for spec in backends:
        backend = sweep_backend(spec, chunk_targets, os.cpu_count() or 1)
        for index, count in enumerate([min([c for c in client_counts if c] or [0]), *client_counts]):
            report = round_from_start(
                config, model, initial, train_data, backend, clients_per_round=count or None, client_fraction=1.0
            )
            if index:  # index 0 is the warm-up
                rows.append({"backend": spec, "clients": report.clients, "seconds": report.seconds})
                logging.getLogger(__name__).info(f"sweep: {spec}, {report.clients} clients: {report.seconds:.2f} s")
        if hasattr(backend, "shutdown"):
            backend.shutdown()
    return {"device": str(config["device"]), "cpus": os.cpu_count(), "rounds": rows}


def measure_settings_cost(
    dataset: str, overrides: dict[str, Any], labels: list[str], clients: int, rounds: int
) -> dict[str, Any]:
    """Seconds and bytes per round of each federated setting ``NAME[key=value,...]`` (NAME is only its label),
    sequential backend (the robust rules need each upload), ``clients`` per round: per setting one untimed
    warm-up round, then ``rounds`` timed rounds, each from the same initial model and client sample."""
    from recbole_feddmmr.quick_start import prepare_run

    rows = []
    for label in labels:
        _, settings = parse_run(label)
        config, (train_data, _, _), model = prepare_run(
            "UR4RecV2MoE", dataset, config_dict={**overrides, **settings, "clients_per_round": clients}
        )
        initial = copy.deepcopy(model.state_dict())
        backend = make_backend("sequential", config["device"])
        seconds, up, down = [], [], []
        for index in range(rounds + 1):  # index 0 is the warm-up
            report = round_from_start(config, model, initial, train_data, backend)
            if index:
                seconds.append(report.seconds)
                up.append(report.bytes_up)
                down.append(report.bytes_down)
        rows.append(
            {
                "label": label,
                "settings": settings,
                "clients": report.clients,
                "seconds_per_round": statistics.median(seconds),
                "bytes_up_per_round": statistics.median(up),
                "bytes_down_per_round": statistics.median(down),
            }
        )
        logging.getLogger(__name__).info(f"cost: {label}: {rows[-1]['seconds_per_round']:.2f} s per round")
    first = rows[0]
    for row in rows:
        row["x_seconds"] = row["seconds_per_round"] / first["seconds_per_round"]
        row["x_bytes_up"] = row["bytes_up_per_round"] / first["bytes_up_per_round"]
    return {"device": str(config["device"]), "clients": clients, "timed_rounds": rounds, "settings": rows}


def payoff(sweep: dict[str, Any], baseline: str = "vectorized") -> dict[str, Any]:
    """Per client count, each backend's seconds over the baseline's; and the smallest count from which a Ray
    pool is at least as fast as the baseline (None: at no measured count)."""
    seconds, counts = sweep_seconds(sweep)
    ratios = {
        count: {b: s / seconds[(baseline, count)] for (b, c), s in seconds.items() if c == count and b != baseline}
        for count in counts
        if (baseline, count) in seconds
    }
    ray_wins = [count for count, by in ratios.items() if any(b.startswith("ray") and r <= 1.0 for b, r in by.items())]
    return {"over_" + baseline: ratios, "ray_pays_off_from_clients": min(ray_wins) if ray_wins else None}


def _task(
    kind: str,
    label: str,
    dataset: str,
    overrides: dict[str, Any],
    chunk_targets: int | None,
    backends: tuple[str, ...] = BACKENDS,
    sampled_clients: int | None = 64,
):
    start_worker(None)
    if kind == "speed":
        speed = measure_speed(dataset, {**overrides, "federated": True}, chunk_targets, backends, sampled_clients)
        return kind, label, speed
    model, run_overrides = parse_run(label)
    return kind, label, {**run_model(model, dataset, {**overrides, **run_overrides}), "run_overrides": run_overrides}


def ratios(runs: list[dict[str, Any]], numerator: str, denominator: str) -> dict[str, float]:
    """Test NDCG@10 and HR@10 (full, uni100) of run ``numerator`` over run ``denominator``."""
    by_label = {run["label"]: run for run in runs}
    top, bottom = by_label[numerator], by_label[denominator]
    return {
        f"{split}_{metric}": top[split][metric] / bottom[split][metric]
        for split in ("test_full", "test_uni100")
        for metric in ("ndcg@10", "hit@10")
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser, argv = begin_command(MODULE, __doc__, argv)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS), help="MODEL[key=value,...] labels")
    parser.add_argument("--rounds", type=int, default=20, help="rounds of the federated runs")
    parser.add_argument("--sasrec_epochs", type=int, default=6, help="epochs of centralised runs")
    parser.add_argument("--stopping_step", type=int, default=5)
    parser.add_argument("--seed", type=int, default=2020)
    parser.add_argument("--jobs", type=int, default=1, help="tasks run side by side in this many processes")
    parser.add_argument("--no_speed", action="store_true", help="skip the epoch / round timing")
    parser.add_argument("--speed_only", action="store_true", help="only the epoch / round timing (no --runs)")
    parser.add_argument(
        "--backends",
        nargs="+",
        default=list(BACKENDS),
        metavar="BACKEND",
        help="backends the speed part times: sequential, vectorized, ray:N (N actors) or auto (what a run picks)",
    )
    parser.add_argument("--chunk_targets", type=int, default=None, help="vectorized backend chunk size")
    parser.add_argument(
        "--sampled_clients", type=int, default=64, help="the speed part also times a round of this many (0: no)"
    )
    parser.add_argument(
        "--sweep_backends",
        nargs="+",
        default=None,
        metavar="BACKEND",
        help="only time one round per backend (sequential, vectorized, ray:N) and --sweep_clients count",
    )
    parser.add_argument(
        "--sweep_clients", nargs="+", type=int, default=[16, 64, 256, 0], help="clients per round (0: all)"
    )
    parser.add_argument(
        "--interleaved",
        type=int,
        default=None,
        metavar="PARTS",
        help="only time an epoch and a full round of the first --backends, cut into PARTS parts run in turn",
    )
    parser.add_argument(
        "--compare_settings",
        nargs="+",
        default=None,
        metavar="NAME[key=value,...]",
        help="only time rounds of each federated setting (sequential backend, --sampled_clients per round); "
        "ratios against the first",
    )
    parser.add_argument("--compare_rounds", type=int, default=3, help="timed rounds per --compare_settings setting")
    parser.add_argument("--out", default="results/federated_benchmark.json")
    parser.add_argument("--report", metavar="JSON", help="only print the table of an existing results file")
    args, settings = parser.parse_known_args(argv)
    if args.report:
        report = read_results(args.report)
        print(format_results(report))
        return report

    overrides = command_settings(
        settings, rounds=args.rounds, epochs=args.sasrec_epochs, stopping_step=args.stopping_step, seed=args.seed
    )
    out = Path(args.out)
    federated = {**overrides, "federated": True}
    if args.interleaved:
        logging.basicConfig(level=logging.INFO)
        timing = interleaved_round_over_epoch(
            args.dataset, federated, args.backends[0], args.interleaved, args.chunk_targets
        )
        report = new_report("federated-interleaved", MODULE, argv, interleaved=timing)
        write_json(out, report)
        print(format_interleaved(timing) + provenance(report) + f"\nwrote {out}")
        return report
    if args.sweep_backends:
        logging.basicConfig(level=logging.INFO)
        sweep = measure_round_sweep(
            args.dataset, federated, args.sweep_backends, args.sweep_clients, args.chunk_targets
        )
        sweep["payoff"] = payoff(sweep)
        report = new_report("federated-sweep", MODULE, argv, sweep=sweep)
        write_json(out, report)
        print(format_sweep(sweep) + f"\n\nwrote {out}")
        return report
    if args.compare_settings:
        logging.basicConfig(level=logging.INFO)
        if args.sampled_clients < 1:
            parser.error("--compare_settings times rounds of --sampled_clients clients: give at least 1")
        cost = measure_settings_cost(
            args.dataset, federated, args.compare_settings, args.sampled_clients, args.compare_rounds
        )
        report = new_report("federated-settings-cost", MODULE, argv, cost=cost)
        write_json(out, report)
        print(format_settings_cost(cost) + provenance(report) + f"\nwrote {out}")
        return report
    if args.speed_only and args.no_speed:
        parser.error("--speed_only and --no_speed exclude each other")
    backends = tuple(dict.fromkeys(args.backends))  # in the given order, once each
    for name in backends:  # a misspelt backend fails here, not after the centralised epoch
        if name != "auto":
            sweep_backend(name, 256, os.cpu_count())
    report = new_report("federated-benchmark", MODULE, argv, dataset=args.dataset, overrides=overrides, runs=[])
    runs = [] if args.speed_only else args.runs
    # the first (longest) run first, so that side-by-side processes finish together
    tasks = [("run", label) for label in runs[:1]]
    tasks += [] if args.no_speed else [("speed", "speed")]
    tasks += [("run", label) for label in runs[1:]]
    pool_tasks = [
        (kind, label, args.dataset, overrides, args.chunk_targets, backends, args.sampled_clients)
        for kind, label in tasks
    ]
    for (_, label, *_), outcome, error in run_in_pool(_task, pool_tasks, args.jobs):
        if error is not None:  # written after each task: a cut-off run still reports what finished
            report.setdefault("failed", []).append({"task": label, "error": error})
        elif outcome[0] == "speed":
            report["speed"] = outcome[2]
        else:
            report["runs"].append({"label": label, **outcome[2]})
            report["runs"].sort(key=lambda run: args.runs.index(run["label"]))
        write_json(out, report)
    labels = [run["label"] for run in report["runs"]]
    federated_run, plain, central = (args.runs + [None] * 3)[:3]
    if federated_run in labels and central in labels:
        report[f"ratio {federated_run} / {central}"] = ratios(report["runs"], federated_run, central)
    if federated_run in labels and plain in labels:
        report[f"ratio {federated_run} / {plain}"] = ratios(report["runs"], federated_run, plain)
    write_json(out, report)
    print(format_federated_benchmark(report))
    return report


if __name__ == "__main__":
    sys.exit(1 if run_cli(main).get("failed") else 0)
