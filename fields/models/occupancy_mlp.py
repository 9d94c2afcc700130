"""Occupancy MLP fields of shapes, as in HyperDiffusion: small ReLU MLPs over positionally encoded xyz.

A field maps points ``[n, 3]`` of the box ``[-1, 1]^3`` to occupancy logits ``[n]`` (inside where the
logit is > 0). The encoding is NeRF's: the raw coordinates followed by ``sin(f_k x), cos(f_k x)``
for ``f_k = base_frequency * 2^k``, ``k = 0 .. num_frequencies - 1``. HyperDiffusion's fields
(encoding with 4 frequencies, 3 hidden layers of 128, biases) have 36,737 parameters.

The module is a plain Flax module without state, so a stack of fields (params with a leading field
axis) is evaluated with ``jax.vmap(lambda p: model.apply({"params": p}, points))``.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class OccupancyFieldConfig:
    """An occupancy MLP's architecture.

    Attributes:
        num_frequencies: sine/cosine frequency bands of the positional encoding (0: raw xyz only).
        base_frequency: the lowest band's angular frequency; band ``k`` is ``base_frequency * 2^k``
            (1.0 and 4 bands on ``[-1, 1]^3``: the finest period is about 0.8, 1/2.5 of the box).
        hidden_width: neurons per hidden layer (HyperDiffusion: 128).
        num_hidden_layers: hidden layers (HyperDiffusion: 3).
    """

    num_frequencies: int = 4
    base_frequency: float = 1.0
    hidden_width: int = 128
    num_hidden_layers: int = 3

    def __post_init__(self):
        if self.num_frequencies < 0:
            raise ValueError(f"num_frequencies must be >= 0, got {self.num_frequencies}")
        if not self.base_frequency > 0:
            raise ValueError(f"base_frequency must be > 0, got {self.base_frequency}")
        if self.hidden_width <= 0:
            raise ValueError(f"hidden_width must be > 0, got {self.hidden_width}")
        if self.num_hidden_layers < 0:
            raise ValueError(f"num_hidden_layers must be >= 0, got {self.num_hidden_layers}")

    @property
    def encoded_dim(self) -> int:
        return 3 * (1 + 2 * self.num_frequencies)

    @property
    def num_params(self) -> int:
        widths = [self.encoded_dim] + [self.hidden_width] * self.num_hidden_layers + [1]
        return sum((fan_in + 1) * fan_out for fan_in, fan_out in zip(widths[:-1], widths[1:], strict=True))


def positional_encoding(points: jax.Array, num_frequencies: int, base_frequency: float = 1.0) -> jax.Array:
    """``[n, 3]`` -> ``[n, 3 * (1 + 2 * num_frequencies)]``: ``[x, sin(f_0 x), cos(f_0 x), ...]``."""
    points = points.astype(jnp.float32)
    if num_frequencies == 0:
        return points
    frequencies = jnp.asarray([base_frequency * 2.0**k for k in range(num_frequencies)], jnp.float32)
    angles = (points[..., None, :] * frequencies[:, None]).reshape(*points.shape[:-1], -1)  # [n, K * 3]
    return jnp.concatenate([points, jnp.sin(angles), jnp.cos(angles)], axis=-1)


class OccupancyMLP(nn.Module):
    """Points ``[n, 3]`` in ``[-1, 1]^3`` -> occupancy logits ``[n]`` (ReLU MLP with biases)."""

    config: OccupancyFieldConfig

    @nn.compact
    def __call__(self, points: jax.Array) -> jax.Array:
        config = self.config
        hidden = positional_encoding(points, config.num_frequencies, config.base_frequency)
        for layer in range(config.num_hidden_layers):
            hidden = jax.nn.relu(nn.Dense(config.hidden_width, name=f"dense_{layer}")(hidden))
        logits = nn.Dense(1, name=f"dense_{config.num_hidden_layers}")(hidden)
        return logits[..., 0].astype(jnp.float32)


def init_params(config: OccupancyFieldConfig, key: jax.Array) -> dict:
    """Fresh params of an ``OccupancyMLP``."""
    return OccupancyMLP(config).init(key, jnp.zeros((1, 3), jnp.float32))["params"]


def param_shapes(config: OccupancyFieldConfig) -> dict:
    """The params pytree's leaf shapes (without initialising)."""
    abstract = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
    return jax.tree_util.tree_map(lambda leaf: tuple(leaf.shape), abstract)
