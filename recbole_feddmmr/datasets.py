"""Datasets the plugin can build by itself, offline.

``ml-100k``: the atomic files inside RecBole's wheel (.inter, .item, .user) are
copied to ``dataset_atomic/ml-100k/`` and ``ml-100k.itememb`` is added with
384-d SBERT features (offline all-MiniLM-L6-v2) of "Title (year). Genres: ...",
for exactly the items of the .inter file (an item that only appears in the
.itememb would become a ranking candidate in RecBole).

``planted``: the synthetic planted-signal dataset of :mod:`recbole_feddmmr.synthetic`.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from recbole_feddmmr.atomic_write import replaced_when_whole
from recbole_feddmmr.errors import MissingFileError
from recbole_feddmmr.features.atomic import item_token_order, ml100k_item_texts, read_atomic, write_itememb
from recbole_feddmmr.features.text import encode_texts, load_sentence_encoder
from recbole_feddmmr.features.validate import (
    FeatureFileError,
    FeatureFileReport,
    validate_atomic_file,
    validate_itememb,
)
from recbole_feddmmr.synthetic import PLANTED, write_planted

# read_atomic and ml100k_item_texts live with the feature tools (below this module) and are re-exported here
__all__ = [
    "ML100K",
    "check_atomic_files",
    "check_item_features",
    "ensure_dataset",
    "ml100k_item_texts",
    "prepare_ml100k",
    "read_atomic",
    "recbole_ml100k_dir",
]
ML100K = "ml-100k"
ML100K_COPIED = ("inter", "item", "user")
logger = logging.getLogger(__name__)


def recbole_ml100k_dir() -> Path:
    import recbole

    return Path(recbole.__file__).resolve().parent / "dataset_example" / ML100K


def prepare_ml100k(target_dir: str | Path, encoder=None, show_progress: bool = True) -> Path:
    """Write any missing file of ``target_dir`` (= dataset_atomic/ml-100k); existing files are kept."""
    target = Path(target_dir)
    target.mkdir(parents=True, exist_ok=True)
    source = recbole_ml100k_dir()
    for suffix in ML100K_COPIED:
        destination = target / f"{ML100K}.{suffix}"
        if not destination.exists():
            with replaced_when_whole(destination) as partial:
                shutil.copyfile(source / f"{ML100K}.{suffix}", partial)
    itememb = target / f"{ML100K}.itememb"
    if not itememb.exists():
        started = time.perf_counter()
        item_ids = sorted(read_atomic(target / f"{ML100K}.inter")["item_id"].unique(), key=item_token_order)
        texts = ml100k_item_texts(target / f"{ML100K}.item", item_ids)
        logger.info(f"encoding {len(texts)} ml-100k item texts with SBERT (offline all-MiniLM-L6-v2)")
        embeddings = encode_texts(texts, encoder or load_sentence_encoder(), show_progress=show_progress)
        write_itememb(itememb, item_ids, {"sbert_emb": embeddings})
        logger.info(
            f"wrote {itememb}: {len(item_ids)} items x {embeddings.shape[1]}-d sbert_emb "
            f"in {time.perf_counter() - started:.1f}s"
        )
    return target


def ensure_dataset(dataset: str, data_path: str | Path, show_progress: bool = True) -> None:
    """Make ``data_path`` (= dataset_atomic/<dataset>) usable, or fail with what to do."""
    data_path = Path(data_path)
    if dataset == ML100K:
        prepare_ml100k(data_path, show_progress=show_progress)
    elif dataset == PLANTED:
        write_planted(data_path)
    elif not (data_path / f"{dataset}.inter").is_file():
        raise MissingFileError(
            f"no {data_path / (dataset + '.inter')}: put the atomic files of '{dataset}' in {data_path} "
            "(see docs/datasets.md, 'Your own dataset')"
        )


def unload_itememb(config) -> None:
    """Take the absent ``.itememb`` out of what RecBole loads (its suffix, columns and id alias), which
    RecBole would otherwise fail on ("additional feature file not found", or a KeyError on the alias)."""
    id_field = config["feature_id_field"]
    config["additional_feat_suffix"] = [s for s in config["additional_feat_suffix"] or [] if s != "itememb"] or None
    if config["load_col"] is not None:
        config["load_col"] = {suffix: columns for suffix, columns in config["load_col"].items() if suffix != "itememb"}
    if config["alias_of_item_id"]:
        config["alias_of_item_id"] = [field for field in config["alias_of_item_id"] if field != id_field] or None


def check_atomic_files(config) -> set[str] | None:
    """Validate the atomic files RecBole will load for this run (header types, cell counts, numbers).
    -> the item ids of the ``.inter`` file when it had to read them (``None`` otherwise), for
    :func:`check_item_features` to reuse."""
    folder = Path(config["data_path"])
    load_col = config["load_col"]
    loaded = {}
    for suffix in ("inter", "item", "user"):
        path = folder / f"{config['dataset']}.{suffix}"
        if path.is_file() and (load_col is None or suffix in load_col):
            validate_atomic_file(path)
            loaded[suffix] = path
    item_field = config["ITEM_ID_FIELD"]
    if "item" not in loaded or "inter" not in loaded:
        return None
    inter_items = set(read_atomic(loaded["inter"]).get(item_field, []))
    never = set(read_atomic(loaded["item"]).get(item_field, [])) - inter_items
    if never:
        logger.warning(
            f"{len(never)} items of {loaded['item'].name} never occur in {loaded['inter'].name} (e.g. "
            f"{sorted(never, key=item_token_order)[:3]}): RecBole still ranks them as candidates, though no "
            "target can be one; remove their rows from the .item file to rank only interacted items"
        )
    return inter_items


def check_item_features(config, inter_items: set[str] | None = None) -> FeatureFileReport | None:
    """Validate ``<data_path>/<dataset>.itememb`` for a model that reads item features, before RecBole loads it.

    A model reads features when its config names ``feature_id_field`` (UR4RecV2MoE does). Fails when the
    file is malformed (see :func:`validate_itememb`) or exists while the config would not load it, so a
    run with a feature file never silently trains without it. Returns ``None`` when there is nothing to check.
    """
    id_field = config["feature_id_field"]
    path = Path(config["data_path"]) / f"{config['dataset']}.itememb"
    if not id_field:
        return None
    if not path.exists():
        logger.warning(
            f"no {path}: {config['model']} trains with the sequential expert only; write item features with "
            f"`python -m recbole_feddmmr.features --dataset {config['dataset']} ...` (or set feature_id_field=None)"
        )
        unload_itememb(config)
        return None
    suffixes = config["additional_feat_suffix"] or []
    load_col = config["load_col"]
    if "itememb" not in suffixes or (load_col is not None and "itememb" not in load_col):
        raise FeatureFileError(
            f"{path} exists but the config does not load it: add `additional_feat_suffix: [itememb]`, "
            f"`load_col: {{itememb: [{id_field}, ...]}}` and `alias_of_item_id: [{id_field}]` (see docs/datasets.md)"
        )
    if inter_items is None:  # the item ids of the .inter file, unless check_atomic_files already read them
        inter_items = set(
            read_atomic(Path(config["data_path"]) / f"{config['dataset']}.inter")[config["ITEM_ID_FIELD"]]
        )
    expected = {config["text_feature_field"]: config["text_dim"], config["visual_feature_field"]: config["visual_dim"]}
    report = validate_itememb(path, inter_items, {k: v for k, v in expected.items() if k}, id_field=id_field)
    read = {name: option for name, option in (
        (config["text_feature_field"], "text_feature_field"), (config["visual_feature_field"], "visual_feature_field")
    ) if name}  # fmt: skip
    if report.dims and not set(read) & set(report.dims):
        wanted = ", ".join(f"{option}={name}" for name, option in read.items()) or "no feature column"
        raise FeatureFileError(
            f"{path} has the feature columns {sorted(report.dims)}, but the model reads {wanted}: set "
            f"text_feature_field / visual_feature_field to the file's columns (and list them in load_col)"
        )
    described = ", ".join(
        f"{name} {dim}-d ({report.items - report.missing.get(name, 0)} of {report.items} items)"
        for name, dim in report.dims.items()
    )
    logger.info(f"item features in {path.name}: {described or 'no feature column'}")
    return report
