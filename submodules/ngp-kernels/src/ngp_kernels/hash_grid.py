"""Hash-grid encoding through the ``ngp_kernels`` XLA FFI targets.

Shapes (float32 everywhere):
    table      ``[..., E, F]``      flat table of all levels (``E = num_entries``, ``F`` features)
    positions  ``[..., B, D]``      points in ``[0, 1]^D``, ``D`` in {2, 3}
    output     ``[..., B, L * F]``  level-major features

``...`` are leading "field" dims: ``hash_grid_encode`` broadcasts them, and ``jax.vmap`` (any
nesting, over table, positions or both) adds more, all handled by ONE kernel launch that walks the
flattened fields. Unbatched inputs are not copied (``vmap_method="expand_dims"``; the kernels read
a size-1 field dim as a broadcast).

Gradients (``jax.custom_vjp``): w.r.t. the table and w.r.t. the positions. Only the cotangents
that are actually needed are computed (symbolic zeros tell which), with a fused kernel when both
are.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

_FWD = "ngp_hash_grid_fwd"
_BWD_TABLE = "ngp_hash_grid_bwd_table"
_BWD_POSITIONS = "ngp_hash_grid_bwd_positions"
_BWD_BOTH = "ngp_hash_grid_bwd_both"


@dataclasses.dataclass(frozen=True)
class GridSpec:
    """Static layout of a hash grid, as the kernels consume it (hashable, jit-static).

    All tuples have one entry per level.
    """

    num_dims: int
    features_per_level: int
    scales: tuple[float, ...]  # float32-representable level scales
    resolutions: tuple[int, ...]  # grid points per axis
    sizes: tuple[int, ...]  # table rows owned by each level
    offsets: tuple[int, ...]  # first table row of each level
    dense: tuple[bool, ...]  # dense (True) or hashed (False) indexing

    @classmethod
    def from_config(cls, config: Any) -> GridSpec:
        """Builds a spec from a ``GridSpec`` or any object shaped like ``HashGridConfig``.

        ``config`` needs ``num_dims``, ``num_levels``, ``features_per_level`` and ``layout`` with
        tuple attributes ``scales, resolutions, sizes, offsets, dense`` (duck-typed; this package
        does not import the caller's model code).
        """
        if isinstance(config, GridSpec):
            return config
        layout = config.layout
        spec = cls(
            num_dims=int(config.num_dims),
            features_per_level=int(config.features_per_level),
            scales=tuple(float(np.float32(s)) for s in layout.scales),
            resolutions=tuple(int(r) for r in layout.resolutions),
            sizes=tuple(int(s) for s in layout.sizes),
            offsets=tuple(int(o) for o in layout.offsets),
            dense=tuple(bool(d) for d in layout.dense),
        )
        if spec.num_levels != int(config.num_levels):
            raise ValueError(f"layout has {spec.num_levels} levels, config says {config.num_levels}")
        return spec

    def __post_init__(self):
        n = len(self.scales)
        if not n or any(len(t) != n for t in (self.resolutions, self.sizes, self.offsets, self.dense)):
            raise ValueError("GridSpec per-level tuples must be non-empty and of equal length")
        if self.num_dims not in (2, 3):
            raise ValueError(f"num_dims must be 2 or 3, got {self.num_dims}")

    @property
    def num_levels(self) -> int:
        return len(self.scales)

    @property
    def num_entries(self) -> int:
        return self.offsets[-1] + self.sizes[-1]

    @property
    def output_dim(self) -> int:
        return self.num_levels * self.features_per_level

    def attrs(self) -> dict[str, np.ndarray]:
        """Per-level FFI attributes."""
        return dict(
            scales=np.asarray(self.scales, np.float32),
            resolutions=np.asarray(self.resolutions, np.int64),
            sizes=np.asarray(self.sizes, np.int64),
            offsets=np.asarray(self.offsets, np.int64),
            dense=np.asarray(self.dense, np.int32),
        )


# ------------------------------------------------------------------------------------------------
# Raw FFI calls. Inputs have equal rank; leading dims are equal or 1.


def _lead(*arrays: jax.Array) -> tuple[int, ...]:
    return tuple(np.broadcast_shapes(*(a.shape[:-2] for a in arrays)))


def _ffi_forward(table: jax.Array, positions: jax.Array, spec: GridSpec) -> jax.Array:
    """``[..., E, F], [..., B, D] -> [..., B, L*F]``."""
    lead = _lead(table, positions)
    out = jax.ShapeDtypeStruct(lead + (positions.shape[-2], spec.output_dim), jnp.float32)
    call = jax.ffi.ffi_call(_FWD, out, vmap_method="expand_dims")
    return call(table, positions, **spec.attrs())


def _ffi_backward(table, positions, d_out, spec: GridSpec, want_table: bool, want_positions: bool):
    """Cotangents ``(d_table [..., E, F] | None, d_positions [..., B, D] | None)`` (leading dims
    are the broadcast of all inputs')."""
    lead = _lead(table, positions, d_out)
    t_type = jax.ShapeDtypeStruct(lead + table.shape[-2:], jnp.float32)
    p_type = jax.ShapeDtypeStruct(lead + positions.shape[-2:], jnp.float32)
    attrs = spec.attrs()
    if want_table and want_positions:
        call = jax.ffi.ffi_call(_BWD_BOTH, (t_type, p_type), vmap_method="expand_dims")
        d_table, d_positions = call(table, positions, d_out, **attrs)
        return d_table, d_positions
    if want_table:
        call = jax.ffi.ffi_call(_BWD_TABLE, t_type, vmap_method="expand_dims")
        return call(table, positions, d_out, **attrs), None
    if want_positions:
        call = jax.ffi.ffi_call(_BWD_POSITIONS, p_type, vmap_method="expand_dims")
        return None, call(table, positions, d_out, **attrs)
    return None, None


def _unbroadcast(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Sums ``x`` over the leading dims where ``shape`` (same rank) has size 1."""
    axes = tuple(i for i, (a, b) in enumerate(zip(x.shape, shape, strict=True)) if b == 1 and a != 1)
    if axes:
        x = jnp.sum(x, axis=axes, keepdims=True)
    return x


# ------------------------------------------------------------------------------------------------
# custom_vjp


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class _Needs:
    """Which cotangents the backward pass must produce (static residual)."""

    table: bool
    positions: bool


def _encode_impl(table, positions, spec):
    return _ffi_forward(table, positions, spec)


_encode = jax.custom_vjp(_encode_impl, nondiff_argnums=(2,))


def _encode_fwd(table, positions, spec):
    needs = _Needs(bool(table.perturbed), bool(positions.perturbed))
    table, positions = table.value, positions.value
    return _ffi_forward(table, positions, spec), (table, positions, needs)


def _encode_bwd(spec, residuals, d_out):
    table, positions, needs = residuals
    if isinstance(d_out, SymbolicZero):
        return None, None
    d_table, d_positions = _ffi_backward(table, positions, d_out, spec, needs.table, needs.positions)
    if d_table is not None:
        d_table = _unbroadcast(d_table, table.shape)
    if d_positions is not None:
        d_positions = _unbroadcast(d_positions, positions.shape)
    return d_table, d_positions


_encode.defvjp(_encode_fwd, _encode_bwd, symbolic_zeros=True)


def hash_grid_encode(table: jax.Array, positions: jax.Array, config: Any) -> jax.Array:
    """Multiresolution hash-grid encoding (the compiled twin of ``encode_reference``).

    Args:
        table: ``[E, F]`` float32 (or ``[..., E, F]``: leading field dims, broadcast against
            those of ``positions``).
        positions: ``[B, D]`` float32 in ``[0, 1]^D`` (or ``[..., B, D]``).
        config: a ``HashGridConfig``-like object (``num_dims``, ``num_levels``,
            ``features_per_level``, ``layout``) or a :class:`GridSpec`; read at trace time.

    Returns:
        ``[B, L * F]`` float32 (``[..., B, L * F]`` with leading dims), level-major.

    Works under ``jax.jit``, ``jax.grad`` (w.r.t. table and positions) and ``jax.vmap`` (mapped
    onto the kernels' field axis: no per-field loop).
    """
    spec = GridSpec.from_config(config)
    table = jnp.asarray(table)
    positions = jnp.asarray(positions)
    if table.dtype != jnp.float32 or positions.dtype != jnp.float32:
        raise TypeError(
            f"hash_grid_encode needs float32 table and positions, got {table.dtype} and "
            f"{positions.dtype}; cast them first"
        )
    if table.ndim < 2 or table.shape[-2:] != (spec.num_entries, spec.features_per_level):
        raise ValueError(f"table must be [..., {spec.num_entries}, {spec.features_per_level}], got {table.shape}")
    if positions.ndim < 2 or positions.shape[-1] != spec.num_dims:
        raise ValueError(f"positions must be [..., B, {spec.num_dims}], got {positions.shape}")
    rank = max(table.ndim, positions.ndim, 3)  # at least one field dim for the kernels
    t = jnp.reshape(table, (1,) * (rank - table.ndim) + table.shape)
    p = jnp.reshape(positions, (1,) * (rank - positions.ndim) + positions.shape)
    np.broadcast_shapes(t.shape[:-2], p.shape[:-2])  # raises on incompatible field dims
    out = _encode(t, p, spec)
    out_lead = np.broadcast_shapes(table.shape[:-2], positions.shape[:-2])
    return jnp.reshape(out, out_lead + out.shape[-2:])
