"""Sources of many images for ``fields.encode_dataset``, addressed by a spec string.

- ``procedural:primitives`` - the built-in 2D primitives (``fields.data.procgen_2d``); label = shape.
- ``idx:IMAGES[,LABELS]`` - an IDX file pair, gzipped or not (e.g. Debian's ``dataset-fashion-mnist``:
  ``idx:/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz,/usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz``).
- ``parquet:FILE[#COLUMN]`` - a parquet file with an image column (PNG/JPEG bytes, Hugging Face
  ``{"bytes", "path"}`` structs, or nested lists of numbers); label from a ``label`` column if any.
- ``DIR`` - a folder of images (sorted by path; a subfolder per class gives labels).

Every source gives images of one size ``[height, width, channels]`` (``--size`` resizes) as floats
in [0, 1], a label per item (-1 if none) and a stable source id per item.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
import pathlib
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from fields.cli import UserError
from fields.data.images import pil_to_array

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclasses.dataclass
class ImageSource:
    """``num_items`` images of shape ``[height, width, channels]``; ``load(indices)`` reads some."""

    name: str
    num_items: int
    height: int
    width: int
    channels: int
    labels: np.ndarray  # [num_items] int32, -1 where unknown
    _loader: object = dataclasses.field(repr=False, default=None)
    _ids: object = dataclasses.field(repr=False, default=None)

    def load(self, indices: Sequence[int]) -> np.ndarray:
        """``[len(indices), height, width, channels]`` float32 in [0, 1]."""
        return np.stack([self._loader(int(index)) for index in indices]).astype(np.float32)

    def source_id(self, index: int) -> str:
        return self._ids(int(index))


def _resize(array: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    if size is None or array.shape[:2] == size:
        return array
    channels = array.shape[-1]
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[channels]
    image = Image.fromarray(np.round(array[..., 0] * 255).astype(np.uint8) if channels == 1
                            else np.round(array * 255).astype(np.uint8), mode)
    resized = np.asarray(image.resize((size[1], size[0]), Image.Resampling.BOX), np.float32) / 255.0
    return resized[..., None] if channels == 1 else resized


def procedural_source(num_items: int, seed: int, size: tuple[int, int] | None) -> ImageSource:
    from fields.data.procgen_2d import primitive_image

    side = size[0] if size else 28
    if size and size[0] != size[1]:
        raise UserError(f"procedural:primitives makes square images; got --size {size[0]}x{size[1]}")
    labels = np.asarray([primitive_image(i, seed, 4)[1] for i in range(num_items)], np.int32)
    return ImageSource("procedural:primitives", num_items, side, side, 3, labels,
                       lambda i: primitive_image(i, seed, side)[0], lambda i: f"primitives/{seed}/{i}")


def read_idx(path: str) -> np.ndarray:
    """An IDX file (optionally gzipped) -> uint8 array of its shape."""
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise UserError(f"cannot read IDX file {path}: {error.strerror or error}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise UserError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    num_dims = data[3]
    header = 4 + 4 * num_dims
    shape = tuple(int.from_bytes(data[4 + 4 * k: 8 + 4 * k], "big") for k in range(num_dims))
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise UserError(f"{path}: header promises {expected} bytes for shape {shape}, found {len(data) - header}")
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def idx_source(spec: str, size: tuple[int, int] | None, limit: int | None) -> ImageSource:
    paths = spec.split(",")
    images = read_idx(paths[0])
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise UserError(f"{paths[0]}: expected [N, H, W] or [N, H, W, C] images, got shape {images.shape}")
    labels = np.full(len(images), -1, np.int32)
    if len(paths) > 1:
        label_data = read_idx(paths[1])
        if label_data.shape != (len(images),):
            raise UserError(f"{paths[1]}: {label_data.shape[0] if label_data.ndim else 0} labels for {len(images)} "
                            "images")
        labels = label_data.astype(np.int32)
    count = len(images) if limit is None else min(limit, len(images))
    height, width = size or images.shape[1:3]
    name = os.path.basename(paths[0])
    return ImageSource(f"idx:{paths[0]}", count, height, width, images.shape[-1], labels[:count],
                       lambda i: _resize(images[i].astype(np.float32) / 255.0, size), lambda i: f"{name}/{i}")


def _decode_cell(value, where: str) -> np.ndarray:
    if isinstance(value, dict):
        if not value.get("bytes") and value.get("path"):
            try:
                value = {"bytes": pathlib.Path(value["path"]).read_bytes()}
            except OSError as error:
                raise UserError(f"{where}: cannot read the image file {value['path']} ({error.strerror or error})") \
                    from None
        value = value.get("bytes")
    if isinstance(value, bytes | bytearray):
        try:
            with Image.open(io.BytesIO(value)) as image:
                return pil_to_array(image)
        except (UnidentifiedImageError, OSError) as error:
            raise UserError(f"{where}: cannot decode image bytes ({error})") from None
    array = np.asarray(value, np.float32)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise UserError(f"{where}: an image cell must be bytes or an [H, W(, C)] array")
    return array / 255.0 if array.max() > 1.0 else array


def parquet_source(spec: str, size: tuple[int, int] | None, limit: int | None) -> ImageSource:
    import pyarrow.parquet as pq

    path, _, column = spec.partition("#")
    try:
        table = pq.read_table(path)
    except Exception as error:  # noqa: BLE001 - any reader failure is a bad file
        raise UserError(f"cannot read parquet file {path}: {error}") from None
    column = column or next((name for name in ("image", "img", "pixels") if name in table.column_names), "")
    if column not in table.column_names:
        raise UserError(f"{path}: no image column {column or '(image/img/pixels)'}; columns: "
                        f"{', '.join(table.column_names)} (choose with parquet:{path}#COLUMN)")
    cells = table.column(column).to_pylist()
    labels = np.asarray(table.column("label").to_pylist(), np.int32) if "label" in table.column_names else \
        np.full(len(cells), -1, np.int32)
    count = len(cells) if limit is None else min(limit, len(cells))
    first = _resize(_decode_cell(cells[0], f"{path} row 0"), size)

    def load(i):
        array = _resize(_decode_cell(cells[i], f"{path} row {i}"), size)
        if array.shape != first.shape:
            raise UserError(f"{path} row {i}: image of shape {array.shape}, expected {first.shape} (use --size)")
        return array

    return ImageSource(f"parquet:{path}", count, first.shape[0], first.shape[1], first.shape[2], labels[:count], load,
                       lambda i: f"{os.path.basename(path)}/{i}")


def folder_source(path: str, size: tuple[int, int] | None, limit: int | None) -> ImageSource:
    files = sorted(os.path.relpath(os.path.join(root, name), path) for root, _, names in os.walk(path)
                   for name in names if name.lower().endswith(IMAGE_SUFFIXES))
    if not files:
        raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {path}")
    files = files[:limit] if limit is not None else files
    classes = sorted({os.path.dirname(name) for name in files})
    labels = np.asarray([classes.index(os.path.dirname(name)) if len(classes) > 1 else -1 for name in files], np.int32)
    from fields.data.images import load_image

    first = _resize(load_image(os.path.join(path, files[0])), size)

    def load(i):
        array = _resize(load_image(os.path.join(path, files[i])), size)
        if array.shape != first.shape:
            raise UserError(f"{files[i]}: image of shape {array.shape}, expected {first.shape} (use --size)")
        return array

    return ImageSource(f"folder:{path}", len(files), first.shape[0], first.shape[1], first.shape[2], labels, load,
                       lambda i: files[i])


def open_image_source(spec: str, num_items: int | None = None, seed: int = 0,
                      size: tuple[int, int] | None = None) -> ImageSource:
    """Opens a source spec (see the module docstring). ``num_items`` caps (or, for procedural, sets) the count."""
    if spec == "procedural:primitives":
        return procedural_source(num_items or 1024, seed, size)
    if spec.startswith("idx:"):
        return idx_source(spec[4:], size, num_items)
    if spec.startswith("parquet:"):
        return parquet_source(spec[8:], size, num_items)
    if os.path.isdir(spec):
        return folder_source(spec, size, num_items)
    if spec.startswith("procedural:"):
        raise UserError(f"unknown procedural source {spec!r}; try procedural:primitives")
    raise UserError(f"image source not found or not understood: {spec} "
                    "(procedural:primitives, idx:IMAGES[,LABELS], parquet:FILE[#COLUMN], or a folder)")
