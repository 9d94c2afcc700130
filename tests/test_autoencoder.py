"""Split weight autoencoders: section layout, both variants learning, the latent API, the render-PSNR
metric, and python -m hypernets.autoencoder end to end (latents, resume, refusals)."""

import dataclasses
import json
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fields import encode_dataset
from fields.image_fitting import field_config_from_dict, render_batch
from fields.metrics import psnr
from fields.weights import matrix_to_params, section_slices
from hypernets import autoencoder
from hypernets.datasets import load_weight_splits
from hypernets.models.weight_autoencoders import SectionLayout, WeightAutoencoder, conv_length
from hypernets.rendering import image_grid
from tests.helpers import assert_one_line_error, run_entry_point

NUM_FIELDS = 12


@pytest.fixture(scope="module")
def field_data(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("fields") / "primitives")
    status = encode_dataset.main(["--source", "procedural:primitives", "--num", str(NUM_FIELDS), "--size", "8x8",
                                  "--steps", "20", "--backend", "jax", "--quiet", "--out", out])
    assert status in (0, None)
    return out


@pytest.fixture(scope="module")
def splits(field_data):
    return load_weight_splits(field_data, autoencoder.PRESETS["tiny"].val_fraction, 0, "section")


def tiny_network(param_map, kind, latent_dims=None):
    config = dataclasses.replace(autoencoder.PRESETS["tiny"], model=kind)
    if latent_dims is not None:
        config = dataclasses.replace(config, latent_dims=latent_dims)
    return autoencoder.build_network(config, param_map)


# ------------------------------------------------------------------------------------------- layout and models


def test_section_layout_round_trip_on_a_real_field(splits):
    train, _ = splits
    layout = SectionLayout(train.param_map)
    assert layout.names == ["hash", "mlp"]
    assert sum(layout.sizes) == layout.num_params == train.vectors.shape[1]
    sections = layout.split(train.vectors)
    for name, section in zip(layout.names, sections, strict=True):
        np.testing.assert_array_equal(section, train.vectors[:, section_slices(train.param_map)[name]])
    np.testing.assert_array_equal(layout.merge(sections), train.vectors)
    np.testing.assert_array_equal(np.asarray(layout.merge([jnp.asarray(s) for s in sections])), train.vectors)


def test_conv_length_rounds_up_to_whole_halvings():
    assert conv_length(10, 2, 2) == 8  # 5 positions -> 8
    assert conv_length(16, 2, 3) == 8
    assert conv_length(17, 2, 3) == 16
    assert conv_length(1, 4, 0) == 1


@pytest.mark.parametrize("kind", ["conv", "transformer"])
def test_variant_learns_and_keeps_sections_and_fields_apart(kind, splits):
    train, _ = splits
    network = tiny_network(train.param_map, kind, latent_dims=(6, 4))
    assert network.section_latent_dims == {"hash": 6, "mlp": 4}
    assert network.latent_size == 10
    assert network.compression == pytest.approx(train.vectors.shape[1] / 10)
    task = autoencoder.AutoencoderTask(network, "weight")
    batch = {"vectors": jnp.asarray(train.vectors)}
    params = jax.jit(task.init)(jax.random.PRNGKey(0), batch)
    encode, decode = jax.jit(network.encode), jax.jit(network.decode)

    latents = encode(params, batch["vectors"])
    assert latents.shape == (len(train), 10) and latents.dtype == jnp.float32
    decoded = decode(params, latents)
    assert decoded.shape == train.vectors.shape and decoded.dtype == jnp.float32
    # Each field is encoded on its own: a batch of one gives the same latent.
    np.testing.assert_allclose(encode(params, batch["vectors"][:1]), latents[:1], rtol=1e-4, atol=1e-5)
    # Split: changing a field's MLP weights changes only its MLP latent, changing its hash grid only its hash latent.
    sections = section_slices(train.param_map)
    changed_mlp = encode(params, batch["vectors"].at[:, sections["mlp"]].add(1.0))
    changed_hash = encode(params, batch["vectors"].at[:, sections["hash"]].add(1.0))
    np.testing.assert_allclose(changed_mlp[:, :6], latents[:, :6], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(changed_hash[:, 6:], latents[:, 6:], rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(changed_mlp[:, 6:] - latents[:, 6:]))) > 1e-4
    assert float(jnp.max(jnp.abs(changed_hash[:, :6] - latents[:, :6]))) > 1e-4

    optimizer = optax.adam(1e-2)

    @jax.jit
    def step(params, opt_state):
        (loss, metrics), grads = jax.value_and_grad(task.loss, has_aux=True)(params, batch, jax.random.PRNGKey(1))
        with jax.numpy_dtype_promotion("standard"):  # optax mixes Python floats and int32 counts
            updates, opt_state = optimizer.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
        return params, opt_state, loss, metrics

    opt_state = optimizer.init(params)
    losses = []
    for _ in range(40):
        params, opt_state, loss, metrics = step(params, opt_state)
        losses.append(float(loss))
    assert set(metrics) == {"mse_hash", "mse_mlp"}
    sizes = {name: len(indices) for name, indices in sections.items()}
    weighted = sum(float(metrics[f"mse_{name}"]) * size for name, size in sizes.items()) / sum(sizes.values())
    assert losses[-1] == pytest.approx(weighted, rel=1e-4)  # the loss weighs each section's MSE by its size
    assert np.all(np.isfinite(losses))
    # Normalised weights: predicting zeros scores about 1; the fixed batch must be learned well below that.
    assert losses[-1] < 0.8 * losses[0], f"{kind}: loss {losses[0]:.4f} -> {losses[-1]:.4f}"


def test_section_weighting_averages_the_section_errors(splits):
    train, _ = splits
    network = tiny_network(train.param_map, "conv")
    batch = {"vectors": jnp.asarray(train.vectors[:4])}
    params = jax.jit(network.init)(jax.random.PRNGKey(0), batch["vectors"])

    @jax.jit
    def losses(params):
        by_section = autoencoder.AutoencoderTask(network, "section").loss(params, batch, jax.random.PRNGKey(0))
        by_weight = autoencoder.AutoencoderTask(network, "weight").loss(params, batch, jax.random.PRNGKey(0))
        plain = jnp.mean(jnp.square(network.reconstruct(params, batch["vectors"]) - batch["vectors"]))
        return by_section, by_weight, plain

    (section_loss, metrics), (weight_loss, _), plain = losses(params)
    assert float(section_loss) == pytest.approx((float(metrics["mse_hash"]) + float(metrics["mse_mlp"])) / 2, rel=1e-5)
    assert float(weight_loss) == pytest.approx(float(plain), rel=1e-4)
    assert abs(float(section_loss) - float(weight_loss)) > 1e-6  # the two weightings differ


def test_latent_dims_that_do_not_fit_the_sections_are_refused(splits):
    train, _ = splits
    with pytest.raises(ValueError, match="hash, mlp"):
        WeightAutoencoder(train.param_map, "conv", (4, 4, 4))
    with pytest.raises(autoencoder.UserError, match="latent-dims"):
        tiny_network(train.param_map, "conv", latent_dims=(4, 4, 4))


# ------------------------------------------------------------------------------------------- render PSNR


def test_render_psnr_is_very_high_for_a_perfect_reconstruction_and_matches_a_hand_check(splits):
    train, _ = splits
    original = train.denormalize(train.vectors[:3])
    perfect = autoencoder.render_psnr(original, original.copy(), train)
    assert perfect.shape == (3,) and np.all(perfect >= 100.0)

    mlp = section_slices(train.param_map)["mlp"]
    noisy = original.copy()
    noisy[:, mlp] += np.random.default_rng(0).normal(0.0, 0.05, (3, len(mlp))).astype(np.float32)
    measured = autoencoder.render_psnr(original, noisy, train)

    config = field_config_from_dict(train.field_kind, train.field_config, "test")
    height, width = int(train.metadata["image_height"]), int(train.metadata["image_width"])
    reference = render_batch(matrix_to_params(original, train.param_map), config, height, width, "jax")
    renders = render_batch(matrix_to_params(noisy, train.param_map), config, height, width, "jax")
    by_hand = [psnr(renders[index], reference[index]) for index in range(3)]
    np.testing.assert_allclose(measured, by_hand, atol=1e-3)
    assert np.all(measured < 100.0)


def test_image_renderer_matches_the_render_metric_and_the_render_loss_adds_to_the_weight_loss(splits):
    train, _ = splits
    renderer = autoencoder.make_image_renderer(train)
    vectors = jnp.asarray(train.vectors[:3])
    rendered = np.asarray(jax.jit(renderer)(vectors))
    height, width = int(train.metadata["image_height"]), int(train.metadata["image_width"])
    expected = autoencoder.render(train.denormalize(train.vectors[:3]), train).values
    assert rendered.shape == (3, height * width, expected.shape[-1]) and rendered.dtype == np.float32
    np.testing.assert_allclose(rendered.reshape(expected.shape), expected, atol=1e-5)

    network = tiny_network(train.param_map, "conv")
    batch = {"vectors": vectors}
    params = jax.jit(network.init)(jax.random.PRNGKey(0), vectors)
    plain = autoencoder.AutoencoderTask(network, "weight")
    with_render = autoencoder.AutoencoderTask(network, "weight", renderer, 100.0)

    @jax.jit
    def losses(params):
        return plain.loss(params, batch, jax.random.PRNGKey(0)), with_render.loss(params, batch, jax.random.PRNGKey(0))

    (plain_loss, plain_metrics), (render_loss, metrics) = losses(params)
    assert "render_mse" not in plain_metrics and set(metrics) == {"mse_hash", "mse_mlp", "render_mse"}
    reconstruction = np.asarray(renderer(network.reconstruct(params, vectors)))
    by_hand = np.mean(np.square(reconstruction - rendered))
    assert float(metrics["render_mse"]) == pytest.approx(by_hand, rel=1e-4)
    assert float(render_loss) == pytest.approx(float(plain_loss) + 100.0 * by_hand, rel=1e-4)
    grads = jax.jit(jax.grad(lambda params: with_render.loss(params, batch, jax.random.PRNGKey(0))[0]))(params)
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(grads))
    with pytest.raises(ValueError, match="render_weight"):
        dataclasses.replace(autoencoder.PRESETS["tiny"], render_weight=-1.0)


# ------------------------------------------------------------------------------------------- the CLI


def run_autoencoder(argv, capsys):
    return run_entry_point(autoencoder.main, argv, capsys)


def read_history(workdir):
    with open(os.path.join(workdir, "history.jsonl")) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def test_cli_writes_latents_grid_and_api_then_resumes_and_refuses(field_data, splits, tmp_path, capsys):
    train, val = splits
    workdir = str(tmp_path / "conv")
    argv = ["--data", field_data, "--workdir", workdir, "--preset", "tiny", "--quiet", "--latent-dims", "12,4",
            "--render-weight", "10"]
    status, out, err = run_autoencoder(argv, capsys)
    assert status == 0, err
    num_params = train.vectors.shape[1]
    assert f"compression {num_params / 16:.1f}x" in out

    # Latents: one row per field of both splits, in dataset order, readable with plain pyarrow.
    table = pq.read_table(os.path.join(workdir, "latents", "latents-000000.parquet"))
    assert table.num_rows == NUM_FIELDS
    assert table.schema.field("latent").type == pa.list_(pa.float32(), 16)
    assert table.column("row").to_pylist() == list(range(NUM_FIELDS))
    splits_column = table.column("split").to_pylist()
    assert splits_column.count("val") == len(val) and splits_column.count("train") == len(train)
    metadata = {key.decode(): value.decode() for key, value in table.schema.metadata.items()}
    assert json.loads(metadata["autoencoder_workdir"]) == os.path.abspath(workdir)
    assert json.loads(metadata["section_latent_dims"]) == {"hash": 12, "mlp": 4}
    assert json.loads(metadata["compression"]) == pytest.approx(num_params / 16)

    with open(os.path.join(workdir, "evaluation.json")) as handle:
        evaluation = json.load(handle)
    assert evaluation["compression"] == pytest.approx(num_params / 16)
    assert evaluation["latent_size"] == 16 and evaluation["num_params"] == num_params
    assert np.isfinite(evaluation["val_mse"]) and 0.0 < evaluation["val_render_psnr"] < 100.0
    assert evaluation["val_render_psnr_min"] <= evaluation["val_render_psnr"]
    history = read_history(workdir)
    assert max(row["step"] for row in history) == autoencoder.PRESETS["tiny"].loop.steps
    assert "val_mse_hash" in history[-1] and "mse_mlp" in history[-1] and "render_mse" in history[-1]

    pairs = min(autoencoder.PRESETS["tiny"].grid_pairs, NUM_FIELDS)
    expected = image_grid(np.zeros((2 * pairs, 8, 8, 3)), columns=8, group=2).shape
    with Image.open(os.path.join(workdir, "reconstruction.png")) as grid:
        assert grid.size == (expected[1], expected[0])

    # The Python API: the stored latents are the model's encodings; decoding gives raw weights.
    model, params, config, data_info = autoencoder.load_autoencoder(workdir)
    assert config.latent_dims == (12, 4) and config.model == "conv"
    latents, columns, stored = autoencoder.read_latents(os.path.join(workdir, "latents"))
    assert latents.shape == (NUM_FIELDS, 16) and stored["latent_dim"] == 16
    train_rows = [index for index, split in enumerate(columns["split"]) if split == "train"]
    np.testing.assert_allclose(model.encode(train.vectors), latents[train_rows], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(model.network.encode(params, jnp.asarray(train.vectors)), latents[train_rows],
                               rtol=1e-4, atol=1e-5)
    normalised = model.decode(latents)
    raw = model.decode_to_fields(latents)
    assert normalised.shape == raw.shape == (NUM_FIELDS, num_params) and raw.dtype == np.float32
    for name, indices in section_slices(data_info.param_map).items():
        mean, std = train.normalization.section_mean[name], train.normalization.section_std[name]
        np.testing.assert_allclose(raw[:, indices], normalised[:, indices] * std + mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(model.encode_fields(train.denormalize(train.vectors)), latents[train_rows],
                               rtol=1e-3, atol=1e-4)

    # The same command again resumes (nothing left to train); a changed config is refused in one line.
    status, out, err = run_autoencoder(argv, capsys)
    assert status == 0, err
    assert "resuming from step" in out
    assert max(row["step"] for row in read_history(workdir)) == autoencoder.PRESETS["tiny"].loop.steps
    status, _, err = run_autoencoder(argv + ["--learning-rate", "0.5"], capsys)
    assert_one_line_error(status, err, "different config")
    status, _, err = run_autoencoder(["--data", field_data, "--workdir", workdir, "--model", "transformer"], capsys)
    assert_one_line_error(status, err, "different config")


def test_cli_bad_input_is_one_line(field_data, tmp_path, capsys, monkeypatch):
    status, _, err = run_autoencoder(["--data", str(tmp_path / "missing"), "--workdir", str(tmp_path / "w"),
                                      "--preset", "tiny"], capsys)
    assert_one_line_error(status, err, "missing")
    status, _, err = run_autoencoder(["--data", field_data, "--workdir", str(tmp_path / "w2"), "--preset", "huge"],
                                     capsys)
    assert_one_line_error(status, err, "unknown preset")
    status, _, err = run_autoencoder(["--data", field_data, "--workdir", str(tmp_path / "w3"), "--preset", "tiny",
                                      "--latent-dims", "4,4,4"], capsys)
    assert_one_line_error(status, err, "hash, mlp")
    status, _, err = run_autoencoder(["--data", field_data, "--workdir", str(tmp_path / "w4"), "--latent-dims",
                                      "a,b"], capsys)
    assert_one_line_error(status, err, "comma-separated")
    status, _, err = run_autoencoder(["--data", field_data, "--workdir", str(tmp_path / "w5"), "--preset", "tiny",
                                      "--render-weight", "-1"], capsys)
    assert_one_line_error(status, err, "render_weight")
    with pytest.raises(autoencoder.UserError, match="no autoencoder run"):
        autoencoder.load_autoencoder(str(tmp_path / "nothing"))

    # --model sane: dispatched to hypernets.sane.main with the other arguments.
    calls = []
    monkeypatch.setitem(sys.modules, "hypernets.sane", types.SimpleNamespace(main=lambda argv: calls.append(argv) or 0))
    assert autoencoder.main(["--data", "D", "--model", "sane", "--workdir", "W"]) == 0
    assert calls == [["--data", "D", "--workdir", "W"]]
