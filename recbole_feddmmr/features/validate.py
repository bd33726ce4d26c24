"""Check atomic files (``.inter``, ``.item``, ``.user``, ``.itememb``) before RecBole loads them, and fail
with one clear line.

RecBole would otherwise accept a bad file silently or fail deep inside pandas: a header cell without
``:type`` drops the column, a row with a missing cell becomes NaN, a non-numeric timestamp stops the run
with a traceback; in an ``.itememb``, an id that is not in the ``.inter`` file becomes a new ranking
candidate, a short vector is zero-padded, a duplicate row overwrites another.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from recbole_feddmmr.errors import DataFileError
from recbole_feddmmr.features.atomic import item_token_order


class FeatureFileError(DataFileError):
    """A feature file that must not be trained on; the message names the file, line or item and the fix."""


@dataclass
class FeatureFileReport:
    """What a valid ``.itememb`` holds."""

    path: Path
    items: int
    dims: dict[str, int]  # feature column -> dimension
    missing: dict[str, int] = field(default_factory=dict)  # feature column -> items with an empty cell


ATOMIC_TYPES = ("token", "token_seq", "float", "float_seq")


def validate_atomic_file(path: str | Path) -> list[str]:
    """Check an atomic file's header (``name:type`` cells), its rows' cell count and its ``float`` cells.
    -> the column names. Raises :class:`FeatureFileError` naming the file, line and fix."""
    path = Path(path)
    with open(path, encoding="utf-8") as handle:
        header = handle.readline().rstrip("\n")
        columns = [cell.partition(":") for cell in header.split("\t")]  # (name, ":", type)
        for name, colon, kind in columns:
            if not colon or kind not in ATOMIC_TYPES:
                raise FeatureFileError(
                    f"{path}:1: header cell '{name}{colon}{kind}' needs a type: write name:token, name:token_seq, "
                    "name:float or name:float_seq"
                )
        floats = [index for index, (_, _, kind) in enumerate(columns) if kind == "float"]
        for line_number, line in enumerate(handle, start=2):
            cells = line.rstrip("\n").split("\t")
            if len(cells) != len(columns):
                if not line.strip():
                    continue  # a blank line (e.g. at the end) is no row
                raise FeatureFileError(
                    f"{path}:{line_number}: {len(cells)} tab-separated cells, the header has {len(columns)}"
                )
            for index in floats:
                if cells[index].strip() and not _is_float(cells[index]):
                    raise FeatureFileError(
                        f"{path}:{line_number}: column '{columns[index][0]}' has '{cells[index]}', not a number "
                        "(a float column; declare it :token if it is an id)"
                    )
    return [name for name, _, _ in columns]


def _read_header(path: Path, header: str, id_field: str) -> list[str]:
    """Column names of an atomic-file header; the id column must be a token, the others float_seq."""
    columns = [column.partition(":") for column in header.split("\t")]  # (name, ":", type)
    names = [name for name, _, _ in columns]
    if id_field not in names:
        raise FeatureFileError(f"{path}:1: no '{id_field}:token' column; the header is '{header}'")
    for name, _, kind in columns:
        if name != id_field and kind != "float_seq":
            raise FeatureFileError(f"{path}:1: column '{name}' has type '{kind}', feature columns must be float_seq")
    return names


def validate_itememb(
    path: str | Path, inter_item_ids: set[str], expected_dims: dict[str, int], id_field: str = "iid"
) -> FeatureFileReport:
    """Validate ``path`` against the item ids of the ``.inter`` file and the model's feature sizes.

    ``expected_dims`` maps feature columns to the dimension the model expects (columns the
    model does not read may be absent from it). Empty cells are allowed: the item lacks that
    feature and the matching expert is off for it.
    """
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines:
        raise FeatureFileError(f"{path}: empty file; write a header line such as 'iid:token\tsbert_emb:float_seq'")
    names = _read_header(path, lines[0], id_field)
    id_column = names.index(id_field)
    features = [name for name in names if name != id_field]
    dims: dict[str, int] = {}
    missing = dict.fromkeys(features, 0)
    first_line: dict[str, int] = {}
    for line_number, line in enumerate(lines[1:], start=2):
        cells = line.split("\t")
        if len(cells) != len(names):
            raise FeatureFileError(
                f"{path}:{line_number}: {len(cells)} tab-separated cells, the header has {len(names)}"
            )
        item = cells[id_column]
        if item in first_line:
            raise FeatureFileError(
                f"{path}:{line_number}: item '{item}' appears again (first at line {first_line[item]}); "
                "keep one row per item"
            )
        first_line[item] = line_number
        for name, cell in zip(names, cells, strict=True):
            if name == id_field:
                continue
            if not cell.strip():
                missing[name] += 1
                continue
            try:
                vector = np.array(cell.split(), dtype=np.float64)
            except ValueError:
                bad = next(token for token in cell.split() if not _is_float(token))
                raise FeatureFileError(
                    f"{path}:{line_number}: column '{name}' of item '{item}' has '{bad}', not a number; "
                    "write space-separated floats"
                ) from None
            if not np.isfinite(vector).all():
                raise FeatureFileError(
                    f"{path}:{line_number}: column '{name}' of item '{item}' contains NaN or inf; re-encode that item"
                )
            expected = expected_dims.get(name, dims.get(name))
            if expected is not None and len(vector) != expected:
                raise FeatureFileError(
                    f"{path}:{line_number}: column '{name}' of item '{item}' has {len(vector)} values, expected "
                    f"{expected}; re-encode it or set the model's dimension option to match"
                )
            dims.setdefault(name, len(vector))
    unknown = sorted(set(first_line) - inter_item_ids, key=item_token_order)
    if unknown:
        raise FeatureFileError(
            f"{path}: {len(unknown)} item ids are not in the .inter file (e.g. {unknown[:5]}); RecBole would add "
            "them as ranking candidates: remove those rows"
        )
    return FeatureFileReport(path, len(first_line), dims, {name: n for name, n in missing.items() if n})


def _is_float(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True
