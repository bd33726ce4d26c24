"""CLIP image features through transformers, from a local model folder only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from recbole_feddmmr.errors import DataFileError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class ImageFolderError(DataFileError):
    """An images folder that cannot give features for the dataset's items."""


def find_item_images(images_dir: str | Path, item_ids: list[str]) -> dict[str, Path]:
    """``{item id: image file}`` for the items that have a file ``<item id>.<png|jpg|jpeg|webp>`` in ``images_dir``.

    Raises when the folder is missing or none of its files is named after an item id.
    """
    folder = Path(images_dir)
    if not folder.is_dir():
        raise ImageFolderError(f"images folder {folder} does not exist")
    by_stem = {path.stem: path for path in sorted(folder.iterdir()) if path.suffix.lower() in IMAGE_SUFFIXES}
    found = {item: by_stem[item] for item in item_ids if item in by_stem}
    if not found:
        examples = ", ".join(sorted(by_stem)[:3]) or "no image files"
        raise ImageFolderError(
            f"images folder {folder} matches no item id ({examples}; items look like {', '.join(item_ids[:3])}): "
            "name each image <item id>.png|jpg|webp"
        )
    return found


def load_clip(model_dir: str | Path, device: str = "cpu"):
    """(CLIPModel, CLIPImageProcessor) from a local folder; nothing is downloaded."""
    from transformers import CLIPImageProcessor, CLIPModel

    model = CLIPModel.from_pretrained(str(model_dir), local_files_only=True).to(device).eval()
    processor = CLIPImageProcessor.from_pretrained(str(model_dir), local_files_only=True)
    return model, processor


@torch.no_grad()
def encode_images(
    paths: list[Path], model, processor, batch_size: int = 32, normalize: bool = True, show_progress: bool = True
) -> np.ndarray:
    """Image files -> float32 CLIP image embeddings [len(paths), D] (D = the model's projection size)."""
    from PIL import Image

    device = next(model.parameters()).device
    chunks = []
    starts = range(0, len(paths), batch_size)
    for start in tqdm(starts, desc="CLIP images", disable=not show_progress, total=len(starts)):
        images = []
        for path in paths[start : start + batch_size]:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(device)
        output = model.get_image_features(pixel_values=pixels)
        features = output if isinstance(output, torch.Tensor) else output.pooler_output  # transformers 4 / 5
        if normalize:
            features = torch.nn.functional.normalize(features, dim=-1)
        chunks.append(features.float().cpu().numpy())
    return np.concatenate(chunks) if chunks else np.zeros((0, model.config.projection_dim), dtype=np.float32)
