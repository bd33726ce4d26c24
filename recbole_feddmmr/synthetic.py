"""A planted-signal dataset: users prefer items by a hidden content factor seen only through item features.

    python -m recbole_feddmmr.synthetic            # writes dataset_atomic/planted/

Generative story (all draws from one seeded generator, so the files are reproducible):

- every item belongs to one of ``num_factors`` hidden content factors (uniformly);
- its text and visual features are two independent noisy views of that factor: a per-factor
  centroid per modality plus Gaussian noise, L2-normalised (as SBERT / CLIP features are);
- every user prefers one factor; each of the user's interactions is, with probability
  ``signal``, a uniform draw among the items of that factor not yet seen, else a uniform
  draw among all unseen items; timestamps are increasing, so order carries no signal beyond the factor.

Defaults: 1,000 users x 16 interactions over 4,000 items in 100 factors (40 items each), so an
item is met about 4 times in training: item IDs are learned from little co-occurrence, while
the features tell an item's factor directly. A model that reads the candidate's content should win.
(A first version with 20 factors of 200 items and 30 interactions per user let ID co-occurrence
alone reach the content ceiling, so it could not separate the two.)

The ``.itememb`` also holds the same vectors shuffled across items (``sbert_shuffled``,
``clip_shuffled``): same marginal distribution, no link to the item. Training on those
columns (``text_feature_field=sbert_shuffled visual_feature_field=clip_shuffled``) is the
control in which any gain of the experts must vanish.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from recbole_feddmmr.atomic_write import replaced_when_whole
from recbole_feddmmr.errors import ConfigError, run_cli
from recbole_feddmmr.features.atomic import write_itememb

logger = logging.getLogger(__name__)
PLANTED = "planted"


@dataclass(frozen=True)
class PlantedSpec:
    num_users: int = 1000
    num_items: int = 4000
    num_factors: int = 100
    interactions_per_user: int = 16
    signal: float = 0.9  # share of a user's interactions drawn from the preferred factor
    text_dim: int = 32
    visual_dim: int = 48
    noise: float = 0.5  # feature noise std per dimension, relative to unit-norm centroids / sqrt(dim)
    seed: int = 2020


def unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def noisy_views(factor: np.ndarray, num_factors: int, dim: int, noise: float, rng: np.random.Generator) -> np.ndarray:
    """``factor`` [I] -> [I, dim]: the factor's random unit centroid plus Gaussian noise, L2-normalised."""
    centroids = unit_rows(rng.standard_normal((num_factors, dim)))  # [C, dim]
    return unit_rows(centroids[factor] + noise / np.sqrt(dim) * rng.standard_normal((len(factor), dim)))


def generate(spec: PlantedSpec) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray]:
    """-> (interactions [user_id, item_id, timestamp], items [item_id, factor], user factors)."""
    if spec.interactions_per_user * 2 > spec.num_items // spec.num_factors:
        raise ConfigError("interactions_per_user must be at most half the items of one factor")
    rng = np.random.default_rng(spec.seed)
    item_factor = rng.integers(0, spec.num_factors, spec.num_items)  # [I]
    user_factor = rng.integers(0, spec.num_factors, spec.num_users)  # [U]
    items_of = [np.flatnonzero(item_factor == f) for f in range(spec.num_factors)]
    rows = []
    for user in range(spec.num_users):  # data generation, once: clarity over speed
        seen: set[int] = set()
        for step in range(spec.interactions_per_user):
            pool = items_of[user_factor[user]] if rng.random() < spec.signal else np.arange(spec.num_items)
            item = int(rng.choice(pool))
            while item in seen:
                item = int(rng.choice(pool))
            seen.add(item)
            rows.append((user + 1, item + 1, step + 1))
    interactions = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    items = pd.DataFrame({"item_id": np.arange(1, spec.num_items + 1), "factor": item_factor})
    return interactions, items, user_factor


def write_planted(target_dir: str | Path, spec: PlantedSpec = PlantedSpec(), overwrite: bool = False) -> Path:
    """Write ``planted.inter`` and ``planted.itememb`` (true and shuffled features) into ``target_dir``."""
    target = Path(target_dir)
    inter_path, itememb_path = target / f"{PLANTED}.inter", target / f"{PLANTED}.itememb"
    if not overwrite and inter_path.exists() and itememb_path.exists():
        logger.info(f"{target} already holds the planted dataset (pass --overwrite to regenerate)")
        return target
    interactions, items, _ = generate(spec)  # before any folder exists: a refused spec leaves nothing behind
    target.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(spec.seed + 1)
    factor = items["factor"].to_numpy()
    text = noisy_views(factor, spec.num_factors, spec.text_dim, spec.noise, rng)  # [I, Ft]
    visual = noisy_views(factor, spec.num_factors, spec.visual_dim, spec.noise, rng)  # [I, Fv]
    # only items of the .inter file get a row (RecBole would add others as ranking candidates)
    used = np.isin(items["item_id"], interactions["item_id"].unique())
    text, visual = text[used], visual[used]
    permutation = rng.permutation(len(text))  # the written rows, handed to other items
    columns = {
        "sbert_emb": text,
        "clip_emb": visual,
        "sbert_shuffled": text[permutation],
        "clip_shuffled": visual[permutation],
    }
    header = ["user_id:token", "item_id:token", "timestamp:float"]
    with replaced_when_whole(inter_path) as partial:  # as write_itememb does
        interactions.to_csv(partial, sep="\t", index=False, header=header)
    write_itememb(itememb_path, items["item_id"][used].astype(str).tolist(), columns)
    logger.info(
        f"wrote {target}: {len(interactions)} interactions, {spec.num_users} users, {int(used.sum())} items, "
        f"{spec.num_factors} hidden factors, text {spec.text_dim}-d, visual {spec.visual_dim}-d"
    )
    return target


def main(argv: list[str] | None = None) -> None:
    defaults = PlantedSpec()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=f"dataset_atomic/{PLANTED}")
    parser.add_argument("--overwrite", action="store_true")
    for field, value in vars(defaults).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value)
    args = vars(parser.parse_args(argv))
    out, overwrite = args.pop("out"), args.pop("overwrite")
    write_planted(out, PlantedSpec(**args), overwrite=overwrite)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run_cli(main)
