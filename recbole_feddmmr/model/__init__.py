"""Models of the plugin; ``registry.get_model`` looks here before RecBole."""

from recbole_feddmmr.model.baselines import FDSAText, SASRecFText
from recbole_feddmmr.model.ur4rec_v2_moe import UR4RecV2MoE

__all__ = ["FDSAText", "SASRecFText", "UR4RecV2MoE"]
