"""Entry points: one training + evaluation run, and loading a trained model back.

Deliberately free of ``ray`` (``recbole.quick_start`` imports it at import time),
so a training run needs no Ray installation. Both public functions install the RecBole compatibility
patches (:func:`recbole_feddmmr.compat.install`) and the plugin's training modes (the federated rounds)
before anything else.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from recbole.data import create_dataset, data_preparation
from recbole.utils import init_logger, init_seed

from recbole_feddmmr import compat
from recbole_feddmmr import federated as _federated  # noqa: F401  (registers the federated training mode)
from recbole_feddmmr.checkpoints import read_checkpoint
from recbole_feddmmr.config import Config
from recbole_feddmmr.datasets import check_atomic_files, check_item_features, ensure_dataset
from recbole_feddmmr.errors import CheckpointError, ConfigError
from recbole_feddmmr.provenance import git_commit
from recbole_feddmmr.registry import get_model, get_trainer


def prepare_run(
    model: str | None = None,
    dataset: str | None = None,
    config_file_list: list[str] | None = None,
    config_dict: dict[str, Any] | None = None,
    cmd_args: list[str] | None = None,
):
    """Config, datasets and model of one run -> (config, (train, valid, test), model)."""
    compat.install()
    config = Config(model, dataset, config_file_list, config_dict, cmd_args)
    init_seed(config["seed"], config["reproducibility"])
    # RecBole's init_logger creates log/<model>/ by check-then-create, which runs started side by side (the
    # benchmarks' process pools) can race into a FileExistsError; exist_ok makes the creation race-free
    os.makedirs(os.path.join("log", config["model"]), exist_ok=True)
    init_logger(config)
    logger = logging.getLogger()
    logger.info(" ".join(sys.orig_argv))
    for warning in config.setting_warnings:
        logger.warning(warning)
    logger.info(config)
    ensure_dataset(config["dataset"], config["data_path"], show_progress=config["show_progress"])
    check_item_features(config, check_atomic_files(config))
    full_dataset = create_dataset(config)
    logger.info(full_dataset)
    check_topk(config, full_dataset)
    splits, model_instance = splits_and_model(config, full_dataset)
    logger.info(model_instance)
    return config, splits, model_instance.to(config["device"])


def splits_and_model(config, dataset) -> tuple[tuple, Any]:
    """RecBole's train / valid / test dataloaders of ``dataset`` and a fresh model (on the CPU), seeded as a
    run seeds them: what :func:`prepare_run` trains and :func:`load_checkpoint` fills."""
    splits = data_preparation(config, dataset)
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    return splits, get_model(config["model"])(config, splits[0]._dataset)


def build_trainer(config, model):
    """The trainer of this run's model and mode (``federated: True`` trains by rounds)."""
    mode = "federated" if config["federated"] else None
    return get_trainer(config["MODEL_TYPE"], config["model"], mode)(config, model)


def check_topk(config, dataset) -> None:
    """Refuse a ``topk`` longer than the ranking it cuts, before any training (RecBole would fail after the
    first epoch)."""
    candidates = dataset.item_num - 1  # internal id 0 is padding
    modes = config["eval_args"]["mode"]  # "full", "uni100", or RecBole's {"valid": ..., "test": ...}
    for mode in modes.values() if isinstance(modes, dict) else [modes]:
        if mode != "full":  # uniN / popN: the target and N sampled negatives
            candidates = min(candidates, 1 + int(mode.removeprefix("uni").removeprefix("pop")))
    if max(config["topk"]) > candidates:
        raise ConfigError(
            f"topk={config['topk']} asks for {max(config['topk'])} items, but {config['dataset']} ranks "
            f"{candidates} candidates: lower topk"
        )


def log_file() -> Path | None:
    """The log file RecBole's ``init_logger`` opened for this run."""
    handlers = [handler for handler in logging.getLogger().handlers if isinstance(handler, logging.FileHandler)]
    return Path(handlers[-1].baseFilename) if handlers else None


def format_summary(result: dict[str, Any]) -> str:
    """The end-of-run table: validation and test metrics side by side, then where the run wrote."""
    valid, test = result["best_valid_result"] or {}, result["test_result"] or {}
    lines = [
        f"{result['model']} on {result['dataset']}: best epoch {result['best_epoch']} "
        f"(valid {result['valid_metric']} {result['best_valid_score']:.4f}), {result['seconds']:.0f} s",
        f"{'metric':<10} {'valid':>8} {'test':>8}",
    ]
    lines += [f"{name:<10} {valid.get(name, float('nan')):>8.4f} {test[name]:>8.4f}" for name in test]
    for label in ("checkpoint", "log", "tensorboard", "results"):
        if result.get(label):
            lines.append(f"{label + ':':<12} {result[label]}")
    return "\n".join(lines)


def run_recbole_feddmmr(
    model: str | None = None,
    dataset: str | None = None,
    config_file_list: list[str] | None = None,
    config_dict: dict[str, Any] | None = None,
    saved: bool = True,
    cmd_args: list[str] | None = None,
) -> dict[str, Any]:
    """Train with early stopping on validation, then evaluate the best checkpoint on test.

    Settings, lowest priority first: the plugin's yaml files, ``config_file_list``, ``config_dict``, then
    ``cmd_args`` (``--key=value`` items, as on the command line).
    """
    config, (train_data, valid_data, test_data), model_instance = prepare_run(
        model, dataset, config_file_list, config_dict, cmd_args
    )
    started = time.perf_counter()
    trainer = build_trainer(config, model_instance)
    best_valid_score, best_valid_result = trainer.fit(
        train_data, valid_data, saved=saved, show_progress=config["show_progress"]
    )
    test_result = trainer.evaluate(test_data, load_best_model=saved, show_progress=config["show_progress"])
    log_path = log_file()
    result = {
        "model": config["model"],
        "dataset": config["dataset"],
        "federated": bool(config["federated"]),
        "best_epoch": getattr(trainer, "best_epoch", None),
        "valid_metric": config["valid_metric"].lower(),
        "best_valid_score": float(best_valid_score),
        "valid_score_bigger": config["valid_metric_bigger"],
        "best_valid_result": as_floats(best_valid_result),
        "test_result": as_floats(test_result),
        "seconds": round(time.perf_counter() - started, 1),
        "commit": git_commit(),
        "checkpoint": os.path.abspath(trainer.saved_model_file) if saved else None,
        "log": str(log_path) if log_path else None,
        "tensorboard": getattr(trainer.tensorboard, "log_dir", None),
    }
    if log_path is not None:  # next to the log, one per run: <log name>.results.json
        result["results"] = str(log_path.with_suffix(".results.json"))
        record = {**result, "config": dict(config.final_config_dict)}
        Path(result["results"]).write_text(json.dumps(record, indent=1, default=str))
    logging.getLogger().info("\n" + format_summary(result))
    return result


def as_floats(metrics: dict | None) -> dict[str, float] | None:
    """RecBole's metric OrderedDict of numpy floats -> plain floats (printable, JSON-able)."""
    return None if metrics is None else {name: float(value) for name, value in metrics.items()}


def load_checkpoint(path: str | Path, device: str | None = None) -> tuple:
    """A checkpoint this plugin wrote (UR4RecV2MoE, a federated run, or a RecBole model run through the
    plugin) -> ``(config, model, dataset, train_data, valid_data, test_data)``, the model in eval mode.

    The dataset and its splits are rebuilt from the checkpoint's own configuration (same seed, same
    split), the model is rebuilt and its weights and memory loaded; ``device`` (default: the checkpoint's,
    or the CPU where it is not available) is where the model goes.
    """
    import torch

    compat.install()
    state = read_checkpoint(path)
    config = state.get("config")
    if not isinstance(config, Config) or "state_dict" not in state:
        raise CheckpointError(f"{path} is not a model checkpoint of recbole_feddmmr (no config or weights)")
    config.compatibility_settings()  # numpy aliases RecBole's dataset code reads (set when a Config is built)
    if device is not None:
        config["device"] = torch.device(device)
    elif config["device"].type == "cuda" and not torch.cuda.is_available():
        config["device"] = torch.device("cpu")
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    (train_data, valid_data, test_data), model = splits_and_model(config, dataset)
    try:
        model.load_state_dict(state["state_dict"])
    except RuntimeError as error:
        first = str(error).splitlines()[1].strip() if len(str(error).splitlines()) > 1 else str(error)
        raise CheckpointError(f"{path} does not fit {config['model']} on {config['dataset']}: {first}") from None
    model.load_other_parameter(state.get("other_parameter"))
    return config, model.to(config["device"]).eval(), dataset, train_data, valid_data, test_data
