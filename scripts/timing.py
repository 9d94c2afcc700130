"""Timing helper shared by the micro-benchmarks."""

from __future__ import annotations

import statistics
import time

import jax


def median_ms(fn, args, repeats: int) -> float:
    """Median wall time of ``fn(*args)`` in ms over ``repeats`` calls, after two warm-up calls."""
    jax.block_until_ready(fn(*args))  # compile + warm up
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
