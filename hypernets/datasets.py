"""Training data for hypernetworks: field datasets split by source, normalised, and served in batches.

``load_weight_splits`` reads a dataset of fields (``fields/v1`` parquet shards) and returns a train and
a validation split of normalised weight vectors; ``load_token_splits`` does the same for a dataset of
tokens (``fields-tokens/v1``). Rows are split by a stable hash of their ``source_id``, so all fields of
one source (e.g. several seeds fitted to one image) land in the same split, and adding rows to a
dataset never moves an existing source to the other split.

``BatchStream`` serves endless shuffled batches from in-memory arrays. Its order depends only on the
seed, and ``state()`` / ``restore()`` make a resumed stream give exactly the batches an uninterrupted
one would.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any

import numpy as np

from fields.cli import UserError
from fields.field_datasets import (
    FIELDS_FORMAT,
    TOKENS_FORMAT,
    TokenDataset,
    list_shards,
    read_dataset,
    read_token_dataset,
)
from fields.weights import NORMALIZATION_MODES, NormalizationStats, ParamEntry

# ------------------------------------------------------------------------------------------ splits


def _source_score(source_id: str, seed: int) -> float:
    """A stable pseudo-random number in [0, 1) for ``(seed, source_id)`` (same on every machine and run)."""
    digest = hashlib.blake2b(f"{seed}\x00{source_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / float(1 << 64)


def split_by_source(source_ids: list[str], val_fraction: float, seed: int) -> np.ndarray:
    """Which rows are held out for validation, decided per source.

    A source goes to validation when the hash of ``(seed, source_id)`` falls below ``val_fraction``, so
    every row of one source lands in the same split. Rows with an empty ``source_id`` count as sources
    of their own. With two or more rows both splits are non-empty: if the hash leaves one empty, the
    source closest to the threshold moves over. If every row shares one source, the split cannot be
    both disjoint and non-empty; then the rows themselves are split (the only case where a source spans
    both splits).

    Args:
        source_ids: ``[N]`` source of each row.
        val_fraction: expected fraction of sources held out, in ``[0, 1)``.
        seed: changes the assignment.

    Returns:
        ``[N]`` bool, True for validation rows.

    Raises:
        UserError: ``val_fraction`` outside ``[0, 1)``.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"validation fraction must be in [0, 1), got {val_fraction}")
    keys = [str(source) if str(source) else f"\x00row {row}" for row, source in enumerate(source_ids)]
    if len(set(keys)) == 1 and len(keys) >= 2:
        keys = [f"{key}\x00row {row}" for row, key in enumerate(keys)]
    unique = sorted(set(keys))
    scores = {key: _source_score(key, seed) for key in unique}
    held_out = {key for key in unique if scores[key] < val_fraction}
    if len(unique) >= 2:
        if not held_out:
            held_out = {min(unique, key=lambda key: scores[key])}
        elif len(held_out) == len(unique):
            held_out.discard(max(unique, key=lambda key: scores[key]))
    return np.array([key in held_out for key in keys], dtype=bool)


def _dataset_format(path: str) -> str | None:
    """The ``hfn_format`` schema entry of the first shard (None when unreadable; the reader reports that)."""
    import pyarrow.parquet as pq

    if not os.path.exists(path):
        raise UserError(f"dataset not found: {path}")
    try:
        metadata = pq.read_schema(list_shards(path)[0]).metadata or {}
    except UserError:
        raise
    except Exception:  # noqa: BLE001 - the reader gives the one-line message for a bad file
        return None
    value = metadata.get(b"hfn_format")
    return value.decode("utf-8", "replace") if value is not None else None


def _require_format(path: str, expected: str) -> None:
    found = _dataset_format(path)
    if found == TOKENS_FORMAT and expected == FIELDS_FORMAT:
        raise UserError(
            f"{path} is a dataset of tokens ({TOKENS_FORMAT}); this model trains on field weights ({FIELDS_FORMAT}, "
            "as written by python -m fields.encode_dataset)"
        )
    if found == FIELDS_FORMAT and expected == TOKENS_FORMAT:
        raise UserError(
            f"{path} is a dataset of field weights ({FIELDS_FORMAT}); this model trains on tokens ({TOKENS_FORMAT}): "
            "make them with python -m scripts.tokenize"
        )


def _split_rows(source_ids: list[str], val_fraction: float, seed: int, path: str) -> tuple[np.ndarray, np.ndarray]:
    if not source_ids:
        raise UserError(f"{path} holds no rows")
    validation = split_by_source(source_ids, val_fraction, seed)
    return np.flatnonzero(~validation), np.flatnonzero(validation)


def label_column(columns: dict[str, Any], count: int) -> np.ndarray:
    """``[count]`` int32 labels of a dataset's metadata ``columns`` (-1: unknown, or no label column)."""
    if "label" not in columns:
        return np.full(count, -1, np.int32)
    return np.asarray(columns["label"]).astype(np.int32)


def _source_ids(columns: dict[str, Any], count: int) -> list[str]:
    if "source_id" not in columns:
        return [""] * count
    return ["" if value is None else str(value) for value in columns["source_id"]]


# -------------------------------------------------------------------------------- field weights


@dataclasses.dataclass
class WeightData:
    """One split of a dataset of fields, normalised.

    Attributes:
        vectors: ``[N, P]`` float32 weights normalised with ``normalization`` in ``mode``.
        labels: ``[N]`` int32 class labels (-1: unknown).
        source_ids: ``[N]`` source of each row.
        param_map: layout of the vectors (``list[ParamEntry]``).
        field_kind, field_config: what the fields are (``field_config`` as a dict).
        metadata: the dataset's other schema metadata (``image_height``, ``image_width``, ...).
        normalization: statistics of the train split (or the ones stored with the dataset).
        mode: ``"section"`` or ``"tensor"``.
        rows: ``[N]`` int64 row numbers in the source dataset.
        path: the dataset's path.
    """

    vectors: np.ndarray
    labels: np.ndarray
    source_ids: list[str]
    param_map: list[ParamEntry]
    field_kind: str
    field_config: dict
    metadata: dict
    normalization: NormalizationStats
    mode: str
    rows: np.ndarray | None = None
    path: str = ""

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    def denormalize(self, vectors: np.ndarray) -> np.ndarray:
        """Normalised ``[n, P]`` -> raw field weights ``[n, P]`` float32."""
        return self.normalization.denormalize(vectors, self.mode)

    def normalize(self, weights: np.ndarray) -> np.ndarray:
        """Raw field weights ``[n, P]`` -> normalised ``[n, P]`` float32 (inverse of ``denormalize``)."""
        return self.normalization.normalize(weights, self.mode)


def load_weight_splits(
    path: str, val_fraction: float = 0.1, seed: int = 0, mode: str = "section"
) -> tuple[WeightData, WeightData]:
    """Reads a dataset of fields and splits it into normalised train and validation sets.

    Normalisation statistics are the dataset's stored ones when it has them, else they are computed on
    the train split only (``NormalizationStats.from_matrix``), so validation rows do not leak into them.

    Args:
        path: one ``.parquet`` shard or a folder of them.
        val_fraction: expected fraction of sources held out (see ``split_by_source``).
        seed: split seed.
        mode: ``"section"`` (one mean/std per hash/MLP section) or ``"tensor"`` (per tensor).

    Returns:
        ``(train, validation)``.

    Raises:
        UserError: missing path, a token dataset, an empty or malformed dataset, an unknown mode.
    """
    if mode not in NORMALIZATION_MODES:
        raise UserError(f"unknown normalisation mode {mode!r}; choose one of: {', '.join(NORMALIZATION_MODES)}")
    _require_format(path, FIELDS_FORMAT)
    dataset = read_dataset(path)
    count = len(dataset)
    source_ids = _source_ids(dataset.columns, count)
    labels = label_column(dataset.columns, count)
    train_rows, validation_rows = _split_rows(source_ids, val_fraction, seed, path)
    if not np.all(np.isfinite(dataset.matrix)):
        bad = np.flatnonzero(~np.all(np.isfinite(dataset.matrix), axis=1))
        raise UserError(f"{path}: {bad.size} row(s) hold NaN or infinite weights (first: row {int(bad[0])})")
    normalization = dataset.normalization
    if normalization is None:
        normalization = NormalizationStats.from_matrix(dataset.matrix[train_rows], dataset.param_map)

    def split(rows: np.ndarray) -> WeightData:
        return WeightData(
            vectors=normalization.normalize(dataset.matrix[rows], mode),
            labels=labels[rows],
            source_ids=[source_ids[row] for row in rows],
            param_map=list(dataset.param_map),
            field_kind=dataset.field_kind,
            field_config=dict(dataset.field_config),
            metadata=dict(dataset.metadata),
            normalization=normalization,
            mode=mode,
            rows=rows.astype(np.int64),
            path=path,
        )

    return split(train_rows), split(validation_rows)


# ------------------------------------------------------------------------------------------ tokens


@dataclasses.dataclass
class TokenData:
    """One split of a dataset of tokens.

    Attributes:
        tokens: ``[N, T]`` int32 data tokens in ``[0, vocab_size)`` (no special tokens).
        labels: ``[N]`` int32 class labels (-1: unknown).
        source_ids: ``[N]`` source of each row.
        vocab_size: size of the tokenizer's data vocabulary (models add their special tokens above it).
        dataset: the whole ``TokenDataset`` it came from (tokenizer, param map, normalisation, metadata).
        rows: ``[N]`` int64 row numbers in ``dataset``.
    """

    tokens: np.ndarray
    labels: np.ndarray
    source_ids: list[str]
    vocab_size: int
    dataset: TokenDataset
    rows: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


def load_token_splits(path: str, val_fraction: float = 0.1, seed: int = 0) -> tuple[TokenData, TokenData]:
    """Reads a dataset of tokens and splits it by source into train and validation sets.

    Raises:
        UserError: missing path, a dataset of field weights, an empty or malformed dataset.
    """
    _require_format(path, TOKENS_FORMAT)
    dataset = read_token_dataset(path)
    count = len(dataset)
    source_ids = _source_ids(dataset.columns, count)
    labels = label_column(dataset.columns, count)
    train_rows, validation_rows = _split_rows(source_ids, val_fraction, seed, path)

    def split(rows: np.ndarray) -> TokenData:
        return TokenData(
            tokens=dataset.tokens[rows],
            labels=labels[rows],
            source_ids=[source_ids[row] for row in rows],
            vocab_size=int(dataset.tokenizer.vocab_size),
            dataset=dataset,
            rows=rows.astype(np.int64),
        )

    return split(train_rows), split(validation_rows)


# ----------------------------------------------------------------------------------------- batches


class BatchStream:
    """Endless shuffled batches over in-memory arrays; deterministic given the seed; resumable.

    Epoch ``e`` visits the rows in the order ``np.random.default_rng([seed, e]).permutation(N)`` (or in
    order when ``shuffle`` is False) and ends when the rest would not fill a batch (that tail is
    dropped). When ``N < batch_size`` the epoch's order is repeated until one full batch fits, so every
    batch has ``batch_size`` rows.

    Args:
        arrays: ``{name: [N, ...]}`` arrays with the same leading size (the name ``"index"`` is reserved).
        batch_size: rows per batch.
        seed: shuffling seed.
        shuffle: shuffle each epoch.

    Raises:
        ValueError: no arrays, mismatched or zero leading sizes, a non-positive batch size, or an
            array named ``"index"``.
    """

    def __init__(self, arrays: dict[str, np.ndarray], batch_size: int, seed: int = 0, shuffle: bool = True):
        if not arrays:
            raise ValueError("BatchStream needs at least one array")
        if "index" in arrays:
            raise ValueError("the array name 'index' is reserved for the row ids BatchStream adds")
        sizes = {name: int(np.shape(array)[0]) if np.ndim(array) else -1 for name, array in arrays.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"arrays differ in their leading size: {sizes}")
        self.num_rows = next(iter(sizes.values()))
        if self.num_rows <= 0:
            raise ValueError("BatchStream needs at least one row")
        if batch_size <= 0:
            raise ValueError(f"batch size must be > 0, got {batch_size}")
        self.arrays = {name: np.asarray(array) for name, array in arrays.items()}
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self._epoch = 0
        self._position = 0
        self._order_epoch = -1
        self._order = np.empty(0, np.int64)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """``[max(N, k*N)]`` int64 row order of ``epoch`` (k copies when ``N < batch_size``)."""
        if epoch != self._order_epoch:
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
            else:
                order = np.arange(self.num_rows)
            copies = -(-self.batch_size // self.num_rows)
            self._order = np.tile(order, copies).astype(np.int64)
            self._order_epoch = epoch
        return self._order

    def next(self) -> dict[str, np.ndarray]:
        """The next batch: every array sliced to ``[batch_size, ...]``, plus ``"index"``: ``[batch_size]`` int64."""
        order = self._epoch_order(self._epoch)
        if self._position + self.batch_size > len(order):
            self._epoch += 1
            self._position = 0
            order = self._epoch_order(self._epoch)
        indices = order[self._position : self._position + self.batch_size]
        self._position += self.batch_size
        batch = {name: array[indices] for name, array in self.arrays.items()}
        batch["index"] = indices.copy()
        return batch

    def state(self) -> dict[str, int]:
        """``{"epoch", "position"}`` (plus ``num_rows``, ``batch_size``, ``seed`` to check a restore); JSON-able."""
        return {
            "epoch": int(self._epoch),
            "position": int(self._position),
            "num_rows": int(self.num_rows),
            "batch_size": int(self.batch_size),
            "seed": int(self.seed),
        }

    def restore(self, state: dict[str, int]) -> None:
        """Continues from ``state`` (from ``state()``), so later batches match an uninterrupted stream.

        Raises:
            UserError: the state was saved by a stream over another number of rows, batch size or seed.
        """
        for name in ("num_rows", "batch_size", "seed"):
            if name in state and int(state[name]) != getattr(self, name):
                raise UserError(
                    f"cannot resume the data stream: it was saved with {name} {int(state[name])}, "
                    f"this one has {getattr(self, name)} (did the dataset or batch size change?)"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or position < 0 or position > len(self._epoch_order(epoch)):
            raise UserError(f"cannot resume the data stream from epoch {epoch}, position {position}")
        self._epoch, self._position = epoch, position
