"""Seconds per training step of UR4RecV2MoE settings, in one process, with ratios against the first.

    python scripts/step_time.py --dataset ml-100k --threads 2 \
        --runs UR4RecV2MoE "UR4RecV2MoE[train_neg_num=300]" "UR4RecV2MoE[loss_type=CE]"

Each setting builds its model and the trainer's sequence windows, then runs ``--warmup`` and ``--steps``
optimizer steps of the plugin's training loop (window loss, memory writes) on the first batches of
epoch 0; it prints the median seconds per timed step, the epoch that implies (steps per epoch times
that median) and its ratio to the first setting's; ``--epoch`` times the whole of epoch 0 instead, and
``--epochs N`` times N whole epochs of each setting, interleaved (epoch e of every setting before epoch e + 1,
so the machine's drift falls on all of them alike), as the trainer runs them (its optimizer, the memory
filling up), and prints each setting's median epoch and its ratio to the first's. A probe
of what a setting costs before a converged run is spent on it, not a substitute for the benchmark's
measured epochs.
"""

from __future__ import annotations

import sys
from pathlib import Path

# the checkout this script belongs to, before any installed copy of the package (which may be older)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import itertools
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--runs", nargs="+", default=["UR4RecV2MoE"], help="MODEL[key=value,...] as in the benchmark")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument(
        "--epoch", action="store_true", help="time one whole epoch (every step and memory write) instead of a median"
    )
    parser.add_argument("--epochs", type=int, default=0, help="time this many whole epochs per setting, interleaved")
    args = parser.parse_args()
    import torch

    from recbole_feddmmr.experiments.runner import parse_run
    from recbole_feddmmr.quick_start import build_trainer, prepare_run
    from recbole_feddmmr.trainer import train_steps

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.epochs:
        interleaved_epochs(args.runs, args.dataset, args.epochs)
        return
    reference = None
    for run in args.runs:
        model_name, overrides = parse_run(run)
        settings = {"state": "ERROR", "show_progress": False, **overrides}
        config, (train_data, _, _), model = prepare_run(model_name, args.dataset, config_dict=settings)
        trainer = build_trainer(config, model)
        windows = trainer.sequence_windows(train_data)
        optimizer = torch.optim.Adam(model.parameters(), lr=config["learning_rate"])
        model.train()
        if args.epoch:  # the whole of epoch 0 (windows are built before the clock starts, as in training)
            batches = list(windows.epoch(0))
            started = time.perf_counter()
            train_steps(model, optimizer, batches, model.calculate_window_loss)
            epoch_seconds = time.perf_counter() - started
            reference = reference or epoch_seconds
            print(f"{run}: {epoch_seconds:.1f} s for epoch 0, x{epoch_seconds / reference:.2f} of {args.runs[0]}")
            continue
        seconds = []
        for batch in itertools.islice(windows.epoch(0), args.warmup + args.steps):
            started = time.perf_counter()
            train_steps(model, optimizer, [batch], model.calculate_window_loss)
            seconds.append(time.perf_counter() - started)
        per_step = statistics.median(seconds[args.warmup :])
        reference = reference or per_step
        print(
            f"{run}: {per_step:.3f} s per step (median of {len(seconds) - args.warmup}), "
            f"{len(windows)} steps per epoch -> {per_step * len(windows):.0f} s per epoch, "
            f"x{per_step / reference:.2f} of {args.runs[0]}",
            flush=True,
        )


def interleaved_epochs(runs: list[str], dataset: str, epochs: int) -> None:
    """Train every setting ``epochs`` whole epochs with its own trainer's optimizer, one epoch of each in turn;
    print every epoch's seconds, then each setting's median and its ratio to the first setting's median."""
    from recbole_feddmmr.experiments.runner import parse_run
    from recbole_feddmmr.quick_start import build_trainer, prepare_run
    from recbole_feddmmr.trainer import train_steps

    settings = []
    for run in runs:
        model_name, overrides = parse_run(run)
        config, (train_data, _, _), model = prepare_run(
            model_name, dataset, config_dict={"state": "ERROR", "show_progress": False, **overrides}
        )
        trainer = build_trainer(config, model)
        settings.append((run, model, trainer.optimizer, trainer.sequence_windows(train_data)))
    seconds: dict[str, list[float]] = {run: [] for run in runs}
    for epoch in range(epochs):
        for run, model, optimizer, windows in settings:
            model.train()
            batches = list(windows.epoch(epoch))  # built before the clock starts, as in training
            started = time.perf_counter()
            train_steps(model, optimizer, batches, model.calculate_window_loss)
            seconds[run].append(time.perf_counter() - started)
            print(f"epoch {epoch} {run}: {seconds[run][-1]:.1f} s", flush=True)
    reference = statistics.median(seconds[runs[0]])
    for run in runs:
        median = statistics.median(seconds[run])
        print(f"{run}: median {median:.1f} s per epoch over {epochs}, x{median / reference:.2f} of {runs[0]}")


if __name__ == "__main__":
    main()
