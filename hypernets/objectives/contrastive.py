"""Contrastive objective: NT-Xent (normalised temperature-scaled cross entropy, SimCLR; Chen et al. 2020).

For ``B`` pairs of views, the ``2B`` projections are L2-normalised; each one's positive is the other
view of its pair and its negatives are the other ``2B - 2`` projections of the batch:

    loss_i = -log( exp(sim(z_i, z_pos(i)) / t) / sum_{k != i} exp(sim(z_i, z_k) / t) )

averaged over all ``2B`` anchors, with ``sim`` the cosine similarity and ``t`` the temperature.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NORM_EPSILON = 1e-8
SELF_SIMILARITY_MASK = -1e30  # finite, so a row never becomes NaN


def l2_normalize(vectors: jax.Array) -> jax.Array:
    """``[n, dim]`` -> rows of unit length (float32; a zero row stays zero)."""
    vectors = jnp.asarray(vectors, jnp.float32)
    norms = jnp.sqrt(jnp.sum(jnp.square(vectors), axis=-1, keepdims=True))
    return vectors / jnp.maximum(norms, jnp.float32(NORM_EPSILON))


def nt_xent(first: jax.Array, second: jax.Array, temperature: float) -> jax.Array:
    """NT-Xent loss of ``B`` positive pairs.

    Args:
        first: ``[B, dim]`` projections of the first views.
        second: ``[B, dim]`` projections of the second views (row ``i`` pairs with ``first[i]``).
        temperature: softmax temperature ``t > 0``.

    Returns:
        scalar float32, the mean over the ``2B`` anchors.
    """
    if first.shape != second.shape or first.ndim != 2:
        raise ValueError(f"nt_xent needs two [B, dim] arrays of one shape, got {first.shape} and {second.shape}")
    count = first.shape[0]
    projections = l2_normalize(jnp.concatenate([first, second], axis=0))  # [2B, dim]
    logits = projections @ projections.T / jnp.float32(temperature)  # [2B, 2B]
    logits = jnp.where(jnp.eye(2 * count, dtype=jnp.bool_), jnp.float32(SELF_SIMILARITY_MASK), logits)
    positives = jnp.concatenate([jnp.arange(count, 2 * count), jnp.arange(count)])  # [2B]
    positive_logits = jnp.take_along_axis(logits, positives[:, None], axis=1)[:, 0]
    return jnp.mean(jax.nn.logsumexp(logits, axis=1) - positive_logits)
