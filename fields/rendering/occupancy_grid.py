"""Occupancy grid for empty-space skipping (Instant-NGP): EMA of density, thresholded to a bitfield.

The grid covers the scene box with ``resolution^3`` cells, linear index ``x + R*(y + R*z)``.
``density [R^3]`` holds an exponential moving average of the field's optical thickness per
marching step (density * step size) sampled in each cell; ``bitfield [R^3 / 8]`` (uint8, bit
``i & 7`` of byte ``i >> 3``) marks the cells whose value exceeds ``min(threshold, mean)``.
Updates follow Instant-NGP: every
``update_every`` steps, decay the EMA by ``decay`` and take the max with fresh density samples at
a jittered point of (during warm-up) every cell or (after it) half uniform cells and half occupied
cells.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class OccupancyGridConfig:
    """Attributes:
    resolution: cells per axis (128 in Instant-NGP).
    threshold: optical thickness (density * step size) above which a cell is occupied (0.01 in
        Instant-NGP), capped by the grid's mean.
    decay: EMA decay per update (0.95).
    update_every: steps between updates (16).
    warmup_steps: steps during which every cell is updated (256).
    """

    resolution: int = 128
    threshold: float = 0.01
    decay: float = 0.95
    update_every: int = 16
    warmup_steps: int = 256

    def __post_init__(self):
        if self.resolution < 8 or self.resolution % 8:
            raise ValueError(f"occupancy grid resolution must be a multiple of 8 and >= 8, got {self.resolution}")

    @property
    def num_cells(self) -> int:
        return self.resolution**3


def initial_state(config: OccupancyGridConfig) -> dict[str, jax.Array]:
    """Density zero but every cell marked occupied until the first update sees the field."""
    return {
        "density": jnp.zeros((config.num_cells,), jnp.float32),
        "bitfield": jnp.full((config.num_cells // 8,), 255, jnp.uint8),
    }


def pack_bits(occupied: jax.Array) -> jax.Array:
    """``occupied [num_cells] bool`` -> ``[num_cells / 8] uint8`` (bit ``i & 7`` of byte ``i >> 3``)."""
    bits = occupied.reshape(-1, 8).astype(jnp.uint8)
    shifts = jnp.arange(8, dtype=jnp.uint8)
    return jnp.sum(bits << shifts, axis=-1, dtype=jnp.uint8)


def unpack_bits(bitfield: jax.Array) -> jax.Array:
    """Inverse of ``pack_bits``."""
    shifts = jnp.arange(8, dtype=jnp.uint8)
    return (((bitfield[:, None] >> shifts) & jnp.uint8(1)) == 1).reshape(-1)


def cell_index(unit_positions: jax.Array, resolution: int) -> jax.Array:
    """``unit_positions [n, 3]`` in [0, 1]^3 -> linear cell index ``[n]`` int32 (clamped)."""
    cells = jnp.clip(jnp.floor(unit_positions * resolution).astype(jnp.int32), 0, resolution - 1)
    return cells[:, 0] + resolution * (cells[:, 1] + resolution * cells[:, 2])


def is_occupied(bitfield: jax.Array, unit_positions: jax.Array, resolution: int) -> jax.Array:
    """Occupancy ``[n]`` bool of ``unit_positions [n, 3]`` (outside [0, 1]^3 is never occupied)."""
    index = cell_index(unit_positions, resolution)
    byte = jnp.take(bitfield, index >> 3, mode="clip")
    inside = jnp.all((unit_positions >= 0.0) & (unit_positions <= 1.0), axis=-1)
    return inside & (((byte >> (index & 7).astype(jnp.uint8)) & jnp.uint8(1)) == 1)


def cell_centres(resolution: int) -> np.ndarray:
    """Lower corners of all cells in linear order, ``[R^3, 3]`` in [0, 1)^3."""
    axis = np.arange(resolution, dtype=np.float32) / resolution
    z, y, x = np.meshgrid(axis, axis, axis, indexing="ij")
    return np.stack([x.ravel(), y.ravel(), z.ravel()], axis=-1)


def update(
    state: dict[str, jax.Array],
    density_fn,
    key: jax.Array,
    step: jax.Array,
    config: OccupancyGridConfig,
    step_size: float,
    num_samples: int | None = None,
) -> dict[str, jax.Array]:
    """One EMA update of the grid (call every ``update_every`` steps, inside jit).

    Args:
        density_fn: ``unit_positions [n, 3] -> density [n]``.
        step_size: the marching step; the grid stores density * step_size.
        step: current training step (selects warm-up vs. steady-state sampling).
        num_samples: cells sampled after warm-up (default: a quarter of all cells, half of them
            uniform and half among occupied cells).
    """
    num_cells = config.num_cells
    resolution = config.resolution
    num_samples = num_samples or num_cells // 4
    corners = jnp.asarray(cell_centres(resolution))
    key_jitter, key_uniform, key_occupied = jax.random.split(key, 3)

    def update_all(density):
        jitter = jax.random.uniform(key_jitter, (num_cells, 3)) / resolution
        fresh = density_fn(corners + jitter) * step_size
        return jnp.maximum(density * config.decay, fresh)

    def update_some(density):
        uniform = jax.random.randint(key_uniform, (num_samples // 2,), 0, num_cells)
        # The other half uniformly among occupied cells (inverse CDF; uniform if none is occupied).
        cdf = jnp.cumsum(unpack_bits(state["bitfield"]).astype(jnp.int32))
        draws = jax.random.randint(key_occupied, (num_samples - num_samples // 2,), 0, jnp.maximum(cdf[-1], 1))
        among_occupied = jnp.where(cdf[-1] > 0, jnp.searchsorted(cdf, draws, side="right"), draws)
        indices = jnp.concatenate([uniform, among_occupied.astype(jnp.int32)])
        jitter = jax.random.uniform(key_jitter, (num_samples, 3)) / resolution
        fresh = density_fn(corners[indices] + jitter) * step_size
        decayed = density * config.decay
        return decayed.at[indices].max(fresh)

    density = jax.lax.cond(step < config.warmup_steps, update_all, update_some, state["density"])
    threshold = jnp.minimum(jnp.float32(config.threshold), jnp.mean(density))
    return {"density": density, "bitfield": pack_bits(density > threshold)}
