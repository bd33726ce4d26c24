"""RecBole atomic files: read them as tables, and write ``.itememb`` files (one ``token`` id column,
``float_seq`` feature columns)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd

from recbole_feddmmr.atomic_write import replaced_when_whole
from recbole_feddmmr.errors import DataFileError


def item_token_order(token: str) -> tuple[int, int | str]:
    """Sort key for item tokens: numeric ids by value first, then the others alphabetically."""
    return (0, int(token)) if token.isdigit() else (1, token)


def write_itememb(
    path: str | Path,
    item_ids: list[str],
    features: dict[str, np.ndarray],
    available: dict[str, np.ndarray] | None = None,
    id_field: str = "iid",
) -> Path:
    """Write ``path`` with header ``iid:token <name>:float_seq ...`` and one row per item.

    ``features`` maps a column name to a [len(item_ids), D] array; ``available`` optionally
    maps it to a [len(item_ids)] bool array, and an item without the feature gets an empty
    cell (never a made-up vector). The file is written to a temporary name and renamed, so
    a crash never leaves a truncated file behind.
    """
    path = Path(path)
    available = available or {}
    masks = {name: np.asarray(available.get(name, np.ones(len(item_ids), bool)), bool) for name in features}
    for name, matrix in features.items():
        if matrix.shape[0] != len(item_ids) or masks[name].shape != (len(item_ids),):
            raise ValueError(f"feature '{name}' has {matrix.shape[0]} rows for {len(item_ids)} items")
        if not np.isfinite(matrix[masks[name]]).all():
            raise ValueError(f"feature '{name}' contains NaN or inf values")
    header = "\t".join([f"{id_field}:token"] + [f"{name}:float_seq" for name in features])
    rendered = {
        name: [" ".join(f"{v:.7g}" for v in row) if keep else "" for row, keep in zip(matrix, masks[name], strict=True)]
        for name, matrix in features.items()
    }
    with replaced_when_whole(path) as partial, open(partial, "w", encoding="utf-8") as handle:
        handle.write(header + "\n")
        for row, item_id in enumerate(item_ids):
            handle.write("\t".join([str(item_id)] + [rendered[name][row] for name in features]) + "\n")
    return path


def atomic_columns(path: str | Path) -> list[str]:
    """An atomic file's column names without their ``:type`` suffix, from its header line alone."""
    with open(path, encoding="utf-8") as handle:
        return [cell.split(":")[0] for cell in handle.readline().rstrip("\n").split("\t")]


def read_atomic(path: str | Path) -> pd.DataFrame:
    """An atomic file as strings, columns named without their ``:type`` suffix."""
    frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, quoting=csv.QUOTE_NONE)
    frame.columns = [column.split(":")[0] for column in frame.columns]
    return frame


def ml100k_item_texts(item_file: str | Path, item_ids: list[str]) -> list[str]:
    """The text ``Title (year). Genres: A, B`` of each of ``item_ids``, from RecBole's ml-100k.item."""
    items = read_atomic(item_file).set_index("item_id")
    missing = [item for item in item_ids if item not in items.index]
    if missing:
        raise DataFileError(f"{item_file}: no row for item ids {missing[:5]} that appear in the .inter file")
    texts = []
    for item in item_ids:
        row = items.loc[item]
        year = f" ({row['release_year']})" if row["release_year"] else ""
        genres = ", ".join(row["class"].split())
        texts.append(f"{row['movie_title']}{year}. Genres: {genres}" if genres else f"{row['movie_title']}{year}")
    return texts
