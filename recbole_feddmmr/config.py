"""Config: RecBole's Config plus the plugin's yaml layers and data folder, and the command-line syntax of settings.

Every command of the plugin takes settings as ``--key=value`` (or ``--key value``); :func:`parse_overrides`
reads them, each value by :func:`setting_value`, and the main command hands them to :class:`Config` as its
``cmd_args`` (RecBole's Config would read ``sys.argv`` itself; this one never does).
"""

from __future__ import annotations

import difflib
import functools
import os
from pathlib import Path
from typing import Any

import recbole
import yaml
from recbole.config import Config as RecBoleConfig

from recbole_feddmmr.compat import apply_numpy_aliases
from recbole_feddmmr.errors import ConfigError, MissingFileError
from recbole_feddmmr.registry import get_model

# settings RecBole reads without a yaml default, and the plugin's former name of MAX_ITEM_LIST_LENGTH
UNLISTED_SETTINGS = frozenset({"model", "dataset", "config_files", "max_seq_len"})


def properties_dir() -> Path:
    """The plugin's yaml folder: inside the installed package, or ``properties/`` of a source checkout."""
    package_dir = Path(__file__).resolve().parent
    for candidate in (package_dir / "properties", package_dir.parent / "properties"):
        if (candidate / "overall.yaml").is_file():
            return candidate
    raise MissingFileError(
        f"recbole_feddmmr properties not found next to {package_dir}; reinstall with `bash scripts/install.sh`"
    )


def setting_value(text: str) -> Any:
    """A setting's value as written on a command line: YAML (``true``, ``null``, ``[1, 2]``, ``{mode: full}``),
    Python's ``None``, and numbers PyYAML reads as text (``1e-3``); anything else stays the text itself."""
    if text in ("None", "none"):
        return None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(value) if value.strip().lower() not in ("inf", "nan", "infinity") else value
        except ValueError:
            return value
    return value


def parse_overrides(arguments: list[str]) -> dict[str, Any]:
    """``--key=value`` or ``--key value`` items -> {key: value} (values by :func:`setting_value`); anything else
    is a :class:`ConfigError`, as is a key given twice with different values."""
    overrides: dict[str, Any] = {}
    pending = None
    for argument in [*arguments, None]:
        if pending is not None:
            if argument is None or (argument.startswith("--") and len(argument) > 2):
                raise ConfigError(f"{pending} has no value: write {pending}=VALUE")
            key, text = pending[2:], argument
            pending = None
        elif argument is None:
            break
        elif argument.startswith("--") and "=" in argument:
            key, text = argument[2:].split("=", 1)
        elif argument.startswith("--") and len(argument) > 2:
            pending = argument
            continue
        else:
            raise ConfigError(f"unexpected argument '{argument}': settings are given as --key=value")
        value = setting_value(text)
        if key in overrides and overrides[key] != value:
            raise ConfigError(f"--{key} is given twice with different values ({overrides[key]!r}, {value!r})")
        overrides[key] = value
    return overrides


class Config(RecBoleConfig):
    """RecBole's Config that also knows the plugin's models, yaml files and ``dataset_atomic/``.

    Priority, lowest first: RecBole's internal yaml, the plugin's ``overall.yaml``, ``federated.yaml``,
    ``model/<Model>.yaml``, ``dataset/<dataset>.yaml``, the dataset folder's own
    ``<data_path>/<dataset>/<dataset>.yaml``, then (as in RecBole) config files, config dict and the
    command line's ``--key=value`` settings (``cmd_args``).
    """

    def __init__(
        self,
        model=None,
        dataset=None,
        config_file_list: list[str] | None = None,
        config_dict: dict[str, Any] | None = None,
        cmd_args: list[str] | None = None,
    ) -> None:
        """``cmd_args``: the command line's ``--key=value`` settings (:func:`parse_overrides`), which win over
        everything else, as RecBole's command-line settings do; ``sys.argv`` is never read."""
        for path in config_file_list or []:
            if not os.path.isfile(path):
                raise ConfigError(f"config file {path} does not exist (--config_files takes existing yaml files)")
        self._cmd_args = list(cmd_args or [])
        super().__init__(model, dataset, config_file_list, config_dict)
        self._single_sequence_length()
        self.setting_warnings = unknown_setting_warnings(self)

    def _load_cmd_line(self) -> dict[str, Any]:
        return parse_overrides(self._cmd_args)

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
        # a dataset folder may carry its own settings (its columns, its feature sizes) next to its atomic files
        data_root = self.external_config_dict.get("data_path") or self.internal_config_dict["data_path"]
        own = Path(data_root) / dataset / f"{dataset}.yaml"
        if own.is_file():
            self._update_internal_config_dict(str(own))

    def _set_default_parameters(self) -> None:
        data_root = self.final_config_dict["data_path"]
        super()._set_default_parameters()
        # RecBole points ml-100k at the copy inside its wheel; the plugin reads
        # dataset_atomic/<dataset>/ for every dataset (that is where the .itememb lives).
        # Absolute, so a checkpoint's config finds its data from any working directory (load_checkpoint).
        self.final_config_dict["data_path"] = os.path.abspath(os.path.join(data_root, self.dataset))


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
