"""Where a centralised training step's time goes: torch's profiler over a few steps of each setting, the
operators with the most self CPU time as a table, side by side in one process.

    OMP_NUM_THREADS=1 python scripts/profile_step.py --dataset ml-100k --threads 1 \\
        --runs "UR4RecV2MoE[feature_id_field=null]" UR4RecV2MoE --out results/profile_step.md

Each setting builds its model and the trainer's sequence windows, runs ``--warmup`` steps of the plugin's
training loop (window loss, optimizer step, memory writes) unprofiled, then profiles ``--steps`` more. An
operator's row sums all its calls, forward and backward (autograd runs backward ops under the same names),
with the input shapes of its costliest call (``[P, N]``: prediction points x catalogue). The profiler's own
overhead inflates small ops: the wall-clock ratio is scripts/step_time.py's.
"""

from __future__ import annotations

import sys
from pathlib import Path

# the checkout this script belongs to, before any installed copy of the package (which may be older)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import itertools


def profile_table(run: str, dataset: str, warmup: int, steps: int, top: int) -> tuple[float, list[str]]:
    """-> (profiled self CPU seconds per step, markdown rows of the ``top`` operator/shape pairs)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from recbole_feddmmr.experiments.runner import parse_run
    from recbole_feddmmr.quick_start import build_trainer, prepare_run
    from recbole_feddmmr.trainer import train_steps

    model_name, overrides = parse_run(run)
    config, (train_data, _, _), model = prepare_run(
        model_name, dataset, config_dict={"state": "ERROR", "show_progress": False, **overrides}
    )
    windows = build_trainer(config, model).sequence_windows(train_data)
    optimizer = torch.optim.Adam(model.parameters(), lr=config["learning_rate"])
    model.train()
    batches = list(itertools.islice(windows.epoch(0), warmup + steps))
    train_steps(model, optimizer, batches[:warmup], model.calculate_window_loss)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as profiler:
        train_steps(model, optimizer, batches[warmup:], model.calculate_window_loss)
    by_shape = profiler.key_averages(group_by_input_shape=True)
    costliest = {}  # operator -> input shapes of its costliest (operator, shapes) group
    for event in sorted(by_shape, key=lambda event: event.self_cpu_time_total):
        costliest[event.key] = ", ".join(str(shape) for shape in event.input_shapes if shape)[:60]
    events = profiler.key_averages()
    total = sum(event.self_cpu_time_total for event in events) / 1e6  # seconds
    rows = []
    for event in sorted(events, key=lambda event: -event.self_cpu_time_total)[:top]:
        seconds = event.self_cpu_time_total / 1e6
        rows.append(
            f"| {event.key} | {costliest.get(event.key, '')} | {event.count} | {1000 * seconds / steps:.1f} "
            f"| {seconds / total:.0%} |"
        )
    return total / steps, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--runs", nargs="+", default=["UR4RecV2MoE"], help="MODEL[key=value,...] as in the benchmark")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--top", type=int, default=12, help="operator rows per setting")
    parser.add_argument("--out", default=None, help="also write the tables (markdown) here")
    args = parser.parse_args()
    import torch

    from recbole_feddmmr.provenance import git_commit, machine_description

    if args.threads:
        torch.set_num_threads(args.threads)
    lines = [
        f"Profiled steps of `{' '.join(sys.argv[1:])}` on {args.dataset}; commit {git_commit()}; "
        f"{machine_description()}.",
        "",
    ]
    for run in args.runs:
        per_step, rows = profile_table(run, args.dataset, args.warmup, args.steps, args.top)
        lines += [
            f"### {run}: {1000 * per_step:.0f} ms self CPU per profiled step",
            "",
            "| operator | input shapes (costliest call) | calls | ms per step | share |",
            "|---|---|---|---|---|",
            *rows,
            "",
        ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
