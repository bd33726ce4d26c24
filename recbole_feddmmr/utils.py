"""Model / trainer lookup (plugin first, then RecBole) and package paths."""

from __future__ import annotations

import importlib
import os
import platform
import subprocess
from pathlib import Path

import torch
from recbole.utils import ModelType
from recbole.utils import get_model as recbole_get_model
from recbole.utils import get_trainer as recbole_get_trainer

from recbole_feddmmr.compat import keep_anomaly_mode
from recbole_feddmmr.errors import ConfigError, MissingFileError

PACKAGE_DIR = Path(__file__).resolve().parent
PLUGIN_MODEL_MODULE = "recbole_feddmmr.model"
PLUGIN_TRAINER_MODULE = "recbole_feddmmr.trainer"


def properties_dir() -> Path:
    """The plugin's yaml folder: inside the installed package, or ``properties/`` of a source checkout."""
    package_dir = Path(__file__).resolve().parent
    for candidate in (package_dir / "properties", package_dir.parent / "properties"):
        if (candidate / "overall.yaml").is_file():
            return candidate
    raise MissingFileError(
        f"recbole_feddmmr properties not found next to {package_dir}; reinstall with `bash scripts/install.sh`"
    )


def get_model(model_name: str) -> type:
    """The model class called ``model_name``: the plugin's if it has one, else RecBole's."""
    plugin_models = importlib.import_module(PLUGIN_MODEL_MODULE)
    if hasattr(plugin_models, model_name):
        return getattr(plugin_models, model_name)
    try:
        with keep_anomaly_mode():  # the lookup imports all of RecBole's models (see compat)
            return recbole_get_model(model_name)
    except (ValueError, ImportError) as error:
        # RecBole's lookup ends by importing its optional tree-model backends (lightgbm, xgboost), so an
        # unknown name surfaces as their ImportError: name the real cause unless a backend was asked for
        if isinstance(error, ImportError) and model_name.lower() in ("lightgbm", "xgboost"):
            raise ConfigError(f"RecBole's {model_name} needs the {model_name.lower()} package ({error})") from None
        raise ConfigError(
            f"unknown model '{model_name}': recbole_feddmmr has {', '.join(plugin_models.__all__)} and RecBole "
            "has no model of that name (see RecBole's model list; names are case-sensitive)"
        ) from None


def get_trainer(model_type: ModelType, model_name: str, federated: bool = False) -> type:
    """``<model_name>Trainer`` from the plugin if it exists, else RecBole's choice; with ``federated``
    the plugin's FederatedTrainer, for any model that trains through a window loss
    (``calculate_window_loss``, e.g. UR4RecV2MoE).

    Either way the class can reload RecBole checkpoints on torch >= 2.6, and a killed run that saves
    checkpoints resumes where it stopped when the same command runs again (:mod:`recbole_feddmmr.resumable`).
    """
    from recbole_feddmmr.resumable import with_resumable_fit  # resumable reads config, which imports this module

    if federated:
        if not hasattr(get_model(model_name), "calculate_window_loss"):
            raise ConfigError(
                f"federated training needs a model with a window loss (calculate_window_loss), which {model_name} "
                "has not: use UR4RecV2MoE (a plain SASRec = UR4RecV2MoE with --feature_id_field=None)"
            )
        from recbole_feddmmr.federated.trainer import FederatedTrainer

        return FederatedTrainer
    plugin_trainers = importlib.import_module(PLUGIN_TRAINER_MODULE)
    trainer_class = getattr(plugin_trainers, f"{model_name}Trainer", None)
    if trainer_class is None:
        trainer_class = recbole_get_trainer(model_type, model_name)
    return with_resumable_fit(trainer_class)


def usable_cpus() -> int:
    """CPU cores this process may run on (its affinity where the OS has one, e.g. a container's share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {torch.get_num_threads()} torch threads, {device}; torch {torch.__version__}"


def git_commit() -> str:
    """The short commit of the checkout this package runs from, with ``-dirty`` when tracked files differ from
    it (a figure then came from uncommitted code); ``unknown`` for an installed copy outside a checkout."""

    def git(*arguments: str) -> str:
        return subprocess.run(
            ["git", *arguments], capture_output=True, text=True, check=True, cwd=PACKAGE_DIR
        ).stdout.strip()

    try:
        # the checkout must be this project's: an installed copy can sit inside another repository (pyenv's)
        if Path(git("rev-parse", "--show-toplevel")).resolve() != PACKAGE_DIR.parent:
            return "unknown"
        commit, changes = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}-dirty" if changes else commit
