"""The planted-signal dataset: the signal is where the generator says it is, and only there."""

from __future__ import annotations

import numpy as np

from recbole_feddmmr.datasets import read_atomic
from recbole_feddmmr.synthetic import PlantedSpec, generate, write_planted

SMALL = PlantedSpec(num_users=60, num_items=400, num_factors=5, interactions_per_user=12, signal=0.8, seed=7)


def test_users_draw_the_planted_share_from_their_factor_and_never_repeat_an_item():
    interactions, items, user_factor = generate(SMALL)
    assert len(interactions) == SMALL.num_users * SMALL.interactions_per_user
    assert not interactions.duplicated(["user_id", "item_id"]).any()
    factor_of_item = items.set_index("item_id")["factor"]
    in_preferred = factor_of_item[interactions["item_id"]].to_numpy() == user_factor[interactions["user_id"] - 1]
    # signal 0.8 plus the 1/5 of random draws that land in the factor anyway: 0.84 expected
    assert abs(in_preferred.mean() - (SMALL.signal + (1 - SMALL.signal) / SMALL.num_factors)) < 0.05
    assert interactions.groupby("user_id")["timestamp"].apply(lambda t: t.is_monotonic_increasing).all()


def test_generation_is_reproducible_from_the_seed(tmp_path):
    first = write_planted(tmp_path / "a", SMALL)
    second = write_planted(tmp_path / "b", SMALL)
    for suffix in ("inter", "itememb"):
        assert (first / f"planted.{suffix}").read_text() == (second / f"planted.{suffix}").read_text()


def test_true_features_reveal_the_factor_and_shuffled_ones_are_the_same_rows_unlinked(tmp_path):
    write_planted(tmp_path, SMALL)
    _, items, _ = generate(SMALL)
    inter = read_atomic(tmp_path / "planted.inter")
    emb = read_atomic(tmp_path / "planted.itememb")
    assert set(emb["iid"]) == set(inter["item_id"])  # exactly the items of the .inter file

    def matrix(column: str) -> np.ndarray:
        return np.array([np.array(cell.split(), dtype=float) for cell in emb[column]])

    factor = items.set_index("item_id")["factor"][emb["iid"].astype(int)].to_numpy()
    for true_column, shuffled_column, dim in (("sbert_emb", "sbert_shuffled", 32), ("clip_emb", "clip_shuffled", 48)):
        true, shuffled = matrix(true_column), matrix(shuffled_column)
        assert true.shape[1] == dim
        np.testing.assert_allclose(np.linalg.norm(true, axis=1), 1.0, atol=1e-5)
        # nearest factor centroid (mean of that factor's rows) recovers the factor from the true features
        centroids = np.stack([true[factor == f].mean(0) for f in range(SMALL.num_factors)])
        assert ((true @ centroids.T).argmax(1) == factor).mean() > 0.95
        shuffled_centroids = np.stack([shuffled[factor == f].mean(0) for f in range(SMALL.num_factors)])
        assert ((shuffled @ shuffled_centroids.T).argmax(1) == factor).mean() < 0.5
        # same vectors, other items: each shuffled row is some true row
        assert sorted(map(tuple, np.round(shuffled, 5))) == sorted(map(tuple, np.round(true, 5)))
