"""Ray marching and front-to-back compositing through the ``ngp_kernels`` XLA FFI targets.

The compiled twins of ``fields.rendering.volume.march_rays`` and ``composite_reference``:

* :func:`march_rays` marches rays through an occupancy bitfield and packs the occupied samples
  into a fixed budget (no gradients). Float ops are those XLA runs for the jitted twin with a
  constant scene box (see ``csrc/marching.h``); empty cells are skipped (DDA) without changing the
  output.
* :func:`composite` composites packed samples into colour, opacity and depth per ray;
  differentiable w.r.t. ``sigmas`` and ``rgbs`` (``jax.custom_vjp``, closed-form backward kernel).

Both run on CPU (multithreaded, deterministic) and, when built with nvcc, on CUDA. Under
``jax.vmap`` they fall back to a sequential loop over the mapped axis.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_MARCH = "ngp_march_rays"
_COMPOSITE_FWD = "ngp_composite_fwd"
_COMPOSITE_BWD = "ngp_composite_bwd"

TERMINATION_THRESHOLD = 1e-4


class MarchedSamples(NamedTuple):
    """Packed samples (field names as ``fields.rendering.volume.PackedSamples``).

    Attributes:
        positions: ``[S, 3]`` world positions.
        directions: ``[S, 3]`` ray directions.
        ts: ``[S]`` distance along the ray.
        dts: ``[S]`` step lengths (0 for unused slots).
        ray_indices: ``[S]`` int32 (unused slots: ``R``).
        valid: ``[S]`` bool.
        num_samples: ``[]`` int32, occupied samples before truncation to the budget.
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


def _check(name: str, x: jax.Array, dtype, shape: tuple[int | None, ...]) -> None:
    if x.dtype != dtype:
        raise TypeError(f"{name} must be {np.dtype(dtype).name}, got {x.dtype}; cast it first")
    if x.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, x.shape, strict=True)):
        want = ", ".join("?" if s is None else str(s) for s in shape)
        raise ValueError(f"{name} must have shape [{want}], got {list(x.shape)}")


def march_rays(
    origins: jax.Array,
    directions: jax.Array,
    bitfield: jax.Array,
    aabb: jax.Array,
    *,
    grid_resolution: int,
    step_size: float,
    max_steps: int,
    max_samples: int,
) -> MarchedSamples:
    """Marches ``R`` rays through the occupancy grid and packs the occupied samples.

    Args:
        origins: ``[R, 3]`` float32; directions: ``[R, 3]`` float32 unit vectors.
        bitfield: ``[grid_resolution^3 / 8]`` uint8 (bit ``i & 7`` of byte ``i >> 3``, cell
            ``i = x + G * (y + G * z)``).
        aabb: ``[2, 3]`` float32 scene box (min corner, max corner).
        grid_resolution: cells per axis ``G`` (even). step_size: distance between candidates.
        max_steps: candidates per ray. max_samples: the sample budget ``S``.

    Returns:
        :class:`MarchedSamples` (a tuple): candidate ``k`` of a ray is at ``t_near + (k + 0.5) *
        step_size`` and kept when before ``t_far`` and in an occupied cell; kept samples are packed
        in ray order, front to back, and truncated to ``S``. No gradients.
    """
    origins, directions = jnp.asarray(origins), jnp.asarray(directions)
    bitfield, aabb = jnp.asarray(bitfield), jnp.asarray(aabb)
    grid_resolution, max_steps, max_samples = int(grid_resolution), int(max_steps), int(max_samples)
    _check("origins", origins, jnp.float32, (None, 3))
    num_rays = origins.shape[0]
    _check("directions", directions, jnp.float32, (num_rays, 3))
    if grid_resolution < 2 or grid_resolution % 2:
        raise ValueError(f"grid_resolution must be even and >= 2, got {grid_resolution}")
    _check("bitfield", bitfield, jnp.uint8, (grid_resolution**3 // 8,))
    _check("aabb", aabb, jnp.float32, (2, 3))
    if max_steps < 0 or max_samples < 0:
        raise ValueError("max_steps and max_samples must be >= 0")
    f32, i32 = jnp.float32, jnp.int32
    S = max_samples
    out_types = (
        jax.ShapeDtypeStruct((S, 3), f32),
        jax.ShapeDtypeStruct((S, 3), f32),
        jax.ShapeDtypeStruct((S,), f32),
        jax.ShapeDtypeStruct((S,), f32),
        jax.ShapeDtypeStruct((S,), i32),
        jax.ShapeDtypeStruct((S,), jnp.bool_),
        jax.ShapeDtypeStruct((), i32),
        jax.ShapeDtypeStruct((num_rays,), i32),
    )
    call = jax.ffi.ffi_call(_MARCH, out_types, vmap_method="sequential")
    outs = call(
        jax.lax.stop_gradient(origins),
        jax.lax.stop_gradient(directions),
        bitfield,
        jax.lax.stop_gradient(aabb),
        grid_resolution=np.int64(grid_resolution),
        step_size=np.float32(step_size),
        max_steps=np.int64(max_steps),
    )
    return MarchedSamples(*outs)


# ------------------------------------------------------------------------------------------------
# Compositing


def _composite_call(sigmas, rgbs, ts, dts, ray_indices, valid, num_rays: int, threshold: float):
    f32 = jnp.float32
    out_types = (
        jax.ShapeDtypeStruct((num_rays, 3), f32),
        jax.ShapeDtypeStruct((num_rays,), f32),
        jax.ShapeDtypeStruct((num_rays,), f32),
    )
    call = jax.ffi.ffi_call(_COMPOSITE_FWD, out_types, vmap_method="sequential")
    return call(sigmas, rgbs, ts, dts, ray_indices, valid, termination_threshold=np.float32(threshold))


def _composite_impl(sigmas, rgbs, ts, dts, ray_indices, valid, num_rays, threshold):
    return _composite_call(sigmas, rgbs, ts, dts, ray_indices, valid, num_rays, threshold)


_composite = jax.custom_vjp(_composite_impl, nondiff_argnums=(6, 7))


def _composite_fwd(sigmas, rgbs, ts, dts, ray_indices, valid, num_rays, threshold):
    out = _composite_call(sigmas, rgbs, ts, dts, ray_indices, valid, num_rays, threshold)
    return out, (sigmas, rgbs, ts, dts, ray_indices, valid)


def _composite_bwd(num_rays, threshold, residuals, cotangents):
    sigmas, rgbs, ts, dts, ray_indices, valid = residuals
    d_colour, d_opacity, d_depth = cotangents
    num_samples = sigmas.shape[0]
    out_types = (
        jax.ShapeDtypeStruct((num_samples,), jnp.float32),
        jax.ShapeDtypeStruct((num_samples, 3), jnp.float32),
    )
    call = jax.ffi.ffi_call(_COMPOSITE_BWD, out_types, vmap_method="sequential")
    d_sigmas, d_rgbs = call(
        sigmas,
        rgbs,
        ts,
        dts,
        ray_indices,
        valid,
        d_colour,
        d_opacity,
        d_depth,
        termination_threshold=np.float32(threshold),
    )
    # ts and dts come from march_rays (no gradient); ray_indices / valid are not differentiable.
    return d_sigmas, d_rgbs, None, None, None, None


_composite.defvjp(_composite_fwd, _composite_bwd)


def composite(
    sigmas: jax.Array,
    rgbs: jax.Array,
    ts: jax.Array,
    dts: jax.Array,
    ray_indices: jax.Array,
    valid: jax.Array,
    *,
    num_rays: int,
    termination_threshold: float = TERMINATION_THRESHOLD,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Front-to-back compositing of packed samples (the compiled twin of ``composite_reference``).

    Args:
        sigmas: ``[S]`` float32 densities; rgbs: ``[S, 3]`` float32 colours.
        ts, dts: ``[S]`` float32 sample distances and step lengths.
        ray_indices: ``[S]`` int32; the samples of a ray must be contiguous (as ``march_rays``
            packs them). Indices outside ``[0, num_rays)`` (the padding index) are ignored.
        valid: ``[S]`` bool.
        num_rays: ``R``. termination_threshold: samples contribute while ``T >= threshold``.

    Returns:
        ``colour [R, 3]``, ``opacity [R]``, ``depth [R]`` (float32). Differentiable w.r.t.
        ``sigmas`` and ``rgbs`` (no gradient flows to ``ts`` / ``dts``).
    """
    sigmas, rgbs, ts, dts = (jnp.asarray(x) for x in (sigmas, rgbs, ts, dts))
    ray_indices, valid = jnp.asarray(ray_indices), jnp.asarray(valid)
    _check("sigmas", sigmas, jnp.float32, (None,))
    S = sigmas.shape[0]
    _check("rgbs", rgbs, jnp.float32, (S, 3))
    _check("ts", ts, jnp.float32, (S,))
    _check("dts", dts, jnp.float32, (S,))
    _check("ray_indices", ray_indices, jnp.int32, (S,))
    _check("valid", valid, jnp.bool_, (S,))
    num_rays = int(num_rays)
    if num_rays < 0:
        raise ValueError(f"num_rays must be >= 0, got {num_rays}")
    ts, dts = jax.lax.stop_gradient(ts), jax.lax.stop_gradient(dts)
    return _composite(sigmas, rgbs, ts, dts, ray_indices, valid, num_rays, float(termination_threshold))
