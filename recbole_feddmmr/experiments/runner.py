"""What every experiment shares: run labels, the command's settings, one run measured end to end, a process
pool of runs, atomic results files and their provenance.

* A run is a label ``MODEL`` or ``MODEL[key=value,...]`` (:func:`parse_run`); the label's settings win over
  the command's.
* A command's settings are ``--key=value`` items, read as the main command reads them
  (:func:`recbole_feddmmr.config.parse_overrides`).
* :func:`run_model` trains a run with early stopping on validation and evaluates its best checkpoint on
  test (full ranking, uni100, the cold-item slice) with its costs; :func:`run_in_pool` runs many in fresh
  processes side by side.
* A results file is written whole or not at all (:func:`write_json`) and opens with its kind, its command,
  commit and machine (:func:`new_report`).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import re
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from recbole_feddmmr import compat
from recbole_feddmmr.atomic_write import replaced_when_whole
from recbole_feddmmr.config import parse_overrides, setting_value
from recbole_feddmmr.errors import ConfigError
from recbole_feddmmr.provenance import git_commit, machine_description, peak_rss_mb, usable_cpus

NOT_RECORDED = "not recorded"
COLD_MAX_TRAIN_INTERACTIONS = 5  # the benchmark's cold slice: targets with at most this many training interactions


# ---------------------------------------------------------------- commands, runs and settings
def begin_command(module: str, doc: str | None, argv: list[str] | None) -> tuple[argparse.ArgumentParser, list[str]]:
    """An experiment command's start: RecBole's compatibility patches installed, its argument parser (named
    ``python -m MODULE``, the module's docstring as help) and its arguments (``sys.argv`` unless given)."""
    compat.install()
    parser = argparse.ArgumentParser(
        prog=f"python -m {module}", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    return parser, list(sys.argv[1:] if argv is None else argv)


def parse_run(spec: str) -> tuple[str, dict[str, Any]]:
    """``"MODEL[key=value,...]"`` -> (MODEL, {key: value}), values as on the command line; a plain ``"MODEL"``
    has no settings of its own."""
    match = re.fullmatch(r"([\w-]+)(?:\[(.*)\])?", spec.strip())
    if not match:
        raise ConfigError(f"run '{spec}' is not MODEL or MODEL[key=value,...]")
    model, body = match.groups()
    overrides = {}
    for item in filter(None, (body or "").split(",")):
        if "=" not in item:
            raise ConfigError(f"run '{spec}': '{item}' is not key=value")
        key, value = item.split("=", 1)
        overrides[key.strip()] = setting_value(value)
    return model, overrides


def command_settings(arguments: list[str], **base: Any) -> dict[str, Any]:
    """An experiment's settings for every run: ``base`` (its own flags, e.g. epochs), quiet progress, then the
    command's ``--key=value`` items, which win."""
    return {**base, "show_progress": False, "state": "INFO", **parse_overrides(arguments)}


# ---------------------------------------------------------------- one run, measured


def run_model(
    model: str, dataset: str, overrides: dict[str, Any], cold_max: int = COLD_MAX_TRAIN_INTERACTIONS
) -> dict[str, Any]:
    """Train ``model`` with early stopping, evaluate its best checkpoint on test (full, uni100, and the cold
    slice: the test users whose target has at most ``cold_max`` training interactions) -> its metrics,
    validation curve, costs and, for UR4RecV2MoE, the router's expert shares."""
    import torch
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import init_seed

    from recbole_feddmmr.config import Config
    from recbole_feddmmr.quick_start import build_trainer, prepare_run

    config, (train_data, valid_data, test_data), model_instance = prepare_run(model, dataset, config_dict=overrides)
    trainer = build_trainer(config, model_instance)
    # the validation curve as (epoch or round, validation NDCG@10, seconds of fit until then); kept in the
    # trainer's records so that a killed run resumed by the same command keeps what its earlier processes saw
    trainer.run_records["curve"] = []
    on_cuda = config["device"].type == "cuda"
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()

    def record_validation(epoch_idx: int, valid_score: float) -> None:
        trainer.run_records["curve"].append((int(epoch_idx), float(valid_score), trainer.fit_elapsed()))

    best_valid_score, best_valid = trainer.fit(
        train_data, valid_data, saved=True, show_progress=False, callback_fn=record_validation
    )
    fit_seconds = trainer.fit_elapsed()  # training and validation, as a user waits for them
    records = trainer.run_records
    epoch_seconds, curve = records.get("epoch_seconds", []), records["curve"]
    test_full = trainer.evaluate(test_data, load_best_model=True)
    cold = cold_item_slice(config, train_data, test_data, cold_max)
    test_cold = trainer.evaluate(cold, load_best_model=False) if cold is not None else {}

    uni_overrides = dict(overrides, eval_args=dict(config["eval_args"], mode={"valid": "full", "test": "uni100"}))
    uni_config = Config(model=model, dataset=dataset, config_dict=uni_overrides)
    init_seed(uni_config["seed"], uni_config["reproducibility"])
    _, _, test_uni = data_preparation(uni_config, create_dataset(uni_config))
    test_uni100 = trainer.evaluate(test_uni, load_best_model=True)

    samples = len(train_data._dataset.inter_feat)
    rounds = [vars(report).copy() for report in getattr(trainer, "round_reports", [])]
    trained_samples = samples * len(epoch_seconds)
    if rounds:  # federated: a round plays the part of an epoch, and trains only its sampled clients' targets
        epoch_seconds = [report["seconds"] for report in rounds]
        trained_samples = sum(report["samples"] for report in rounds)
    result = {
        "model": model,
        "epochs_trained": len(epoch_seconds),
        "best_epoch": trainer.best_epoch,  # the epoch of the checkpoint just evaluated
        "best_valid_ndcg@10": float(best_valid_score),
        "valid_full": {k: float(v) for k, v in best_valid.items()},
        "test_full": {k: float(v) for k, v in test_full.items()},
        "test_uni100": {k: float(v) for k, v in test_uni100.items()},
        "train_samples_per_epoch": samples,
        "train_seconds": sum(epoch_seconds),
        "fit_seconds": fit_seconds,
        "train_samples_per_second": trained_samples / max(sum(epoch_seconds), 1e-9),
        "checkpoint": trainer.saved_model_file,
        "parameters": sum(p.numel() for p in model_instance.parameters() if p.requires_grad),
        # until the best epoch's validation ended: what early stopping on validation needed to find it
        "seconds_to_best": next((s for epoch, _, s in curve if epoch == trainer.best_epoch), fit_seconds),
        "valid_curve": [[epoch, score] for epoch, score, _ in curve],
        "peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if on_cuda else peak_rss_mb(),
        "peak_memory_kind": "CUDA allocated" if on_cuda else "process RSS",
        "test_cold": {k: float(v) for k, v in test_cold.items()},
        "cold_users": 0 if cold is None else len(cold._dataset),
    }
    if hasattr(model_instance, "live_experts"):
        result["live_experts"] = model_instance.live_experts
        result["expert_share"] = expert_share(model_instance, test_data, config["device"])
    attack = getattr(trainer, "attack", None)
    # the attack's success: its targets' exposure among the clean users (also with no attacker, as the reference)
    if attack is not None and attack.targets:
        result["attack"] = {"kind": attack.kind, "fraction": attack.fraction, "targets": list(attack.targets)}
        result["target_exposure@10"] = target_exposure(
            model_instance, test_data, torch.tensor(attack.targets), trainer.attack_users, config["device"]
        )
    if rounds:
        result["rounds"] = rounds
        result["bytes_up_total"] = sum(report["bytes_up"] for report in rounds)
        result["bytes_down_total"] = sum(report["bytes_down"] for report in rounds)
    elif records.get("memory_epochs"):
        result["memory_per_epoch"] = records["memory_epochs"]
        memory_seconds = sum(epoch["seconds"] for epoch in records["memory_epochs"])
        result["memory_share_of_train_time"] = memory_seconds / max(sum(epoch_seconds), 1e-9)
    if len(trainer.segments) > 1:  # resumed: where each process took over, with its commit and machine
        result["segments"] = trainer.segments
    return result


def target_exposure(model, eval_data, targets, excluded_users, device, k: int = 10) -> float:
    """ER@k: the share of ``eval_data``'s users, but ``excluded_users`` (e.g. the attackers'), whose top ``k`` of
    the whole catalogue (the padding item left out) holds one of ``targets`` [T]."""
    import torch

    from recbole_feddmmr.federated.attacks import exposure_at_k

    model.eval()
    tops, clean = [], []
    with torch.no_grad():
        for batch in eval_data:
            interaction = batch[0].to(device)
            scores = model.full_sort_predict(interaction).view(len(interaction), -1)  # [B, n_items]
            scores[:, 0] = float("-inf")
            tops.append(scores.topk(k, dim=1).indices.cpu())
            clean.append(~torch.isin(interaction[model.USER_ID].cpu(), excluded_users))
    return exposure_at_k(torch.cat(tops), targets, torch.cat(clean))


def item_train_counts(train_data):
    """Training interactions of every item [n_items]: each training target once, plus each user's first item
    (the only interaction of the training split that is never a target)."""
    import torch

    feat, dataset = train_data._dataset.inter_feat, train_data._dataset
    targets = feat[dataset.iid_field]
    first = feat[dataset.item_id_list_field][feat[dataset.item_list_length_field] == 1, 0]
    return torch.bincount(torch.cat([targets, first]), minlength=dataset.item_num)


def cold_item_slice(config, train_data, test_data, max_count: int = COLD_MAX_TRAIN_INTERACTIONS):
    """The test users whose target item has at most ``max_count`` training interactions, as a full-ranking
    dataloader for RecBole's evaluator (``None`` when there is no such user). The case the content experts
    exist for: an item the ID embedding has barely seen."""
    from recbole.data.dataloader import FullSortEvalDataLoader
    from recbole.utils import ModelType

    dataset = test_data._dataset
    if not isinstance(test_data, FullSortEvalDataLoader) or config["MODEL_TYPE"] != ModelType.SEQUENTIAL:
        return None  # training targets are counted from the sequential split's augmented samples
    counts = item_train_counts(train_data)
    cold = counts[dataset.inter_feat[dataset.iid_field]] <= max_count  # [test users]
    if not bool(cold.any()):
        return None
    return FullSortEvalDataLoader(config, dataset.copy(dataset.inter_feat[cold]), test_data._sampler, shuffle=False)


def expert_share(model, eval_data, device) -> dict[str, float]:
    """The router's mean weight per expert over every (user, item) pair of ``eval_data``'s users
    (all items but the padding item), with the model as it is (e.g. the best checkpoint)."""
    import torch

    from recbole_feddmmr.model.ur4rec_v2_moe import EXPERTS

    model.eval()
    total, pairs = torch.zeros(len(EXPERTS), dtype=torch.float64), 0
    with torch.no_grad():
        for batch in eval_data:
            weights = model.router_weights_for(batch[0].to(device))[:, 1:]  # [B, n_items - 1, X]
            total += weights.sum(dim=(0, 1)).double().cpu()
            pairs += weights.shape[0] * weights.shape[1]
    return dict(zip(EXPERTS, (total / max(pairs, 1)).tolist(), strict=True))


# ---------------------------------------------------------------- many runs side by side
def threads_per_job(jobs: int) -> int | None:
    """Torch threads of each of ``jobs`` runs side by side: the cores split between them (with every run taking
    all cores, their threads oversubscribe the machine and wait on each other); ``None`` (torch's default)
    for one job or when ``OMP_NUM_THREADS`` says otherwise."""
    return None if "OMP_NUM_THREADS" in os.environ or jobs <= 1 else max(1, usable_cpus() // jobs)


def start_worker(threads: int | None) -> None:
    """A spawned worker's start: INFO logs, and ``threads`` torch threads."""
    import torch

    logging.basicConfig(level=logging.INFO)
    if threads:
        torch.set_num_threads(threads)


def run_in_pool(
    function: Callable[..., Any], tasks: Iterable[tuple], jobs: int = 1
) -> Iterator[tuple[tuple, Any, str | None]]:
    """``function(*task)`` for every task, ``jobs`` side by side, each in a fresh process (spawned: no torch
    state shared by fork; each run's peak memory is its own) -> (task, result, None) or (task, None,
    traceback) as they finish: one failed task never takes the others with it."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=context, max_tasks_per_child=1) as pool:
        futures = {pool.submit(function, *task): task for task in tasks}
        for future in as_completed(futures):
            task = futures[future]
            try:
                yield task, future.result(), None
            except Exception:
                yield task, None, traceback.format_exc()


# ---------------------------------------------------------------- results files
def write_json(path: str | Path, data: Any) -> Path:
    """``data`` as JSON at ``path``, written to a temporary name and renamed: a results file is whole or absent."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replaced_when_whole(path) as partial:
        partial.write_text(json.dumps(data, indent=1, default=str))
    return path


def new_report(kind: str, module: str, argv: list[str] | None, **fields: Any) -> dict[str, Any]:
    """A results file's opening: its kind (what :mod:`recbole_feddmmr.experiments.report` prints it as), the
    exact command (``python -m MODULE ARGS``), the commit and the machine."""
    arguments = " ".join(sys.argv[1:] if argv is None else argv)
    return {
        "kind": kind,
        "command": f"python -m {module} {arguments}".rstrip(),
        "commit": git_commit(),
        "machine": machine_description(),
        "written": time.strftime("%Y-%m-%d %H:%M:%S"),
    } | fields


def provenance(report: dict[str, Any]) -> str:
    """The line under every table: the command, commit and machine a results file records."""
    return (
        f"\ncommand: `{report.get('command') or NOT_RECORDED}`; commit {report.get('commit') or NOT_RECORDED}; "
        f"machine: {report.get('machine') or NOT_RECORDED}"
    )
