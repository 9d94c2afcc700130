"""Next-token objective over weight tokens, and samplers (key-value cached and a slow reference).

Training is teacher forcing: the model reads ``[start, t_0, ..., t_{T-2}]`` and is scored with the
cross-entropy (float32, nats per token) of ``[t_0, ..., t_{T-1}]``. With a factorised head the
per-token loss is ``-log p(high) - log p(low | high)``, the negative log-likelihood of the whole
16-bit token, so losses of plain and factorised models compare directly (``log(vocab_size)`` is
the loss of a uniform guess).

Sampling draws one token per position. ``sample_tokens`` runs one jitted single-position step per
token inside ``lax.scan``, reading and writing the key-value cache; ``sample_tokens_reference``
re-runs the whole sequence for every token (slow; it exists to check the cached sampler). Both
use the same randomness: position ``i`` draws with ``fold_in(key, i)`` (split in two for the
high and low parts of a factorised token), so the two samplers agree token for token.

``TokenRules`` keep samples decodable: tokens that decode to NaN or inf (the fp8 NaN codes, fp16
and bf16 infinities and NaNs) are never drawn. For two-token weights (bf16) the rule for the
second byte depends on the first.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hypernets.models.transformer import LOW_VOCAB, TokenTransformer, TransformerConfig, init_cache


def shift_right(tokens: jax.Array, start_token: int) -> jax.Array:
    """Model inputs: ``tokens [batch, T]`` (any integer dtype) -> ``[start, t_0, ..., t_{T-2}]`` int32.

    The cast to int32 comes first, so a start token of 256 never wraps in uint8 storage.
    """
    tokens = jnp.asarray(tokens).astype(jnp.int32)
    start = jnp.full((tokens.shape[0], 1), start_token, jnp.int32)
    return jnp.concatenate([start, tokens[:, :-1]], axis=1)


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """``logits [..., classes]``, ``targets [...]`` int -> negative log-likelihood ``[...]`` float32."""
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets.astype(jnp.int32)[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - picked


def token_nll(
    model: TokenTransformer,
    params: Any,
    tokens: jax.Array,
    labels: jax.Array | None,
    key: jax.Array | None = None,
    deterministic: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Teacher-forced negative log-likelihood of every token.

    Args:
        tokens: ``[batch, T]`` integers in ``[0, vocab_size)``.
        labels: ``[batch]`` int32 class labels, or None.
        key: dropout key (needed when ``deterministic`` is False and the model has dropout).

    Returns:
        ``nll [batch, T]`` float32 (nats) and ``correct [batch, T]`` bool (greedy prediction right).
    """
    config = model.config
    tokens = jnp.asarray(tokens).astype(jnp.int32)
    variables = {"params": params}
    rngs = {"dropout": key} if key is not None and not deterministic else {}
    hidden = model.apply(variables, shift_right(tokens, config.start_token), labels, deterministic,
                         method=TokenTransformer.hidden_states, rngs=rngs)
    if config.factorized:
        high, low = tokens // LOW_VOCAB, tokens % LOW_VOCAB
        high_logits = model.apply(variables, hidden, method=TokenTransformer.high_logits)
        low_logits = model.apply(variables, hidden, high, method=TokenTransformer.low_logits)
        nll = cross_entropy(high_logits, high) + cross_entropy(low_logits, low)
        correct = (jnp.argmax(high_logits, -1) == high) & (jnp.argmax(low_logits, -1) == low)
        return nll, correct
    logits = model.apply(variables, hidden, method=TokenTransformer.logits)
    return cross_entropy(logits, tokens), jnp.argmax(logits, -1) == tokens


@dataclasses.dataclass(frozen=True)
class AutoregressiveTask:
    """The ``hypernets.loop.Task`` of the token model: batches ``{"tokens": [B, T], "labels": [B]}``."""

    model: TokenTransformer

    def init(self, key: jax.Array, batch: dict[str, jax.Array]) -> Any:
        inputs = shift_right(batch["tokens"], self.model.config.start_token)
        return self.model.init({"params": key}, inputs, batch_labels(batch))["params"]

    def loss(self, params: Any, batch: dict[str, jax.Array], key: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        nll, correct = token_nll(self.model, params, batch["tokens"], batch_labels(batch), key, deterministic=False)
        loss = jnp.mean(nll)
        metrics = {"accuracy": jnp.mean(correct.astype(jnp.float32)), "bits_per_token": loss / jnp.float32(math.log(2))}
        return loss, metrics


def batch_labels(batch: dict[str, jax.Array]) -> jax.Array | None:
    labels = batch.get("labels")
    return None if labels is None else jnp.asarray(labels).astype(jnp.int32)


@functools.lru_cache(maxsize=8)
def nll_function(config: TransformerConfig):
    """Jitted ``(params, tokens [B, T], labels [B]) -> (mean nll [B], accuracy [B])`` per row, no dropout."""
    model = TokenTransformer(config)

    def rows(params, tokens, labels):
        nll, correct = token_nll(model, params, tokens, labels)
        return jnp.mean(nll, axis=1), jnp.mean(correct.astype(jnp.float32), axis=1)

    return jax.jit(rows)


# ------------------------------------------------------------------------------------ token rules


@dataclasses.dataclass(frozen=True)
class TokenRules:
    """Which tokens may be drawn.

    Attributes:
        first: ``[vocab]`` bool, allowed at a weight's first (or only) token.
        second: ``[vocab, vocab]`` bool, allowed second token given the first, for two-token
            weights (bf16); None for one-token weights.
    """

    first: np.ndarray
    second: np.ndarray | None = None


def allow_all(vocab_size: int) -> TokenRules:
    return TokenRules(np.ones(vocab_size, bool))


def token_rules(tokenizer) -> TokenRules:
    """Rules that keep every sampled weight finite, from a ``fields.tokenizers.Tokenizer``."""
    vocab = tokenizer.vocab_size
    if tokenizer.name == "uniform":  # every code decodes inside the stored range
        return allow_all(vocab)
    codes = np.arange(vocab, dtype=np.int64)
    if tokenizer.tokens_per_weight == 1:
        return TokenRules(np.isfinite(tokenizer.decode(codes[:, None]))[:, 0])
    if tokenizer.tokens_per_weight == 2:
        pairs = np.stack(np.meshgrid(codes, codes, indexing="ij"), axis=-1).reshape(-1, 2)
        second = np.isfinite(tokenizer.decode(pairs))[:, 0].reshape(vocab, vocab)
        return TokenRules(second.any(axis=1), second)
    return allow_all(vocab)


# ------------------------------------------------------------------------------------ sampling


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """``temperature`` 0 means greedy (argmax); ``top_k`` 0 keeps every token."""

    temperature: float = 1.0
    top_k: int = 0

    def __post_init__(self):
        if not (self.temperature >= 0.0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


def choose(logits: jax.Array, allowed: jax.Array, key: jax.Array, options: SamplingOptions) -> jax.Array:
    """Draws one token per row: ``logits [batch, classes]``, ``allowed`` bool broadcastable -> ``[batch]`` int32.

    Disallowed tokens are removed first, then all but the ``top_k`` largest logits; the draw is
    from ``softmax(logits / temperature)`` (greedy for temperature 0).
    """
    logits = jnp.where(allowed, logits.astype(jnp.float32), -jnp.inf)
    if options.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if 0 < options.top_k < logits.shape[-1]:
        kth_largest = jax.lax.top_k(logits, options.top_k)[0][..., -1:]
        logits = jnp.where(logits >= kth_largest, logits, -jnp.inf)
    return jax.random.categorical(key, logits / jnp.float32(options.temperature), axis=-1).astype(jnp.int32)


def next_token(
    model: TokenTransformer,
    params: Any,
    hidden: jax.Array,
    previous: jax.Array,
    position: jax.Array,
    key: jax.Array,
    first: jax.Array,
    second: jax.Array | None,
    options: SamplingOptions,
) -> jax.Array:
    """Token at ``position`` from the hidden state there.

    Args:
        hidden: ``[batch, width]``; previous: ``[batch]`` int32, the token at ``position - 1``
            (the start token at position 0); position: int32 scalar; key: the sampling key
            (folded with ``position`` here); first, second: the ``TokenRules`` arrays.

    Returns:
        ``[batch]`` int32 tokens in ``[0, vocab_size)``.
    """
    config = model.config
    variables = {"params": params}
    key = jax.random.fold_in(key, position)
    batch = hidden.shape[0]
    allowed = jnp.broadcast_to(first[None], (batch, config.vocab_size))
    if second is not None:
        second_rows = second[jnp.clip(previous, 0, config.vocab_size - 1)]
        allowed = jnp.where(position % 2 == 1, second_rows, allowed)
    if not config.factorized:
        return choose(model.apply(variables, hidden, method=TokenTransformer.logits), allowed, key, options)
    high_key, low_key = jax.random.split(key)
    allowed = allowed.reshape(batch, config.high_vocab, LOW_VOCAB)
    high_logits = model.apply(variables, hidden, method=TokenTransformer.high_logits)
    high = choose(high_logits, allowed.any(axis=-1), high_key, options)
    low_allowed = allowed[jnp.arange(batch), high]  # [batch, 256]
    low_logits = model.apply(variables, hidden, high, method=TokenTransformer.low_logits)
    low = choose(low_logits, low_allowed, low_key, options)
    return high * LOW_VOCAB + low


def _rule_arrays(config: TransformerConfig, rules: TokenRules | None) -> tuple[jax.Array, jax.Array | None]:
    rules = rules if rules is not None else allow_all(config.vocab_size)
    if rules.first.shape != (config.vocab_size,):
        raise ValueError(f"token rules are for {rules.first.shape[0]} tokens, the model has {config.vocab_size}")
    second = None if rules.second is None else jnp.asarray(rules.second, jnp.bool_)
    return jnp.asarray(rules.first, jnp.bool_), second


def _labels_array(labels: Any, batch_size: int) -> jax.Array:
    if labels is None:
        return jnp.full((batch_size,), -1, jnp.int32)
    return jnp.asarray(labels).astype(jnp.int32)


@functools.lru_cache(maxsize=8)
def _cached_sampler(config: TransformerConfig, options: SamplingOptions):
    """Jitted ``(params, key, labels [B], first, second) -> tokens [B, T]`` with the key-value cache."""
    model = TokenTransformer(config)

    def sample(params, key, labels, first, second):
        batch = labels.shape[0]

        def step(carry, position):
            cache, previous = carry
            hidden, cache = model.apply({"params": params}, previous, labels, position, cache,
                                        method=TokenTransformer.decode_step)
            token = next_token(model, params, hidden, previous, position, key, first, second, options)
            return (cache, token), token

        start = jnp.full((batch,), config.start_token, jnp.int32)
        positions = jnp.arange(config.max_length, dtype=jnp.int32)
        _, tokens = jax.lax.scan(step, (init_cache(config, batch), start), positions)
        return tokens.T

    return jax.jit(sample)


def sample_tokens(
    model: TokenTransformer,
    params: Any,
    key: jax.Array,
    num_samples: int,
    labels: Any = None,
    rules: TokenRules | None = None,
    options: SamplingOptions = SamplingOptions(),
) -> np.ndarray:
    """Samples ``[num_samples, T]`` int32 tokens with the key-value cache (one step per token).

    Args:
        labels: ``[num_samples]`` class labels (conditional models; -1 = unknown) or None.
        rules: allowed tokens (default: all).
    """
    first, second = _rule_arrays(model.config, rules)
    sampler = _cached_sampler(model.config, options)
    return np.asarray(sampler(params, key, _labels_array(labels, num_samples), first, second))


@functools.lru_cache(maxsize=8)
def _reference_functions(config: TransformerConfig, options: SamplingOptions):
    """Jitted ``forward(params, inputs, labels) -> hidden [B, T, width]`` and ``pick`` (``next_token``)."""
    model = TokenTransformer(config)
    forward = jax.jit(lambda params, inputs, labels: model.apply({"params": params}, inputs, labels,
                                                                  method=TokenTransformer.hidden_states))
    return forward, jax.jit(functools.partial(next_token, model, options=options))


def sample_tokens_reference(
    model: TokenTransformer,
    params: Any,
    key: jax.Array,
    num_samples: int,
    labels: Any = None,
    rules: TokenRules | None = None,
    options: SamplingOptions = SamplingOptions(),
) -> np.ndarray:
    """Same draws as ``sample_tokens``, re-running the whole sequence for every token (slow; for tests)."""
    config = model.config
    first, second = _rule_arrays(config, rules)
    labels = _labels_array(labels, num_samples)
    forward, pick = _reference_functions(config, options)
    inputs = np.full((num_samples, config.max_length), config.start_token, np.int32)
    tokens = np.zeros((num_samples, config.max_length), np.int32)
    for position in range(config.max_length):
        hidden = forward(params, jnp.asarray(inputs), labels)[:, position]
        token = np.asarray(pick(params, hidden, jnp.asarray(inputs[:, position]), jnp.int32(position), key,
                                first, second))
        tokens[:, position] = token
        if position + 1 < config.max_length:
            inputs[:, position + 1] = token
    return tokens
