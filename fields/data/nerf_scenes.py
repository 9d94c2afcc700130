"""Load posed multi-view image sets (NeRF datasets) in the Blender/instant-ngp or nerfstudio format.

Two layouts are read:

* Blender NeRF-synthetic / instant-ngp: ``transforms_{train,val,test}.json`` per split, each with
  top-level ``camera_angle_x`` (the FULL horizontal field of view in radians; optional
  ``camera_angle_y``) and ``frames[]`` with ``file_path`` (relative to the json's folder, with or
  without extension: tried as is, then with ``.png``) and ``transform_matrix``.
* nerfstudio: one ``transforms.json`` with intrinsics ``fl_x, fl_y, cx, cy, w, h`` in pixels at the
  top level and/or per frame (per-frame values override), and ``file_path`` per frame (usually
  with extension). All frames are in the one file: without split indices a split gets all of them
  (or the ones nerfstudio's ``{split}_filenames`` list names, when present).

``transform_matrix`` is a 4x4 camera-to-world matrix in the OpenGL convention (camera looks down
-z, +y up, +x right) in both formats. Intrinsic keys (``fl_x``, ``fl_y``, ``cx``, ``cy``, ``w``,
``h``, ``camera_angle_x``, ``camera_angle_y``) are looked up per frame first, then at the top level;
``fl_*`` wins over ``camera_angle_*``; ``cx, cy`` default to the image centre; ``fl_y`` falls back to
``fl_x``. Lens distortion parameters are ignored.

Split indices (``split_indices``: a dict or a JSON file like ``{"train": [0, 2], "test": [1]}``)
pick frames by position in the split's frame list, for either layout.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image

from fields.cli import UserError
from fields.data.images import load_image

INTRINSIC_KEYS = ("fl_x", "fl_y", "cx", "cy", "w", "h", "camera_angle_x", "camera_angle_y")


@dataclasses.dataclass
class SceneData:
    """One split of a posed image set.

    Attributes:
        images: ``[N, H, W, C]`` float32 in [0, 1]; C = 4 (straight alpha) if any image has alpha, else 3.
        camera_to_world: ``[N, 4, 4]`` float32 camera-to-world matrices (OpenGL: looks down -z, +y up).
        intrinsics: ``[N, 4]`` float32 ``(fx, fy, cx, cy)`` per frame in pixels of ``images`` (after
            downscaling); pixel ``(i, j)`` has its centre at ``(i + 0.5, j + 0.5)``.
        width, height: image size in pixels (after downscaling).
        file_paths: ``[N]`` image file paths as read.
        split: the split name.
    """

    images: np.ndarray
    camera_to_world: np.ndarray
    intrinsics: np.ndarray
    width: int
    height: int
    file_paths: list[str]
    split: str

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_channels(self) -> int:
        return int(self.images.shape[-1])


def _fail(source: str, message: str, frame: int | None = None):
    where = f"{source}: frame {frame}: " if frame is not None else f"{source}: "
    raise UserError(where + " ".join(str(message).split()))


def _read_json(path: str):
    if not os.path.isfile(path):
        raise UserError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: cannot read: {error}") from None


def load_split_indices(source: str | Mapping) -> dict[str, list[int]]:
    """Reads split indices: a mapping or a JSON file ``{"train": [0, 2, ...], "test": [1, ...], ...}``."""
    name = source if isinstance(source, str) else "split_indices"
    data = _read_json(source) if isinstance(source, str) else source
    if not isinstance(data, Mapping):
        _fail(name, f"must be an object mapping split names to index lists, got {type(data).__name__}")
    result = {}
    for split, indices in data.items():
        if not isinstance(indices, Sequence) or isinstance(indices, str) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices
        ):
            _fail(name, f"{split!r} must be a list of non-negative integers")
        result[str(split)] = [int(i) for i in indices]
    return result


def _number(value, source: str, key: str, frame: int | None, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        _fail(source, f"{key!r} must be a finite number, got {value!r}", frame)
    if positive and value <= 0:
        _fail(source, f"{key!r} must be positive, got {value!r}", frame)
    return float(value)


def _matrix(frame_data: dict, source: str, index: int) -> np.ndarray:
    if "transform_matrix" not in frame_data:
        _fail(source, "missing 'transform_matrix'", index)
    value = frame_data["transform_matrix"]
    if not isinstance(value, list):
        _fail(source, f"'transform_matrix' must be 4x4 nested lists, got {type(value).__name__}", index)
    if len(value) != 4:
        _fail(source, f"'transform_matrix' must be 4x4, got {len(value)} rows", index)
    for r, row in enumerate(value):
        if not isinstance(row, list) or len(row) != 4:
            got = f"{len(row)} columns" if isinstance(row, list) else type(row).__name__
            _fail(source, f"'transform_matrix' must be 4x4, row {r} has {got}", index)
        for x in row:
            if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
                _fail(source, f"'transform_matrix' must hold finite numbers, got {x!r}", index)
    return np.asarray(value, dtype=np.float64)


def _resolve_image(root: str, file_path, source: str, index: int) -> str:
    if not isinstance(file_path, str) or not file_path:
        _fail(source, f"'file_path' must be a non-empty string, got {file_path!r}", index)
    path = os.path.normpath(os.path.join(root, file_path))
    for candidate in (path, path + ".png"):
        if os.path.isfile(candidate):
            return candidate
    _fail(source, f"image {file_path!r} not found (looked for {path} and {path}.png)", index)


def _load_frame_image(path: str, source: str, index: int) -> np.ndarray:
    try:
        image = load_image(path)
    except UserError as error:
        _fail(source, str(error), index)
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return image


def _downscale(image: np.ndarray, factor: int) -> np.ndarray:
    """Area (box) resize by an integer factor; alpha images are averaged premultiplied."""
    height, width = image.shape[:2]
    size = (max(width // factor, 1), max(height // factor, 1))
    planes = image.astype(np.float32)
    if planes.shape[-1] == 4:
        planes = np.concatenate([planes[..., :3] * planes[..., 3:], planes[..., 3:]], axis=-1)
    resized = np.stack([
        np.asarray(Image.fromarray(np.ascontiguousarray(planes[..., c])).resize(size, Image.Resampling.BOX))
        for c in range(planes.shape[-1])
    ], axis=-1)
    if resized.shape[-1] == 4:
        alpha = resized[..., 3:]
        resized[..., :3] = np.where(alpha > 0, resized[..., :3] / np.maximum(alpha, 1e-8), 0.0)
    return np.clip(resized, 0.0, 1.0).astype(np.float32)


def _intrinsics(frame_data: dict, top: dict, width: int, height: int, source: str, index: int) -> tuple:
    def get(key):
        value = frame_data.get(key, top.get(key))
        return None if value is None else _number(value, source, key, index, positive=key not in ("cx", "cy"))

    for key, actual in (("w", width), ("h", height)):
        declared = get(key)
        if declared is not None and int(declared) != actual:
            _fail(source, f"{key!r} is {declared:g} but the image is {width}x{height}", index)
    fx = get("fl_x")
    if fx is None:
        angle_x = get("camera_angle_x")
        if angle_x is None:
            _fail(source, "missing 'camera_angle_x' (or 'fl_x')", index)
        if angle_x >= math.pi:
            _fail(source, f"'camera_angle_x' must be the full field of view in radians (< pi), got {angle_x}", index)
        fx = 0.5 * width / math.tan(0.5 * angle_x)
    fy = get("fl_y")
    if fy is None:
        angle_y = get("camera_angle_y")
        fy = fx if angle_y is None else 0.5 * height / math.tan(0.5 * angle_y)
    cx, cy = get("cx"), get("cy")
    return fx, fy, 0.5 * width if cx is None else cx, 0.5 * height if cy is None else cy


def _locate(path: str, split: str) -> tuple[str, str]:
    """(json path, layout) for ``path`` (a folder or a json file)."""
    if os.path.isfile(path):
        return path, "file"
    if not os.path.isdir(path):
        raise UserError(f"{path}: no such scene folder or transforms file")
    per_split = os.path.join(path, f"transforms_{split}.json")
    if os.path.exists(per_split):
        return per_split, "blender"
    single = os.path.join(path, "transforms.json")
    if os.path.exists(single):
        return single, "single"
    raise UserError(f"{path}: found neither transforms_{split}.json nor transforms.json")


def load_scene(path: str, split: str = "train", downscale: int = 1,
               split_indices: str | Mapping | None = None, white_background: bool = False) -> SceneData:
    """Loads one split of a NeRF dataset.

    Args:
        path: the scene folder (or a transforms json file directly).
        split: ``train``, ``val``, ``test`` (any name for which a file or split index list exists).
        downscale: integer factor; images are area-resized to ``size // downscale`` and the
            intrinsics scaled to match.
        split_indices: dict or JSON file ``{"train": [...], "test": [...]}`` choosing frames (by
            position in the file's frame list) for this split.
        white_background: composite RGBA images onto white and return RGB.

    Returns:
        :class:`SceneData` (see its shapes).

    Raises:
        UserError: one line naming the file, the frame index and the key, for a missing or invalid
            transforms file, missing intrinsics or frames, a bad ``transform_matrix``, a missing
            image, or images of different sizes.
    """
    if isinstance(downscale, bool) or not isinstance(downscale, int) or downscale < 1:
        raise UserError(f"downscale must be a positive integer, got {downscale!r}")
    json_path, layout = _locate(path, split)
    root = os.path.dirname(json_path)
    data = _read_json(json_path)
    if not isinstance(data, dict):
        _fail(json_path, f"must hold a JSON object, got {type(data).__name__}")
    if "frames" not in data:
        _fail(json_path, "missing 'frames'")
    frames = data["frames"]
    if not isinstance(frames, list) or not frames:
        _fail(json_path, "'frames' must be a non-empty list")
    for k, frame in enumerate(frames):
        if not isinstance(frame, dict):
            _fail(json_path, f"must be an object, got {type(frame).__name__}", k)
    if "fl_x" not in data and "camera_angle_x" not in data and not all(
        "fl_x" in f or "camera_angle_x" in f for f in frames
    ):
        _fail(json_path, "missing 'camera_angle_x' (or 'fl_x')")

    chosen = list(range(len(frames)))
    if split_indices is not None:
        indices = load_split_indices(split_indices)
        name = split_indices if isinstance(split_indices, str) else "split_indices"
        if split not in indices:
            _fail(name, f"no {split!r} list (has: {', '.join(indices) or 'none'})")
        for i in indices[split]:
            if i >= len(frames):
                _fail(name, f"{split!r} index {i} is out of range: {json_path} has {len(frames)} frames")
        chosen = indices[split]
    elif layout != "blender" and isinstance(data.get(f"{split}_filenames"), list):
        wanted = {os.path.normpath(str(p)) for p in data[f"{split}_filenames"]}
        chosen = [k for k, f in enumerate(frames) if os.path.normpath(str(f.get("file_path"))) in wanted]
        if not chosen:
            _fail(json_path, f"'{split}_filenames' matches no frame's 'file_path'")

    images, matrices, intrinsics, paths = [], [], [], []
    size = None
    for k in chosen:
        frame = frames[k]
        if "file_path" not in frame:
            _fail(json_path, "missing 'file_path'", k)
        matrix = _matrix(frame, json_path, k)
        image_path = _resolve_image(root, frame["file_path"], json_path, k)
        image = _load_frame_image(image_path, json_path, k)
        height, width = image.shape[:2]
        if size is None:
            size = (width, height)
        elif (width, height) != size:
            _fail(json_path, f"image {frame['file_path']!r} is {width}x{height}, but earlier frames are "
                  f"{size[0]}x{size[1]}", k)
        fx, fy, cx, cy = _intrinsics(frame, data, width, height, json_path, k)
        if downscale > 1:
            image = _downscale(image, downscale)
            sx, sy = image.shape[1] / width, image.shape[0] / height
            fx, fy, cx, cy = fx * sx, fy * sy, cx * sx, cy * sy
        images.append(image)
        matrices.append(matrix)
        intrinsics.append((fx, fy, cx, cy))
        paths.append(image_path)

    if not images:
        _fail(json_path, f"no frames selected for split {split!r}")
    channels = 4 if any(im.shape[-1] == 4 for im in images) else 3
    stacked = np.stack([im if im.shape[-1] == channels else
                        np.concatenate([im, np.ones_like(im[..., :1])], axis=-1) for im in images]).astype(np.float32)
    if white_background and channels == 4:
        stacked = stacked[..., :3] * stacked[..., 3:] + (1.0 - stacked[..., 3:])
    return SceneData(
        images=stacked,
        camera_to_world=np.stack(matrices).astype(np.float32),
        intrinsics=np.asarray(intrinsics, dtype=np.float32),
        width=int(stacked.shape[2]),
        height=int(stacked.shape[1]),
        file_paths=paths,
        split=split,
    )
