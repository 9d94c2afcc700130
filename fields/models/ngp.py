"""Instant-NGP field: multiresolution hash encoding followed by a small MLP."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax

from fields.models import hash_grid
from fields.models.hash_grid import HashGridConfig
from fields.models.mlp import MLP, OUTPUT_ACTIVATIONS


@dataclasses.dataclass(frozen=True)
class NGPFieldConfig:
    """Architecture of an Instant-NGP field (what a saved field file needs to be rebuilt).

    Attributes:
        grid: the hash-grid encoding.
        hidden_width: MLP neurons per hidden layer.
        num_hidden_layers: MLP hidden layers.
        output_dim: output channels (1 grey, 3 RGB, 4 RGBA for images).
        output_activation: ``"sigmoid"`` for colours, ``"none"`` for raw outputs.
    """

    grid: HashGridConfig = dataclasses.field(default_factory=HashGridConfig)
    hidden_width: int = 64
    num_hidden_layers: int = 2
    output_dim: int = 3
    output_activation: str = "sigmoid"

    def __post_init__(self):
        if self.hidden_width < 1 or self.num_hidden_layers < 0 or self.output_dim < 1:
            raise ValueError(
                "field MLP needs hidden_width >= 1, num_hidden_layers >= 0 and output_dim >= 1, got "
                f"{self.hidden_width}, {self.num_hidden_layers}, {self.output_dim}"
            )
        if self.output_activation not in OUTPUT_ACTIVATIONS:
            raise ValueError(
                f"unknown output_activation {self.output_activation!r}; choose one of {sorted(OUTPUT_ACTIVATIONS)}"
            )

    @property
    def field_kind(self) -> str:
        return "ngp_image"

    def build(self, backend: str = "auto") -> nn.Module:
        return NGPField(self, backend=backend)


class NGPField(nn.Module):
    """Hash grid + MLP. Params: ``hash_table [num_entries, F]`` and ``mlp/dense_k/kernel``.

    Attributes:
        config: the architecture.
        backend: hash-grid backend, ``"auto"``, ``"kernel"`` or ``"jax"`` (not part of the weights).
    """

    config: NGPFieldConfig
    backend: str = "auto"

    @nn.compact
    def __call__(self, positions: jax.Array) -> jax.Array:
        """``positions [num_points, num_dims]`` in [0, 1] -> ``[num_points, output_dim]``."""
        grid = self.config.grid
        table = self.param("hash_table", lambda key: hash_grid.init_table(key, grid))
        features = hash_grid.encode(table, positions, grid, self.backend)
        return MLP(
            self.config.hidden_width,
            self.config.num_hidden_layers,
            self.config.output_dim,
            self.config.output_activation,
            name="mlp",
        )(features)
