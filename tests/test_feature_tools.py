"""The feature command: SBERT texts and CLIP images of a dataset's items into a validated .itememb."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from conftest import TEST_DATA, tiny_config, tiny_run

from recbole_feddmmr.datasets import check_item_features, read_atomic
from recbole_feddmmr.errors import ConfigError
from recbole_feddmmr.features.__main__ import item_texts, main
from recbole_feddmmr.features.image import ImageFolderError, find_item_images


@pytest.fixture
def tiny_clip(tmp_path):
    """A randomly initialised CLIP with 6-d projections and 32x32 inputs, saved like a downloaded model."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    small = {"hidden_size": 8, "intermediate_size": 16, "num_attention_heads": 2, "num_hidden_layers": 1}
    config = CLIPConfig(
        text_config={**small, "vocab_size": 64, "max_position_embeddings": 16},
        vision_config={**small, "image_size": 32, "patch_size": 16},
        projection_dim=6,
    )
    torch.manual_seed(0)
    folder = tmp_path / "clip"
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_dataset(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(TEST_DATA / "tiny", data / "tiny")
    (data / "tiny" / "tiny.itememb").unlink()
    return data


def make_images(folder, item_ids, size=40):
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    for index, item in enumerate(item_ids):
        pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{item}.{'png' if index % 2 else 'jpg'}")


def test_texts_and_images_become_a_validated_itememb_that_the_model_reads(tmp_path, tiny_dataset, tiny_clip):
    with_image = [str(i) for i in range(1, 21)]  # items 21-30 have no image
    make_images(tmp_path / "posters", with_image)
    summary = main(
        [
            "--dataset",
            "tiny",
            "--data-path",
            str(tiny_dataset),
            "--text-columns",
            "movie_title",
            "class",
            "--images",
            str(tmp_path / "posters"),
            "--clip-model",
            str(tiny_clip),
            "--batch-size",
            "8",
        ]
    )
    assert summary["items"] == 30
    assert summary["sbert_emb"] == {"dim": 384, "encoded": 30, "without": 0}
    assert summary["clip_emb"] == {"dim": 6, "encoded": 20, "without": 10}

    frame = read_atomic(tiny_dataset / "tiny" / "tiny.itememb").set_index("iid")
    assert set(frame.index) == set(read_atomic(tiny_dataset / "tiny" / "tiny.inter")["item_id"])
    assert (frame.loc[["21", "30"], "clip_emb"] == "").all()  # no image: no vector
    clip = np.array(frame.loc["3", "clip_emb"].split(), dtype=np.float32)
    np.testing.assert_allclose(np.linalg.norm(clip), 1.0, rtol=1e-5)

    report = check_item_features(tiny_config(tmp_path, data_path=str(tiny_dataset), text_dim=384))
    assert report.dims == {"sbert_emb": 384, "clip_emb": 6} and report.missing == {"clip_emb": 10}
    _, dataset, _, model = tiny_run(tmp_path, data_path=str(tiny_dataset), text_dim=384)
    assert model.live_experts == ["sequential", "visual", "semantic"]
    row = dataset.token2id("item_id", "3")
    np.testing.assert_allclose(model.item_features.visual[row].numpy(), clip, rtol=1e-6)
    assert not model.item_features.visual_available[dataset.token2id("item_id", "25")]


def test_images_only_run_switches_the_semantic_expert_off(tmp_path, tiny_dataset, tiny_clip):
    make_images(tmp_path / "posters", [str(i) for i in range(1, 31)])
    main(
        [
            "--dataset",
            "tiny",
            "--data-path",
            str(tiny_dataset),
            "--no-text",
            "--images",
            str(tmp_path / "posters"),
            "--clip-model",
            str(tiny_clip),
        ]
    )
    _, _, _, model = tiny_run(tmp_path, data_path=str(tiny_dataset))
    assert model.live_experts == ["sequential", "visual"]


def test_item_texts_join_the_chosen_columns():
    texts = item_texts(TEST_DATA / "tiny" / "tiny.item", ["2", "999"], ["movie_title", "release_year"])
    assert texts == ["Movie 2. 1992", ""]
    with pytest.raises(ValueError, match="no column"):
        item_texts(TEST_DATA / "tiny" / "tiny.item", ["2"], ["plot"])


def test_an_images_folder_that_matches_no_item_is_an_error(tmp_path):
    make_images(tmp_path / "posters", ["poster_a", "poster_b"])
    with pytest.raises(ImageFolderError, match="matches no item id"):
        find_item_images(tmp_path / "posters", ["1", "2"])
    with pytest.raises(ImageFolderError, match="does not exist"):
        find_item_images(tmp_path / "nowhere", ["1"])


def test_existing_file_is_kept_unless_overwrite(tmp_path, tiny_dataset):
    (tiny_dataset / "tiny" / "tiny.itememb").write_text("iid:token\tsbert_emb:float_seq\n")
    with pytest.raises(ConfigError, match="--overwrite"):
        main(["--dataset", "tiny", "--data-path", str(tiny_dataset), "--text-columns", "movie_title"])
