"""The autoregressive token model: cached vs re-run sampling, the loss, learning a toy set, the entry point."""

import dataclasses
import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from fields.field_datasets import read_dataset, read_token_dataset
from fields.tokenizers import BF16Tokenizer, FP8E4M3Tokenizer, FP16Tokenizer
from hypernets.models.transformer import TokenTransformer, TransformerConfig, init_cache
from hypernets.objectives import autoregressive as objective
from tests.helpers import assert_one_line_error, run_entry_point

PLAIN = TransformerConfig(vocab_size=16, max_length=9, width=32, depth=2, num_heads=2, mlp_ratio=2, num_classes=3)
FACTORISED = TransformerConfig(vocab_size=1 << 16, max_length=7, width=32, depth=2, num_heads=2, mlp_ratio=2,
                               factorized=True)
OPTIONS = [objective.SamplingOptions(0.0, 0), objective.SamplingOptions(1.0, 0), objective.SamplingOptions(0.7, 3)]


def _init(config: TransformerConfig, seed: int = 0):
    model = TokenTransformer(config)
    inputs = jnp.full((2, config.max_length), config.start_token, jnp.int32)
    params = jax.jit(model.init)(jax.random.PRNGKey(seed), inputs, jnp.zeros((2,), jnp.int32))["params"]
    return model, params


def _plain_rules() -> objective.TokenRules:
    """Two-token-weight rules with holes: some first tokens banned, each first token bans some second ones."""
    rng = np.random.default_rng(1)
    first = np.ones(PLAIN.vocab_size, bool)
    first[[2, 7, 11]] = False
    second = rng.random((PLAIN.vocab_size, PLAIN.vocab_size)) > 0.4
    second[:, 0] = True
    return objective.TokenRules(first, second)


@pytest.fixture(scope="module")
def models():
    return {"plain": (*_init(PLAIN), _plain_rules()),
            "factorised": (*_init(FACTORISED), objective.token_rules(FP16Tokenizer()))}


def _labels(config: TransformerConfig, count: int) -> np.ndarray | None:
    return (np.arange(count) % (config.num_classes + 1) - 1).astype(np.int32) if config.num_classes else None


def _check_rules(tokens: np.ndarray, rules: objective.TokenRules) -> None:
    if rules.second is None:
        assert rules.first[tokens].all()
        return
    assert rules.first[tokens[:, 0::2]].all()
    assert rules.second[tokens[:, 0:-1:2], tokens[:, 1::2]].all()


@pytest.mark.parametrize("name", ["plain", "factorised"])
def test_decode_step_matches_full_forward(models, name):
    model, params, _ = models[name]
    config = model.config
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, size=(3, config.max_length)).astype(np.int32)
    inputs = objective.shift_right(jnp.asarray(tokens), config.start_token)
    labels = jnp.asarray([0, 2, -1], jnp.int32)
    full = jax.jit(lambda p: model.apply({"params": p}, inputs, labels, method=TokenTransformer.hidden_states))(params)
    cache = init_cache(config, 3)
    assert cache[0]["key"].shape == (3, config.num_heads, config.max_length, config.head_dim)
    step = jax.jit(lambda p, token, position, c: model.apply({"params": p}, token, labels, position, c,
                                                             method=TokenTransformer.decode_step))
    for position in range(config.max_length):
        hidden, cache = step(params, inputs[:, position], jnp.int32(position), cache)
        np.testing.assert_allclose(np.asarray(hidden), np.asarray(full[:, position]), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("name", ["plain", "factorised"])
def test_cached_sampler_equals_full_rerun_sampler(models, name):
    model, params, rules = models[name]
    config = model.config
    labels = _labels(config, 8)
    key = jax.random.PRNGKey(3)
    for options in OPTIONS:
        cached = objective.sample_tokens(model, params, key, 8, labels, rules, options)
        reference = objective.sample_tokens_reference(model, params, key, 8, labels, rules, options)
        assert cached.dtype == np.int32 and cached.shape == (8, config.max_length)
        np.testing.assert_array_equal(cached, reference, err_msg=f"{options}")
        assert cached.min() >= 0 and cached.max() < config.vocab_size
        _check_rules(cached, rules)
    if config.factorized:  # fp16 rules: every sampled token decodes to a finite weight
        assert np.isfinite(FP16Tokenizer().decode(cached)).all()


@pytest.mark.parametrize("name", ["plain", "factorised"])
def test_top_k_one_equals_greedy(models, name):
    model, params, rules = models[name]
    labels = _labels(model.config, 8)
    key = jax.random.PRNGKey(3)
    greedy = objective.sample_tokens(model, params, key, 8, labels, rules, objective.SamplingOptions(0.0, 0))
    top_one = objective.sample_tokens(model, params, key, 8, labels, rules, objective.SamplingOptions(1.5, 1))
    sampled = objective.sample_tokens(model, params, key, 8, labels, rules, objective.SamplingOptions(1.0, 0))
    np.testing.assert_array_equal(top_one, greedy)
    assert not np.array_equal(sampled, greedy)  # the draw is random, so top-k=1 did constrain it


def test_token_rules_keep_weights_finite():
    fp8 = objective.token_rules(FP8E4M3Tokenizer())
    assert fp8.second is None and not fp8.first[0x7F] and not fp8.first[0xFF] and fp8.first.sum() == 254
    bf16 = objective.token_rules(BF16Tokenizer())
    assert bf16.second.shape == (256, 256)
    assert bf16.second[0x3F].all() and not bf16.second[0x7F, 0x80] and bf16.second[0x7F, 0x7F]
    fp16 = objective.token_rules(FP16Tokenizer())
    assert not fp16.first[0x7C00] and fp16.first[0x7BFF] and fp16.first.sum() == 65536 - 2 * 1024


def test_loss_is_float32_and_start_token_never_wraps():
    stored = np.array([[0, 255, 3, 4, 5, 6, 7, 8, 9]] * 4, np.uint8)  # uint8 storage, as on disk
    inputs = objective.shift_right(stored, 256)
    assert inputs.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(inputs[:, 0]), 256)
    np.testing.assert_array_equal(np.asarray(inputs[:, 1:]), stored[:, :-1].astype(np.int32))
    for config, vocab in ((dataclasses.replace(PLAIN, vocab_size=256), 256), (FACTORISED, 1 << 16)):
        assert config.start_token == vocab and config.start_token >= config.vocab_size
        task = objective.AutoregressiveTask(TokenTransformer(config))
        tokens = np.random.default_rng(0).integers(0, vocab, size=(4, config.max_length)).astype(np.int32)
        if vocab == 256:
            tokens = stored
        batch = {"tokens": jnp.asarray(tokens), "labels": jnp.asarray([0, 1, 2, -1], jnp.int32)}
        params = jax.jit(task.init)(jax.random.PRNGKey(0), batch)
        loss, metrics = jax.jit(task.loss)(params, batch, jax.random.PRNGKey(1))
        assert loss.dtype == jnp.float32 and loss.shape == () and np.isfinite(float(loss))
        # An untrained model is close to a uniform guess over the whole (16-bit) token.
        assert 0.6 * math.log(vocab) < float(loss) < 1.6 * math.log(vocab)
        assert all(np.isfinite(float(value)) for value in metrics.values())




def test_learns_a_predictable_toy_set():
    """Label l starts a run at 4l + r (r random in 0..3), then counts up mod 16: only the first token is uncertain."""
    config = TransformerConfig(vocab_size=16, max_length=16, width=32, depth=1, num_heads=2, mlp_ratio=2,
                               num_classes=4)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=256).astype(np.int32)
    starts = 4 * labels + rng.integers(0, 4, size=256)
    tokens = ((starts[:, None] + np.arange(16)[None]) % 16).astype(np.int32)
    task = objective.AutoregressiveTask(TokenTransformer(config))
    params = jax.jit(task.init)(jax.random.PRNGKey(0), {"tokens": tokens[:32], "labels": labels[:32]})
    optimizer = optax.adam(3e-3)
    state = optimizer.init(params)

    @jax.jit
    def step(params, state, batch, key):
        (loss, _), grads = jax.value_and_grad(task.loss, has_aux=True)(params, batch, key)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes Python floats and int32 counts
            updates, state = optimizer.update(grads, state, params)
            return optax.apply_updates(params, updates), state, loss

    for index in range(200):
        rows = rng.integers(0, 256, size=32)
        params, state, loss = step(params, state, {"tokens": tokens[rows], "labels": labels[rows]},
                                   jax.random.PRNGKey(index))
    # Floor: log(4) / 16 = 0.087 nats per token; a uniform guess is log(16) = 2.77.
    assert float(loss) < 0.3, float(loss)
    sample_labels = np.array([0, 1, 2, 3, 3, 2, 1, 0], np.int32)
    samples = objective.sample_tokens(task.model, params, jax.random.PRNGKey(0), 8, sample_labels,
                                      options=objective.SamplingOptions(0.0, 0))
    assert np.all(samples[:, 0] // 4 == sample_labels)
    assert np.all((samples[:, 1:] - samples[:, :-1]) % 16 == 1)


# ------------------------------------------------------------------------------------------- entry point


@pytest.fixture(scope="module")
def token_data(tmp_path_factory):
    from fields import encode_dataset
    from scripts import tokenize

    root = tmp_path_factory.mktemp("autoregressive")
    fields_dir, tokens_dir = str(root / "fields"), str(root / "tokens")
    assert encode_dataset.main(["--source", "procedural:primitives", "--num", "8", "--size", "8x8", "--steps", "10",
                                "--backend", "jax", "--out", fields_dir, "--quiet"]) == 0
    assert tokenize.main(["--fields", fields_dir, "--tokenizer", "fp8_e4m3", "--normalize", "section",
                          "--out", tokens_dir, "--quiet"]) == 0
    return fields_dir, tokens_dir


def _history_steps(workdir: str) -> list[int]:
    with open(os.path.join(workdir, "history.jsonl")) as handle:
        return [int(json.loads(line)["step"]) for line in handle if line.strip()]


def test_entry_point_trains_samples_resumes_and_refuses(token_data, tmp_path, capsys):
    from hypernets import autoregressive

    fields_dir, tokens_dir = token_data
    workdir = str(tmp_path / "run")
    argv = ["--data", tokens_dir, "--workdir", workdir, "--preset", "tiny", "--num-samples", "3",
            "--quiet"]
    status, _, err = run_entry_point(autoregressive.main, argv, capsys)
    assert status == 0, err

    source = read_token_dataset(tokens_dir)
    samples = read_dataset(os.path.join(workdir, "samples"))
    assert len(samples) == 3 and samples.field_kind == source.field_kind == "ngp_image"
    assert samples.param_map == source.param_map and samples.field_config == source.field_config
    assert samples.metadata["image_height"] == 8 and samples.metadata["image_width"] == 8
    assert list(samples.columns["source_id"]) == ["sample-000000", "sample-000001", "sample-000002"]
    np.testing.assert_array_equal(samples.columns["label"], -1)
    assert np.isfinite(samples.matrix).all()
    sample_tokens = read_token_dataset(os.path.join(workdir, "sample_tokens"))
    assert sample_tokens.tokens.shape == (3, source.tokens.shape[1])
    assert sample_tokens.tokenizer.name == "fp8_e4m3" and sample_tokens.normalization_mode == "section"
    np.testing.assert_array_equal(sample_tokens.decode_weights(), samples.matrix)  # denormalised fields
    assert not np.allclose(samples.matrix, sample_tokens.tokenizer.decode(sample_tokens.tokens))
    from hypernets.rendering import image_grid

    expected = image_grid(np.zeros((3, 8, 8, 3)), columns=2).shape  # 3 renders of 8x8, 2 per row
    with Image.open(os.path.join(workdir, "samples.png")) as grid:
        assert grid.size == (expected[1], expected[0])
    history = _history_steps(workdir)
    assert history[-1] == 4
    with open(os.path.join(workdir, "history.jsonl")) as handle:
        last = json.loads(handle.read().strip().splitlines()[-1])
    assert np.isfinite(last["val_loss"]) and 0.0 <= last["val_accuracy"] <= 1.0  # held-out rows at the last step

    # The same command again resumes at the last step: no training, the same model, so the same samples.
    status, out, err = run_entry_point(autoregressive.main, argv, capsys)
    assert status == 0, err
    assert "resuming from step 4" in out and _history_steps(workdir) == history
    again = read_token_dataset(os.path.join(workdir, "sample_tokens"))
    np.testing.assert_array_equal(again.tokens, sample_tokens.tokens)

    # Sampling options may change; --sample-only reads the saved model and the saved config.
    status, _, err = run_entry_point(
        autoregressive.main, ["--data", tokens_dir, "--workdir", workdir, "--sample-only", "--num-samples", "2",
                              "--temperature", "0.5", "--top-k", "4", "--quiet"], capsys)
    assert status == 0, err
    resampled = read_dataset(os.path.join(workdir, "samples"))
    assert len(resampled) == 2 and resampled.metadata["generator"]["top_k"] == 4
    assert resampled.metadata["generator"]["step"] == 4 and _history_steps(workdir) == history

    status, _, err = run_entry_point(autoregressive.main, argv + ["--learning-rate", "0.5"], capsys)
    assert_one_line_error(status, err, "different config (autoregressive.loop.learning_rate")
    shutil.rmtree(os.path.join(workdir, "checkpoints"))  # a saved config without a checkpoint
    status, _, err = run_entry_point(
        autoregressive.main, ["--data", tokens_dir, "--workdir", workdir, "--sample-only"], capsys)
    assert_one_line_error(status, err, "holds no trained run (no checkpoint yet")
    status, _, err = run_entry_point(
        autoregressive.main, ["--data", tokens_dir, "--workdir", str(tmp_path / "empty"), "--sample-only"], capsys)
    assert_one_line_error(status, err, "holds no trained run")
    status, _, err = run_entry_point(
        autoregressive.main, ["--data", fields_dir, "--workdir", str(tmp_path / "fields"), "--preset", "tiny"], capsys)
    assert_one_line_error(status, err, "scripts.tokenize")
