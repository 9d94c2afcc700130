"""Instant-NGP multiresolution hash-grid encoding, ray marching and compositing as XLA FFI calls.

C++ kernels on CPU (multithreaded, deterministic backward), CUDA kernels on GPU when the package
was built with nvcc. The functions computed are exactly ``fields.models.hash_grid.encode_reference``
and ``fields.rendering.volume.march_rays`` / ``composite_reference``.

Public API:
    hash_grid_encode(table, positions, config) -> features
    march_rays(origins, directions, bitfield, aabb, *, grid_resolution, step_size, max_steps,
               max_samples) -> MarchedSamples (a NamedTuple of 8 arrays)
    composite(sigmas, rgbs, ts, dts, ray_indices, valid, *, num_rays, termination_threshold)
        -> (colour, opacity, depth), differentiable w.r.t. sigmas and rgbs
    GridSpec: the static per-level layout the kernels need (built from any config-like object)
    built_with_cuda(): True when the CUDA targets were compiled in (and registered)
    cpu_num_threads(): threads the CPU kernels use
"""

from __future__ import annotations

import jax

from ngp_kernels import _ngp_kernels
from ngp_kernels.hash_grid import GridSpec, hash_grid_encode
from ngp_kernels.volume import MarchedSamples, composite, march_rays

__all__ = [
    "GridSpec",
    "hash_grid_encode",
    "MarchedSamples",
    "march_rays",
    "composite",
    "built_with_cuda",
    "cpu_num_threads",
]
__version__ = "0.1.0"


def built_with_cuda() -> bool:
    """True when the extension was compiled with the CUDA kernels."""
    return bool(_ngp_kernels.built_with_cuda())


def cpu_num_threads() -> int:
    """Number of threads the CPU kernels split work over (env ``NGP_KERNELS_NUM_THREADS``)."""
    return int(_ngp_kernels.cpu_num_threads())


def _register() -> None:
    # Only the platforms compiled in are present: "cpu" always, "CUDA" when built with nvcc.
    for platform, targets in _ngp_kernels.registrations().items():
        for name, capsule in targets.items():
            jax.ffi.register_ffi_target(name, capsule, platform=platform)


_register()
