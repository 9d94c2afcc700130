"""Benchmark the compiled hash-grid kernels (ngp_kernels) against the pure-JAX reference.

Times, in one process, jitted encode forward and forward+backward (vjp w.r.t. the table; also
w.r.t. table and positions) for the kernel and for ``fields.models.hash_grid.encode_reference``,
and prints JSON with the median milliseconds over ``--repeats`` runs and the speed-up ratios.

Usage (from the repo root):
    python -m scripts.bench_hash_grid --repeats 20 --cases image,nerf
"""

from __future__ import annotations

import argparse
import json
import platform

import jax
import jax.numpy as jnp

from fields.models.hash_grid import HashGridConfig, encode_reference, init_table
from scripts.timing import median_ms

CASES = {
    # Image "large" preset: 2D, L=8, T=2^14, F=2, N_min=64, N_max=2048, 2^15 points.
    "image": (HashGridConfig(2, 8, 2, 14, 64, 2048), 1 << 15),
    # NeRF-size volume: 3D, L=16, T=2^19, F=2, N_min=16, N_max=2048, 2^18 points.
    "nerf": (HashGridConfig(3, 16, 2, 19, 16, 2048), 1 << 18),
}


def _programs(encode, config):
    def forward(table, positions):
        return encode(table, positions, config)

    def fwd_bwd_table(table, positions, cotangent):
        out, vjp = jax.vjp(lambda t: encode(t, positions, config), table)
        return out, vjp(cotangent)[0]

    def fwd_bwd_both(table, positions, cotangent):
        out, vjp = jax.vjp(lambda t, p: encode(t, p, config), table, positions)
        return out, *vjp(cotangent)

    return {
        "fwd": jax.jit(forward),
        "fwd_bwd_table": jax.jit(fwd_bwd_table),
        "fwd_bwd_table_positions": jax.jit(fwd_bwd_both),
    }


def bench_case(name: str, repeats: int) -> dict:
    import ngp_kernels

    config, batch = CASES[name]
    k_table, k_pos, k_ct = jax.random.split(jax.random.PRNGKey(0), 3)
    table = init_table(k_table, config)
    positions = jax.random.uniform(k_pos, (batch, config.num_dims), jnp.float32)
    cotangent = jax.random.normal(k_ct, (batch, config.output_dim), jnp.float32)
    result = {
        "config": {
            "num_dims": config.num_dims,
            "num_levels": config.num_levels,
            "features_per_level": config.features_per_level,
            "log2_table_size": config.log2_table_size,
            "min_resolution": config.min_resolution,
            "max_resolution": config.max_resolution,
            "num_points": batch,
            "num_entries": config.num_entries,
        }
    }
    kernel = _programs(ngp_kernels.hash_grid_encode, config)
    reference = _programs(encode_reference, config)
    for op in kernel:
        args = (table, positions) if op == "fwd" else (table, positions, cotangent)
        k_ms = median_ms(kernel[op], args, repeats)
        r_ms = median_ms(reference[op], args, repeats)
        result[op] = {"kernel_ms": round(k_ms, 3), "jax_ms": round(r_ms, 3), "speedup": round(r_ms / k_ms, 2)}
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per measurement")
    parser.add_argument("--cases", default="image,nerf", help=f"comma list of {sorted(CASES)}")
    args = parser.parse_args(argv)
    import ngp_kernels

    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown cases {unknown}; choose from {sorted(CASES)}")
    report = {
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "machine": platform.processor() or platform.machine(),
        "kernel_threads": ngp_kernels.cpu_num_threads(),
        "repeats": args.repeats,
        "statistic": "median ms",
        "cases": {name: bench_case(name, args.repeats) for name in cases},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
