"""Write ``dataset_atomic/NAME/NAME.itememb`` from item texts (SBERT) and item images (CLIP).

    python -m recbole_feddmmr.features --dataset ml-100k --overwrite
    python -m recbole_feddmmr.features --dataset mydata --text-columns title description \\
        --images posters/ --clip-model /models/clip-vit-base-patch32 --device cuda

Rows are written for exactly the items of ``NAME.inter``. An item without a text or an
image gets an empty cell for that feature: the matching expert is off for it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import yaml

from recbole_feddmmr.errors import ConfigError, DataFileError, MissingFileError, run_cli
from recbole_feddmmr.features.atomic import (
    atomic_columns,
    item_token_order,
    ml100k_item_texts,
    read_atomic,
    write_itememb,
)
from recbole_feddmmr.features.image import encode_images, find_item_images, load_clip
from recbole_feddmmr.features.text import encode_texts, load_sentence_encoder


def item_texts(item_file: Path, item_ids: list[str], columns: list[str], item_field: str = "item_id") -> list[str]:
    """Texts of ``item_ids``: the non-empty values of ``columns`` joined by '. ' ('' for an item with none)."""
    items = read_atomic(item_file).set_index(item_field)
    absent = [column for column in columns if column not in items.columns]
    if absent:
        raise ConfigError(f"{item_file} has no column {absent}; its columns are {list(items.columns)}")
    rows = items.reindex(item_ids).fillna("")
    return [". ".join(value.strip() for value in row if value.strip()) for row in rows[columns].itertuples(index=False)]


def build_features(args: argparse.Namespace) -> dict:
    """Encode what was asked and write the .itememb; returns the summary that is printed."""
    started = time.perf_counter()
    folder = Path(args.data_path) / args.dataset
    inter = folder / f"{args.dataset}.inter"
    if not inter.is_file():
        raise MissingFileError(f"no {inter}: put the dataset's atomic files in {folder}")
    item_ids = sorted(read_atomic(inter)[args.item_field].unique(), key=item_token_order)
    output = folder / f"{args.dataset}.itememb"
    if output.exists() and not args.overwrite:
        raise ConfigError(f"{output} exists; pass --overwrite to replace it")
    features, available, summary = {}, {}, {"items": len(item_ids)}

    def add_column(name: str, encoded: np.ndarray, present: np.ndarray) -> None:
        """``encoded`` [present.sum(), D] rows of the items where ``present`` -> a column with empty cells elsewhere."""
        matrix = np.zeros((len(item_ids), encoded.shape[1]), np.float32)  # [items, D]; absent rows are not written
        matrix[present] = encoded
        features[name], available[name] = matrix, present
        summary[name] = {"dim": matrix.shape[1], "encoded": int(present.sum()), "without": int((~present).sum())}

    if not args.no_text:
        if args.dataset == "ml-100k" and not args.text_columns:  # its own text recipe
            texts = ml100k_item_texts(folder / f"{args.dataset}.item", item_ids)
        else:
            if not args.text_columns:
                raise ConfigError("say which .item columns form the text: --text-columns COLUMN [COLUMN ...]")
            texts = item_texts(folder / f"{args.dataset}.item", item_ids, args.text_columns, args.item_field)
        has_text = np.array([bool(text) for text in texts])
        if not has_text.any():
            raise DataFileError(f"no item of {args.dataset}.inter has a text in the chosen .item columns")
        encoder = load_sentence_encoder(args.text_model, device=args.device)
        encoded = encode_texts([t for t in texts if t], encoder, args.batch_size, not args.no_normalize)
        add_column("sbert_emb", encoded, has_text)

    if args.images:
        if not args.clip_model:
            raise ConfigError("--images needs --clip-model: a local folder with a CLIP model (transformers format)")
        found = find_item_images(args.images, item_ids)
        model, processor = load_clip(args.clip_model, device=args.device)
        encoded = encode_images(list(found.values()), model, processor, args.batch_size, not args.no_normalize)
        add_column("clip_emb", encoded, np.array([item in found for item in item_ids]))

    if not features:
        raise ConfigError("nothing to encode: drop --no-text or give --images")
    write_itememb(output, item_ids, features, available)
    summary["file"], summary["seconds"] = str(output), round(time.perf_counter() - started, 1)
    summary["yaml"] = loading_yaml(folder, args.dataset, summary)
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m recbole_feddmmr.features",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--data-path", default="dataset_atomic")
    parser.add_argument("--item-field", default="item_id", help="item id column of the .inter/.item files")
    parser.add_argument("--no-text", action="store_true", help="skip SBERT text features")
    parser.add_argument(
        "--text-model", default=None, help="local sentence-transformers folder (default: offline MiniLM)"
    )
    parser.add_argument(
        "--text-columns",
        nargs="+",
        default=None,
        help=".item columns forming the text; required unless --no-text (ml-100k has its own recipe)",
    )
    parser.add_argument("--images", default=None, help="folder with one image per item id: <id>.png|jpg|webp")
    parser.add_argument("--clip-model", default=None, help="local CLIP folder (transformers format)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--no-normalize", action="store_true", help="keep raw (not L2-normalised) embeddings")
    parser.add_argument("--overwrite", action="store_true")
    summary = build_features(parser.parse_args(argv))
    for name in ("sbert_emb", "clip_emb"):
        if name in summary:
            info = summary[name]
            print(f"{name}: {info['encoded']} of {summary['items']} items, {info['dim']}-d, {info['without']} without")
    print(f"wrote {summary['file']} in {summary['seconds']}s")
    print(f"\n# settings that load it: add them to a yaml given with --config_files\n{summary['yaml']}")
    return summary


def loading_yaml(folder: Path, dataset: str, summary: dict) -> str:
    """The dataset settings under which RecBole loads the new ``.itememb`` next to the dataset's other files."""
    load_col = {}
    for suffix in ("inter", "item"):
        path = folder / f"{dataset}.{suffix}"
        if path.is_file():
            load_col[suffix] = atomic_columns(path)
    load_col["itememb"] = ["iid", *(name for name in ("sbert_emb", "clip_emb") if name in summary)]
    settings: dict = {"load_col": load_col, "additional_feat_suffix": ["itememb"], "alias_of_item_id": ["iid"]}
    if "sbert_emb" in summary:
        settings["text_dim"] = summary["sbert_emb"]["dim"]
    if "clip_emb" in summary:
        settings["visual_dim"] = summary["clip_emb"]["dim"]
    return yaml.safe_dump(settings, default_flow_style=None, sort_keys=False).strip()


if __name__ == "__main__":
    run_cli(main)
