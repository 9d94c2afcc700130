"""Field weights as data: params pytree <-> named flat tensors, and safetensors files.

A params pytree (nested dicts of arrays, as Flax returns) is flattened to ``{"a/b/c": array}``
with ``/``-joined names in sorted order. ``save_field`` writes those tensors to a safetensors file
whose metadata holds the field config as JSON, so the file is self-describing and readable
without this project's code.

For weight-space learning, a ``param_map`` lays the tensors out in one float32 vector ``[P]``
(sorted names, row-major), with each tensor tagged by a section (``"hash"`` / ``"mlp"``); a
dataset of ``N`` fields is a matrix ``[N, P]``, and ``NormalizationStats`` hold its per-tensor and
per-section mean and standard deviation.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
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
    from safetensors.numpy import save

    from fields.files import write_atomic

    tensors = {name: np.ascontiguousarray(value) for name, value in flatten_params(params).items()}
    header = {"format": METADATA_FORMAT, "kind": kind, "field_config": json.dumps(field_config)}
    header.update({key: json.dumps(value) for key, value in metadata.items()})
    write_atomic(path, save(tensors, metadata=header))


def load_field(path: str, kind: str | None = None) -> tuple[dict[str, Any], dict, dict[str, Any]]:
    """Reads a field written by ``save_field``.

    Returns:
        ``(params, field_config, metadata)``: nested dict of numpy arrays, the config dict, and
        the other metadata entries decoded from JSON, plus ``kind``.

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
        extra["kind"] = header.get("kind")
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: malformed metadata: {error}") from None
    return unflatten_params(flat), field_config, extra


# --------------------------------------------------------------------------------------------
# Weights as vectors: a param map (name, shape, offset, section) over the flatten_params order.
# --------------------------------------------------------------------------------------------

HASH_SECTION = "hash"
MLP_SECTION = "mlp"


@dataclasses.dataclass(frozen=True)
class ParamEntry:
    """Where one tensor lives in a field's flat parameter vector.

    Attributes:
        name: ``/``-joined path, as ``flatten_params`` names it (e.g. ``"mlp/dense_0/kernel"``).
        shape: the tensor's shape.
        offset: index of its first element in the vector ``[P]``.
        size: number of elements (product of ``shape``).
        section: the group it belongs to (``"hash"`` or ``"mlp"`` by default).
    """

    name: str
    shape: tuple[int, ...]
    offset: int
    size: int
    section: str


def default_section(name: str) -> str:
    """``"hash"`` for names starting with ``hash_table``, else ``"mlp"``."""
    return HASH_SECTION if name.startswith("hash_table") else MLP_SECTION


def param_map(params: Mapping[str, Any], section_of: Callable[[str], str] = default_section) -> list[ParamEntry]:
    """The param map of a params pytree: one ``ParamEntry`` per tensor in ``flatten_params`` order."""
    entries = []
    offset = 0
    for name, value in flatten_params(params).items():
        shape = tuple(int(dim) for dim in np.shape(value))
        size = int(math.prod(shape))
        entries.append(ParamEntry(name, shape, offset, size, section_of(name)))
        offset += size
    return entries


def param_count(pmap: Sequence[ParamEntry]) -> int:
    """Total number of parameters ``P`` of a param map."""
    return sum(entry.size for entry in pmap)


def param_map_to_json(pmap: Sequence[ParamEntry]) -> str:
    """Param map -> JSON (a list of ``{name, shape, offset, size, section}`` objects)."""
    return json.dumps([{**dataclasses.asdict(entry), "shape": list(entry.shape)} for entry in pmap])


def param_map_from_json(text: str | bytes | list) -> list[ParamEntry]:
    """Inverse of ``param_map_to_json`` (also accepts the already decoded list).

    Raises:
        ValueError: malformed entries, or offsets that do not tile ``[0, P)`` in order.
    """
    items = json.loads(text) if isinstance(text, str | bytes) else text
    if not isinstance(items, list):
        raise ValueError("param map must be a JSON list")
    entries = []
    offset = 0
    for item in items:
        try:
            entry = ParamEntry(
                name=str(item["name"]),
                shape=tuple(int(dim) for dim in item["shape"]),
                offset=int(item["offset"]),
                size=int(item["size"]),
                section=str(item["section"]),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"malformed param map entry {item!r}: {error}") from None
        if entry.size != math.prod(entry.shape) or entry.offset != offset:
            raise ValueError(f"param map entry {entry.name!r} has offset/size inconsistent with the entries before it")
        entries.append(entry)
        offset += entry.size
    return entries


def _check_params_fit(flat: Mapping[str, np.ndarray], pmap: Sequence[ParamEntry], lead: int = 0) -> None:
    """Names and shapes (after ``lead`` leading axes) of ``flat`` match ``pmap``."""
    names = [entry.name for entry in pmap]
    if sorted(flat) != sorted(names):
        missing = sorted(set(names) - set(flat))
        extra = sorted(set(flat) - set(names))
        raise ValueError(f"params do not fit the param map (missing: {missing}, unexpected: {extra})")
    for entry in pmap:
        found = tuple(np.shape(flat[entry.name]))
        if found[lead:] != entry.shape:
            raise ValueError(f"{entry.name}: shape {found} does not match the param map's {entry.shape}")


def params_to_vector(params: Mapping[str, Any], pmap: Sequence[ParamEntry]) -> np.ndarray:
    """Params pytree -> float32 vector ``[P]`` laid out by ``pmap`` (exact for float32 params)."""
    flat = flatten_params(params)
    _check_params_fit(flat, pmap)
    vector = np.empty(param_count(pmap), np.float32)
    for entry in pmap:
        vector[entry.offset : entry.offset + entry.size] = np.asarray(flat[entry.name], np.float32).reshape(-1)
    return vector


def vector_to_params(vector: np.ndarray, pmap: Sequence[ParamEntry]) -> dict[str, Any]:
    """Vector ``[..., P]`` -> nested dict of float32 arrays ``[..., *shape]`` (inverse of ``params_to_vector``).

    Leading axes are kept, so a matrix ``[N, P]`` gives tensors with a leading ``N`` axis.
    """
    vector = np.asarray(vector)
    total = param_count(pmap)
    if vector.ndim < 1 or vector.shape[-1] != total:
        raise ValueError(f"vector has shape {vector.shape}; the param map needs a last axis of {total}")
    lead = vector.shape[:-1]
    flat = {
        entry.name: np.array(vector[..., entry.offset : entry.offset + entry.size], np.float32).reshape(
            lead + entry.shape
        )
        for entry in pmap
    }
    return unflatten_params(flat)


def stack_to_matrix(
    params_list: Sequence[Mapping[str, Any]], pmap: Sequence[ParamEntry] | None = None
) -> np.ndarray:
    """A list of ``N`` params pytrees -> float32 matrix ``[N, P]`` (``pmap`` defaults to the first's)."""
    if pmap is None:
        if not params_list:
            raise ValueError("stack_to_matrix needs a param map for an empty list")
        pmap = param_map(params_list[0])
    matrix = np.empty((len(params_list), param_count(pmap)), np.float32)
    for row, params in enumerate(params_list):
        matrix[row] = params_to_vector(params, pmap)
    return matrix


def matrix_to_params(matrix: np.ndarray, pmap: Sequence[ParamEntry]) -> dict[str, Any]:
    """Matrix ``[N, P]`` -> nested dict of float32 arrays ``[N, *shape]`` (stacked params, e.g. for vmap)."""
    matrix = np.asarray(matrix)
    if matrix.ndim != 2:
        raise ValueError(f"matrix must be [N, P], got shape {matrix.shape}")
    return vector_to_params(matrix, pmap)


def stacked_params_to_matrix(params: Mapping[str, Any], pmap: Sequence[ParamEntry]) -> np.ndarray:
    """Params whose leaves have a leading field axis ``[N, *shape]`` -> float32 matrix ``[N, P]`` laid out
    by ``pmap`` (the inverse of ``matrix_to_params``)."""
    flat = flatten_params(params)
    _check_params_fit(flat, pmap, lead=1)
    count = int(np.shape(flat[pmap[0].name])[0])
    return np.concatenate([np.asarray(flat[entry.name], np.float32).reshape(count, entry.size) for entry in pmap],
                          axis=1)


def section_slices(pmap: Sequence[ParamEntry]) -> dict[str, np.ndarray]:
    """``{section: int64 indices [P_section]}`` into the vector, in order of first appearance."""
    pieces: dict[str, list[np.ndarray]] = {}
    for entry in pmap:
        pieces.setdefault(entry.section, []).append(np.arange(entry.offset, entry.offset + entry.size, dtype=np.int64))
    return {section: np.concatenate(parts) for section, parts in pieces.items()}


# --------------------------------------------------------------------------------------------
# Normalisation statistics over a dataset matrix [N, P].
# --------------------------------------------------------------------------------------------

NORMALIZATION_MODES = ("section", "tensor")


@dataclasses.dataclass(frozen=True)
class _Moments:
    count: int
    mean: float
    m2: float  # sum of squared deviations from the mean

    @staticmethod
    def combine(parts: Sequence[_Moments]) -> _Moments:
        count = sum(part.count for part in parts)
        if count == 0:
            return _Moments(0, 0.0, 0.0)
        mean = sum(part.count * part.mean for part in parts) / count
        m2 = sum(part.m2 + part.count * (part.mean - mean) ** 2 for part in parts)
        return _Moments(count, float(mean), float(m2))


@dataclasses.dataclass(frozen=True)
class NormalizationStats:
    """Per-tensor and per-section mean and standard deviation of a dataset of fields.

    Statistics are scalars per tensor (over all rows and all of its elements) and per section,
    accumulated in float64. ``normalize`` maps ``x -> (x - mean) / std`` column-wise with the
    statistics of the column's tensor (``mode="tensor"``) or section (``mode="section"``);
    a standard deviation below ``min_std`` is replaced by 1 (a constant tensor is only centred).

    Attributes:
        param_map: the layout of the vectors.
        count: rows the statistics were computed from.
        tensor_mean, tensor_std: ``{tensor name: float}``.
        section_mean, section_std: ``{section: float}``.
        min_std: the floor described above.
    """

    param_map: tuple[ParamEntry, ...]
    count: int
    tensor_mean: dict[str, float]
    tensor_std: dict[str, float]
    section_mean: dict[str, float]
    section_std: dict[str, float]
    min_std: float = 1e-12

    @classmethod
    def from_matrix(cls, matrix: np.ndarray, pmap: Sequence[ParamEntry], min_std: float = 1e-12) -> NormalizationStats:
        """Statistics of ``matrix [N, P]`` laid out by ``pmap``."""
        return cls._from_moments(_matrix_moments(matrix, pmap), tuple(pmap), min_std)

    @classmethod
    def from_matrices(
        cls, matrices: Iterable[np.ndarray], pmap: Sequence[ParamEntry], min_std: float = 1e-12
    ) -> NormalizationStats:
        """Statistics over several matrices ``[N_i, P]`` (e.g. shards), combined exactly (Chan et al.)."""
        per_matrix = [_matrix_moments(matrix, pmap) for matrix in matrices]
        combined = {entry.name: _Moments.combine([moments[entry.name] for moments in per_matrix]) for entry in pmap}
        return cls._from_moments(combined, tuple(pmap), min_std)

    @classmethod
    def _from_moments(cls, moments: dict[str, _Moments], pmap: tuple[ParamEntry, ...], min_std: float):
        sections: dict[str, list[_Moments]] = {}
        for entry in pmap:
            sections.setdefault(entry.section, []).append(moments[entry.name])
        section_moments = {section: _Moments.combine(parts) for section, parts in sections.items()}

        def std(m: _Moments) -> float:
            return math.sqrt(m.m2 / m.count) if m.count else 0.0

        rows = moments[pmap[0].name].count // max(pmap[0].size, 1) if pmap else 0
        return cls(
            param_map=pmap,
            count=int(rows),
            tensor_mean={name: m.mean for name, m in moments.items()},
            tensor_std={name: std(m) for name, m in moments.items()},
            section_mean={section: m.mean for section, m in section_moments.items()},
            section_std={section: std(m) for section, m in section_moments.items()},
            min_std=min_std,
        )

    def column_stats(self, mode: str = "section") -> tuple[np.ndarray, np.ndarray]:
        """Per-column ``(mean [P], std [P])`` float64 for ``mode`` (``std`` already floored)."""
        if mode not in NORMALIZATION_MODES:
            raise ValueError(f"normalization mode must be one of {NORMALIZATION_MODES}, got {mode!r}")
        total = param_count(self.param_map)
        mean = np.empty(total, np.float64)
        std = np.empty(total, np.float64)
        for entry in self.param_map:
            if mode == "tensor":
                mu, sigma = self.tensor_mean[entry.name], self.tensor_std[entry.name]
            else:
                mu, sigma = self.section_mean[entry.section], self.section_std[entry.section]
            mean[entry.offset : entry.offset + entry.size] = mu
            std[entry.offset : entry.offset + entry.size] = sigma if sigma >= self.min_std else 1.0
        return mean, std

    def normalize(self, matrix: np.ndarray, mode: str = "section") -> np.ndarray:
        """``[..., P]`` -> float32 ``(x - mean) / std`` (computed in float64)."""
        mean, std = self.column_stats(mode)
        return ((np.asarray(matrix, np.float64) - mean) / std).astype(np.float32)

    def denormalize(self, matrix: np.ndarray, mode: str = "section") -> np.ndarray:
        """Inverse of ``normalize``: ``[..., P]`` -> float32 ``x * std + mean`` (computed in float64)."""
        mean, std = self.column_stats(mode)
        return (np.asarray(matrix, np.float64) * std + mean).astype(np.float32)

    def to_json(self) -> str:
        return json.dumps(
            {
                "count": self.count,
                "min_std": self.min_std,
                "param_map": json.loads(param_map_to_json(self.param_map)),
                "tensor_mean": self.tensor_mean,
                "tensor_std": self.tensor_std,
                "section_mean": self.section_mean,
                "section_std": self.section_std,
            }
        )

    @classmethod
    def from_json(cls, text: str | bytes | dict) -> NormalizationStats:
        values = json.loads(text) if isinstance(text, str | bytes) else text
        try:
            return cls(
                param_map=tuple(param_map_from_json(values["param_map"])),
                count=int(values["count"]),
                tensor_mean={str(k): float(v) for k, v in values["tensor_mean"].items()},
                tensor_std={str(k): float(v) for k, v in values["tensor_std"].items()},
                section_mean={str(k): float(v) for k, v in values["section_mean"].items()},
                section_std={str(k): float(v) for k, v in values["section_std"].items()},
                min_std=float(values.get("min_std", 1e-12)),
            )
        except (KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"malformed normalization statistics: {error!r}") from None


def _matrix_moments(matrix: np.ndarray, pmap: Sequence[ParamEntry]) -> dict[str, _Moments]:
    matrix = np.asarray(matrix)
    total = param_count(pmap)
    if matrix.ndim != 2 or matrix.shape[1] != total:
        raise ValueError(f"matrix must be [N, {total}], got shape {matrix.shape}")
    moments = {}
    for entry in pmap:
        block = matrix[:, entry.offset : entry.offset + entry.size]
        count = int(block.size)
        if count == 0:
            moments[entry.name] = _Moments(0, 0.0, 0.0)
            continue
        mean = float(np.mean(block, dtype=np.float64))
        m2 = float(np.sum(np.square(block.astype(np.float64) - mean)))
        moments[entry.name] = _Moments(count, mean, m2)
    return moments
