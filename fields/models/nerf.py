"""Instant-NGP NeRF field: 3D hash grid -> density MLP (trunc-exp) -> SH-encoded colour MLP."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from fields.models import hash_grid
from fields.models.hash_grid import HashGridConfig
from fields.models.mlp import MLP


@jax.custom_vjp
def trunc_exp(x: jax.Array) -> jax.Array:
    """``exp(x)`` whose gradient uses ``exp(min(x, 15))`` (Instant-NGP's density activation)."""
    return jnp.exp(x)


def _trunc_exp_forward(x):
    return jnp.exp(x), x


def _trunc_exp_backward(x, cotangent):
    return (cotangent * jnp.exp(jnp.minimum(x, jnp.float32(15.0))),)


trunc_exp.defvjp(_trunc_exp_forward, _trunc_exp_backward)


def spherical_harmonics(directions: jax.Array, degree: int = 4) -> jax.Array:
    """Real spherical harmonics basis up to ``degree`` (1 to 4) of unit directions.

    Args:
        directions: ``[num_points, 3]`` unit vectors.

    Returns:
        ``[num_points, degree**2]``.
    """
    if not 1 <= degree <= 4:
        raise ValueError(f"spherical harmonics degree must be in [1, 4], got {degree}")
    x, y, z = directions[:, 0], directions[:, 1], directions[:, 2]
    xx, yy, zz = x * x, y * y, z * z
    xy, yz, xz = x * y, y * z, x * z
    basis = [jnp.full_like(x, 0.28209479177387814)]
    if degree > 1:
        basis += [-0.48860251190291987 * y, 0.48860251190291987 * z, -0.48860251190291987 * x]
    if degree > 2:
        basis += [
            1.0925484305920792 * xy,
            -1.0925484305920792 * yz,
            0.94617469575755997 * zz - 0.31539156525251999,
            -1.0925484305920792 * xz,
            0.54627421529603959 * (xx - yy),
        ]
    if degree > 3:
        basis += [
            0.59004358992664352 * y * (-3.0 * xx + yy),
            2.8906114426405538 * xy * z,
            0.45704579946446572 * y * (1.0 - 5.0 * zz),
            0.3731763325901154 * z * (5.0 * zz - 3.0),
            0.45704579946446572 * x * (1.0 - 5.0 * zz),
            1.4453057213202769 * z * (xx - yy),
            0.59004358992664352 * x * (-xx + 3.0 * yy),
        ]
    return jnp.stack(basis, axis=-1).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class NeRFFieldConfig:
    """Architecture of an Instant-NGP NeRF field.

    Attributes:
        grid: 3D hash grid over the scene box mapped to [0, 1]^3.
        density_hidden_width, density_hidden_layers: the density MLP.
        geometry_features: features passed from the density MLP to the colour MLP (its output is
            ``1 + geometry_features``; the first is log-density).
        color_hidden_width, color_hidden_layers: the colour MLP.
        sh_degree: spherical-harmonics degree of the view-direction encoding (4 -> 16 features).
    """

    grid: HashGridConfig = dataclasses.field(
        default_factory=lambda: HashGridConfig(num_dims=3, num_levels=16, features_per_level=2, log2_table_size=19,
                                               min_resolution=16, max_resolution=2048)
    )
    density_hidden_width: int = 64
    density_hidden_layers: int = 1
    geometry_features: int = 15
    color_hidden_width: int = 64
    color_hidden_layers: int = 2
    sh_degree: int = 4

    def __post_init__(self):
        if self.grid.num_dims != 3:
            raise ValueError(f"a NeRF field needs a 3D hash grid, got num_dims={self.grid.num_dims}")
        if not 1 <= self.sh_degree <= 4:
            raise ValueError(f"sh_degree must be in [1, 4], got {self.sh_degree}")


class NeRFField(nn.Module):
    """Params: ``hash_table``, ``density_mlp/dense_k/kernel``, ``color_mlp/dense_k/kernel``."""

    config: NeRFFieldConfig
    backend: str = "auto"

    def setup(self):
        grid = self.config.grid
        self.hash_table = self.param("hash_table", lambda key: hash_grid.init_table(key, grid))
        self.density_mlp = MLP(self.config.density_hidden_width, self.config.density_hidden_layers,
                               1 + self.config.geometry_features)
        self.color_mlp = MLP(self.config.color_hidden_width, self.config.color_hidden_layers, 3, "sigmoid")

    def _geometry(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        features = hash_grid.encode(self.hash_table, positions, self.config.grid, self.backend)
        output = self.density_mlp(features)
        return trunc_exp(output[:, 0]), output

    def density(self, positions: jax.Array) -> jax.Array:
        """``positions [n, 3]`` in [0, 1]^3 -> density ``[n]``."""
        return self._geometry(positions)[0]

    def __call__(self, positions: jax.Array, directions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``positions [n, 3]`` in [0, 1]^3, unit ``directions [n, 3]`` -> (density ``[n]``, rgb ``[n, 3]``)."""
        density, geometry = self._geometry(positions)
        view = spherical_harmonics(directions, self.config.sh_degree)
        rgb = self.color_mlp(jnp.concatenate([geometry, view], axis=-1))
        return density, rgb
