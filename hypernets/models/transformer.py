"""A decoder-only transformer over weight tokens, with a key-value cache for sampling.

Pre-LayerNorm blocks (causal self-attention, then a GELU MLP), learned position embeddings, a start
token outside the data vocabulary (id ``vocab_size``, kept in int32 so it never wraps), optional
class-label conditioning (a label embedding added to the start position) and, for large
vocabularies (e.g. fp16 tokens, 65536 values), a factorised head: a token ``t`` is split into
``high = t // 256`` and ``low = t % 256``, the model predicts ``high`` and then ``low`` given ``high``
(the low head also sees an embedding of the high byte), and a token's input embedding is
``embed_high[high] + embed_low[low]``.

The same parameters serve two forward paths:

- ``hidden_states(inputs [batch, length])``: the whole sequence at once with a causal mask
  (training, the reference sampler);
- ``decode_step(token [batch], position, cache)``: one position, reading and updating a fixed-size
  cache of keys and values ``[batch, heads, max_length, head_dim]`` per layer (fast sampling).
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

LOW_VOCAB = 256  # the factorised head predicts the low byte of a token
ATTENTION_MASK_VALUE = -1e30  # finite, so fully masked rows never produce NaN


class EncoderBlock(nn.Module):
    """Pre-LayerNorm block with bidirectional attention (the autoencoders' encoders and decoders):
    ``x + attention(norm(x))``, then ``x + mlp(norm(x))``; ``[batch, T, width]`` -> same."""

    width: int
    num_heads: int
    mlp_ratio: float = 4.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        normed = nn.LayerNorm(name="attention_norm")(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.num_heads, qkv_features=self.width,
                                                out_features=self.width, name="attention")(normed, normed)
        hidden = nn.gelu(nn.Dense(int(self.width * self.mlp_ratio), name="mlp_in")(nn.LayerNorm(name="mlp_norm")(x)))
        return x + nn.Dense(self.width, name="mlp_out")(hidden)


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Architecture of the token model.

    Attributes:
        vocab_size: size of the data vocabulary (the start token is ``vocab_size``).
        max_length: positions the model reads, i.e. the token sequence length ``T``.
        width: model dimension.
        depth: number of transformer blocks.
        num_heads: attention heads (``width`` must divide by it).
        mlp_ratio: MLP hidden width over ``width``.
        dropout: dropout rate on embeddings and residual branches (training only).
        num_classes: class labels for conditioning (0: unconditional); labels outside
            ``[0, num_classes)`` (e.g. -1, unknown) use an extra "no label" embedding.
        factorized: predict a token as (high byte, low byte); needs ``vocab_size % 256 == 0``.
    """

    vocab_size: int
    max_length: int
    width: int = 64
    depth: int = 2
    num_heads: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.0
    num_classes: int = 0
    factorized: bool = False

    def __post_init__(self):
        if self.vocab_size < 2 or self.max_length < 1:
            raise ValueError(f"need vocab_size >= 2 and max_length >= 1, got {self.vocab_size}, {self.max_length}")
        if self.width < 1 or self.depth < 1 or self.num_heads < 1 or self.width % self.num_heads:
            raise ValueError(f"width {self.width} must be a positive multiple of num_heads {self.num_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {self.num_classes}")
        if self.factorized and (self.vocab_size % LOW_VOCAB or self.vocab_size <= LOW_VOCAB):
            raise ValueError(f"a factorised head needs a vocab_size multiple of {LOW_VOCAB} above it, "
                             f"got {self.vocab_size}")

    @property
    def start_token(self) -> int:
        return self.vocab_size

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def high_vocab(self) -> int:
        """Values of the high part of a token (factorised head only)."""
        return self.vocab_size // LOW_VOCAB


def init_cache(config: TransformerConfig, batch_size: int) -> list[dict[str, jax.Array]]:
    """Empty key-value cache: per layer ``{"key", "value"}`` of ``[batch, heads, max_length, head_dim]`` float32."""
    shape = (batch_size, config.num_heads, config.max_length, config.head_dim)
    return [{"key": jnp.zeros(shape, jnp.float32), "value": jnp.zeros(shape, jnp.float32)}
            for _ in range(config.depth)]


def attend(query: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array) -> jax.Array:
    """Scaled dot-product attention in float32.

    Args:
        query: ``[batch, heads, queries, head_dim]``.
        key, value: ``[batch, heads, keys, head_dim]``.
        mask: bool, broadcastable to ``[batch, heads, queries, keys]``; True = may attend.

    Returns:
        ``[batch, heads, queries, head_dim]``.
    """
    scale = jnp.float32(1.0 / math.sqrt(query.shape[-1]))
    scores = jnp.einsum("bhqd,bhkd->bhqk", query, key) * scale
    scores = jnp.where(mask, scores, jnp.float32(ATTENTION_MASK_VALUE))
    weights = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("bhqk,bhkd->bhqd", weights, value)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention with a full (causal) path and a one-position cached path."""

    config: TransformerConfig

    def setup(self):
        self.qkv = nn.Dense(3 * self.config.width, name="qkv")
        self.out = nn.Dense(self.config.width, name="out")

    def _split_heads(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``[batch, length, width]`` -> query, key, value, each ``[batch, heads, length, head_dim]``."""
        batch, length, _ = x.shape
        qkv = self.qkv(x).reshape(batch, length, 3, self.config.num_heads, self.config.head_dim)
        qkv = qkv.transpose(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def _merge_heads(self, x: jax.Array) -> jax.Array:
        """``[batch, heads, length, head_dim]`` -> ``[batch, length, width]``, then the output projection."""
        batch, _, length, _ = x.shape
        return self.out(x.transpose(0, 2, 1, 3).reshape(batch, length, self.config.width))

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x: [batch, length, width]`` -> ``[batch, length, width]``, position i attending to 0..i."""
        query, key, value = self._split_heads(x)
        length = x.shape[1]
        causal = jnp.tril(jnp.ones((length, length), jnp.bool_))
        return self._merge_heads(attend(query, key, value, causal))

    def step(self, x: jax.Array, cache: dict[str, jax.Array], position: jax.Array):
        """One position: ``x: [batch, 1, width]`` at ``position`` (int32 scalar).

        Writes this position's key and value into the cache, attends to cached positions
        ``0..position``, and returns ``([batch, 1, width], updated cache)``.
        """
        query, key, value = self._split_heads(x)
        start = (0, 0, position, 0)
        keys = jax.lax.dynamic_update_slice(cache["key"], key, start)
        values = jax.lax.dynamic_update_slice(cache["value"], value, start)
        visible = jnp.arange(self.config.max_length) <= position  # [max_length]
        output = attend(query, keys, values, visible)
        return self._merge_heads(output), {"key": keys, "value": values}


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attention(norm(x))``, then ``x + mlp(norm(x))``."""

    config: TransformerConfig

    def setup(self):
        config = self.config
        self.attention_norm = nn.LayerNorm(name="attention_norm")
        self.attention = CausalSelfAttention(config, name="attention")
        self.mlp_norm = nn.LayerNorm(name="mlp_norm")
        self.mlp_in = nn.Dense(config.mlp_ratio * config.width, name="mlp_in")
        self.mlp_out = nn.Dense(config.width, name="mlp_out")
        self.dropout = nn.Dropout(config.dropout)

    def _mlp(self, x: jax.Array, deterministic: bool) -> jax.Array:
        hidden = nn.gelu(self.mlp_in(self.mlp_norm(x)))
        return self.dropout(self.mlp_out(hidden), deterministic=deterministic)

    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        x = x + self.dropout(self.attention(self.attention_norm(x)), deterministic=deterministic)
        return x + self._mlp(x, deterministic)

    def step(self, x: jax.Array, cache: dict[str, jax.Array], position: jax.Array):
        attended, cache = self.attention.step(self.attention_norm(x), cache, position)
        x = x + attended
        return x + self._mlp(x, True), cache


class TokenTransformer(nn.Module):
    """Decoder-only transformer over token sequences (see the module docstring).

    Inputs are the data tokens shifted right behind the start token: ``inputs[:, 0] = start_token``,
    ``inputs[:, i] = tokens[:, i - 1]``; the output at position ``i`` predicts ``tokens[:, i]``.
    """

    config: TransformerConfig

    def setup(self):
        config = self.config
        embedding_init = nn.initializers.normal(stddev=0.02)
        if config.factorized:
            self.high_embedding = nn.Embed(config.high_vocab, config.width, embedding_init=embedding_init)
            self.low_embedding = nn.Embed(LOW_VOCAB, config.width, embedding_init=embedding_init)
            self.start_embedding = self.param("start_embedding", embedding_init, (config.width,))
            self.high_head = nn.Dense(config.high_vocab, name="high_head")
            self.low_head_hidden = nn.Dense(config.width, name="low_head_hidden")
            self.low_head_high_embedding = nn.Embed(config.high_vocab, config.width, embedding_init=embedding_init)
            self.low_head = nn.Dense(LOW_VOCAB, name="low_head")
        else:
            self.token_embedding = nn.Embed(config.vocab_size + 1, config.width, embedding_init=embedding_init)
            self.head = nn.Dense(config.vocab_size, name="head")
        if config.num_classes:
            self.label_embedding = nn.Embed(config.num_classes + 1, config.width, embedding_init=embedding_init)
        self.position_embedding = self.param("position_embedding", embedding_init, (config.max_length, config.width))
        self.blocks = [Block(config, name=f"block_{index}") for index in range(config.depth)]
        self.final_norm = nn.LayerNorm(name="final_norm")
        self.dropout = nn.Dropout(config.dropout)

    # ------------------------------------------------------------------ embeddings

    def embed(self, tokens: jax.Array, positions: jax.Array, labels: jax.Array | None) -> jax.Array:
        """Input embeddings.

        Args:
            tokens: ``[batch, length]`` int32 in ``[0, vocab_size]`` (``vocab_size`` = start token).
            positions: ``[length]`` int32 position of each column.
            labels: ``[batch]`` int32 class labels (ignored when unconditional; out of range = unknown).

        Returns:
            ``[batch, length, width]`` float32.
        """
        config = self.config
        tokens = tokens.astype(jnp.int32)
        if config.factorized:
            data = jnp.clip(tokens, 0, config.vocab_size - 1)
            pieces = self.high_embedding(data // LOW_VOCAB) + self.low_embedding(data % LOW_VOCAB)
            is_start = (tokens == config.start_token)[..., None]
            x = jnp.where(is_start, self.start_embedding.astype(jnp.float32), pieces)
        else:
            x = self.token_embedding(tokens)
        x = x + self.position_embedding[positions][None]
        if config.num_classes:
            x = x + jnp.where((positions == 0)[None, :, None], self._label_vectors(labels, x.shape[0])[:, None, :],
                              jnp.float32(0.0))
        return x

    def _label_vectors(self, labels: jax.Array | None, batch_size: int) -> jax.Array:
        """``[batch]`` labels -> ``[batch, width]`` embeddings (index ``num_classes`` for unknown labels)."""
        num_classes = self.config.num_classes
        labels = jnp.full((batch_size,), -1, jnp.int32) if labels is None else labels.astype(jnp.int32)
        index = jnp.where((labels >= 0) & (labels < num_classes), labels, num_classes)
        return self.label_embedding(index)

    # ------------------------------------------------------------------ forward paths

    def hidden_states(self, inputs: jax.Array, labels: jax.Array | None = None,
                      deterministic: bool = True) -> jax.Array:
        """Whole-sequence causal forward: ``inputs [batch, length]`` int32 -> ``[batch, length, width]`` (normed)."""
        positions = jnp.arange(inputs.shape[1], dtype=jnp.int32)
        x = self.dropout(self.embed(inputs, positions, labels), deterministic=deterministic)
        for block in self.blocks:
            x = block(x, deterministic)
        return self.final_norm(x)

    def decode_step(self, token: jax.Array, labels: jax.Array | None, position: jax.Array,
                    cache: list[dict[str, jax.Array]]):
        """One cached position.

        Args:
            token: ``[batch]`` int32, the input at ``position`` (the start token at position 0).
            labels: ``[batch]`` int32 or None.
            position: int32 scalar in ``[0, max_length)``.
            cache: from ``init_cache`` (positions ``< position`` filled by earlier steps).

        Returns:
            ``(hidden [batch, width], updated cache)``; ``hidden`` equals ``hidden_states(...)[:, position]``.
        """
        positions = jnp.reshape(position, (1,)).astype(jnp.int32)
        x = self.embed(token[:, None], positions, labels)
        new_cache = []
        for block, layer_cache in zip(self.blocks, cache, strict=True):
            x, layer_cache = block.step(x, layer_cache, position)
            new_cache.append(layer_cache)
        return self.final_norm(x)[:, 0], new_cache

    # ------------------------------------------------------------------ output heads

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Plain head: ``[..., width]`` -> ``[..., vocab_size]`` float32."""
        return self.head(hidden).astype(jnp.float32)

    def high_logits(self, hidden: jax.Array) -> jax.Array:
        """Factorised head, first part: ``[..., width]`` -> ``[..., high_vocab]`` float32."""
        return self.high_head(hidden).astype(jnp.float32)

    def low_logits(self, hidden: jax.Array, high: jax.Array) -> jax.Array:
        """Factorised head, second part: ``hidden [..., width]``, ``high [...]`` int32 -> ``[..., 256]`` float32."""
        conditioned = self.low_head_hidden(hidden) + self.low_head_high_embedding(high.astype(jnp.int32))
        return self.low_head(nn.gelu(conditioned)).astype(jnp.float32)

    def __call__(self, inputs: jax.Array, labels: jax.Array | None = None, deterministic: bool = True):
        """Forward for initialisation: every parameter is used once.

        Returns:
            plain: logits ``[batch, length, vocab_size]``; factorised: ``(high_logits, low_logits)``
            with the low head conditioned on high byte 0.
        """
        hidden = self.hidden_states(inputs, labels, deterministic)
        if self.config.factorized:
            return self.high_logits(hidden), self.low_logits(hidden, jnp.zeros(inputs.shape, jnp.int32))
        return self.logits(hidden)
