"""Config: RecBole's Config plus the plugin's yaml layers and data folder."""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import os
from pathlib import Path

import recbole
import yaml
from recbole.config import Config as RecBoleConfig

from recbole_feddmmr.compat import apply_numpy_aliases
from recbole_feddmmr.errors import ConfigError
from recbole_feddmmr.utils import get_model, properties_dir

# settings RecBole reads without a yaml default, and the plugin's former name of MAX_ITEM_LIST_LENGTH
UNLISTED_SETTINGS = frozenset({"model", "dataset", "config_files", "max_seq_len"})
# settings a federated run cannot honour: its clients' local steps are plain SGD/Adam steps in float32
FEDERATED_UNSUPPORTED = {
    "clip_grad_norm": "local steps do not clip gradients",
    "weight_decay": "local optimizers have no weight decay",
    "enable_amp": "local steps run in float32",
}


class Config(RecBoleConfig):
    """RecBole's Config that also knows the plugin's models, yaml files and ``dataset_atomic/``.

    Priority, lowest first: RecBole's internal yaml, the plugin's ``overall.yaml``, ``federated.yaml``,
    ``model/<Model>.yaml``, ``dataset/<dataset>.yaml``, then (as in RecBole) config
    files, config dict and ``--key=value`` command-line arguments.
    """

    def __init__(self, model=None, dataset=None, config_file_list=None, config_dict=None) -> None:
        for path in config_file_list or []:
            if not os.path.isfile(path):
                raise ConfigError(f"config file {path} does not exist (--config_files takes existing yaml files)")
        super().__init__(model, dataset, config_file_list, config_dict)
        self._single_sequence_length()
        if self.final_config_dict.get("federated"):
            check_federated_settings(self.final_config_dict)
        self.setting_warnings = unknown_setting_warnings(self)

    def _init_device(self) -> None:
        super()._init_device()
        # RecBole's default use_gpu=True stays in the config dump on a machine without CUDA: say what runs
        self.final_config_dict["use_gpu"] = self.final_config_dict["device"].type == "cuda"

    def _single_sequence_length(self) -> None:
        """``max_seq_len`` was the model's own copy of ``MAX_ITEM_LIST_LENGTH``: one setting now."""
        legacy = self.final_config_dict.pop("max_seq_len", None)
        length = self.final_config_dict["MAX_ITEM_LIST_LENGTH"]
        if legacy is not None and legacy != length:
            raise ConfigError(
                f"max_seq_len={legacy} disagrees with MAX_ITEM_LIST_LENGTH={length}: the model's positions are "
                "MAX_ITEM_LIST_LENGTH; set that one only"
            )

    def compatibility_settings(self) -> None:
        apply_numpy_aliases()
        super().compatibility_settings()

    def _get_model_and_dataset(self, model, dataset):
        if model is None:
            model = self.external_config_dict.get("model")
        if isinstance(model, str):
            model = get_model(model)
        return super()._get_model_and_dataset(model, dataset)

    def _load_internal_config_dict(self, model, model_class, dataset):
        super()._load_internal_config_dict(model, model_class, dataset)
        # a plugin model built on a RecBole model (e.g. SASRecFText on SASRecF) starts from its ancestors'
        # RecBole defaults, which RecBole looks up by the model's own name only
        recbole_models = Path(recbole.__file__).resolve().parent / "properties" / "model"
        for ancestor in reversed(model_class.__mro__[1:]):
            if (recbole_models / f"{ancestor.__name__}.yaml").is_file():
                self._update_internal_config_dict(str(recbole_models / f"{ancestor.__name__}.yaml"))
        plugin = properties_dir()
        for path in (
            plugin / "overall.yaml",
            plugin / "federated.yaml",
            plugin / "model" / f"{model}.yaml",
            plugin / "dataset" / f"{dataset}.yaml",
        ):
            if path.is_file():
                self._update_internal_config_dict(str(path))

    def _set_default_parameters(self) -> None:
        data_root = self.final_config_dict["data_path"]
        super()._set_default_parameters()
        # RecBole points ml-100k at the copy inside its wheel; the plugin reads
        # dataset_atomic/<dataset>/ for every dataset (that is where the .itememb lives).
        # Absolute, so a checkpoint's config finds its data from any working directory (load_checkpoint).
        self.final_config_dict["data_path"] = os.path.abspath(os.path.join(data_root, self.dataset))


# settings that do not change what a run computes (where it writes, how it shows progress, which device and
# how fast it evaluates); every other config entry is part of a run's fingerprint. The federated backend is
# part of it: its dropout masks differ.
NOT_IN_FINGERPRINT = frozenset(
    {
        "show_progress", "state", "checkpoint_dir", "eval_batch_size",
        "vectorized_chunk_targets", "device", "gpu_id", "use_gpu", "local_rank", "nproc", "world_size", "offset",
        "ip", "port", "worker", "log_wandb", "wandb_project", "eval_user_chunk", "ray_address",
    }
)  # fmt: skip


def config_fingerprint(config) -> str:
    """A hash of every config entry that defines the run (the same command gives the same fingerprint)."""
    settings = {key: value for key, value in config.final_config_dict.items() if key not in NOT_IN_FINGERPRINT}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_federated_settings(settings: dict) -> None:
    """Refuse settings a federated run would otherwise ignore silently."""
    for key, reason in FEDERATED_UNSUPPORTED.items():
        if settings.get(key):
            raise ConfigError(f"{key}={settings[key]} is not supported with federated=True ({reason}): unset it")
    prototypes = settings.get("enable_prototype_aggregation")
    if prototypes and settings.get("memory_type") == "history":
        raise ConfigError(
            "memory_type=history has no memory to summarise into prototypes: "
            "set enable_prototype_aggregation=False (or memory_type=dynamic)"
        )
    if prototypes and (settings.get("num_memory_prototypes") or 0) < 1:
        raise ConfigError(
            f"num_memory_prototypes={settings.get('num_memory_prototypes')}: at least 1 prototype per client, "
            "or enable_prototype_aggregation=False"
        )


@functools.cache
def _settings_of_recbole_models() -> dict[str, tuple[str, ...]]:
    """Setting name -> the RecBole models whose yaml defines it."""
    import recbole

    owners: dict[str, list[str]] = {}
    for path in sorted((Path(recbole.__file__).parent / "properties" / "model").glob("*.yaml")):
        for key in yaml.safe_load(path.read_text()) or {}:
            owners.setdefault(key, []).append(path.stem)
    return {key: tuple(models) for key, models in owners.items()}


def unknown_setting_warnings(config: Config) -> list[str]:
    """One warning per given setting (yaml file, config dict or ``--key=value``) that neither RecBole, nor the
    plugin, nor this model knows, with the closest known name: RecBole accepts any key, so a typo such as
    ``--learnign_rate=0.1`` would otherwise be ignored without a word."""
    known = set(config.internal_config_dict) | set(config.final_config_dict) - set(config.external_config_dict)
    known |= UNLISTED_SETTINGS
    warnings = []
    for key in sorted(set(config.external_config_dict) - known):
        owners = _settings_of_recbole_models().get(key)
        if owners:
            warnings.append(
                f"setting '{key}' is not used by {config['model']} (it is a setting of {', '.join(owners[:3])})"
            )
            continue
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        warnings.append(f"unknown setting '{key}' is ignored{hint}")
    return warnings
