"""Datasets of fields (and of their tokens) as Parquet shards readable without this project's code.

Field shards (``hfn_format = "fields/v1"``):

- column ``params: fixed_size_list<float32>[P]``, one row per field, laid out by the param map;
- metadata columns ``source_id: string``, ``label: int32`` (-1 for none), ``psnr: float32`` (or the
  field kind's quality metric, NaN if unknown), ``seed: int32``, ``steps: int32`` (-1 if unknown),
  plus any further columns the writer adds;
- schema metadata (UTF-8 keys and JSON values): ``hfn_format``, ``field_kind`` (e.g.
  ``"ngp_image"``), ``field_config`` (the architecture), ``param_map`` (list of
  ``{name, shape, offset, size, section}``), optionally ``normalization`` (``NormalizationStats``)
  and writer-defined extras (e.g. ``image_height``, ``image_width``).

Token shards (``hfn_format = "fields-tokens/v1"``) hold ``tokens: fixed_size_list<uint8|uint16|int32>[T]``
(the smallest type holding the vocabulary; special tokens are never stored, models add them), the
same metadata columns, the source's field metadata and ``tokenizer`` (the tokenizer spec with any
stored ranges), ``source_dataset`` (path and stored normalisation of the field dataset) and, when
weights were normalised before tokenizing, ``token_normalization`` (``{"mode": ..., "stats": ...}``).

A dataset is one ``.parquet`` file or a folder of them (read in name order); all shards of a folder
must agree on kind, config and param map. ``pyarrow.parquet.read_table(path)``, pandas and Hugging
Face ``datasets`` (``load_dataset("parquet", data_files=...)``) read the shards as they are.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fields.cli import UserError
from fields.files import atomic_writer
from fields.tokenizers import Tokenizer, tokenizer_from_json
from fields.weights import NormalizationStats, ParamEntry, param_count, param_map_from_json, param_map_to_json

FIELDS_FORMAT = "fields/v1"
TOKENS_FORMAT = "fields-tokens/v1"
PARAMS_COLUMN = "params"
TOKENS_COLUMN = "tokens"
# Standard per-row metadata columns: (arrow type name, default when the writer does not give it).
METADATA_COLUMNS: dict[str, tuple[str, Any]] = {
    "source_id": ("string", ""),
    "label": ("int32", -1),
    "psnr": ("float32", float("nan")),
    "seed": ("int32", -1),
    "init_seed": ("int32", -1),  # seed of the initial weights (shared by every field of an aligned dataset)
    "steps": ("int32", -1),
}
# Schema metadata keys this module writes; any other JSON-able entry may be added by a writer.
FIELD_RESERVED_KEYS = ("hfn_format", "field_kind", "field_config", "param_map", "normalization")
TOKEN_RESERVED_KEYS = FIELD_RESERVED_KEYS + ("tokenizer", "token_normalization", "source_dataset")
ROW_GROUP_BYTES = 128 << 20


def _pa():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow is a dependency
        raise UserError("datasets of fields need pyarrow: pip install pyarrow") from None
    return pa, pq


@dataclasses.dataclass
class FieldDataset:
    """A dataset of fields read into memory.

    Attributes:
        matrix: ``[N, P]`` float32, one field per row, laid out by ``param_map``.
        columns: ``{name: array [N]}`` metadata columns (strings as a list).
        field_kind, field_config: what the fields are (``field_config`` as a dict).
        param_map: the layout of the rows.
        normalization: the stored ``NormalizationStats``, or None.
        metadata: the other schema metadata entries (JSON-decoded).
        paths: the shard files read, in order; ``shard_sizes``: rows per shard.
    """

    matrix: np.ndarray
    columns: dict[str, Any]
    field_kind: str
    field_config: dict
    param_map: list[ParamEntry]
    normalization: NormalizationStats | None
    metadata: dict[str, Any]
    paths: list[str]
    shard_sizes: list[int]

    def __len__(self) -> int:
        return int(self.matrix.shape[0])


@dataclasses.dataclass
class TokenDataset:
    """A dataset of tokenized fields read into memory.

    Attributes:
        tokens: ``[N, T]`` int32 (widened from the stored type, so special tokens can be added).
        columns, field_kind, field_config, param_map, metadata, paths, shard_sizes: as in ``FieldDataset``.
        tokenizer: the tokenizer (``tokenizer.decode(tokens)`` gives ``[N, P]`` weights, normalised
            when ``normalization_mode`` is set).
        normalization_mode, normalization: the normalisation applied before tokenizing, or None.
    """

    tokens: np.ndarray
    columns: dict[str, Any]
    field_kind: str
    field_config: dict
    param_map: list[ParamEntry]
    tokenizer: Tokenizer
    normalization_mode: str | None
    normalization: NormalizationStats | None
    metadata: dict[str, Any]
    paths: list[str]
    shard_sizes: list[int]

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def decode_weights(self) -> np.ndarray:
        """``[N, P]`` float32 weights decoded from the tokens, denormalised if they were normalised."""
        weights = self.tokenizer.decode(self.tokens)
        if self.normalization is not None:
            weights = self.normalization.denormalize(weights, self.normalization_mode)
        return weights


# ------------------------------------------------------------------------------------------- writing


def _is_foreign_key(key: str) -> bool:
    """Schema metadata of other tools (pandas, Hugging Face, Arrow) that must not be copied over."""
    return key in ("pandas", "huggingface") or key.startswith("ARROW:")


def _metadata_arrays(metadata_columns: Mapping[str, Sequence[Any]] | None, num_rows: int) -> dict[str, Any]:
    pa, _ = _pa()
    metadata_columns = dict(metadata_columns or {})
    for name in (PARAMS_COLUMN, TOKENS_COLUMN):
        if name in metadata_columns:
            raise ValueError(f"metadata column name {name!r} is reserved")
    arrays = {}
    for name, (type_name, default) in METADATA_COLUMNS.items():
        values = metadata_columns.pop(name, None)
        if values is None:
            values = [default] * num_rows
        values = values if isinstance(values, np.ndarray) else list(values)
        arrays[name] = pa.array(values, type=getattr(pa, type_name)())
    for name, values in metadata_columns.items():
        arrays[name] = pa.array(values if isinstance(values, np.ndarray) else list(values))
    for name, array in arrays.items():
        if len(array) != num_rows:
            raise ValueError(f"metadata column {name!r} has {len(array)} values for {num_rows} rows")
    return arrays


def _schema_metadata(core: Mapping[str, str | None], extra: Mapping[str, Any]) -> dict[bytes, bytes]:
    """Parquet schema metadata: ``core`` entries are already strings (plain or JSON) and are stored
    as they are (None: left out); ``extra`` values are always stored as JSON, so they read back exactly."""
    metadata = {key.encode(): value.encode() for key, value in core.items() if value is not None}
    metadata.update({key.encode(): json.dumps(value).encode() for key, value in extra.items()})
    return metadata


def _write_atomic(path: str, table) -> None:
    """Writes a parquet table atomically (``fields.files.atomic_writer``), zstd, row groups of ~``ROW_GROUP_BYTES``."""
    _, pq = _pa()
    row_bytes = max(1, table.nbytes // max(table.num_rows, 1))
    with atomic_writer(path) as handle:
        pq.write_table(table, handle, compression="zstd", row_group_size=max(1, ROW_GROUP_BYTES // row_bytes))


def _list_column(matrix: np.ndarray, value_type):
    pa, _ = _pa()
    values = pa.array(np.ascontiguousarray(matrix).reshape(-1), type=value_type)
    return pa.FixedSizeListArray.from_arrays(values, int(matrix.shape[1]))


def _field_entries(hfn_format: str, field_kind: str, field_config: Mapping[str, Any],
                   pmap: Sequence[ParamEntry]) -> dict[str, str]:
    """The schema metadata entries that field and token shards share."""
    return {
        "hfn_format": hfn_format,
        "field_kind": field_kind,
        "field_config": json.dumps(dict(field_config), sort_keys=True),
        "param_map": param_map_to_json(pmap),
    }


def _write_table(path: str, column_name: str, column, metadata_columns: Mapping[str, Sequence[Any]] | None,
                 entries: Mapping[str, str | None], extra_schema_metadata: Mapping[str, Any] | None,
                 reserved: Sequence[str]) -> None:
    """The data column ``[N]`` plus the metadata columns, with ``entries`` and the writer's extras
    (none of them a ``reserved`` key) as schema metadata, written atomically."""
    pa, _ = _pa()
    arrays = {column_name: column, **_metadata_arrays(metadata_columns, len(column))}
    extra = dict(extra_schema_metadata or {})
    clash = sorted(set(extra) & set(reserved))
    if clash:
        raise ValueError(f"extra schema metadata uses reserved key(s) {clash}")
    _write_atomic(path, pa.table(arrays).replace_schema_metadata(_schema_metadata(entries, extra)))


def write_shard(
    path: str,
    params_matrix: np.ndarray,
    metadata_columns: Mapping[str, Sequence[Any]] | None,
    field_kind: str,
    field_config: Mapping[str, Any],
    pmap: Sequence[ParamEntry],
    extra_schema_metadata: Mapping[str, Any] | None = None,
    normalization: NormalizationStats | None = None,
) -> None:
    """Writes one shard of fields, atomically (temporary file in the same folder, fsync, rename).

    Args:
        path: destination ``.parquet`` file.
        params_matrix: ``[N, P]`` weights (converted to float32), laid out by ``pmap``.
        metadata_columns: ``{name: [N] values}``; the standard columns missing here get defaults
            (``source_id ""``, ``label -1``, ``psnr NaN``, ``seed -1``, ``steps -1``), other names are
            stored with the type pyarrow infers.
        field_kind: e.g. ``"ngp_image"``.
        field_config: the architecture as a JSON-able dict.
        pmap: the param map of the rows.
        extra_schema_metadata: further JSON-able schema entries (e.g. ``{"image_height": 28}``).
        normalization: dataset statistics to store with the shard.

    Raises:
        ValueError: wrong shapes, non-float weights, column lengths, or a reserved metadata key.
    """
    pa, _ = _pa()
    matrix = np.asarray(params_matrix)
    if not np.issubdtype(matrix.dtype, np.floating):
        raise ValueError(f"params_matrix must be floating point, got {matrix.dtype}")
    matrix = matrix.astype(np.float32, copy=False)
    total = param_count(pmap)
    if matrix.ndim != 2 or matrix.shape[1] != total:
        raise ValueError(f"params_matrix must be [N, {total}] for this param map, got {matrix.shape}")
    entries = {
        **_field_entries(FIELDS_FORMAT, field_kind, field_config, pmap),
        "normalization": normalization.to_json() if normalization is not None else None,
    }
    _write_table(path, PARAMS_COLUMN, _list_column(matrix, pa.float32()), metadata_columns, entries,
                 extra_schema_metadata, FIELD_RESERVED_KEYS)


def write_token_shard(
    path: str,
    tokens: np.ndarray,
    metadata_columns: Mapping[str, Sequence[Any]] | None,
    tokenizer: Tokenizer,
    field_kind: str,
    field_config: Mapping[str, Any],
    pmap: Sequence[ParamEntry],
    normalization_mode: str | None = None,
    normalization: NormalizationStats | None = None,
    source_dataset: Mapping[str, Any] | None = None,
    extra_schema_metadata: Mapping[str, Any] | None = None,
) -> None:
    """Writes one shard of tokenized fields, atomically.

    Args:
        tokens: ``[N, T]`` integers in ``[0, tokenizer.vocab_size)``, ``T = P * tokens_per_weight``
            (special tokens are not stored).
        tokenizer: the tokenizer that made them (its spec is stored).
        field_kind, field_config, pmap: the source fields' metadata.
        normalization_mode, normalization: normalisation applied to the weights before tokenizing.
        source_dataset: JSON-able description of the source dataset (path, its normalization).
        extra_schema_metadata: further entries, typically the source shard's own extras
            (``image_height``, ...), as in ``write_shard``.

    Raises:
        ValueError: wrong shape, tokens outside the vocabulary, column lengths, reserved keys.
    """
    pa, _ = _pa()
    tokens = np.asarray(tokens)
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be integers, got {tokens.dtype}")
    expected = tokenizer.num_tokens(param_count(pmap))
    if tokens.ndim != 2 or tokens.shape[1] != expected:
        raise ValueError(f"tokens must be [N, {expected}] for this param map and tokenizer, got {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= tokenizer.vocab_size):
        raise ValueError(f"tokens outside [0, {tokenizer.vocab_size}) (special tokens are not stored)")
    if (normalization is None) != (normalization_mode is None):
        raise ValueError("give both normalization_mode and normalization, or neither")
    storage = tokenizer.storage_dtype
    entries = {
        **_field_entries(TOKENS_FORMAT, field_kind, field_config, pmap),
        "tokenizer": tokenizer.to_json(),
        "token_normalization": (
            json.dumps({"mode": normalization_mode, "stats": json.loads(normalization.to_json())})
            if normalization is not None
            else None
        ),
        "source_dataset": json.dumps(dict(source_dataset)) if source_dataset is not None else None,
    }
    _write_table(path, TOKENS_COLUMN, _list_column(tokens.astype(storage), pa.from_numpy_dtype(storage)),
                 metadata_columns, entries, extra_schema_metadata, TOKEN_RESERVED_KEYS)


# ------------------------------------------------------------------------------------------- reading


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def list_shards(path: str) -> list[str]:
    """The shard files of a dataset: ``[path]`` for a file, the folder's ``*.parquet`` in name order.

    Raises:
        UserError: missing path or a folder without shards.
    """
    if os.path.isdir(path):
        shards = sorted(glob.glob(os.path.join(glob.escape(path), "*.parquet")))
        if not shards:
            raise UserError(f"no *.parquet shards in {path}")
        return shards
    if not os.path.exists(path):
        raise UserError(f"dataset not found: {path}")
    return [path]


@dataclasses.dataclass
class _ShardHeader:
    path: str
    format: str
    field_kind: str
    field_config: dict
    param_map: list[ParamEntry]
    entries: dict[str, Any]  # every schema metadata entry, JSON-decoded where possible
    schema: Any


def _read_header(path: str, expected_format: str) -> _ShardHeader:
    _, pq = _pa()
    try:
        schema = pq.read_schema(path)
    except Exception as error:  # noqa: BLE001 - any failure to parse means not a (valid) parquet file
        raise UserError(f"cannot read {path}: not a parquet file or unreadable ({_one_line(error)})") from None
    raw = {
        key.decode("utf-8", "replace"): value.decode("utf-8", "replace")
        for key, value in (schema.metadata or {}).items()
    }
    entries: dict[str, Any] = {}
    for key, value in raw.items():
        if key.startswith("ARROW:"):
            continue
        try:
            entries[key] = json.loads(value)
        except json.JSONDecodeError:
            entries[key] = value
    found_format = raw.get("hfn_format")
    if found_format is None:
        raise UserError(f"{path} has no hfn_format schema metadata: not a dataset of fields")
    if found_format != expected_format:
        hint = {FIELDS_FORMAT: "read it with read_dataset", TOKENS_FORMAT: "read it with read_token_dataset"}
        advice = hint.get(found_format, "unknown format")
        raise UserError(f"{path} holds {found_format!r} data, expected {expected_format!r} ({advice})")
    for key in ("field_kind", "field_config", "param_map"):
        if key not in raw:
            raise UserError(f"{path} lacks the {key!r} schema metadata")
    if not isinstance(entries["field_config"], dict):
        raise UserError(f"{path}: field_config schema metadata is not a JSON object")
    try:
        pmap = param_map_from_json(raw["param_map"])
    except (ValueError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: malformed param_map schema metadata ({_one_line(error)})") from None
    return _ShardHeader(path, found_format, raw["field_kind"], entries["field_config"], pmap, entries, schema)


def _check_headers_agree(headers: Sequence[_ShardHeader], keys: Sequence[str]) -> None:
    first = headers[0]
    for header in headers[1:]:
        for key in keys:
            if header.entries.get(key) != first.entries.get(key):
                raise UserError(f"shard {header.path} does not match shard {first.path}: {key} differs")
        if header.schema.remove_metadata() != first.schema.remove_metadata():
            raise UserError(f"shard {header.path} does not match shard {first.path}: columns differ")


def _read_list_column(path: str, table, name: str, width: int, allowed: Sequence[str]) -> np.ndarray:
    pa, _ = _pa()
    if name not in table.column_names:
        raise UserError(f"{path} has no {name!r} column")
    column = table.column(name)
    column_type = column.type
    if not pa.types.is_fixed_size_list(column_type) or str(column_type.value_type) not in allowed:
        raise UserError(f"{path}: column {name!r} is {column_type}, expected fixed_size_list<{'|'.join(allowed)}>")
    if column_type.list_size != width:
        raise UserError(
            f"{path}: {name} rows have {column_type.list_size} values but the param map needs {width}"
        )
    if column.null_count:
        raise UserError(f"{path}: {column.null_count} null row(s) in column {name!r}")
    array = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    values = array.flatten().to_numpy(zero_copy_only=False)
    return np.asarray(values).reshape(len(array), width)


def _read_columns(table, skip: str) -> dict[str, Any]:
    columns = {}
    for name in table.column_names:
        if name == skip:
            continue
        column = table.column(name)
        try:
            columns[name] = column.to_numpy()
            if columns[name].dtype == object:
                columns[name] = column.to_pylist()
        except Exception:  # noqa: BLE001 - non-primitive types: keep Python values
            columns[name] = column.to_pylist()
    return columns


def _concat_columns(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    if not parts:
        return {}
    merged = {}
    for name in parts[0]:
        values = [part[name] for part in parts]
        if all(isinstance(value, np.ndarray) for value in values):
            merged[name] = np.concatenate(values)
        else:
            merged[name] = [item for value in values for item in list(value)]
    return merged


def _read_table(path: str):
    _, pq = _pa()
    try:
        return pq.read_table(path)
    except Exception as error:  # noqa: BLE001 - a truncated or corrupt file
        raise UserError(f"cannot read {path}: {_one_line(error)}") from None


def _normalization_from(path: str, value: Any) -> NormalizationStats | None:
    if value is None:
        return None
    try:
        return NormalizationStats.from_json(value)
    except (ValueError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: malformed normalization schema metadata ({_one_line(error)})") from None


FIELD_HEADER_KEYS = FIELD_RESERVED_KEYS  # the keys every shard of a dataset must agree on
TOKEN_HEADER_KEYS = ("hfn_format", "field_kind", "field_config", "param_map", "tokenizer", "token_normalization")


def validate_shards(path: str, tokens: bool = False) -> list[str]:
    """Checks a dataset's shard headers (schema metadata only, no data) and returns the shard paths.

    Raises:
        UserError: as ``read_dataset`` (or ``read_token_dataset`` with ``tokens=True``) for header problems.
    """
    paths = list_shards(path)
    headers = [_read_header(shard, TOKENS_FORMAT if tokens else FIELDS_FORMAT) for shard in paths]
    _check_headers_agree(headers, TOKEN_HEADER_KEYS if tokens else FIELD_HEADER_KEYS)
    return paths


def read_dataset(path: str) -> FieldDataset:
    """Reads a dataset of fields: one shard, or every ``*.parquet`` shard of a folder in name order.

    Raises:
        UserError (one line, naming the file): not parquet or unreadable, a token dataset, missing
            ``params`` column or schema metadata, rows whose length differs from the param map's
            total, or shards of one folder that disagree on format, kind, config, param map,
            normalization or columns.
    """
    paths = list_shards(path)
    headers = [_read_header(shard, FIELDS_FORMAT) for shard in paths]
    _check_headers_agree(headers, FIELD_HEADER_KEYS)
    first = headers[0]
    width = param_count(first.param_map)
    matrices, column_parts, sizes = [], [], []
    for shard in paths:
        table = _read_table(shard)
        matrices.append(_read_list_column(shard, table, PARAMS_COLUMN, width, ("float",)))
        column_parts.append(_read_columns(table, PARAMS_COLUMN))
        sizes.append(table.num_rows)
    matrix = np.concatenate(matrices).astype(np.float32, copy=False)
    metadata = {k: v for k, v in first.entries.items() if k not in FIELD_RESERVED_KEYS and not _is_foreign_key(k)}
    return FieldDataset(
        matrix=matrix,
        columns=_concat_columns(column_parts),
        field_kind=first.field_kind,
        field_config=first.field_config,
        param_map=first.param_map,
        normalization=_normalization_from(first.path, first.entries.get("normalization")),
        metadata=metadata,
        paths=paths,
        shard_sizes=sizes,
    )


def read_token_dataset(path: str) -> TokenDataset:
    """Reads a dataset of tokenized fields (one shard or a folder), like ``read_dataset``.

    Raises:
        UserError: as ``read_dataset``, plus a missing or malformed tokenizer spec, tokens outside
            the vocabulary, or a ``T`` that does not match ``P * tokens_per_weight``.
    """
    paths = list_shards(path)
    headers = [_read_header(shard, TOKENS_FORMAT) for shard in paths]
    _check_headers_agree(headers, TOKEN_HEADER_KEYS)
    first = headers[0]
    if "tokenizer" not in first.entries:
        raise UserError(f"{first.path} lacks the 'tokenizer' schema metadata")
    try:
        tokenizer = tokenizer_from_json(first.entries["tokenizer"])
    except (ValueError, TypeError, AttributeError) as error:
        raise UserError(f"{first.path}: malformed tokenizer schema metadata ({_one_line(error)})") from None
    width = tokenizer.num_tokens(param_count(first.param_map))
    allowed = ("uint8", "uint16", "int32", "int64", "uint32")
    token_parts, column_parts, sizes = [], [], []
    for shard in paths:
        table = _read_table(shard)
        tokens = _read_list_column(shard, table, TOKENS_COLUMN, width, allowed)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= tokenizer.vocab_size):
            raise UserError(f"{shard}: tokens outside the vocabulary [0, {tokenizer.vocab_size})")
        token_parts.append(tokens.astype(np.int32))
        column_parts.append(_read_columns(table, TOKENS_COLUMN))
        sizes.append(table.num_rows)
    normalization = first.entries.get("token_normalization")
    mode, stats = None, None
    if normalization is not None:
        if not isinstance(normalization, dict) or "mode" not in normalization or "stats" not in normalization:
            raise UserError(f"{first.path}: malformed token_normalization schema metadata")
        mode = str(normalization["mode"])
        stats = _normalization_from(first.path, normalization["stats"])
    metadata = {k: v for k, v in first.entries.items() if k not in TOKEN_RESERVED_KEYS and not _is_foreign_key(k)}
    metadata["source_dataset"] = first.entries.get("source_dataset")
    return TokenDataset(
        tokens=np.concatenate(token_parts),
        columns=_concat_columns(column_parts),
        field_kind=first.field_kind,
        field_config=first.field_config,
        param_map=first.param_map,
        tokenizer=tokenizer,
        normalization_mode=mode,
        normalization=stats,
        metadata=metadata,
        paths=paths,
        shard_sizes=sizes,
    )
