"""Denoisers over field weights: a DiT over weight chunks, and a small MLP for low-dimensional data.

A field's flat weight vector ``[P]`` is cut into tokens by ``WeightChunker``: each section of the
param map (``hash``, ``mlp``, ...) is chunked on its own into ``chunk_size`` consecutive weights,
the last chunk of a section padded with zeros, so no token mixes sections. ``DiT`` (Peebles & Xie,
2023) embeds each chunk linearly, adds a learned position embedding and a learned section
embedding, runs ``depth`` transformer blocks modulated by adaLN-Zero from the timestep (+ class)
embedding, and maps back to ``chunk_size`` values per token. All modulation and the final
projection start at zero, so the untrained model outputs exactly zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fields.weights import ParamEntry, param_count, section_slices


class WeightChunker:
    """Flat weight vectors ``[batch, P]`` <-> tokens ``[batch, num_tokens, chunk_size]``, section by section.

    Attributes:
        chunk_size: weights per token.
        num_params: ``P``.
        num_tokens: ``T``, the sum over sections of ``ceil(section size / chunk_size)``.
        section_names: the sections in order of first appearance in the param map.
        section_ids: ``[T]`` int32, the index into ``section_names`` of each token.
        gather_index: ``[T * chunk_size]`` int64 index into the vector padded with one zero at
            position ``P`` (padding slots point there).
        scatter_index: ``[P]`` int64 position of each weight in the flattened tokens.
        mask: ``[T, chunk_size]`` float32, 1 for real weights, 0 for padding.
    """

    def __init__(self, pmap: Sequence[ParamEntry], chunk_size: int):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.chunk_size = int(chunk_size)
        self.num_params = param_count(pmap)
        slices = section_slices(pmap)
        self.section_names = list(slices)
        gather, section_ids = [], []
        for section_index, indices in enumerate(slices.values()):
            num_chunks = -(-len(indices) // self.chunk_size)
            padded = np.full(num_chunks * self.chunk_size, self.num_params, np.int64)
            padded[: len(indices)] = indices
            gather.append(padded)
            section_ids.extend([section_index] * num_chunks)
        self.gather_index = np.concatenate(gather) if gather else np.zeros(0, np.int64)
        self.section_ids = np.asarray(section_ids, np.int32)
        self.num_tokens = int(len(self.section_ids))
        self.scatter_index = np.empty(self.num_params, np.int64)
        real = self.gather_index < self.num_params
        self.scatter_index[self.gather_index[real]] = np.flatnonzero(real)
        self.mask = real.astype(np.float32).reshape(self.num_tokens, self.chunk_size)

    def to_tokens(self, vectors):
        """``[batch, P]`` -> ``[batch, T, chunk_size]`` (numpy in, numpy out; jax in, jax out)."""
        xp = np if isinstance(vectors, np.ndarray) else jnp
        if vectors.shape[-1] != self.num_params:
            raise ValueError(f"vectors have {vectors.shape[-1]} weights; the param map has {self.num_params}")
        padded = xp.concatenate([vectors, xp.zeros(vectors.shape[:-1] + (1,), vectors.dtype)], axis=-1)
        return padded[..., self.gather_index].reshape(vectors.shape[:-1] + (self.num_tokens, self.chunk_size))

    def from_tokens(self, tokens):
        """``[batch, T, chunk_size]`` -> ``[batch, P]``, dropping the padding (inverse of ``to_tokens``)."""
        if tuple(tokens.shape[-2:]) != (self.num_tokens, self.chunk_size):
            raise ValueError(f"tokens have shape {tokens.shape}; expected [..., {self.num_tokens}, {self.chunk_size}]")
        flat = tokens.reshape(tokens.shape[:-2] + (self.num_tokens * self.chunk_size,))
        return flat[..., self.scatter_index]


def timestep_embedding(timesteps: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of (integer or float) timesteps ``[batch]`` -> ``[batch, dim]`` float32."""
    half = dim // 2
    frequencies = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = jnp.asarray(timesteps, jnp.float32)[:, None] * frequencies[None, :]
    embedding = jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)
    if dim % 2:
        embedding = jnp.concatenate([embedding, jnp.zeros_like(embedding[:, :1])], axis=-1)
    return embedding


class ConditionEmbedding(nn.Module):
    """Timestep embedding (sinusoid + MLP) plus, when ``num_classes > 0``, a class embedding with a
    null class ``num_classes`` (used when ``labels`` is None)."""

    width: int
    num_classes: int = 0

    @nn.compact
    def __call__(self, timesteps: jax.Array, labels: jax.Array | None) -> jax.Array:
        """``timesteps, labels: [batch]`` -> ``[batch, width]``."""
        hidden = nn.Dense(self.width, name="time_in")(timestep_embedding(timesteps, self.width))
        condition = nn.Dense(self.width, name="time_out")(nn.silu(hidden))
        if self.num_classes > 0:
            if labels is None:
                labels = jnp.full(timesteps.shape, self.num_classes, jnp.int32)
            table = nn.Embed(self.num_classes + 1, self.width, embedding_init=nn.initializers.normal(0.02),
                             name="class_embedding")
            condition = condition + table(jnp.asarray(labels, jnp.int32))
        return condition


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """adaLN modulation: ``x [batch, T, width] * (1 + scale) + shift`` with ``shift, scale: [batch, width]``."""
    return x * (1.0 + scale[:, None, :]) + shift[:, None, :]


class DiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero: shift/scale/gate for attention and MLP from the condition."""

    width: int
    num_heads: int
    mlp_ratio: float = 4.0

    @nn.compact
    def __call__(self, x: jax.Array, condition: jax.Array) -> jax.Array:
        """``x: [batch, T, width]``, ``condition: [batch, width]`` -> ``[batch, T, width]``."""
        modulation = nn.Dense(6 * self.width, kernel_init=nn.initializers.zeros, name="adaln")(nn.silu(condition))
        shift_attn, scale_attn, gate_attn, shift_mlp, scale_mlp, gate_mlp = jnp.split(modulation, 6, axis=-1)
        normed = modulate(nn.LayerNorm(use_scale=False, use_bias=False, name="norm_attn")(x), shift_attn, scale_attn)
        attended = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, qkv_features=self.width,
                                                   out_features=self.width, name="attention")(normed, normed)
        x = x + gate_attn[:, None, :] * attended
        normed = modulate(nn.LayerNorm(use_scale=False, use_bias=False, name="norm_mlp")(x), shift_mlp, scale_mlp)
        hidden = nn.gelu(nn.Dense(int(self.width * self.mlp_ratio), name="mlp_in")(normed))
        return x + gate_mlp[:, None, :] * nn.Dense(self.width, name="mlp_out")(hidden)


class DiT(nn.Module):
    """Diffusion transformer over weight tokens.

    Attributes:
        num_tokens: ``T``.
        chunk_size: values per token (input and output).
        section_ids: ``[T]`` section index per token (a tuple, so the module stays hashable).
        width, depth, num_heads, mlp_ratio: transformer size.
        num_classes: 0 for an unconditional model; otherwise class ids ``[0, num_classes)`` plus
            the null class ``num_classes``.
    """

    num_tokens: int
    chunk_size: int
    section_ids: tuple[int, ...]
    width: int = 256
    depth: int = 8
    num_heads: int = 8
    mlp_ratio: float = 4.0
    num_classes: int = 0

    @nn.compact
    def __call__(self, tokens: jax.Array, timesteps: jax.Array, labels: jax.Array | None = None) -> jax.Array:
        """``tokens: [batch, T, chunk_size]``, ``timesteps: [batch]`` int, ``labels: [batch]`` int or None
        -> ``[batch, T, chunk_size]`` float32."""
        if tuple(tokens.shape[1:]) != (self.num_tokens, self.chunk_size):
            expected = f"[batch, {self.num_tokens}, {self.chunk_size}]"
            raise ValueError(f"tokens have shape {tokens.shape}; expected {expected}")
        x = nn.Dense(self.width, name="token_embedding")(jnp.asarray(tokens, jnp.float32))
        positions = self.param("position_embedding", nn.initializers.normal(0.02), (self.num_tokens, self.width))
        num_sections = max(self.section_ids, default=0) + 1
        sections = nn.Embed(num_sections, self.width, embedding_init=nn.initializers.normal(0.02),
                            name="section_embedding")(jnp.asarray(self.section_ids, jnp.int32))
        x = x + (positions + sections)[None]
        condition = ConditionEmbedding(self.width, self.num_classes, name="condition")(timesteps, labels)
        for index in range(self.depth):
            x = DiTBlock(self.width, self.num_heads, self.mlp_ratio, name=f"block_{index}")(x, condition)
        shift, scale = jnp.split(
            nn.Dense(2 * self.width, kernel_init=nn.initializers.zeros, name="final_adaln")(nn.silu(condition)), 2, -1
        )
        x = modulate(nn.LayerNorm(use_scale=False, use_bias=False, name="final_norm")(x), shift, scale)
        return nn.Dense(self.chunk_size, kernel_init=nn.initializers.zeros, name="output")(x)


class MLPDenoiser(nn.Module):
    """A small denoiser for low-dimensional data ``[batch, dim]``: MLP over (x, timestep embedding,
    optional class embedding), SiLU activations."""

    dim: int
    width: int = 128
    depth: int = 3
    num_classes: int = 0

    @nn.compact
    def __call__(self, x: jax.Array, timesteps: jax.Array, labels: jax.Array | None = None) -> jax.Array:
        """``x: [batch, dim]``, ``timesteps: [batch]``, ``labels: [batch]`` or None -> ``[batch, dim]``."""
        condition = ConditionEmbedding(self.width, self.num_classes, name="condition")(timesteps, labels)
        hidden = nn.Dense(self.width, name="input")(jnp.asarray(x, jnp.float32)) + condition
        for index in range(self.depth):
            hidden = nn.Dense(self.width, name=f"hidden_{index}")(nn.silu(hidden))
        return nn.Dense(self.dim, name="output")(nn.silu(hidden))
