"""Small fully connected networks used as field decoders."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

OUTPUT_ACTIVATIONS = {
    "none": lambda x: x,
    "sigmoid": jax.nn.sigmoid,
}


class MLP(nn.Module):
    """ReLU MLP without biases (as tiny-cuda-nn's fully fused MLP).

    Attributes:
        hidden_width: neurons per hidden layer.
        num_hidden_layers: number of hidden layers (0 gives a single linear layer).
        output_dim: output features.
        output_activation: key of ``OUTPUT_ACTIVATIONS``.
    """

    hidden_width: int
    num_hidden_layers: int
    output_dim: int
    output_activation: str = "none"

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        """``inputs [num_points, in_features]`` -> ``[num_points, output_dim]``."""
        hidden = inputs
        for layer in range(self.num_hidden_layers):
            hidden = nn.Dense(self.hidden_width, use_bias=False, name=f"dense_{layer}")(hidden)
            hidden = jax.nn.relu(hidden)
        output = nn.Dense(self.output_dim, use_bias=False, name=f"dense_{self.num_hidden_layers}")(hidden)
        return OUTPUT_ACTIVATIONS[self.output_activation](output.astype(jnp.float32))
