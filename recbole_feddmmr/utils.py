"""Model / trainer lookup (plugin first, then RecBole) and package paths."""

from __future__ import annotations

import importlib
from pathlib import Path

from recbole.utils import ModelType
from recbole.utils import get_model as recbole_get_model
from recbole.utils import get_trainer as recbole_get_trainer

from recbole_feddmmr.compat import with_trusted_checkpoints

PLUGIN_MODEL_MODULE = "recbole_feddmmr.model"
PLUGIN_TRAINER_MODULE = "recbole_feddmmr.trainer"


def properties_dir() -> Path:
    """The plugin's yaml folder: inside the installed package, or ``properties/`` of a source checkout."""
    package_dir = Path(__file__).resolve().parent
    for candidate in (package_dir / "properties", package_dir.parent / "properties"):
        if (candidate / "overall.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        f"recbole_feddmmr properties not found next to {package_dir}; reinstall with `bash scripts/install.sh`"
    )


def get_model(model_name: str) -> type:
    """The model class called ``model_name``: the plugin's if it has one, else RecBole's."""
    plugin_models = importlib.import_module(PLUGIN_MODEL_MODULE)
    if hasattr(plugin_models, model_name):
        return getattr(plugin_models, model_name)
    try:
        return recbole_get_model(model_name)
    except (ValueError, ImportError) as error:  # RecBole may fail importing an optional backend on the way
        raise ValueError(
            f"unknown model '{model_name}': not a recbole_feddmmr model ({', '.join(plugin_models.__all__)}) "
            f"and RecBole could not provide it ({error})"
        ) from error


def get_trainer(model_type: ModelType, model_name: str, federated: bool = False) -> type:
    """``<model_name>Trainer`` from the plugin if it exists, else RecBole's choice; with ``federated``
    the plugin's FederatedTrainer, for any model that trains through a window loss
    (``calculate_window_loss``, e.g. UR4RecV2MoE).

    Either way the class can reload RecBole checkpoints on torch >= 2.6.
    """
    if federated:
        if not hasattr(get_model(model_name), "calculate_window_loss"):
            raise ValueError(
                f"federated training needs a model with a window loss (calculate_window_loss), which {model_name} "
                "has not: use UR4RecV2MoE (a plain SASRec = UR4RecV2MoE with --feature_id_field=None)"
            )
        from recbole_feddmmr.federated.trainer import FederatedTrainer

        return FederatedTrainer
    plugin_trainers = importlib.import_module(PLUGIN_TRAINER_MODULE)
    trainer_class = getattr(plugin_trainers, f"{model_name}Trainer", None)
    if trainer_class is None:
        trainer_class = recbole_get_trainer(model_type, model_name)
    return with_trusted_checkpoints(trainer_class)
