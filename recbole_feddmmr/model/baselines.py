"""RecBole's feature-aware sequential baselines, given a dense item feature from the ``.itememb`` file.

RecBole's SASRecF and FDSA read their item features from the ``.item`` file, and they embed a
``float_seq`` field as (value, position) pairs whose position index is the same for every element
unless the values are discretized: a 384-d SBERT vector then collapses to one number times one
embedding, and discretized it becomes a bag of value buckets that no longer knows which dimension
held which value. Neither is the text feature. :class:`SASRecFText` and :class:`FDSAText` are the same
models whose feature layer is a learned linear projection of the dense vector instead
(``text_feature_field`` of the ``.itememb``, the SBERT feature UR4RecV2MoE's semantic expert reads),
so that a feature-aware baseline sees the same content as FedDMMR. Everything else is RecBole's.
"""

from __future__ import annotations

from torch import Tensor, nn

from recbole_feddmmr.compat import keep_anomaly_mode
from recbole_feddmmr.errors import ConfigError
from recbole_feddmmr.model.ur4rec_v2_moe import item_feature_table

with keep_anomaly_mode():  # RecBole's sequential models switch autograd anomaly detection on when imported
    from recbole.model.sequential_recommender import FDSA, SASRecF


class DenseItemFeatureLayer(nn.Module):
    """A fixed ``[n_items, F]`` feature table and a learned projection to the model's hidden size, with the
    interface of RecBole's ``FeatureSeqEmbLayer``: ``(None, item_seq [B, L])`` -> (sparse, dense) per source,
    the dense part ``[B, L, 1, H]`` (one feature field)."""

    def __init__(self, config, dataset, hidden_size: int) -> None:
        super().__init__()
        field, dim = config["text_feature_field"], config["text_dim"]
        table = item_feature_table(dataset, config["feature_id_field"], field, dim)
        if table is None:
            raise ConfigError(
                f"{config['model']} reads the dense item feature '{field}' of the .itememb file (text_feature_field, "
                f"id column feature_id_field={config['feature_id_field']}), which dataset {config['dataset']} "
                "has not loaded: build the features (python -m recbole_feddmmr.features) and list them in load_col"
            )
        self.register_buffer("table", table, persistent=False)  # [n_items, F], the features stay fixed
        self.projection = nn.Linear(dim, hidden_size)

    def forward(self, user_idx: Tensor | None, item_idx: Tensor) -> tuple[dict, dict]:
        dense = self.projection(self.table[item_idx]).unsqueeze(-2)  # [B, L, 1, H]
        return {"item": None}, {"item": dense}


class SASRecFText(SASRecF):
    """SASRecF whose item feature is the dense ``.itememb`` text vector (see the module docstring): the input
    of each position is ``Linear([item embedding; projected text])``, as SASRecF does with its features."""

    def __init__(self, config, dataset) -> None:
        super().__init__(config, dataset)  # its RecBole feature layer (selected_features) is replaced below
        self.feature_embed_layer = DenseItemFeatureLayer(config, dataset, self.hidden_size)
        self.num_feature_field = 1
        self.concat_layer = nn.Linear(2 * self.hidden_size, self.hidden_size)
        self.apply(self._init_weights)


class FDSAText(FDSA):
    """FDSA whose feature stream reads the dense ``.itememb`` text vector (see the module docstring)."""

    def __init__(self, config, dataset) -> None:
        super().__init__(config, dataset)
        self.feature_embed_layer = DenseItemFeatureLayer(config, dataset, self.hidden_size)
        self.num_feature_field = 1
        self.apply(self._init_weights)
