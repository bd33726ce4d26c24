"""ml-100k from RecBole's wheel with offline SBERT features; .itememb writing."""

from __future__ import annotations

import numpy as np
import pytest

from recbole_feddmmr.datasets import ensure_dataset, ml100k_item_texts, prepare_ml100k, read_atomic, recbole_ml100k_dir
from recbole_feddmmr.features import encode_texts, load_sentence_encoder, write_itememb


class CountingEncoder:
    """A stand-in sentence encoder for the file-building test: a deterministic vector per text."""

    def __init__(self):
        self.texts = []

    def encode(self, texts, **kwargs):
        self.texts.extend(texts)
        return np.stack([np.full(4, float(len(text))) for text in texts])


def test_item_text_is_title_year_and_genres():
    texts = ml100k_item_texts(recbole_ml100k_dir() / "ml-100k.item", ["1", "50"])
    assert texts[0] == "Toy Story (1995). Genres: Animation, Children's, Comedy"
    assert texts[1].startswith("Star Wars (1977). Genres: ")


def test_prepare_ml100k_writes_recbole_files_and_features_for_exactly_the_inter_items(tmp_path):
    encoder = CountingEncoder()
    target = prepare_ml100k(tmp_path / "ml-100k", encoder=encoder, show_progress=False)
    for suffix in ("inter", "item", "user"):
        assert (target / f"ml-100k.{suffix}").read_bytes() == (recbole_ml100k_dir() / f"ml-100k.{suffix}").read_bytes()
    itememb = read_atomic(target / "ml-100k.itememb")
    inter_items = set(read_atomic(target / "ml-100k.inter")["item_id"])
    assert list(itememb.columns) == ["iid", "sbert_emb"]
    assert set(itememb["iid"]) == inter_items and len(itememb) == len(inter_items) == 1682
    first = itememb.set_index("iid").loc["1", "sbert_emb"]
    assert first.split() == ["55"] * 4  # len("Toy Story (1995). Genres: Animation, Children's, Comedy")
    # a second call keeps what exists and encodes nothing
    prepare_ml100k(target, encoder=encoder, show_progress=False)
    assert len(encoder.texts) == 1682


def test_unknown_dataset_without_files_fails_with_instructions(tmp_path):
    with pytest.raises(FileNotFoundError, match="put the atomic files"):
        ensure_dataset("my-data", tmp_path / "my-data")


def test_offline_sbert_encodes_normalised_384d_vectors_and_similar_titles_are_close():
    encoder = load_sentence_encoder()
    texts = [
        "Star Wars (1977). Genres: Action, Adventure, Romance, Sci-Fi, War",
        "Return of the Jedi (1983). Genres: Action, Adventure, Romance, Sci-Fi, War",
        "Sense and Sensibility (1995). Genres: Drama, Romance",
        "Star Wars (1977). Genres: Action, Adventure, Romance, Sci-Fi, War",
    ]
    vectors = encode_texts(texts, encoder, show_progress=False)
    assert vectors.shape == (4, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(vectors[0], vectors[3])
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]


def test_write_itememb_round_trips_and_rejects_bad_input(tmp_path):
    matrix = np.array([[0.5, -1.25], [3.0, 1e-3]], dtype=np.float32)
    path = write_itememb(tmp_path / "x.itememb", ["7", "3"], {"sbert_emb": matrix})
    frame = read_atomic(path)
    assert frame["iid"].tolist() == ["7", "3"]
    np.testing.assert_allclose(np.array([row.split() for row in frame["sbert_emb"]], dtype=np.float32), matrix)
    assert path.read_text().splitlines()[0] == "iid:token\tsbert_emb:float_seq"
    with pytest.raises(ValueError, match="NaN or inf"):
        write_itememb(tmp_path / "bad.itememb", ["1"], {"sbert_emb": np.array([[np.nan, 1.0]])})
    with pytest.raises(ValueError, match="rows"):
        write_itememb(tmp_path / "bad.itememb", ["1", "2"], {"sbert_emb": matrix[:1]})
