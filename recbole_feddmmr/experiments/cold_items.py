"""The cold-item protocol: a seeded share of the catalogue never appears in training, and users are tested on
those items, so the test targets' ID embeddings are untrained and only their content can rank them.

From a dataset ``X`` (its atomic files in ``dataset_atomic/X``), :func:`write_cold_dataset` writes
``dataset_atomic/X-cold<percent>s<seed>``:

* the cold items: ``share`` of X's items, drawn with ``seed``;
* every user with a cold interaction preceded by at least :data:`MIN_HISTORY` warm ones keeps, in time
  order, the warm interactions before the last such cold interaction, then that cold interaction: under
  the leave-one-out split it is the user's test target, and the validation target (the one before it) is
  warm. Interactions after it are dropped (they would be the user's future);
* every other user keeps their warm interactions only;
* no other interaction of a cold item is kept: a cold item is only ever a test target, never trained on
  nor validated on, so nothing is chosen on it;
* the ``.item`` and ``.itememb`` rows of the items left, and the settings X runs with (its yaml files),
  so every model reads the same columns and features.

The benchmark's ``--cold_items SHARE`` runs its models on that dataset and reports its cold slice: the test
users whose target has no training interaction. Which items are cold depends on ``seed`` only, not on a
model's seed, so every model and seed is tested on the same users.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from recbole_feddmmr.atomic_write import replaced_when_whole
from recbole_feddmmr.config import properties_dir
from recbole_feddmmr.errors import ConfigError, MissingFileError
from recbole_feddmmr.features.atomic import read_atomic

MIN_HISTORY = 3  # warm interactions a cold test target needs before it: a sequence to predict from


@dataclass(frozen=True)
class ColdDataset:
    name: str
    folder: Path
    cold_item_ids: tuple[str, ...]  # the items' tokens, as in the .inter file
    users: int
    cold_users: int  # users whose test target is a cold item


def cold_dataset_name(dataset: str, share: float, seed: int) -> str:
    return f"{dataset}-cold{round(100 * share)}s{seed}"


def write_cold_dataset(source: Path, dataset: str, share: float, seed: int, data_root: Path) -> ColdDataset:
    """Write (or find, when it is there already) the cold-item dataset of ``dataset`` (folder ``source``)
    under ``data_root``; see the module docstring."""
    if not 0.0 < share < 1.0:
        raise ConfigError(f"--cold_items takes the share of cold items in (0, 1), got {share}")
    inter_path = source / f"{dataset}.inter"
    for needed in (inter_path, source / f"{dataset}.itememb"):
        if not needed.is_file():
            raise MissingFileError(f"no {needed}: the cold-item protocol needs the dataset's interactions and features")
    name = cold_dataset_name(dataset, share, seed)
    folder = data_root / name
    header = inter_path.read_text(encoding="utf-8").split("\n", 1)[0].split("\t")
    inter = read_atomic(inter_path)
    user, item = (
        next(c for c in inter.columns if c.startswith("user")),
        next(c for c in inter.columns if c.startswith("item")),
    )
    time_column = next((c for c in inter.columns if c in ("timestamp", "time")), None)
    if time_column is None:
        raise ConfigError(f"{inter_path} has no timestamp column: the cold-item protocol needs time order")
    items = np.array(sorted(inter[item].unique()))
    cold = set(np.random.default_rng(seed).choice(items, size=round(share * len(items)), replace=False).tolist())
    inter = inter.assign(_time=inter[time_column].astype(float), _order=np.arange(len(inter)))
    inter = inter.sort_values([user, "_time", "_order"], kind="stable")
    is_cold = inter[item].isin(cold).to_numpy()
    kept, cold_users = [], 0
    for _, rows in inter.groupby(user, sort=False).indices.items():
        rows = np.asarray(rows)
        warm_before = np.cumsum(~is_cold[rows]) - ~is_cold[rows]  # warm interactions strictly before each row
        targets = np.flatnonzero(is_cold[rows] & (warm_before >= MIN_HISTORY))
        if len(targets):
            last = targets[-1]
            history = rows[:last][~is_cold[rows[:last]]]
            kept.append(np.append(history, rows[last]))
            cold_users += 1
        else:
            kept.append(rows[~is_cold[rows]])
    frame = inter.iloc[np.concatenate(kept)].drop(columns=["_time", "_order"])
    users = frame[user].nunique()
    if not folder.joinpath(f"{name}.inter").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        left = set(frame[item])
        write_atomic(folder / f"{name}.inter", header, frame)
        for suffix in ("item", "itememb", "user"):
            path = source / f"{dataset}.{suffix}"
            if path.is_file():
                table = read_atomic(path)
                id_column = table.columns[0]
                if suffix != "user":
                    table = table[table[id_column].isin(left)]
                write_atomic(
                    folder / f"{name}.{suffix}", path.read_text(encoding="utf-8").split("\n", 1)[0].split("\t"), table
                )
        settings = {}
        for settings_file in (properties_dir() / "dataset" / f"{dataset}.yaml", source / f"{dataset}.yaml"):
            if settings_file.is_file():
                settings.update(yaml.safe_load(settings_file.read_text()) or {})
        (folder / f"{name}.yaml").write_text(
            f"# the settings of {dataset}, for its cold-item protocol (recbole_feddmmr.experiments.cold_items)\n"
            + yaml.safe_dump(settings, sort_keys=False)
        )
    return ColdDataset(name, folder, tuple(sorted(cold)), users, cold_users)


def write_atomic(path: Path, header: list[str], frame: pd.DataFrame) -> None:
    """``frame`` (string cells, columns named without their types) as an atomic file with ``header``."""
    with replaced_when_whole(path) as partial:
        frame.to_csv(partial, sep="\t", index=False, header=header, quoting=csv.QUOTE_NONE)
