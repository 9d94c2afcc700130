"""Ray marching with empty-space skipping and front-to-back compositing (pure-JAX twins).

Samples are *packed*: the occupied samples of all rays are compacted, in ray order and front to
back within a ray, into a buffer of fixed size ``max_samples`` (the sample budget); samples past
the budget are dropped, and unused slots have ``valid = False`` and ``dt = 0``.

Marching (Instant-NGP, synthetic scenes): a ray enters the scene box at ``t_near`` and steps with
constant ``step_size``; candidate ``k`` sits at ``t_near + (k + 0.5) * step_size`` and is kept when it
lies before ``t_far`` and in an occupied cell.

Compositing: ``alpha_i = 1 - exp(-sigma_i dt_i)``, transmittance ``T_i = prod_{j<i} (1 - alpha_j)``,
weight ``w_i = T_i alpha_i``; a sample contributes only while ``T_i >= termination_threshold``
(early termination). Outputs per ray: colour ``sum w_i c_i``, opacity ``sum w_i`` and depth
``sum w_i t_i``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fields.models.hash_grid import BACKENDS, kernels_available
from fields.rendering import occupancy_grid

TERMINATION_THRESHOLD = 1e-4


@dataclasses.dataclass(frozen=True)
class PackedSamples:
    """A fixed-size buffer of samples (a pytree).

    Attributes:
        positions: ``[S, 3]`` world positions.
        directions: ``[S, 3]`` unit ray directions.
        ts: ``[S]`` distance along the ray.
        dts: ``[S]`` step lengths (0 for unused slots).
        ray_indices: ``[S]`` int32, non-decreasing over valid samples (unused slots: ``num_rays``).
        valid: ``[S]`` bool.
        num_samples: scalar int32, occupied samples before truncation to the budget.
        ray_counts: ``[R]`` int32, occupied samples of each ray before truncation.
    """

    positions: jax.Array
    directions: jax.Array
    ts: jax.Array
    dts: jax.Array
    ray_indices: jax.Array
    valid: jax.Array
    num_samples: jax.Array
    ray_counts: jax.Array

    def complete_rays(self) -> jax.Array:
        """``[R]`` bool: rays all of whose occupied samples fit in the budget."""
        budget = self.ts.shape[0]
        return jnp.cumsum(self.ray_counts) <= budget


jax.tree_util.register_dataclass(
    PackedSamples,
    data_fields=["positions", "directions", "ts", "dts", "ray_indices", "valid", "num_samples", "ray_counts"],
    meta_fields=[],
)


def intersect_aabb(origins: jax.Array, directions: jax.Array, aabb: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Slab test. ``origins, directions [R, 3]``, ``aabb [2, 3]`` -> ``t_near, t_far [R]``.

    ``t_near`` is clamped to >= 0; rays that miss get ``t_near >= t_far``.
    """
    safe = jnp.where(jnp.abs(directions) < 1e-9, jnp.float32(1e-9), directions)
    inverse = 1.0 / safe
    t0 = (aabb[0] - origins) * inverse
    t1 = (aabb[1] - origins) * inverse
    t_near = jnp.maximum(jnp.max(jnp.minimum(t0, t1), axis=-1), 0.0)
    t_far = jnp.min(jnp.maximum(t0, t1), axis=-1)
    return t_near, t_far


def to_unit_cube(positions: jax.Array, aabb: jax.Array) -> jax.Array:
    """World positions ``[n, 3]`` -> ``[0, 1]^3`` coordinates of the scene box ``aabb [2, 3]``."""
    return (positions - aabb[0]) / (aabb[1] - aabb[0])


def _use_kernels(backend: str) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    return backend == "kernel" or (backend == "auto" and kernels_available())


def march_rays(
    origins: jax.Array,
    directions: jax.Array,
    bitfield: jax.Array,
    aabb: jax.Array,
    grid_resolution: int,
    step_size: float,
    max_steps: int,
    max_samples: int,
    backend: str = "jax",
) -> PackedSamples:
    """Marches ``R`` rays through the occupancy grid and packs the occupied samples.

    Args:
        origins: ``[R, 3]``; directions: ``[R, 3]`` unit vectors.
        bitfield: occupancy bitfield ``[grid_resolution^3 / 8]`` uint8.
        aabb: ``[2, 3]`` scene box (min corner, max corner).
        step_size: distance between samples.
        max_steps: candidates per ray (``ceil(box diagonal / step_size)`` covers any ray).
        max_samples: the sample budget ``S``.
        backend: ``"jax"`` (this function's pure-JAX body), ``"kernel"`` or ``"auto"``
            (``ngp_kernels.march_rays`` when installed).
    """
    if _use_kernels(backend):
        import ngp_kernels

        marched = ngp_kernels.march_rays(origins, directions, bitfield, aabb, grid_resolution=grid_resolution,
                                         step_size=step_size, max_steps=max_steps, max_samples=max_samples)
        return PackedSamples(*marched)
    num_rays = origins.shape[0]
    t_near, t_far = intersect_aabb(origins, directions, aabb)
    steps = (jnp.arange(max_steps, dtype=jnp.float32) + 0.5) * jnp.float32(step_size)
    ts = t_near[:, None] + steps[None, :]  # [R, M]
    positions = origins[:, None, :] + directions[:, None, :] * ts[..., None]  # [R, M, 3]
    unit = to_unit_cube(positions.reshape(-1, 3), aabb)
    occupied = occupancy_grid.is_occupied(bitfield, unit, grid_resolution).reshape(num_rays, max_steps)
    keep = occupied & (ts < t_far[:, None])
    flat_keep = keep.reshape(-1)
    slots = jnp.cumsum(flat_keep.astype(jnp.int32)) - 1
    num_samples = slots[-1] + 1
    target = jnp.where(flat_keep & (slots < max_samples), slots, max_samples)  # overflow -> dropped
    ray_of = jnp.repeat(jnp.arange(num_rays, dtype=jnp.int32), max_steps)

    def scatter(values, fill):
        buffer = jnp.full((max_samples + 1,) + values.shape[1:], fill, values.dtype)
        return buffer.at[target].set(values, mode="drop")[:max_samples]

    valid = scatter(flat_keep, False)
    return PackedSamples(
        positions=scatter(positions.reshape(-1, 3), 0.0),
        directions=scatter(jnp.repeat(directions, max_steps, axis=0), 0.0),
        ts=scatter(ts.reshape(-1), 0.0),
        dts=jnp.where(valid, jnp.float32(step_size), 0.0),
        ray_indices=scatter(ray_of, num_rays),
        valid=valid,
        num_samples=num_samples,
        ray_counts=jnp.sum(keep, axis=1, dtype=jnp.int32),
    )


def _segmented_exclusive_cumsum(values: jax.Array, ray_indices: jax.Array) -> jax.Array:
    """Exclusive running sum of ``values [S]`` that restarts where ``ray_indices`` changes."""
    starts = jnp.concatenate([jnp.ones((1,), bool), ray_indices[1:] != ray_indices[:-1]])

    def combine(left, right):
        left_sum, left_start = left
        right_sum, right_start = right
        return jnp.where(right_start, right_sum, left_sum + right_sum), left_start | right_start

    inclusive, _ = jax.lax.associative_scan(combine, (values, starts))
    return inclusive - values


def composite(
    sigmas: jax.Array,
    rgbs: jax.Array,
    samples: PackedSamples,
    num_rays: int,
    termination_threshold: float = TERMINATION_THRESHOLD,
    backend: str = "jax",
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``composite_reference`` or, with ``backend`` kernel/auto, the compiled ``ngp_kernels.composite``
    (same values; gradients w.r.t. ``sigmas`` and ``rgbs``)."""
    if _use_kernels(backend):
        import ngp_kernels

        return ngp_kernels.composite(sigmas, rgbs, samples.ts, samples.dts, samples.ray_indices, samples.valid,
                                     num_rays=num_rays, termination_threshold=termination_threshold)
    return composite_reference(sigmas, rgbs, samples, num_rays, termination_threshold)


def composite_reference(
    sigmas: jax.Array,
    rgbs: jax.Array,
    samples: PackedSamples,
    num_rays: int,
    termination_threshold: float = TERMINATION_THRESHOLD,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Front-to-back compositing of packed samples (pure JAX, differentiable).

    Args:
        sigmas: ``[S]`` densities; rgbs: ``[S, 3]`` colours.
        samples: the packed samples they were evaluated at.

    Returns:
        ``colour [R, 3]``, ``opacity [R]``, ``depth [R]``.
    """
    tau = jnp.where(samples.valid, sigmas * samples.dts, 0.0)
    transmittance = jnp.exp(-_segmented_exclusive_cumsum(tau, samples.ray_indices))
    alive = samples.valid & (transmittance >= termination_threshold)
    weights = jnp.where(alive, transmittance * (1.0 - jnp.exp(-tau)), 0.0)
    segments = jnp.where(samples.valid, samples.ray_indices, num_rays)
    colour = jax.ops.segment_sum(weights[:, None] * rgbs, segments, num_rays + 1)[:num_rays]
    opacity = jax.ops.segment_sum(weights, segments, num_rays + 1)[:num_rays]
    depth = jax.ops.segment_sum(weights * samples.ts, segments, num_rays + 1)[:num_rays]
    return colour, opacity, depth
