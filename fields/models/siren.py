"""Plain-MLP fields: SIREN (sine activations) and Fourier-feature ReLU MLPs.

SIREN (Sitzmann et al. 2020): ``sin(omega_0 (W x + b))`` layers; first-layer weights from
U(-1/fan_in, 1/fan_in), later layers U(-sqrt(6/fan_in)/omega_0, sqrt(6/fan_in)/omega_0), a linear
output layer. Fourier features (Tancik et al. 2020): ``[cos(2 pi B x), sin(2 pi B x)]`` with a
fixed Gaussian ``B ~ N(0, scale^2)`` drawn from ``feature_seed`` (not trained, not stored in the
weights: the config rebuilds it), then a ReLU MLP with biases.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from fields.models.mlp import OUTPUT_ACTIVATIONS

MLP_KINDS = ("siren", "fourier")


@dataclasses.dataclass(frozen=True)
class MLPFieldConfig:
    """Architecture of a plain-MLP field.

    Attributes:
        kind: ``"siren"`` or ``"fourier"``.
        input_dim: coordinate dimensionality (2 for images).
        hidden_width, num_hidden_layers: the MLP.
        output_dim: output channels.
        first_omega, hidden_omega: SIREN frequencies (30 and 30 in the paper).
        num_features, feature_scale, feature_seed: Fourier features (``2 * num_features`` inputs).
        output_activation: ``"none"`` or ``"sigmoid"``.
    """

    kind: str = "siren"
    input_dim: int = 2
    hidden_width: int = 64
    num_hidden_layers: int = 3
    output_dim: int = 3
    first_omega: float = 30.0
    hidden_omega: float = 30.0
    num_features: int = 64
    feature_scale: float = 10.0
    feature_seed: int = 0
    output_activation: str = "none"

    def __post_init__(self):
        if self.kind not in MLP_KINDS:
            raise ValueError(f"MLP field kind must be one of {MLP_KINDS}, got {self.kind!r}")
        if self.hidden_width < 1 or self.num_hidden_layers < 1 or self.output_dim < 1 or self.input_dim < 1:
            raise ValueError("MLP field needs input_dim, hidden_width, num_hidden_layers, output_dim >= 1")
        if self.output_activation not in OUTPUT_ACTIVATIONS:
            raise ValueError(f"unknown output_activation {self.output_activation!r}")

    @property
    def field_kind(self) -> str:
        return f"{self.kind}_image"

    def build(self, backend: str = "auto") -> nn.Module:
        del backend  # no compiled kernels involved
        return SirenField(self) if self.kind == "siren" else FourierField(self)


def _uniform(bound: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class SirenField(nn.Module):
    """``positions [n, input_dim]`` in [0, 1] -> ``[n, output_dim]``; inputs are mapped to [-1, 1]."""

    config: MLPFieldConfig

    @nn.compact
    def __call__(self, positions: jax.Array) -> jax.Array:
        config = self.config
        hidden = positions * 2.0 - 1.0
        fan_in = config.input_dim
        for layer in range(config.num_hidden_layers):
            omega = config.first_omega if layer == 0 else config.hidden_omega
            bound = 1.0 / fan_in if layer == 0 else math.sqrt(6.0 / fan_in) / config.hidden_omega
            dense = nn.Dense(config.hidden_width, kernel_init=_uniform(bound), bias_init=_uniform(1.0 / fan_in),
                             name=f"dense_{layer}")
            hidden = jnp.sin(omega * dense(hidden))
            fan_in = config.hidden_width
        bound = math.sqrt(6.0 / fan_in) / config.hidden_omega
        output = nn.Dense(config.output_dim, kernel_init=_uniform(bound), name=f"dense_{config.num_hidden_layers}")(
            hidden)
        return OUTPUT_ACTIVATIONS[config.output_activation](output)


def fourier_matrix(config: MLPFieldConfig) -> jax.Array:
    """The fixed Gaussian frequency matrix ``[input_dim, num_features]``."""
    key = jax.random.PRNGKey(config.feature_seed)
    return jax.random.normal(key, (config.input_dim, config.num_features), jnp.float32) * config.feature_scale


class FourierField(nn.Module):
    """Gaussian Fourier features + ReLU MLP; ``positions [n, input_dim]`` in [0, 1] -> ``[n, output_dim]``."""

    config: MLPFieldConfig

    @nn.compact
    def __call__(self, positions: jax.Array) -> jax.Array:
        config = self.config
        projected = 2.0 * jnp.pi * positions @ fourier_matrix(config)
        hidden = jnp.concatenate([jnp.cos(projected), jnp.sin(projected)], axis=-1)
        for layer in range(config.num_hidden_layers):
            hidden = jax.nn.relu(nn.Dense(config.hidden_width, name=f"dense_{layer}")(hidden))
        output = nn.Dense(config.output_dim, name=f"dense_{config.num_hidden_layers}")(hidden)
        return OUTPUT_ACTIVATIONS[config.output_activation](output)
