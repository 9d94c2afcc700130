"""Benchmark the compiled ray-marching / compositing kernels (ngp_kernels) against the pure-JAX twins.

Instant-NGP's synthetic-scene setting: box [-1.5, 1.5]^3, a 128^3 occupancy grid with ~15% of the
cells occupied (a few random balls), step = box diagonal / 1024, 1024 candidates per ray, a budget
of 2^18 samples, 4096 rays from a sphere of cameras around the box aimed near its centre. Times
(jitted, median ms over ``--repeats`` runs) ``march`` (``ngp_kernels.march_rays`` vs
``fields.rendering.volume.march_rays``), ``composite_fwd`` and ``composite_fwd_bwd`` (value and
gradient w.r.t. sigmas and rgbs of a linear function of colour, opacity and depth; kernel vs
``composite_reference``) on the marched samples, and the two chained (``march_composite_fwd_bwd``),
and prints JSON with the speed-ups.

Usage (from the repo root):
    python -m scripts.bench_volume --repeats 20
"""

from __future__ import annotations

import argparse
import json
import math
import platform

import jax
import jax.numpy as jnp
import numpy as np

from fields.rendering import occupancy_grid, volume
from scripts.timing import median_ms

AABB = np.array([[-1.5, -1.5, -1.5], [1.5, 1.5, 1.5]], np.float32)
NUM_RAYS = 4096
RESOLUTION = 128
STEPS_PER_DIAGONAL = 1024
STEP = 2.0 * 1.5 * math.sqrt(3.0) / STEPS_PER_DIAGONAL
MAX_SAMPLES = 1 << 18


def make_scene(seed: int = 0, target: float = 0.15):
    """Rays ``[R, 3] x 2`` and a bitfield with ~``target`` of the cells occupied (random balls)."""
    rng = np.random.default_rng(seed)
    axis = (np.arange(RESOLUTION, dtype=np.float32) + 0.5) / RESOLUTION
    z, y, x = np.meshgrid(axis, axis, axis, indexing="ij")
    cells = np.stack([x, y, z], -1).reshape(-1, 3)  # linear order x + G * (y + G * z)
    occupied = np.zeros(len(cells), bool)
    while occupied.mean() < target:
        centre = rng.uniform(0.2, 0.8, 3)
        radius = rng.uniform(0.08, 0.18)
        occupied |= np.sum((cells - centre) ** 2, -1) < radius**2
    bitfield = np.asarray(occupancy_grid.pack_bits(jnp.asarray(occupied)))
    eye = rng.normal(size=(NUM_RAYS, 3))
    origins = (4.0 * eye / np.linalg.norm(eye, axis=1, keepdims=True)).astype(np.float32)
    targets = rng.uniform(-1.0, 1.0, (NUM_RAYS, 3))
    directions = targets - origins
    directions = (directions / np.linalg.norm(directions, axis=1, keepdims=True)).astype(np.float32)
    return jnp.asarray(origins), jnp.asarray(directions), jnp.asarray(bitfield), float(occupied.mean())


def _march_fns():
    import ngp_kernels

    aabb = AABB  # a compile-time constant, as in training

    def kernel(o, d, b):
        s = ngp_kernels.march_rays(
            o,
            d,
            b,
            jnp.asarray(aabb),
            grid_resolution=RESOLUTION,
            step_size=STEP,
            max_steps=STEPS_PER_DIAGONAL,
            max_samples=MAX_SAMPLES,
        )
        return volume.PackedSamples(**s._asdict())

    def twin(o, d, b):
        return volume.march_rays(o, d, b, jnp.asarray(aabb), RESOLUTION, STEP, STEPS_PER_DIAGONAL, MAX_SAMPLES)

    return kernel, twin


def _composite_fns():
    import ngp_kernels

    def kernel(sigmas, rgbs, samples):
        return ngp_kernels.composite(
            sigmas, rgbs, samples.ts, samples.dts, samples.ray_indices, samples.valid, num_rays=NUM_RAYS
        )

    def twin(sigmas, rgbs, samples):
        return volume.composite_reference(sigmas, rgbs, samples, NUM_RAYS)

    return kernel, twin


def _value_and_grad(composite_fn, weights):
    a, b, c = weights

    def loss(sigmas, rgbs, samples):
        colour, opacity, depth = composite_fn(sigmas, rgbs, samples)
        return jnp.sum(colour * a) + jnp.sum(opacity * b) + jnp.sum(depth * c)

    return jax.value_and_grad(loss, argnums=(0, 1))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per measurement")
    args = parser.parse_args(argv)
    import ngp_kernels

    origins, directions, bitfield, occupancy = make_scene()
    k_march, t_march = _march_fns()
    k_comp, t_comp = _composite_fns()
    samples = jax.jit(k_march)(origins, directions, bitfield)
    num_samples = int(samples.num_samples)
    rng = np.random.default_rng(1)
    sigmas = jnp.asarray(rng.exponential(20.0, MAX_SAMPLES).astype(np.float32))
    rgbs = jnp.asarray(rng.uniform(0, 1, (MAX_SAMPLES, 3)).astype(np.float32))
    weights = tuple(jnp.asarray(rng.normal(size=s).astype(np.float32)) for s in ((NUM_RAYS, 3), NUM_RAYS, NUM_RAYS))

    def chained(march_fn, comp_fn):
        vg = _value_and_grad(comp_fn, weights)

        def run(o, d, b, sigmas, rgbs):
            return vg(sigmas, rgbs, march_fn(o, d, b))

        return run

    programs = {
        "march": ((jax.jit(k_march), jax.jit(t_march)), (origins, directions, bitfield)),
        "composite_fwd": ((jax.jit(k_comp), jax.jit(t_comp)), (sigmas, rgbs, samples)),
        "composite_fwd_bwd": (
            (jax.jit(_value_and_grad(k_comp, weights)), jax.jit(_value_and_grad(t_comp, weights))),
            (sigmas, rgbs, samples),
        ),
        "march_composite_fwd_bwd": (
            (jax.jit(chained(k_march, k_comp)), jax.jit(chained(t_march, t_comp))),
            (origins, directions, bitfield, sigmas, rgbs),
        ),
    }
    results = {}
    for name, ((kernel_fn, twin_fn), fn_args) in programs.items():
        k_ms = median_ms(kernel_fn, fn_args, args.repeats)
        t_ms = median_ms(twin_fn, fn_args, args.repeats)
        results[name] = {"kernel_ms": round(k_ms, 3), "jax_ms": round(t_ms, 3), "speedup": round(t_ms / k_ms, 2)}
    report = {
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "machine": platform.processor() or platform.machine(),
        "kernel_threads": ngp_kernels.cpu_num_threads(),
        "repeats": args.repeats,
        "statistic": "median ms",
        "setup": {
            "num_rays": NUM_RAYS,
            "grid_resolution": RESOLUTION,
            "occupied_fraction": round(occupancy, 4),
            "aabb": AABB.tolist(),
            "step_size": STEP,
            "max_steps": STEPS_PER_DIAGONAL,
            "max_samples": MAX_SAMPLES,
            "num_samples": num_samples,
            "mean_samples_per_ray": round(num_samples / NUM_RAYS, 1),
        },
        "results": results,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
