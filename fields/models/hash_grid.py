"""Multiresolution hash encoding (Instant-NGP), pure-JAX reference and backend dispatch.

Definition (Müller et al. 2022, as implemented by tiny-cuda-nn):

- ``num_levels`` levels with growth factor
  ``b = exp((ln max_resolution - ln min_resolution) / (num_levels - 1))``;
  level ``l`` has scale ``min_resolution * b**l - 1`` and grid resolution ``ceil(scale) + 1``.
- A position ``x`` in ``[0, 1]^d`` maps to ``x * scale + 0.5``; its floor is the cell, the rest is
  the fraction used for d-linear interpolation over the ``2**d`` cell corners.
- A level whose ``resolution**d`` entries fit in the table is indexed densely
  (``sum_i coord_i * resolution**i``); finer levels are hashed with
  ``xor_i(coord_i * prime_i) mod table_size`` in uint32 arithmetic,
  primes ``(1, 2654435761, 805459861)``.
- All levels live in one flat table ``[num_entries, features_per_level]``; level ``l`` owns rows
  ``offset_l : offset_l + size_l`` where ``size_l = min(round_up(resolution**d, 8), table_size)``.
- Tables are initialised from U(-1e-4, 1e-4).

``encode`` dispatches to the compiled kernels (``ngp_kernels``) when they are installed and the
``backend`` argument allows it; ``encode_reference`` is the pure-JAX twin every kernel is tested
against.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

HASH_PRIMES = (1, 2654435761, 805459861)
TABLE_INIT_SCALE = 1e-4
BACKENDS = ("auto", "kernel", "jax")


@dataclasses.dataclass(frozen=True)
class HashGridConfig:
    """Shape of a multiresolution hash grid.

    Attributes:
        num_dims: input dimensionality, 2 (images) or 3 (volumes).
        num_levels: number of resolution levels ``L``.
        features_per_level: feature width ``F`` of each table entry.
        log2_table_size: ``log2 T``, the maximum number of entries per level.
        min_resolution: coarsest grid resolution ``N_min``.
        max_resolution: finest grid resolution ``N_max``.
    """

    num_dims: int = 2
    num_levels: int = 16
    features_per_level: int = 2
    log2_table_size: int = 19
    min_resolution: int = 16
    max_resolution: int = 2048

    def __post_init__(self):
        if self.num_dims not in (2, 3):
            raise ValueError(f"hash grid num_dims must be 2 or 3, got {self.num_dims}")
        if self.num_levels < 1:
            raise ValueError(f"hash grid num_levels must be >= 1, got {self.num_levels}")
        if self.features_per_level < 1:
            raise ValueError(f"hash grid features_per_level must be >= 1, got {self.features_per_level}")
        if not 4 <= self.log2_table_size <= 26:
            raise ValueError(f"hash grid log2_table_size must be in [4, 26], got {self.log2_table_size}")
        if not 1 <= self.min_resolution <= self.max_resolution:
            raise ValueError(
                "hash grid needs 1 <= min_resolution <= max_resolution, got "
                f"{self.min_resolution} and {self.max_resolution}"
            )

    @property
    def table_size(self) -> int:
        return 1 << self.log2_table_size

    @property
    def output_dim(self) -> int:
        return self.num_levels * self.features_per_level

    @property
    def layout(self) -> GridLayout:
        return grid_layout(self)

    @property
    def num_entries(self) -> int:
        return self.layout.num_entries

    @property
    def num_params(self) -> int:
        return self.layout.num_entries * self.features_per_level


@dataclasses.dataclass(frozen=True)
class GridLayout:
    """Static per-level layout of a hash grid (all tuples have length ``num_levels``)."""

    scales: tuple[float, ...]  # float32-representable level scales
    resolutions: tuple[int, ...]  # grid points per axis
    sizes: tuple[int, ...]  # table rows owned by each level
    offsets: tuple[int, ...]  # first table row of each level
    dense: tuple[bool, ...]  # True where the level is indexed densely

    @property
    def num_entries(self) -> int:
        return self.offsets[-1] + self.sizes[-1]


@functools.cache
def grid_layout(config: HashGridConfig) -> GridLayout:
    """Computes level scales, resolutions, table sizes and offsets like tiny-cuda-nn."""
    if config.num_levels > 1:
        log2_growth = (math.log2(config.max_resolution) - math.log2(config.min_resolution)) / (
            config.num_levels - 1
        )
    else:
        log2_growth = 0.0
    scales, resolutions, sizes, offsets, dense = [], [], [], [], []
    offset = 0
    for level in range(config.num_levels):
        # float32 arithmetic, as the kernels use it.
        scale = float(
            np.float32(np.exp2(np.float32(level) * np.float32(log2_growth)) * np.float32(config.min_resolution))
            - np.float32(1.0)
        )
        resolution = int(math.ceil(scale)) + 1
        dense_entries = resolution**config.num_dims
        is_dense = dense_entries <= config.table_size
        size = min(-(-dense_entries // 8) * 8, config.table_size)
        scales.append(scale)
        resolutions.append(resolution)
        sizes.append(size)
        offsets.append(offset)
        dense.append(is_dense)
        offset += size
    return GridLayout(tuple(scales), tuple(resolutions), tuple(sizes), tuple(offsets), tuple(dense))


def init_table(key: jax.Array, config: HashGridConfig) -> jax.Array:
    """Returns a table ``[num_entries, features_per_level]`` drawn from U(-1e-4, 1e-4)."""
    shape = (config.num_entries, config.features_per_level)
    return jax.random.uniform(key, shape, jnp.float32, -TABLE_INIT_SCALE, TABLE_INIT_SCALE)


def corner_indices_and_weights(positions: jax.Array, config: HashGridConfig) -> tuple[jax.Array, jax.Array]:
    """Table rows and interpolation weights of every cell corner.

    Args:
        positions: ``[num_points, num_dims]`` float32 in ``[0, 1]``.

    Returns:
        rows: ``[num_points, num_levels, 2**num_dims]`` int32 rows of the flat table.
        weights: ``[num_points, num_levels, 2**num_dims]`` float32 d-linear weights.
    """
    layout = config.layout
    num_dims = config.num_dims
    scales = jnp.asarray(layout.scales, jnp.float32)  # [L]
    scaled = positions[:, None, :] * scales[None, :, None] + jnp.float32(0.5)  # [B, L, D]
    cell_float = jnp.floor(scaled)
    fraction = scaled - cell_float  # [B, L, D]
    cell = cell_float.astype(jnp.int32).astype(jnp.uint32)

    corner_bits = np.array(
        [[(corner >> dim) & 1 for dim in range(num_dims)] for corner in range(1 << num_dims)], np.uint32
    )  # [C, D]
    coords = cell[:, :, None, :] + jnp.asarray(corner_bits)[None, None]  # [B, L, C, D]

    # Dense index: sum_i coord_i * resolution**i.
    resolutions = np.asarray(layout.resolutions, np.uint64)
    strides = np.stack([resolutions**dim for dim in range(num_dims)], axis=-1)  # [L, D]
    strides = jnp.asarray(np.minimum(strides, 2**32 - 1).astype(np.uint32))
    dense_index = jnp.sum(coords * strides[None, :, None, :], axis=-1, dtype=jnp.uint32)
    # Hashed index: xor_i coord_i * prime_i.
    hashed_index = coords[..., 0] * jnp.uint32(HASH_PRIMES[0])
    for dim in range(1, num_dims):
        hashed_index = hashed_index ^ (coords[..., dim] * jnp.uint32(HASH_PRIMES[dim]))
    is_dense = jnp.asarray(layout.dense)[None, :, None]
    index = jnp.where(is_dense, dense_index, hashed_index)
    sizes = jnp.asarray(layout.sizes, jnp.uint32)[None, :, None]
    offsets = jnp.asarray(layout.offsets, jnp.int32)[None, :, None]
    rows = (index % sizes).astype(jnp.int32) + offsets  # [B, L, C]

    weight_per_dim = jnp.where(
        jnp.asarray(corner_bits, bool)[None, None], fraction[:, :, None, :], 1.0 - fraction[:, :, None, :]
    )  # [B, L, C, D]
    weights = jnp.prod(weight_per_dim, axis=-1)
    return rows, weights


def encode_reference(table: jax.Array, positions: jax.Array, config: HashGridConfig) -> jax.Array:
    """Pure-JAX hash-grid encoding.

    Args:
        table: ``[num_entries, features_per_level]`` float32.
        positions: ``[num_points, num_dims]`` float32 in ``[0, 1]``.

    Returns:
        ``[num_points, num_levels * features_per_level]`` float32, level-major.
    """
    rows, weights = corner_indices_and_weights(positions, config)
    corner_features = jnp.take(table, rows, axis=0, mode="clip")  # [B, L, C, F]
    features = jnp.einsum("blc,blcf->blf", weights, corner_features)
    return features.reshape(positions.shape[0], config.output_dim)


def kernels_available() -> bool:
    """True when the compiled ``ngp_kernels`` package imports."""
    try:
        import ngp_kernels  # noqa: F401
    except ImportError:
        return False
    return True


def encode(table: jax.Array, positions: jax.Array, config: HashGridConfig, backend: str = "auto") -> jax.Array:
    """Hash-grid encoding through the chosen backend.

    Args:
        table: ``[num_entries, features_per_level]`` float32.
        positions: ``[num_points, num_dims]`` float32 in ``[0, 1]``.
        backend: ``"kernel"`` (compiled, error if missing), ``"jax"`` (pure JAX) or ``"auto"``
            (kernel when installed, else JAX).

    Returns:
        ``[num_points, num_levels * features_per_level]`` float32.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown hash-grid backend {backend!r}; choose one of {BACKENDS}")
    if backend == "jax" or (backend == "auto" and not kernels_available()):
        return encode_reference(table, positions, config)
    import ngp_kernels

    return ngp_kernels.hash_grid_encode(table, positions, config)
