"""Field weights as data: params pytree <-> named flat tensors, and safetensors files.

A params pytree (nested dicts of arrays, as Flax returns) is flattened to ``{"a/b/c": array}``
with ``/``-joined names in sorted order. ``save_field`` writes those tensors to a safetensors file
whose metadata holds the field config as JSON, so the file is self-describing and readable
without this project's code.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from fields.cli import UserError

METADATA_FORMAT = "hyper-field-networks/field/v1"


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    """Nested dict of arrays -> ``{"path/to/leaf": np.ndarray}`` (sorted by name)."""
    flat: dict[str, np.ndarray] = {}
    for name in sorted(params):
        value = params[name]
        path = f"{prefix}{name}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, path + "/"))
        else:
            flat[path] = np.asarray(value)
    return flat


def unflatten_params(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Inverse of ``flatten_params``."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return tree


def save_field(path: str, params: Mapping[str, Any], kind: str, field_config: dict, **metadata: Any) -> None:
    """Writes a field's weights to a safetensors file, atomically.

    Args:
        path: destination ``.safetensors`` file.
        params: nested dict of arrays (the field's params).
        kind: the field type, e.g. ``"ngp_image"``; checked when loading.
        field_config: the field's architecture as a JSON-able dict.
        **metadata: further JSON-able entries (e.g. ``image_height``) stored in the metadata.
    """
    from safetensors.numpy import save_file

    tensors = {name: np.ascontiguousarray(value) for name, value in flatten_params(params).items()}
    header = {"format": METADATA_FORMAT, "kind": kind, "field_config": json.dumps(field_config)}
    header.update({key: json.dumps(value) for key, value in metadata.items()})
    directory = os.path.dirname(os.path.abspath(path))
    descriptor, temporary = tempfile.mkstemp(dir=directory, suffix=".tmp")
    os.close(descriptor)
    try:
        save_file(tensors, temporary, metadata=header)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def load_field(path: str, kind: str | None = None) -> tuple[dict[str, Any], dict, dict[str, Any]]:
    """Reads a field written by ``save_field``.

    Returns:
        ``(params, field_config, metadata)``: nested dict of numpy arrays, the config dict, and
        the other metadata entries decoded from JSON.

    Raises:
        UserError: missing or unreadable file, not a field file, or a different field kind.
    """
    from safetensors import safe_open

    if not os.path.exists(path):
        raise UserError(f"field file not found: {path}")
    try:
        with safe_open(path, framework="numpy") as handle:
            header = dict(handle.metadata() or {})
            flat = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except Exception as error:  # noqa: BLE001 - any decoding failure is a bad file
        raise UserError(f"cannot read field file {path}: {error}") from None
    if header.get("format") != METADATA_FORMAT or "field_config" not in header:
        raise UserError(f"{path} is not a Hyper Field Networks field file (no field_config metadata)")
    if kind is not None and header.get("kind") != kind:
        raise UserError(f"{path} holds a {header.get('kind')!r} field, expected {kind!r}")
    try:
        field_config = json.loads(header.pop("field_config"))
        extra = {key: json.loads(value) for key, value in header.items() if key not in ("format", "kind")}
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: malformed metadata: {error}") from None
    return unflatten_params(flat), field_config, extra
