"""Every results file as a table: the formatters the experiments print with and the report command dispatches to.

Pure functions of a results file's JSON (a dict); they compute nothing but ratios of what the file holds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from recbole_feddmmr.experiments.comparison import train_samples_per_second
from recbole_feddmmr.experiments.runner import provenance

FEDERATED_SPEED_BACKENDS = ("sequential", "vectorized")


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
    """The federated / centralised accuracy summary of ``experiments.federated_study``."""
    return (
        f"federated test NDCG@10 {report['federated_test_ndcg10']:.4f} / centralised "
        f"{report['centralised_test_ndcg10']:.4f} = x{report['ratio']:.3f} "
        f"(federated run: {report['federated_wall_seconds']:.0f} s; seed {report.get('seed', 'not recorded')})"
        + provenance(report)
    )


def format_search(report: dict[str, Any]) -> str:
    """The best trial of a Tune search (``best.json``): its values, validation score and test metrics."""
    values = ", ".join(f"{name}={value:.4g}" for name, value in report["best_values"].items())
    test = report["rerun_test"]
    return (
        f"best of {report['trials']} trials: {values} -> valid NDCG@10 {report['best_trial_valid_ndcg@10']:.4f} "
        f"(rerun {report['rerun_valid_ndcg@10']:.4f}); test NDCG@10 {test['ndcg@10']:.4f}, HR@10 {test['hit@10']:.4f}"
        + provenance(report)
    )


def format_runs(report: dict[str, Any]) -> str:
    """A markdown table of the report (one row per run)."""
    lines = [
        f"| model | live experts | best epoch | {TEST_COLUMNS} | train samples/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in report["runs"]:
        experts = ", ".join(run["live_experts"]) if "live_experts" in run else "-"
        lines.append(
            f"| {run.get('label', run['model'])} | {experts} | {run['best_epoch']} of {run['epochs_trained']} | "
            f"{test_cells(run)} | {train_samples_per_second(run):.0f} |"
        )
    for run in report["runs"]:
        if run.get("memory_per_epoch"):
            epochs = run["memory_per_epoch"]
            best = epochs[min(run["best_epoch"], len(epochs) - 1)]
            write_rates = " ".join(f"{epoch['write_rate']:.2f}" for epoch in epochs)
            lines.append(
                f"\n{run.get('label', run['model'])} memory at the kept epoch: fill rate {best['fill_rate']:.3f}, "
                f"write rate {best['write_rate']:.3f}, mean surprise {best['mean_surprise']:.3f}; write rate by "
                f"epoch {write_rates}; memory reads + writes "
                f"{100 * run['memory_share_of_train_time']:.1f}% of training time"
            )
    for key, ratios in report.items():
        if key.startswith("ratios_vs_"):
            for model, values in ratios.items():
                full, uni100, throughput = (
                    "n/a (baseline 0)" if values[name] is None else f"x{values[name]:.{digits}f}"
                    for name, digits in (
                        ("test_full_ndcg@10", 3),
                        ("test_uni100_ndcg@10", 3),
                        ("train_samples_per_second", 2),
                    )
                )
                lines.append(
                    f"\n{model} / {key[len('ratios_vs_') :]}: test NDCG@10 {full} (full), {uni100} (uni100); "
                    f"training throughput {throughput}"
                )
    lines.append(provenance(report))
    return "\n".join(lines)


def sweep_seconds(sweep: dict[str, Any]) -> tuple[dict[tuple[str, int], float], list[int]]:
    """A sweep's rounds as {(backend, clients): seconds}, and its client counts in increasing order."""
    rounds = sweep["rounds"]
    return {(row["backend"], row["clients"]): row["seconds"] for row in rounds}, sorted({r["clients"] for r in rounds})


def format_sweep(sweep: dict[str, Any]) -> str:
    backends = list(dict.fromkeys(row["backend"] for row in sweep["rounds"]))
    seconds, counts = sweep_seconds(sweep)
    lines = [
        f"seconds per round on {sweep['device']} ({sweep['cpus']} CPUs):",
        "| clients per round | " + " | ".join(backends) + " |",
        "|---|" + "---|" * len(backends),
    ]
    for count in counts:
        cells = [f"{seconds[(b, count)]:.2f}" if (b, count) in seconds else "-" for b in backends]
        lines.append(f"| {count} | " + " | ".join(cells) + " |")
    found = sweep.get("payoff", {}).get("ray_pays_off_from_clients", "?")
    lines.append(f"\nRay at least as fast as vectorized from: {found if found is not None else 'no measured'} clients")
    return "\n".join(lines)


def format_settings_cost(cost: dict[str, Any]) -> str:
    """Seconds and MB (10^6 bytes) per round of each federated setting, with ratios to the first."""
    first = cost["settings"][0]["label"]
    lines = [
        f"per round of {cost['clients']} clients on {cost['device']}, sequential backend, median of "
        f"{cost['timed_rounds']} timed rounds from the same initial model; ratios against {first}:",
        "| setting | s per round | x seconds | MB up | x bytes up | MB down |",
        "|---|---|---|---|---|---|",
    ]
    for row in cost["settings"]:
        lines.append(
            f"| {row['label']} | {row['seconds_per_round']:.2f} | x{row['x_seconds']:.2f} | "
            f"{row['bytes_up_per_round'] / 1e6:.1f} | x{row['x_bytes_up']:.2f} | "
            f"{row['bytes_down_per_round'] / 1e6:.1f} |"
        )
    return "\n".join(lines)


def format_budget(budget: dict[str, Any]) -> str:
    """The privacy budget: epsilon per (noise multiplier, rounds), calibrated multiplier per (target, rounds)."""
    header = "| " + " | ".join(f"{count} rounds" for count in budget["rounds"]) + " |"
    rule = "|---|" + "---|" * len(budget["rounds"])
    lines = [
        f"{budget['users']} users, {budget['clients_per_round']} clients per round ({budget['sampling']} sampling), "
        f"delta {budget['delta']:.3g}; epsilon after each number of rounds:",
        "",
        "| noise multiplier " + header,
        rule,
    ]
    for row in budget["epsilon"]:
        lines.append(f"| {row['noise_multiplier']:g} | " + " | ".join(f"{e:.3g}" for e in row["epsilon"]) + " |")
    lines += ["", "The noise multiplier that spends the target epsilon in that many rounds:", ""]
    lines += ["| target epsilon " + header, rule]
    for row in budget["calibrated"]:
        cells = " | ".join(f"{z:.3f}" for z in row["noise_multiplier"])
        lines.append(f"| {row['target_epsilon']:g} | {cells} |")
    return "\n".join(lines)


def format_interleaved(timing: dict[str, Any]) -> str:
    parts = ", ".join(f"{seconds:.1f}" for seconds in timing["epoch_part_seconds"])
    return (
        f"interleaved on {timing['device']}: centralised epoch {timing['epoch_seconds']:.1f} s (parts: {parts}); "
        f"full round of {timing['clients']} clients with {timing['backend']} ({timing['backend_class']}) "
        f"{timing['round_seconds']:.1f} s: x{timing['round_over_epoch']:.2f} of the epoch"
    )


def epoch_seconds(speed: dict[str, Any]) -> str:
    """The centralised epoch's time as the ratios use it: the mean of the epochs timed before and after the rounds
    (older results files have the first only)."""
    if "centralised_epoch_seconds_after" not in speed:
        return f"{speed['centralised_epoch_seconds']:.1f} s"
    return (
        f"{speed['centralised_epoch_seconds_mean']:.1f} s (mean of {speed['centralised_epoch_seconds']:.1f} s before "
        f"the rounds and {speed['centralised_epoch_seconds_after']:.1f} s after)"
    )


def format_federated_benchmark(report: dict[str, Any]) -> str:
    lines = [
        "| run | best round/epoch | valid NDCG@10 | test HR@10 | test NDCG@10 | uni100 HR@10 | uni100 NDCG@10 "
        "| expert share (seq / vis / sem) | MB up+down per round |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    if not report["runs"]:  # --speed_only
        lines = []
    for run in report["runs"]:
        full, uni = run["test_full"], run["test_uni100"]
        share = run.get("expert_share")
        share_text = " / ".join(f"{value:.2f}" for value in share.values()) if share else "-"
        traffic = "-"
        if run.get("rounds"):
            traffic = f"{(run['bytes_up_total'] + run['bytes_down_total']) / len(run['rounds']) / 1e6:.0f}"
        lines.append(
            f"| {run.get('label', run['model'])} | {run['best_epoch']} of {run['epochs_trained']} "
            f"| {run['best_valid_ndcg@10']:.4f} "
            f"| {full['hit@10']:.4f} | {full['ndcg@10']:.4f} | {uni['hit@10']:.4f} | {uni['ndcg@10']:.4f} "
            f"| {share_text} | {traffic} |"
        )
    for key, values in report.items():
        if key.startswith("ratio "):
            text = ", ".join(f"{name} x{value:.3f}" for name, value in values.items())
            lines.append(f"\n{key[len('ratio ') :]}: {text}")
    speed = report.get("speed")
    if speed and set(speed["rounds"]) != set(FEDERATED_SPEED_BACKENDS):  # some backends only (--backends)
        rounds = ", ".join(
            f"{name} {values['seconds']:.1f} s (x{speed['round_over_epoch'][name]:.2f} of the epoch, "
            f"{values['clients']} clients, peak RSS {values['peak_rss_mb']:.0f} MB"
            + (f", CUDA peak {values['cuda_peak_mb']:.0f} MB)" if "cuda_peak_mb" in values else ")")
            for name, values in speed["rounds"].items()
        )
        cuda_peak = speed.get("centralised_cuda_peak_mb")
        lines.append(
            f"\nspeed on {speed.get('device', '?')}: centralised epoch {epoch_seconds(speed)}"
            + (f" (CUDA peak {cuda_peak:.0f} MB)" if cuda_peak is not None else "")
            + f"; full round: {rounds}"
        )
    elif speed:
        rounds = speed["rounds"]
        lines.append(
            f"\nspeed: centralised epoch {epoch_seconds(speed)}; full round of "
            f"{rounds['sequential']['clients']} clients: sequential {rounds['sequential']['seconds']:.1f} s "
            f"(x{speed['round_over_epoch']['sequential']:.2f} of the epoch), vectorized "
            f"{rounds['vectorized']['seconds']:.1f} s (x{speed['round_over_epoch']['vectorized']:.2f}); "
            f"vectorized / sequential x{speed['vectorized_over_sequential']:.2f}; peak RSS "
            f"{speed['centralised_peak_rss_mb']:.0f} / {rounds['sequential']['peak_rss_mb']:.0f} / "
            f"{rounds['vectorized']['peak_rss_mb']:.0f} MB after the epoch / sequential / vectorized round; "
            f"bytes per round {rounds['sequential']['bytes_up'] / 1e6:.0f} MB up, "
            f"{rounds['sequential']['bytes_down'] / 1e6:.0f} MB down"
        )
    sampled = (speed or {}).get("sampled_round")
    if sampled:
        lines.append(
            f"\nsampled round: {sampled['clients']} clients ({sampled['backend']}) {sampled['seconds']:.1f} s, "
            f"x{speed['sampled_over_full']:.3f} of the full round for x{speed['sampled_clients_over_all']:.3f} "
            f"of its clients; peak RSS {sampled['peak_rss_mb']:.0f} MB"
        )
    for failure in report.get("failed", []):
        lines.append(f"\nFAILED {failure['task']}: {failure['error'].strip().splitlines()[-1]}")
    lines.append(provenance(report))
    return "\n".join(lines)


def format_scale(report: dict[str, Any]) -> str:
    lines = [
        "| users (clients) | clients per round | s per round | x | RSS before round MB | round peak RSS MB | x "
        "| round growth MB | x |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base = report["populations"][0]
    for row in report["populations"]:
        lines.append(
            f"| {row['users']:,} ({row['clients']:,}) | {row['clients_per_round']} | {row['seconds_per_round']:.2f} "
            f"| x{row['seconds_per_round'] / base['seconds_per_round']:.2f} | {row['rss_before_round_mb']:.0f} "
            f"| {row['round_peak_rss_mb']:.0f} | x{row['round_peak_rss_mb'] / base['round_peak_rss_mb']:.2f} "
            f"| {row['round_peak_growth_mb']:.0f} "
            f"| x{row['round_peak_growth_mb'] / max(base['round_peak_growth_mb'], 1.0):.2f} |"
        )
    lines.append(provenance(report))
    return "\n".join(lines)


def format_flower_cost(report: dict[str, Any]) -> str:
    """The in-house sequential backend against Flower's simulation: seconds per round, wall time, test NDCG@10."""
    lines = [
        f"{report['dataset']}, {report['supernodes']} SuperNodes:",
        "",
        "| run | rounds | seconds per round | wall seconds | best round | validations | test NDCG@10 |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, run in report["runs"].items():
        valid = run.get("valid_scores", {})  # round -> score (JSON keys are strings); older reports lack them
        validations = ", ".join(f"{float(score):.4f} ({round_idx})" for round_idx, score in valid.items()) or "-"
        lines.append(
            f"| {label} | {len(run['round_seconds'])} | {run['mean_round_seconds']:.3f} | {run['wall_seconds']:.0f} | "
            f"{run['best_round']} | {validations} | {run['test_result']['ndcg@10']:.4f} |"
        )
    lines += ["", f"Flower / in-house seconds per round: x{report['round_time_ratio']:.2f}"]
    if "final_parameters_max_abs_difference" in report:  # reports before this field lack it
        lines.append(
            f"final global parameters, largest difference: {report['final_parameters_max_abs_difference']:.3g}"
        )
    bounds = report["runs"]["flower simulation"].get("secagg_error_bounds")
    if bounds:
        lines.append(f"SecAgg+ quantisation bound of round 0: {bounds[0]:.3g}")
    return "\n".join(lines)


def format_flower_run(run: dict[str, Any]) -> str:
    """One Flower run: its federation, best round and the validation and test metrics of that round."""
    valid, test = run["best_valid_result"], run["test_result"]
    names = [name for name in test if name != "users"]
    lines = [
        f"{run['settings']['model']} on {run['settings']['dataset']}: {run['clients']} clients on {run['supernodes']} "
        f"SuperNodes, {len(run['rounds'])} rounds in {run['seconds']:.0f} s, best round {run['best_round']}",
        "",
        "| metric | valid | test |",
        "|---|---|---|",
        *(f"| {name} | {valid.get(name, float('nan')):.4f} | {test[name]:.4f} |" for name in names),
    ]
    return "\n".join(lines)
