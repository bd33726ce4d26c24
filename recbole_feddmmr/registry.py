"""Model and trainer lookup: the plugin's first, then RecBole's, so baselines run through the same entry point.

Training modes other than RecBole's epochs (the federated rounds) register their trainer here
(:func:`register_mode`); this module imports no mode.
"""

from __future__ import annotations

import importlib

from recbole.utils import ModelType
from recbole.utils import get_model as recbole_get_model
from recbole.utils import get_trainer as recbole_get_trainer

from recbole_feddmmr.compat import keep_anomaly_mode
from recbole_feddmmr.errors import ConfigError
from recbole_feddmmr.resumable import with_resumable_fit

PLUGIN_MODEL_MODULE = "recbole_feddmmr.model"
PLUGIN_TRAINER_MODULE = "recbole_feddmmr.trainer"
_MODE_TRAINERS: dict[str, type] = {}


def register_mode(mode: str, trainer_class: type) -> None:
    """Make ``get_trainer(..., mode=mode)`` return ``trainer_class`` (e.g. the federated package's trainer)."""
    _MODE_TRAINERS[mode] = trainer_class


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


def get_trainer(model_type: ModelType, model_name: str, mode: str | None = None) -> type:
    """The trainer of ``mode`` when one is given (it must have been registered), else ``<model_name>Trainer``
    from the plugin if it exists, else RecBole's choice.

    RecBole's trainers come with the plugin's resumable ``fit`` and trusted checkpoint loading
    (:mod:`recbole_feddmmr.resumable`, :mod:`recbole_feddmmr.checkpoints`), as the plugin's own have them.
    """
    if mode is not None:
        if mode not in _MODE_TRAINERS:
            known = ", ".join(sorted(_MODE_TRAINERS)) or "none registered"
            raise ConfigError(f"unknown training mode '{mode}' ({known}): import the package that provides it")
        return _MODE_TRAINERS[mode]
    plugin_trainers = importlib.import_module(PLUGIN_TRAINER_MODULE)
    trainer_class = getattr(plugin_trainers, f"{model_name}Trainer", None)
    if trainer_class is None:
        trainer_class = recbole_get_trainer(model_type, model_name)
    return with_resumable_fit(trainer_class)
