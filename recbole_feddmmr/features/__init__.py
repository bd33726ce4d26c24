"""Item feature tools: encoders that turn item texts (and, later, images) into RecBole ``.itememb`` files."""

from recbole_feddmmr.features.atomic import write_itememb
from recbole_feddmmr.features.text import encode_texts, load_sentence_encoder, offline_minilm_path

__all__ = ["encode_texts", "load_sentence_encoder", "offline_minilm_path", "write_itememb"]
