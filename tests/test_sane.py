"""SANE-style weight autoencoder: function-preserving neuron permutation, NT-Xent, tokenization and
positional encodings, the linear probe, rotated copies, and python -m hypernets.sane end to end."""

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fields import encode_dataset
from fields.field_datasets import read_dataset
from fields.image_fitting import field_config_from_dict, render_batch
from fields.models.hash_grid import encode_reference
from fields.weights import matrix_to_params
from hypernets import sane
from hypernets.augment import (
    NGPLayout,
    add_weight_noise,
    augment,
    permute_hidden_neurons,
    permute_vectors,
    read_rotation_column,
    rotate_dataset_images,
)
from hypernets.autoencoder import read_latents
from hypernets.objectives.contrastive import nt_xent
from tests.helpers import assert_one_line_error, run_entry_point

NUM_FIELDS = 12
SIZE = 8


@pytest.fixture(scope="module")
def field_data(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("fields") / "primitives")
    status = encode_dataset.main(["--source", "procedural:primitives", "--num", str(NUM_FIELDS), "--size",
                                  f"{SIZE}x{SIZE}", "--steps", "20", "--backend", "jax", "--quiet", "--out", out])
    assert status in (0, None)
    return out


@pytest.fixture(scope="module")
def dataset(field_data):
    return read_dataset(field_data)


def field_config(dataset):
    return field_config_from_dict(dataset.field_kind, dataset.field_config, "test")


# ------------------------------------------------------------------------------------------ augmentations


def test_permutation_keeps_renders_and_raw_outputs_exactly(dataset, key):
    layout = NGPLayout.from_param_map(dataset.param_map)
    vectors = dataset.matrix[:4]
    permuted = np.asarray(permute_vectors(jnp.asarray(vectors), layout, key))
    # The weights change (each kernel's entries are reordered, not altered); the hash table does not.
    np.testing.assert_array_equal(layout.table(permuted), layout.table(vectors))
    for before, after in zip(layout.kernels(vectors), layout.kernels(permuted), strict=True):
        assert not np.array_equal(before, after)
        np.testing.assert_array_equal(np.sort(before.reshape(4, -1), axis=1), np.sort(after.reshape(4, -1), axis=1))
    config = field_config(dataset)
    renders = render_batch(matrix_to_params(vectors, dataset.param_map), config, SIZE, SIZE, backend="jax")
    renders_permuted = render_batch(matrix_to_params(permuted, dataset.param_map), config, SIZE, SIZE, backend="jax")
    assert np.max(np.abs(renders - renders_permuted)) < 1e-5
    # Unclipped outputs at arbitrary positions agree too.
    model = config.build("jax")
    positions = jax.random.uniform(jax.random.fold_in(key, 1), (256, 2), jnp.float32)
    apply = jax.vmap(lambda params: model.apply({"params": params}, positions))
    outputs = [np.asarray(apply(jax.tree_util.tree_map(jnp.asarray, matrix_to_params(matrix, dataset.param_map))))
               for matrix in (vectors, permuted)]
    assert np.max(np.abs(outputs[0] - outputs[1])) < 1e-5


def test_permute_hidden_neurons_moves_rows_and_columns_together():
    kernels = [np.arange(6, dtype=np.float32).reshape(2, 3), np.arange(12, dtype=np.float32).reshape(3, 4),
               np.arange(8, dtype=np.float32).reshape(4, 2)]
    permutations = [np.array([2, 0, 1]), np.array([3, 2, 1, 0])]
    permuted = permute_hidden_neurons(kernels, permutations)
    np.testing.assert_array_equal(permuted[0], kernels[0][:, [2, 0, 1]])
    np.testing.assert_array_equal(permuted[1], kernels[1][[2, 0, 1]][:, [3, 2, 1, 0]])
    np.testing.assert_array_equal(permuted[2], kernels[2][[3, 2, 1, 0]])
    x = np.random.default_rng(0).normal(size=(5, 2)).astype(np.float32)
    forward = lambda ks: np.maximum(np.maximum(x @ ks[0], 0) @ ks[1], 0) @ ks[2]
    np.testing.assert_allclose(forward(permuted), forward(kernels), rtol=1e-6)
    with pytest.raises(ValueError, match="permutations"):
        permute_hidden_neurons(kernels, permutations[:1])


def test_noise_and_augment_views(dataset, key):
    layout = NGPLayout.from_param_map(dataset.param_map)
    vectors = jnp.asarray(dataset.matrix[:8])
    noisy = add_weight_noise(vectors, key, 0.1)
    assert noisy.dtype == jnp.float32
    assert abs(float(jnp.std(noisy - vectors)) - 0.1) < 0.01
    clean, noisy = augment(vectors, layout, key, permute=True, noise_std=0.05)
    np.testing.assert_array_equal(np.asarray(layout.table(clean)), np.asarray(layout.table(vectors)))
    assert 0.04 < float(jnp.std(noisy - clean)) < 0.06
    unchanged, same = augment(vectors, layout, key, permute=False, noise_std=0.0)
    np.testing.assert_array_equal(np.asarray(unchanged), np.asarray(vectors))
    np.testing.assert_array_equal(np.asarray(same), np.asarray(vectors))


# ----------------------------------------------------------------------------------------------- NT-Xent


def test_nt_xent_equals_hand_computed_values():
    # Two pairs; projections are normalised first, so the lengths do not matter.
    first = jnp.array([[2.0, 0.0], [0.0, 1.0]], jnp.float32)
    second = jnp.array([[1.0, 0.0], [0.0, 3.0]], jnp.float32)
    # Every anchor: positive similarity 1, negatives 0 (the other pair's two views) -> log(1 + 2 e^{-1/t}).
    np.testing.assert_allclose(float(nt_xent(first, second, 0.5)), math.log(1.0 + 2.0 * math.exp(-2.0)), rtol=1e-6)
    # Swapped partners: each anchor's "positive" is orthogonal and one negative is identical.
    np.testing.assert_allclose(float(nt_xent(first, second[::-1], 0.5)), math.log(math.exp(2.0) + 2.0), rtol=1e-6)

    # A lopsided pair: b1 at 45 degrees. Anchors a1=(1,0), a2=(0,1), b1=(s,s), b2=(0,1), s = 1/sqrt(2), t = 1.
    second = jnp.array([[1.0, 1.0], [0.0, 2.0]], jnp.float32)
    s = 1.0 / math.sqrt(2.0)
    similarities = {  # anchor -> (positive, [all non-self similarities])
        "a1": (s, [0.0, s, 0.0]), "a2": (1.0, [0.0, s, 1.0]),
        "b1": (s, [s, s, s]), "b2": (1.0, [0.0, 1.0, s]),
    }
    expected = np.mean([-pos + math.log(sum(math.exp(v) for v in others))
                        for pos, others in similarities.values()])
    np.testing.assert_allclose(float(nt_xent(first, second, 1.0)), expected, rtol=1e-6)


def test_nt_xent_is_lower_for_aligned_than_shuffled_pairs(key):
    first = jax.random.normal(key, (16, 8), jnp.float32)
    second = first + 0.1 * jax.random.normal(jax.random.fold_in(key, 1), (16, 8), jnp.float32)
    aligned = float(nt_xent(first, second, 0.2))
    shuffled = float(nt_xent(first, jnp.roll(second, 3, axis=0), 0.2))
    assert aligned + 1.0 < shuffled
    assert np.isfinite(aligned) and np.isfinite(shuffled)


# ------------------------------------------------------------------------------------------- tokenization


def test_tokens_shapes_values_and_round_trip(dataset):
    config = field_config(dataset)
    grid = config.grid
    tokenizer = sane.FieldTokenizer(dataset.param_map, config, lattice_size=4, patch_size=2)
    spec = tokenizer.spec
    vectors = dataset.matrix[:3]
    hash_tokens, neuron_tokens = (np.asarray(tokens) for tokens in tokenizer.tokens(vectors))
    hidden = config.hidden_width
    assert spec.hidden_widths == (hidden,) * config.num_hidden_layers
    assert hash_tokens.shape == (3, grid.num_levels * 4, 4 * grid.features_per_level)
    assert neuron_tokens.shape == (3, config.num_hidden_layers * hidden, spec.max_in + spec.max_out)
    assert spec.max_in == max(grid.output_dim, hidden) and spec.max_out == max(hidden, config.output_dim)

    # A hash token holds one level's features at the 2x2 lattice points of its patch.
    table = tokenizer.layout.table(vectors)[1]
    features = np.asarray(encode_reference(jnp.asarray(table), jnp.asarray(tokenizer.lattice_positions), grid))
    features = features.reshape(4, 4, grid.num_levels, grid.features_per_level)  # [y, x, level, F]
    level, patch_y, patch_x = 2, 1, 0
    token = hash_tokens[1, level * 4 + patch_y * 2 + patch_x].reshape(2, 2, grid.features_per_level)
    np.testing.assert_allclose(token, features[2:4, 0:2, level], rtol=1e-6)
    levels, xy = spec.hash_positions()
    assert levels[level * 4 + patch_y * 2 + patch_x] == level
    np.testing.assert_allclose(xy[level * 4 + patch_y * 2 + patch_x], [0.25, 0.75])

    # A neuron token: incoming weights (a column of dense_k), then outgoing (a row of dense_{k+1}), padded.
    kernels = tokenizer.layout.kernels(vectors)
    layer, neuron = 1, 5
    token = neuron_tokens[2, layer * hidden + neuron]
    np.testing.assert_array_equal(token[:hidden], kernels[1][2][:, neuron])
    np.testing.assert_array_equal(token[spec.max_in:spec.max_in + config.output_dim], kernels[2][2][neuron])
    assert np.all(token[spec.max_in + config.output_dim:] == 0)
    np.testing.assert_array_equal(tokenizer.neuron_mask[layer * hidden + neuron] != 0, np.arange(token.size) <
                                  spec.max_in + config.output_dim)
    first_layer = neuron_tokens[2, neuron]
    np.testing.assert_array_equal(first_layer[:grid.output_dim], kernels[0][2][:, neuron])
    assert np.all(first_layer[grid.output_dim:spec.max_in] == 0)

    # Tokens -> weights is exact, and the hash table is untouched.
    np.testing.assert_array_equal(np.asarray(tokenizer.replace_mlp(vectors, neuron_tokens)), vectors)


def test_positional_encodings_tell_every_token_apart(dataset, key):
    config = field_config(dataset)
    tokenizer = sane.FieldTokenizer(dataset.param_map, config, lattice_size=4, patch_size=2)
    spec = tokenizer.spec
    levels, xy = spec.hash_positions()
    hash_keys = {(int(level), float(x), float(y)) for level, (x, y) in zip(levels, xy, strict=True)}
    assert len(hash_keys) == spec.num_hash_tokens
    assert set(np.unique(xy)) == {0.25, 0.75}
    np.testing.assert_array_equal(np.bincount(levels), [4] * config.grid.num_levels)
    layers, indices = spec.neuron_positions()
    assert len(set(zip(layers.tolist(), indices.tolist(), strict=True))) == spec.num_neuron_tokens
    np.testing.assert_array_equal(np.bincount(layers), spec.hidden_widths)

    module = sane.PositionalEncoding(spec, 16)
    encodings, _ = jax.jit(module.init_with_output)(key)
    encodings = np.asarray(encodings)
    assert encodings.shape == (spec.num_tokens, 16)
    distances = np.linalg.norm(encodings[:, None] - encodings[None], axis=-1)
    assert np.min(distances + np.eye(len(encodings)) * 1e9) > 1e-4


def test_group_views_keeps_complete_sources():
    vectors = np.arange(14, dtype=np.float32).reshape(7, 2)
    labels = np.array([0, 0, 1, 1, 2, 3, 3], np.int32)
    sources = ["a", "a", "b", "b", "c", "d", "d"]
    rotations = np.array([0, 1, 1, 0, 0, 0, 1], np.int32)
    groups = sane.group_views(vectors, labels, sources, rotations)
    assert groups.views.shape == (3, 2, 2) and groups.dropped == 1
    np.testing.assert_array_equal(groups.views[1], vectors[[3, 2]])  # source b, rotations 0 then 1
    np.testing.assert_array_equal(groups.rotations, [[0, 1]] * 3)
    np.testing.assert_array_equal(groups.labels, [0, 1, 3])
    plain = sane.group_views(vectors, labels, sources, None)
    assert plain.views.shape == (7, 1, 2) and np.all(plain.rotations == -1)


# ------------------------------------------------------------------------------------------------- probe


def test_linear_probe_separates_separable_data():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 6)) * 6.0
    train_labels, test_labels = rng.integers(0, 3, 90), rng.integers(0, 3, 45)
    train = centres[train_labels] + rng.normal(size=(90, 6))
    test = centres[test_labels] + rng.normal(size=(45, 6))
    train_labels[:5] = -1  # unknown labels are ignored
    result = sane.linear_probe(train, train_labels, test, test_labels, steps=300)
    assert result["accuracy"] == 1.0 and result["train_accuracy"] == 1.0
    assert result["num_classes"] == 3 and result["num_train"] == 85 and result["num_test"] == 45
    assert result["majority_baseline"] < 0.6
    # Random labels on the same features: a linear probe cannot do much better than chance on new rows.
    shuffled = sane.linear_probe(train, rng.integers(0, 3, 90), test, rng.integers(0, 3, 45), steps=300)
    assert shuffled["accuracy"] < 0.75
    single = sane.linear_probe(train, np.zeros(90, np.int64), test, test_labels)
    assert single["accuracy"] is None and "fewer than 2 classes" in single["note"]


# ------------------------------------------------------------------------------------------- task and CLI


def test_loss_with_rotated_views_and_rotation_head(dataset, key):
    config = sane.PRESETS["tiny"]
    config = dataclasses.replace(config, rotation_weight=0.5)
    task = sane.build_task(config, dataset.param_map, dataset.field_kind, dataset.field_config)
    vectors = dataset.matrix / np.float32(np.std(dataset.matrix))
    views = np.stack([vectors[:4], vectors[4:8]], axis=1)  # [4 sources, 2 views, P]
    batch = {"views": views, "rotations": np.tile(np.array([[0, 2]], np.int32), (4, 1))}
    params = jax.jit(task.init)(key, batch)
    loss, metrics = jax.jit(task.loss)(params, batch, key)
    assert loss.shape == () and loss.dtype == jnp.float32 and np.isfinite(float(loss))
    assert {"reconstruction", "hash_mse", "mlp_mse", "contrastive", "rotation", "rotation_accuracy"} <= set(metrics)
    assert 0.3 < float(metrics["rotation"]) < 4.0  # an untrained head: about log(4)
    # Unaugmented forward in padded chunks: latents, per-field errors, and fields with the decoded MLP.
    latents, hash_error, mlp_error, replaced = task.forward_all(params, vectors[:5], chunk=4)
    assert latents.shape == (5, config.latent_dim) and hash_error.shape == mlp_error.shape == (5,)
    assert np.all(np.isfinite(latents)) and np.all(hash_error > 0) and np.all(mlp_error > 0)
    layout = task.tokenizer.layout
    np.testing.assert_array_equal(layout.table(replaced), layout.table(vectors[:5]))
    assert replaced.shape == (5, vectors.shape[1]) and not np.allclose(replaced, vectors[:5])
    first, second = sane.pick_views(key, 64, 2, True)
    assert np.all(np.asarray(first) != np.asarray(second))


def read_history(workdir):
    with open(os.path.join(workdir, "history.jsonl")) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def test_cli_trains_writes_latents_and_probe_and_resumes(field_data, tmp_path, capsys):
    workdir = str(tmp_path / "run")
    argv = ["--data", field_data, "--workdir", workdir, "--preset", "tiny", "--quiet"]
    status, out, err = run_entry_point(sane.main, argv, capsys)
    assert status == 0, err
    history = read_history(workdir)
    steps = sane.PRESETS["tiny"].loop.steps
    assert max(row["step"] for row in history) == steps
    losses = [row["loss"] for row in history if "loss" in row]
    assert len(losses) >= 5 and all(np.isfinite(losses))
    assert losses[-1] < losses[0], losses
    assert np.isfinite(history[-1]["val_mlp_psnr"]) and history[-1]["val_mlp_psnr"] > 0

    table = pq.read_table(os.path.join(workdir, "latents"))
    assert table.num_rows == NUM_FIELDS
    latent_type = table.schema.field("latent").type
    assert latent_type.list_size == sane.PRESETS["tiny"].latent_dim and latent_type.value_type == pa.float32()
    latents = np.stack(table.column("latent").to_pylist())
    assert np.all(np.isfinite(latents)) and np.std(latents) > 0
    assert set(table.column("split").to_pylist()) == {"train", "val"}
    source = read_dataset(field_data)
    by_row = dict(zip(table.column("row").to_pylist(), table.column("source_id").to_pylist(), strict=True))
    assert all(by_row[row] == source.columns["source_id"][row] for row in range(NUM_FIELDS))
    # The latents are a latents/v1 dataset, as hypernets.autoencoder writes and reads them.
    stored, columns, metadata = read_latents(os.path.join(workdir, "latents"))
    np.testing.assert_array_equal(stored, latents)
    assert columns["row"] == table.column("row").to_pylist() and metadata["generator"]["model"] == "hypernets.sane"
    with open(os.path.join(workdir, "probe.json")) as handle:
        report = json.load(handle)
    assert report["step"] == steps and report["num_val"] == table.column("split").to_pylist().count("val")
    assert "accuracy" in report["class"] and "class_from_weights" in report and "rotation" not in report
    assert report["reconstruction"]["val_mlp_psnr"] > 0 and report["reconstruction"]["val_hash_mse"] >= 0

    # The same command again resumes from the finished checkpoint and trains no further.
    status, out, err = run_entry_point(sane.main, argv, capsys)
    assert status == 0, err
    assert "resum" in (out + err).lower()
    assert max(row["step"] for row in read_history(workdir)) == steps

    # A different training config in the same workdir is refused in one line.
    status, _, err = run_entry_point(sane.main, argv + ["--learning-rate", "0.5"], capsys)
    assert_one_line_error(status, err, "different config")


def test_cli_bad_input_is_one_line(field_data, tmp_path, capsys):
    status, _, err = run_entry_point(sane.main, ["--data", str(tmp_path / "missing"), "--workdir",
                                                 str(tmp_path / "w"), "--preset", "tiny"], capsys)
    assert_one_line_error(status, err, "missing")
    status, _, err = run_entry_point(sane.main, ["--data", field_data, "--workdir", str(tmp_path / "w2"),
                                                 "--preset", "huge"], capsys)
    assert_one_line_error(status, err, "unknown preset")
    status, _, err = run_entry_point(sane.main, ["--data", field_data, "--workdir", str(tmp_path / "w3"),
                                                 "--preset", "tiny", "--rotation-weight", "1"], capsys)
    assert_one_line_error(status, err, "rotated copies")


def test_rotated_copies_keep_sources_and_record_rotations(field_data, dataset, tmp_path):
    out = rotate_dataset_images(field_data, str(tmp_path / "rotated"), rotations=(1,), backend="jax")
    rotated = read_dataset(out)
    assert len(rotated) == 2 * NUM_FIELDS
    rotations = read_rotation_column(out)
    np.testing.assert_array_equal(np.bincount(rotations), [NUM_FIELDS, NUM_FIELDS])
    assert sorted(rotated.columns["source_id"]) == sorted(list(dataset.columns["source_id"]) * 2)
    np.testing.assert_array_equal(rotated.matrix[rotations == 0], dataset.matrix)
    # Rotated images are fitted as well as the originals (same config and steps; 20-step test fits are rough).
    psnr = np.asarray(rotated.columns["psnr"])
    assert np.all(np.isfinite(psnr)) and abs(np.mean(psnr[rotations == 1]) - np.mean(psnr[rotations == 0])) < 3.0
    assert read_rotation_column(field_data) is None
    # Training on them: both rotations of a source fall in one split and form one group of views.
    from hypernets.datasets import load_weight_splits

    train_data, val_data = load_weight_splits(out, 0.25, 0)
    train_rotations, val_rotations = sane.split_rotations(out, train_data, val_data)
    assert set(train_data.source_ids).isdisjoint(val_data.source_ids)
    groups = sane.group_views(train_data.vectors, train_data.labels, train_data.source_ids, train_rotations)
    assert groups.views.shape[:2] == (len(train_data) // 2, 2) and groups.dropped == 0
    np.testing.assert_array_equal(groups.rotations, [[0, 1]] * len(groups.views))
    config = dataclasses.replace(sane.PRESETS["tiny"], probe_steps=20)
    features = lambda data: data.vectors[:, :32]
    report = sane.probe_report(config, features(train_data), features(val_data), train_data, val_data,
                               train_rotations, val_rotations)
    assert report["rotation"]["num_classes"] == 2 and report["rotation"]["num_test"] == len(val_data)
