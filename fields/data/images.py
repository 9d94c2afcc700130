"""Image loading: files (PNG/JPEG/...) and images bundled with scikit-image (``skimage:NAME``)."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from fields.cli import UserError

SKIMAGE_PREFIX = "skimage:"


def load_image(source: str) -> np.ndarray:
    """Loads an image as float32 in [0, 1].

    Args:
        source: a file path, or ``skimage:NAME`` for an image bundled with scikit-image.

    Returns:
        ``[height, width, channels]`` float32 with 1 (grey), 3 (RGB) or 4 (RGBA) channels.

    Raises:
        UserError: the file is missing or unreadable, or the skimage name is unknown.
    """
    if source.startswith(SKIMAGE_PREFIX):
        return _load_skimage(source[len(SKIMAGE_PREFIX) :])
    if not os.path.exists(source):
        raise UserError(f"image not found: {source}")
    try:
        with Image.open(source) as image:
            image.load()
            return pil_to_array(image)
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise UserError(f"cannot read image {source}: {error}") from None


def pil_to_array(image: Image.Image) -> np.ndarray:
    """PIL image -> ``[height, width, channels]`` float32 in [0, 1] (channels 1, 3 or 4)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float32)
        maximum = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        return (array / maximum)[..., None]
    if image.mode == "F":
        return np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)[..., None]
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    if image.mode in ("L", "1"):
        image = image.convert("L")
    else:
        image = image.convert("RGBA" if has_alpha else "RGB")
    array = np.asarray(image, dtype=np.float32) / 255.0
    return array[..., None] if array.ndim == 2 else array


def _load_skimage(name: str) -> np.ndarray:
    import skimage.data

    names = sorted(
        attribute
        for attribute in getattr(skimage.data, "__all__", dir(skimage.data))
        if not attribute.startswith(("_", "data_dir", "file_hash", "download", "lbp", "load", "stereo", "lfw"))
    )
    loader = getattr(skimage.data, name, None) if name in names else None
    if loader is None:
        raise UserError(f"unknown scikit-image image {name!r}; try one of: {', '.join(names)}")
    try:
        array = np.asarray(loader())
    except Exception as error:  # noqa: BLE001 - report any loader failure as one line
        raise UserError(f"cannot load skimage:{name}: {error}") from None
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise UserError(f"skimage:{name} is not a 2D grey/RGB/RGBA image (shape {array.shape})")
    if array.dtype == np.bool_:
        return array.astype(np.float32)
    if np.issubdtype(array.dtype, np.integer):
        return (array.astype(np.float32) / float(np.iinfo(array.dtype).max)).astype(np.float32)
    return np.clip(array.astype(np.float32), 0.0, 1.0)


def array_to_pil(array: np.ndarray) -> Image.Image:
    """``[height, width, channels]`` floats in [0, 1] -> 8-bit PIL image (L, RGB or RGBA)."""
    array = np.asarray(array, dtype=np.float32)
    if array.ndim == 2:
        array = array[..., None]
    quantized = np.round(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)
    if quantized.shape[-1] == 1:
        return Image.fromarray(quantized[..., 0], mode="L")
    return Image.fromarray(quantized, mode="RGBA" if quantized.shape[-1] == 4 else "RGB")


def save_image(path: str, array: np.ndarray) -> None:
    """Writes ``[height, width, channels]`` floats in [0, 1] as an 8-bit image."""
    array_to_pil(array).save(path)
