"""Views of an Instant-NGP field for contrastive learning over weights.

Three ways to make another view of the same field:

- ``permute_vectors``: shuffle the hidden neurons of the MLP. The NGP MLP has no biases and
  ReLU hidden layers, so permuting the output columns of ``dense_k`` and the input rows of
  ``dense_{k+1}`` with the same permutation leaves the function exactly unchanged (the weights
  differ, the renders do not);
- ``add_weight_noise``: small Gaussian noise on every weight;
- ``rotate_dataset_images``: a field fitted to the source image rotated by ``k * 90`` degrees
  (``np.rot90``), written as a dataset of fields with a ``rotation`` column (``k``), so a source
  has several fields that show the same object.

``NGPLayout`` finds the hash table and the MLP kernels in a flat weight vector ``[..., P]`` laid
out by a param map, so the augmentations work on the rows of a dataset directly.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fields.cli import UserError
from fields.weights import ParamEntry, param_count, stacked_params_to_matrix

TABLE_NAME = "hash_table"
KERNEL_PATTERN = re.compile(r"^mlp/dense_(\d+)/kernel$")
ROTATION_COLUMN = "rotation"
PROCEDURAL_SOURCE = "procedural:primitives"
PROCEDURAL_ID = re.compile(r"^primitives/(-?\d+)/(\d+)$")


def _array_module(array):
    return np if isinstance(array, np.ndarray) else jnp


@dataclasses.dataclass(frozen=True)
class NGPLayout:
    """Where the hash table and the MLP kernels of an NGP field live in its flat vector ``[P]``.

    Attributes:
        entries: the param map.
        kernel_names: ``mlp/dense_k/kernel`` in layer order (``k = 0, 1, ...``).
        num_params: ``P``.
    """

    entries: tuple[ParamEntry, ...]
    kernel_names: tuple[str, ...]
    num_params: int

    @classmethod
    def from_param_map(cls, pmap: Sequence[ParamEntry], where: str = "param map") -> NGPLayout:
        """Checks that ``pmap`` is a bias-free NGP field: ``hash_table [E, F]`` and chained kernels.

        Raises:
            UserError: a missing table or kernel, an unexpected tensor (e.g. a bias, which the
                permutation would have to move too), or kernels whose shapes do not chain.
        """
        names = {entry.name: entry for entry in pmap}
        if TABLE_NAME not in names or len(names[TABLE_NAME].shape) != 2:
            raise UserError(f"{where}: no 2-D {TABLE_NAME!r} tensor; hypernets.sane needs Instant-NGP fields")
        layers = {}
        for entry in pmap:
            match = KERNEL_PATTERN.match(entry.name)
            if match:
                layers[int(match.group(1))] = entry
            elif entry.name != TABLE_NAME:
                raise UserError(f"{where}: unexpected tensor {entry.name!r}; hypernets.sane expects the bias-free "
                                "NGP MLP (hash_table and mlp/dense_k/kernel only)")
        if sorted(layers) != list(range(len(layers))) or not layers:
            raise UserError(f"{where}: MLP kernels must be mlp/dense_0/kernel ... without gaps, got "
                            f"{sorted(entry.name for entry in layers.values())}")
        kernels = [layers[index] for index in range(len(layers))]
        for previous, following in zip(kernels[:-1], kernels[1:], strict=True):
            if len(previous.shape) != 2 or len(following.shape) != 2 or previous.shape[1] != following.shape[0]:
                raise UserError(f"{where}: kernel shapes do not chain ({previous.name} {previous.shape}, "
                                f"{following.name} {following.shape})")
        return cls(tuple(pmap), tuple(entry.name for entry in kernels), param_count(pmap))

    def entry(self, name: str) -> ParamEntry:
        for entry in self.entries:
            if entry.name == name:
                return entry
        raise KeyError(name)

    @property
    def table_shape(self) -> tuple[int, int]:
        """``(num_entries, features_per_level)``."""
        return tuple(self.entry(TABLE_NAME).shape)

    @property
    def kernel_shapes(self) -> tuple[tuple[int, int], ...]:
        return tuple(tuple(self.entry(name).shape) for name in self.kernel_names)

    @property
    def hidden_widths(self) -> tuple[int, ...]:
        """Neurons of each hidden layer (the output width of every kernel but the last)."""
        return tuple(shape[1] for shape in self.kernel_shapes[:-1])

    def tensor(self, vectors, name: str):
        """``vectors [..., P]`` -> the tensor ``name`` as ``[..., *shape]`` (numpy or jax, as given)."""
        entry = self.entry(name)
        piece = vectors[..., entry.offset : entry.offset + entry.size]
        return piece.reshape(vectors.shape[:-1] + entry.shape)

    def table(self, vectors):
        """``[..., P]`` -> hash table ``[..., num_entries, features_per_level]``."""
        return self.tensor(vectors, TABLE_NAME)

    def kernels(self, vectors) -> list:
        """``[..., P]`` -> MLP kernels ``[..., in_k, out_k]`` in layer order."""
        return [self.tensor(vectors, name) for name in self.kernel_names]

    def replace(self, vectors, tensors: dict):
        """``vectors [..., P]`` with the named tensors (``[..., *shape]``) put in their place."""
        xp = _array_module(vectors)
        lead = vectors.shape[:-1]
        pieces = []
        for entry in self.entries:
            if entry.name in tensors:
                value = tensors[entry.name]
                pieces.append(xp.reshape(value, lead + (entry.size,)).astype(vectors.dtype))
            else:
                pieces.append(vectors[..., entry.offset : entry.offset + entry.size])
        return xp.concatenate(pieces, axis=-1)

    def replace_kernels(self, vectors, kernels: Sequence):
        """``vectors [..., P]`` with the MLP kernels replaced (hash table kept)."""
        return self.replace(vectors, dict(zip(self.kernel_names, kernels, strict=True)))


# ------------------------------------------------------------------------------- neuron permutation


def random_permutations(key: jax.Array, hidden_widths: Sequence[int]) -> list[jax.Array]:
    """One random permutation ``[H_k]`` int32 per hidden layer."""
    keys = jax.random.split(key, max(len(hidden_widths), 1))
    return [jax.random.permutation(keys[k], width).astype(jnp.int32) for k, width in enumerate(hidden_widths)]


def permute_hidden_neurons(kernels: Sequence, permutations: Sequence) -> list:
    """Permutes the hidden neurons of one bias-free ReLU MLP without changing its function.

    Hidden layer ``k``'s neuron ``j`` becomes neuron ``i`` where ``permutations[k][i] = j``: the
    columns of ``kernels[k]`` and the rows of ``kernels[k + 1]`` are reordered alike.

    Args:
        kernels: ``[in_k, out_k]`` for ``k = 0..n`` (``out_k == in_{k+1}``).
        permutations: ``[out_k]`` int index arrays for the hidden layers ``k = 0..n-1``.

    Returns:
        the permuted kernels (same shapes).
    """
    if len(permutations) != len(kernels) - 1:
        raise ValueError(f"need {len(kernels) - 1} permutations (one per hidden layer), got {len(permutations)}")
    kernels = list(kernels)
    for layer, permutation in enumerate(permutations):
        kernels[layer] = kernels[layer][:, permutation]
        kernels[layer + 1] = kernels[layer + 1][permutation, :]
    return kernels


def permute_vectors(vectors: jax.Array, layout: NGPLayout, key: jax.Array) -> jax.Array:
    """Each field of ``vectors [B, P]`` with its own random hidden-neuron permutation -> ``[B, P]``."""

    def permute_one(vector, field_key):
        permutations = random_permutations(field_key, layout.hidden_widths)
        kernels = permute_hidden_neurons(layout.kernels(vector), permutations)
        return layout.replace_kernels(vector, kernels)

    keys = jax.random.split(key, vectors.shape[0])
    return jax.vmap(permute_one)(vectors, keys)


def add_weight_noise(vectors: jax.Array, key: jax.Array, std: float) -> jax.Array:
    """``vectors + std * N(0, 1)`` (same shape and dtype)."""
    noise = jax.random.normal(key, vectors.shape, jnp.float32).astype(vectors.dtype)
    return vectors + jnp.asarray(std, vectors.dtype) * noise


def augment(vectors: jax.Array, layout: NGPLayout, key: jax.Array, permute: bool,
            noise_std: float) -> tuple[jax.Array, jax.Array]:
    """One augmented view of each field of ``vectors [B, P]``.

    Returns:
        ``(clean, noisy)``, each ``[B, P]``: ``clean`` is the permuted field (the same function as the
        input), ``noisy`` is ``clean`` plus weight noise (the encoder's input; ``clean`` is the
        reconstruction target).
    """
    permute_key, noise_key = jax.random.split(key)
    clean = permute_vectors(vectors, layout, permute_key) if permute else vectors
    noisy = add_weight_noise(clean, noise_key, noise_std) if noise_std > 0 else clean
    return clean, noisy


# ------------------------------------------------------------------------------- rotated copies


def read_rotation_column(path: str) -> np.ndarray | None:
    """The ``rotation`` column of a dataset of fields (``[N]`` int32 in row order), or None without one."""
    import pyarrow.parquet as pq

    from fields.field_datasets import list_shards

    parts = []
    for shard in list_shards(path):
        try:
            names = pq.read_schema(shard).names
            if ROTATION_COLUMN not in names:
                return None
            column = pq.read_table(shard, columns=[ROTATION_COLUMN]).column(ROTATION_COLUMN)
        except Exception as error:  # noqa: BLE001 - a corrupt shard: one line naming it
            raise UserError(f"cannot read the {ROTATION_COLUMN} column of {shard}: {error}") from None
        parts.append(np.asarray(column.to_numpy(), np.int64))
    values = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    return values.astype(np.int32)


def stored_fit_config(metadata: dict, data_path: str, field_kind: str, field_config, backend: str,
                      steps: int | None = None):
    """The config the fields of a dataset were fitted with: the ``fit`` entry of its schema metadata,
    else of ``field_config.json`` beside the shards (``fields.encode_dataset`` writes it), else the
    family's ``small`` preset (with ``steps`` when given). Its field config is ``field_config``.

    Raises:
        UserError: a stored ``fit`` entry that is not a valid config of that field family.
    """
    from fields.config import ConfigError, config_from_dict, read_config_record
    from fields.image_fitting import MLP_PRESETS, PRESETS, ImageFitConfig, MLPImageFitConfig

    values = metadata.get("fit")
    if values is None and os.path.isdir(data_path):
        manifest = read_config_record(os.path.join(data_path, "field_config.json"))
        values = manifest.get("fit") if isinstance(manifest, dict) else None
    if isinstance(values, dict):
        config_class = ImageFitConfig if field_kind == "ngp_image" else MLPImageFitConfig
        try:
            config = config_from_dict(config_class, values, f"{data_path}: fit")
        except ConfigError as error:
            raise UserError(str(error)) from None
    else:
        config = PRESETS["small"] if field_kind == "ngp_image" else MLP_PRESETS[field_config.kind]["small"]
        if steps is not None:
            config = dataclasses.replace(config, steps=max(int(steps), 1))
    return dataclasses.replace(config, field=field_config, backend=backend)


def procedural_item(source_id: str) -> tuple[int, int] | None:
    """``(generator seed, index)`` of a ``primitives/SEED/INDEX`` source id, else None."""
    match = PROCEDURAL_ID.match(source_id)
    return (int(match.group(1)), int(match.group(2))) if match else None


def rotate_dataset_images(data_path: str, out_path: str, rotations: Sequence[int] = (1, 2, 3),
                          backend: str = "auto", fields_per_batch: int = 256, progress: bool = False) -> str:
    """Adds, for every field of a ``procedural:primitives`` dataset, fields fitted to its image rotated
    by ``k * 90`` degrees, and writes all of them as one dataset with a ``rotation`` column.

    The source images are drawn again (``fields.data.procgen_2d.primitive_image(index, seed, size)``
    from the ``primitives/SEED/INDEX`` source ids), rotated with ``np.rot90(image, k)`` and fitted
    with ``fields.image_fitting.fit_image_batch`` with the dataset's fitting config (seed
    ``original seed + 1_000_003 * k``). The originals are copied unchanged with ``rotation = 0``.
    Rotated copies keep the source id of their original, so a split by source keeps them together.
    One shard per rotation (``rotation-K.parquet``); shards already in ``out_path`` are kept, so a
    killed run resumes.

    Args:
        data_path: the dataset of fields (one shard or a folder, as ``fields.encode_dataset`` writes).
        out_path: output folder.
        rotations: the quarter turns ``k`` (1..3) to add.
        backend: hash-grid backend for fitting.
        fields_per_batch: fields fitted in one vmapped call.
        progress: print one line per fitted batch.

    Returns:
        ``out_path``.

    Raises:
        UserError: not an image dataset of ``procedural:primitives``, non-square images, bad rotations.
    """
    from fields.data.procgen_2d import primitive_image
    from fields.field_datasets import FIELD_RESERVED_KEYS, read_dataset, write_shard
    from fields.image_fitting import field_config_from_dict, fit_image_batch

    if not rotations or any(int(k) not in (1, 2, 3) for k in rotations) or len(set(rotations)) != len(rotations):
        raise UserError(f"rotations must be distinct quarter turns in 1..3, got {list(rotations)}")
    dataset = read_dataset(data_path)
    if dataset.metadata.get("source") != PROCEDURAL_SOURCE:
        raise UserError(f"{data_path}: rotated copies need a {PROCEDURAL_SOURCE} dataset (its images can be drawn "
                        f"again); this one's source is {dataset.metadata.get('source')!r}")
    field_config = field_config_from_dict(dataset.field_kind, dataset.field_config, f"{data_path}: field_config")
    height, width = int(dataset.metadata.get("image_height", 0)), int(dataset.metadata.get("image_width", 0))
    if height != width or height < 1:
        raise UserError(f"{data_path}: rotated copies need square images, got {height}x{width}")
    identities = []
    for source_id in dataset.columns.get("source_id", []):
        identity = procedural_item(str(source_id))
        if identity is None:
            raise UserError(f"{data_path}: source id {source_id!r} is not of the form primitives/SEED/INDEX")
        identities.append(identity)
    if len(identities) != len(dataset):
        raise UserError(f"{data_path} has no source_id column")
    steps = np.asarray(dataset.columns.get("steps", [-1]), np.int64)
    config = stored_fit_config(dataset.metadata, data_path, dataset.field_kind, field_config, backend,
                               int(steps.max(initial=1)))

    os.makedirs(out_path, exist_ok=True)
    extra = {key: value for key, value in dataset.metadata.items() if key not in FIELD_RESERVED_KEYS}
    extra["rotations"] = [0] + [int(k) for k in rotations]
    extra["rotated_from"] = os.path.abspath(data_path)
    base_columns = {
        "source_id": [str(value) for value in dataset.columns["source_id"]],
        "label": [int(value) for value in dataset.columns.get("label", [-1] * len(dataset))],
    }
    original_seeds = [int(value) for value in dataset.columns.get("seed", [-1] * len(dataset))]
    # Rotated copies start from the same initial weights as their originals (a shared init stays shared).
    init_seeds = [int(value) for value in dataset.columns.get("init_seed", [-1] * len(dataset))]

    def write(k: int, matrix: np.ndarray, psnr: Sequence[float], seeds: Sequence[int], fit_steps: Sequence[int]):
        columns = {**base_columns, "psnr": [float(value) for value in psnr], "seed": [int(s) for s in seeds],
                   "init_seed": [value if value >= 0 else int(s) for value, s in zip(init_seeds, seeds, strict=True)],
                   "steps": [int(s) for s in fit_steps], ROTATION_COLUMN: [int(k)] * len(matrix)}
        write_shard(os.path.join(out_path, f"rotation-{k}.parquet"), matrix, columns, dataset.field_kind,
                    dataset.field_config, dataset.param_map, extra_schema_metadata=extra)

    if not os.path.exists(os.path.join(out_path, "rotation-0.parquet")):
        psnr = dataset.columns.get("psnr", [float("nan")] * len(dataset))
        write(0, dataset.matrix, psnr, original_seeds, [int(s) for s in steps] if len(steps) == len(dataset)
              else [-1] * len(dataset))
    for k in rotations:
        if os.path.exists(os.path.join(out_path, f"rotation-{int(k)}.parquet")):
            continue
        matrices, psnrs, seeds = [], [], []
        for start in range(0, len(dataset), fields_per_batch):
            batch = identities[start:start + fields_per_batch]
            images = np.stack([np.rot90(primitive_image(index, seed, height)[0], int(k)) for seed, index in batch])
            batch_seeds = [max(original_seeds[start + i], 0) + 1_000_003 * int(k) for i in range(len(batch))]
            batch_init = [init_seeds[start + i] if init_seeds[start + i] >= 0 else batch_seeds[i]
                          for i in range(len(batch))]
            result = fit_image_batch(np.ascontiguousarray(images, np.float32), config, batch_seeds, batch_init)
            matrices.append(stacked_params_to_matrix(result.params, dataset.param_map))
            psnrs.extend(float(value) for value in result.psnr)
            seeds.extend(batch_seeds)
            if progress:
                print(f"rotation {int(k) * 90} degrees: fitted {start + len(batch)}/{len(dataset)} fields, "
                      f"mean PSNR {np.mean(result.psnr):.2f} dB")
        write(int(k), np.concatenate(matrices), psnrs, seeds, [config.steps] * len(dataset))
    return out_path
