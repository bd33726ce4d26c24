"""The feature-aware RecBole baselines given the dense .itememb text vector (SASRecFText, FDSAText)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TEST_DATA, tiny_run

from recbole_feddmmr.errors import ConfigError


def itememb_rows() -> dict[str, np.ndarray]:
    """The tiny dataset's SBERT vectors by item token, read from the file itself."""
    frame = pd.read_csv(TEST_DATA / "tiny" / "tiny.itememb", sep="\t", dtype=str)
    frame.columns = [column.split(":")[0] for column in frame.columns]
    return {row.iid: np.array(row.sbert_emb.split(), dtype=np.float32) for row in frame.itertuples()}


@pytest.mark.parametrize("model_name", ["SASRecFText", "FDSAText"])
def test_the_feature_layer_projects_each_items_own_text_vector(tmp_path, model_name):
    config, dataset, _, model = tiny_run(tmp_path, model=model_name, text_dim=8)
    assert config["n_layers"] == 2 and config["selected_features"] == []  # RecBole's defaults, then ours
    layer = model.feature_embed_layer
    vectors = itememb_rows()
    for token, vector in list(vectors.items())[:3]:
        item = dataset.token2id(dataset.iid_field, token)
        np.testing.assert_allclose(layer.table[item].numpy(), vector, rtol=1e-6)
    items = torch.tensor([[1, 2, 0]])  # [B=1, L=3]
    sparse, dense = layer(None, items)
    assert sparse["item"] is None and dense["item"].shape == (1, 3, 1, config["hidden_size"])
    expected = layer.projection(layer.table[items])  # [1, 3, H]
    torch.testing.assert_close(dense["item"][:, :, 0], expected)


@pytest.mark.parametrize("model_name", ["SASRecFText", "FDSAText"])
def test_the_text_vector_reaches_the_score_and_trains_the_projection(tmp_path, model_name):
    _, _, (train, _, _), model = tiny_run(tmp_path, model=model_name, text_dim=8)
    model.eval()
    batch = next(iter(train)).to("cpu")
    before = model.full_sort_predict(batch)
    with torch.no_grad():
        model.feature_embed_layer.table.mul_(-1.0)  # other content, same ids
    assert not torch.allclose(model.full_sort_predict(batch), before)
    model.train()
    loss = model.calculate_loss(batch)
    loss.backward()
    assert torch.isfinite(loss) and model.feature_embed_layer.projection.weight.grad.abs().sum() > 0


def test_a_missing_text_feature_is_refused_with_its_name(tmp_path):
    with pytest.raises(ConfigError, match=r"'no_such_emb'.*itememb"):
        tiny_run(tmp_path, model="SASRecFText", text_dim=8, text_feature_field="no_such_emb")
