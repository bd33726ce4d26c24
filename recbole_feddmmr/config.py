"""Config: RecBole's Config plus the plugin's yaml layers and data folder."""

from __future__ import annotations

import hashlib
import json
import os

from recbole.config import Config as RecBoleConfig

from recbole_feddmmr.compat import apply_numpy_aliases
from recbole_feddmmr.utils import get_model, properties_dir


class Config(RecBoleConfig):
    """RecBole's Config that also knows the plugin's models, yaml files and ``dataset_atomic/``.

    Priority, lowest first: RecBole's internal yaml, the plugin's ``overall.yaml``, ``federated.yaml``,
    ``model/<Model>.yaml``, ``dataset/<dataset>.yaml``, then (as in RecBole) config
    files, config dict and ``--key=value`` command-line arguments.
    """

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
        self.final_config_dict["data_path"] = os.path.join(data_root, self.dataset)


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
