"""Weight-space diffusion: objectives and samplers on a 2D toy mixture, the weight chunker, the DiT,
and python -m hypernets.diffusion end to end on a tiny field dataset."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from fields import encode_dataset
from fields.field_datasets import read_dataset
from fields.weights import ParamEntry, section_slices
from hypernets import diffusion
from hypernets.models.dit import DiT, MLPDenoiser, WeightChunker
from hypernets.objectives import diffusion as objective_lib
from tests.helpers import assert_one_line_error, run_entry_point

MODES = np.array([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]], np.float32)
MODE_STD = 0.05


# ------------------------------------------------------------------------------ objectives and samplers


@pytest.mark.parametrize("schedule", objective_lib.SCHEDULES)
def test_schedules_decrease_from_one_to_near_zero(schedule):
    abar = objective_lib.alphas_cumprod(schedule, 200)
    assert abar.shape == (200,) and abar.dtype == np.float32
    assert np.all(np.diff(abar) < 0) and abar[0] > 0.99 and abar[-1] < 0.01 and abar[-1] > 0


@pytest.mark.parametrize("objective", objective_lib.OBJECTIVES)
def test_targets_convert_back_to_x0_and_noise(objective, key):
    abar = jnp.asarray(objective_lib.alphas_cumprod("cosine", 100))
    x0_key, noise_key = jax.random.split(key)
    x0 = jax.random.normal(x0_key, (6, 3, 2))
    noise = jax.random.normal(noise_key, (6, 3, 2))
    timesteps = jnp.array([0, 5, 20, 50, 80, 98], jnp.int32)
    x_t = objective_lib.add_noise(abar, x0, noise, timesteps)
    target = objective_lib.training_target(objective, abar, x0, noise, timesteps)
    x0_estimate, noise_estimate = objective_lib.predict_x0_and_noise(objective, abar, target, x_t, timesteps)
    np.testing.assert_allclose(x0_estimate, x0, atol=2e-3)
    np.testing.assert_allclose(noise_estimate, noise, atol=2e-3)


def test_sampling_timesteps_are_descending_and_end_at_zero():
    steps = objective_lib.sampling_timesteps(1000, 10)
    assert steps.dtype == np.int32 and len(steps) == 10 and steps[0] == 999 and steps[-1] == 0
    assert np.all(np.diff(steps) < 0)
    np.testing.assert_array_equal(objective_lib.sampling_timesteps(5, 50), [4, 3, 2, 1, 0])


def test_label_dropout_uses_the_null_class(key):
    labels = jnp.array([0, 1, 2, -1] * 250, jnp.int32)
    dropped = np.asarray(objective_lib.drop_labels(labels, key, num_classes=3, probability=0.25))
    assert np.all(dropped[3::4] == 3)  # unknown labels are always null
    known = dropped.reshape(-1, 4)[:, :3]
    fraction = np.mean(known == 3)
    assert 0.18 < fraction < 0.32
    np.testing.assert_array_equal(known[known != 3], np.asarray(labels).reshape(-1, 4)[:, :3][known != 3])


def mixture_batch(key, batch):
    """``batch`` points of the 4-Gaussian mixture and their mode index."""
    mode_key, noise_key = jax.random.split(key)
    modes = jax.random.randint(mode_key, (batch,), 0, 4, dtype=jnp.int32)
    points = jnp.asarray(MODES)[modes] + MODE_STD * jax.random.normal(noise_key, (batch, 2))
    return points, modes


def train_toy(objective, num_classes=0, steps=1000, num_timesteps=100, seed=0):
    """Trains an MLP denoiser on the mixture with plain Adam; returns ``(denoise, abar)``."""
    model = MLPDenoiser(dim=2, width=64, depth=2, num_classes=num_classes)
    abar = jnp.asarray(objective_lib.alphas_cumprod("cosine", num_timesteps))
    key = jax.random.PRNGKey(seed)
    labels = jnp.zeros((4,), jnp.int32) if num_classes else None
    params = model.init(key, jnp.zeros((4, 2)), jnp.zeros((4,), jnp.int32), labels)["params"]
    optimizer = optax.adam(optax.cosine_decay_schedule(3e-3, steps, alpha=0.05))

    def loss_fn(params, step_key):
        data_key, loss_key = jax.random.split(step_key)
        points, modes = mixture_batch(data_key, 256)
        denoise = lambda x, t, y: model.apply({"params": params}, x, t, y)
        return objective_lib.diffusion_loss(denoise, points, loss_key, abar, objective,
                                            labels=modes if num_classes else None, num_classes=num_classes,
                                            label_dropout=0.2)[0]

    @jax.jit
    def train_all(params, key):
        def step(carry, step_key):
            params, opt_state = carry
            loss, grads = jax.value_and_grad(loss_fn)(params, step_key)
            with jax.numpy_dtype_promotion("standard"):  # optax mixes Python floats and int32 counts
                updates, opt_state = optimizer.update(grads, opt_state, params)
                params = optax.apply_updates(params, updates)
            return (params, opt_state), loss

        (params, _), losses = jax.lax.scan(step, (params, optimizer.init(params)), jax.random.split(key, steps))
        return params, losses

    params, losses = train_all(params, jax.random.fold_in(key, 1))
    assert np.all(np.isfinite(np.asarray(losses)))
    return (lambda x, t, y: model.apply({"params": params}, x, t, y)), abar


def assert_covers_modes(points, name):
    points = np.asarray(points)
    distances = np.linalg.norm(points[:, None, :] - MODES[None], axis=-1)
    nearest = np.argmin(distances, axis=1)
    close = np.min(distances, axis=1) < 0.3
    shares = np.bincount(nearest, minlength=4) / len(points)
    assert np.mean(close) >= 0.9, f"{name}: only {np.mean(close):.2%} within 0.3 of a mode"
    assert np.all((shares >= 0.10) & (shares <= 0.40)), f"{name}: mode shares {shares}"


# Epsilon + deterministic DDIM on the cosine schedule needs x0 clipping (see objectives.diffusion.sample);
# without it, the first step's 1/sqrt(abar) amplification of the model error unbalances the modes.
@pytest.mark.parametrize(("objective", "ddim_clip"), [("epsilon", 2.0), ("v", None), ("x0", None)])
def test_toy_mixture_ddpm_and_ddim_cover_every_mode(objective, ddim_clip):
    denoise, abar = train_toy(objective)
    key = jax.random.PRNGKey(7)
    ddpm = objective_lib.sample(denoise, key, (1000, 2), abar, objective, sampler="ddpm", num_steps=50)
    assert_covers_modes(ddpm, f"{objective} ddpm")
    ddim = objective_lib.sample(denoise, key, (1000, 2), abar, objective, sampler="ddim", num_steps=20,
                                clip_x0=ddim_clip)
    assert_covers_modes(ddim, f"{objective} ddim")


def test_toy_mixture_guidance_picks_the_asked_mode():
    denoise, abar = train_toy("v", num_classes=4, seed=3)
    key = jax.random.PRNGKey(11)
    labels = jnp.arange(400, dtype=jnp.int32) % 4
    guided = objective_lib.sample(denoise, key, (400, 2), abar, "v", sampler="ddim", num_steps=20, labels=labels,
                                  guidance_scale=2.0, null_class=4)
    distances = np.linalg.norm(np.asarray(guided)[:, None, :] - MODES[None], axis=-1)
    assert np.mean(np.argmin(distances, axis=1) == np.asarray(labels)) > 0.95
    assert np.mean(np.min(distances, axis=1) < 0.3) > 0.9
    unconditional = objective_lib.sample(denoise, key, (1000, 2), abar, "v", sampler="ddim", num_steps=20)
    assert_covers_modes(unconditional, "null-class sampling")


# ------------------------------------------------------------------------------------------- chunker


def interleaved_param_map():
    """Sections interleaved in the vector: hash [0, 5), mlp [5, 12), hash [12, 18)."""
    return [ParamEntry("a", (5,), 0, 5, "hash"), ParamEntry("b", (7,), 5, 7, "mlp"),
            ParamEntry("c", (2, 3), 12, 6, "hash")]


def test_chunker_round_trip_sections_and_padding():
    chunker = WeightChunker(interleaved_param_map(), chunk_size=4)
    assert chunker.num_tokens == 5 and chunker.section_names == ["hash", "mlp"]
    np.testing.assert_array_equal(chunker.section_ids, [0, 0, 0, 1, 1])
    vectors = np.arange(1, 3 * 18 + 1, dtype=np.float32).reshape(3, 18)
    tokens = chunker.to_tokens(vectors)
    assert tokens.shape == (3, 5, 4) and isinstance(tokens, np.ndarray)
    # Token contents: each section chunked on its own, tail chunks padded with zeros.
    np.testing.assert_array_equal(tokens[0, 0], [1, 2, 3, 4])
    np.testing.assert_array_equal(tokens[0, 1], [5, 13, 14, 15])
    np.testing.assert_array_equal(tokens[0, 2], [16, 17, 18, 0])
    np.testing.assert_array_equal(tokens[0, 3], [6, 7, 8, 9])
    np.testing.assert_array_equal(tokens[0, 4], [10, 11, 12, 0])
    np.testing.assert_array_equal(chunker.mask, [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1],
                                                 [1, 1, 1, 0]])
    np.testing.assert_array_equal(chunker.from_tokens(tokens), vectors)
    random = np.random.default_rng(0).normal(size=(2, 18)).astype(np.float32)
    on_device = chunker.to_tokens(jnp.asarray(random))
    assert isinstance(on_device, jax.Array)
    np.testing.assert_array_equal(np.asarray(chunker.from_tokens(on_device)), random)
    # Changing a padding slot changes nothing in the vector.
    padded = np.array(tokens)
    padded[:, 2, 3] = 99.0
    np.testing.assert_array_equal(chunker.from_tokens(padded), vectors)


def test_chunker_on_a_real_field_respects_section_boundaries(field_data):
    dataset = read_dataset(field_data)
    chunker = WeightChunker(dataset.param_map, chunk_size=16)
    hash_size = sum(entry.size for entry in dataset.param_map if entry.section == "hash")
    mlp_size = sum(entry.size for entry in dataset.param_map if entry.section == "mlp")
    assert chunker.num_tokens == -(-hash_size // 16) + -(-mlp_size // 16)
    owner = np.empty(chunker.num_params, np.int32)
    for entry in dataset.param_map:
        owner[entry.offset : entry.offset + entry.size] = chunker.section_names.index(entry.section)
    positions = chunker.to_tokens(np.arange(chunker.num_params, dtype=np.float64)[None] + 1)[0]
    for token, section in zip(positions, chunker.section_ids, strict=True):
        real = token[token > 0].astype(np.int64) - 1
        assert len(real) > 0 and np.all(owner[real] == section)
    np.testing.assert_array_equal(chunker.from_tokens(chunker.to_tokens(dataset.matrix)), dataset.matrix)


# ------------------------------------------------------------------------------------------------ DiT


def test_dit_shapes_and_zero_initial_output(key):
    model = DiT(num_tokens=5, chunk_size=4, section_ids=(0, 0, 0, 1, 1), width=32, depth=2, num_heads=4,
                mlp_ratio=2.0, num_classes=3)
    tokens = jax.random.normal(key, (2, 5, 4))
    timesteps = jnp.array([3, 40], jnp.int32)
    labels = jnp.array([0, 3], jnp.int32)
    params = jax.jit(model.init)(key, tokens, timesteps, labels)["params"]
    apply = jax.jit(lambda params, labels: model.apply({"params": params}, tokens, timesteps, labels))
    output = apply(params, labels)
    assert output.shape == (2, 5, 4) and output.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(output), 0.0)
    np.testing.assert_array_equal(np.asarray(apply(params, None)), 0.0)
    # The zero-initialised output layer still gets a gradient, so the model can learn.
    target = jax.random.normal(jax.random.fold_in(key, 1), (2, 5, 4))
    grads = jax.jit(jax.grad(lambda p: jnp.sum(apply(p, labels) * target)))(params)
    assert float(jnp.max(jnp.abs(grads["output"]["kernel"]))) > 0
    # After a perturbation of the output layer, the output depends on the tokens and the condition.
    perturbed = jax.tree_util.tree_map(lambda leaf: leaf, params)
    perturbed["output"] = {"kernel": grads["output"]["kernel"], "bias": params["output"]["bias"]}
    for block in ("block_0", "block_1"):
        perturbed[block]["adaln"]["kernel"] = 0.1 * jax.random.normal(key, params[block]["adaln"]["kernel"].shape)
    first = apply(perturbed, labels)
    other_label = apply(perturbed, jnp.array([1, 3], jnp.int32))
    assert float(jnp.max(jnp.abs(first))) > 0
    assert float(jnp.max(jnp.abs(first[0] - other_label[0]))) > 0
    np.testing.assert_allclose(np.asarray(first[1]), np.asarray(other_label[1]), atol=1e-6)


# ------------------------------------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def field_data(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("fields") / "primitives")
    status = encode_dataset.main(["--source", "procedural:primitives", "--num", "8", "--size", "8x8", "--steps",
                                  "10", "--backend", "jax", "--quiet", "--out", out])
    assert status in (0, None)
    return out


def run_diffusion(argv, capsys):
    return run_entry_point(diffusion.main, argv, capsys)


def read_history(workdir):
    path = os.path.join(workdir, "history.jsonl")
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def test_cli_trains_samples_resumes_and_refuses_a_changed_config(field_data, tmp_path, capsys):
    workdir = str(tmp_path / "run")
    argv = ["--data", field_data, "--workdir", workdir, "--preset", "tiny", "--quiet"]
    status, out, err = run_diffusion(argv, capsys)
    assert status == 0, err
    source = read_dataset(field_data)
    samples = read_dataset(os.path.join(workdir, "samples"))
    assert len(samples) == diffusion.PRESETS["tiny"].num_samples
    assert samples.param_map == source.param_map
    assert samples.field_kind == source.field_kind and samples.field_config == source.field_config
    for key in ("image_height", "image_width"):
        assert samples.metadata[key] == source.metadata[key]
    assert np.all(np.isfinite(samples.matrix)) and np.std(samples.matrix) > 0
    assert samples.columns["source_id"] == [f"sample-{index:06d}" for index in range(len(samples))]
    np.testing.assert_array_equal(samples.columns["label"], -1)
    # Denormalised: each section on the scale of its raw weights (the hash section's is far from 1).
    for section, indices in section_slices(source.param_map).items():
        ratio = np.std(samples.matrix[:, indices]) / np.std(source.matrix[:, indices])
        assert 0.1 < ratio < 10.0, f"{section}: sample std / data std = {ratio}"
    from hypernets.rendering import image_grid

    expected = image_grid(np.zeros((len(samples), 8, 8, 3)), columns=2).shape  # 4 renders of 8x8, 2 per row
    with Image.open(os.path.join(workdir, "samples.png")) as grid:
        assert grid.size == (expected[1], expected[0])
    history = read_history(workdir)
    assert max(row["step"] for row in history) == diffusion.PRESETS["tiny"].loop.steps
    assert np.isfinite(history[-1]["val_loss"])  # the held-out loss at the last step

    # The same command again: resumes from the finished checkpoint and trains no further.
    status, out, err = run_diffusion(argv, capsys)
    assert status == 0, err
    assert f"resuming from step {diffusion.PRESETS['tiny'].loop.steps}" in out
    assert max(row["step"] for row in read_history(workdir)) == diffusion.PRESETS["tiny"].loop.steps

    # Sampling options may change; sample-only uses the saved run.
    status, out, err = run_diffusion(["--data", field_data, "--workdir", workdir, "--sample-only", "--num-samples",
                                      "3", "--sampler", "ddpm", "--sample-steps", "4", "--quiet"], capsys)
    assert status == 0, err
    resampled = read_dataset(os.path.join(workdir, "samples"))
    assert len(resampled) == 3 and np.all(np.isfinite(resampled.matrix))
    assert resampled.metadata["generator"]["sampler"] == "ddpm"
    # --samples-out: another folder (a guidance sweep of one model); W/samples stays as it was.
    other = os.path.join(str(tmp_path), "sweep", "samples_g2")
    status, out, err = run_diffusion(["--data", field_data, "--workdir", workdir, "--sample-only", "--num-samples",
                                      "2", "--guidance-scale", "2", "--samples-out", other, "--quiet"], capsys)
    assert status == 0, err
    swept = read_dataset(other)
    assert len(swept) == 2 and swept.metadata["generator"]["guidance_scale"] == 2.0
    assert os.path.getsize(other + ".png") > 0
    assert len(read_dataset(os.path.join(workdir, "samples"))) == 3
    # --sample-seed: the default is the training seed + 1; another seed draws other samples.
    default_seed = diffusion.PRESETS["tiny"].loop.seed + 1
    assert swept.metadata["generator"]["sample_seed"] == default_seed
    for seed, same in ((default_seed, True), (default_seed + 4, False)):
        reseeded_path = os.path.join(str(tmp_path), "sweep", f"samples_seed{seed}")
        status, out, err = run_diffusion(["--data", field_data, "--workdir", workdir, "--sample-only", "--num-samples",
                                          "2", "--guidance-scale", "2", "--sample-seed", str(seed), "--samples-out",
                                          reseeded_path, "--quiet"], capsys)
        assert status == 0, err
        reseeded = read_dataset(reseeded_path)
        assert reseeded.metadata["generator"]["sample_seed"] == seed
        assert np.array_equal(reseeded.matrix, swept.matrix) == same

    # A different training config in the same workdir is refused in one line.
    status, out, err = run_diffusion(argv + ["--learning-rate", "0.5"], capsys)
    assert_one_line_error(status, err, "different config")

    # --extend: the saved run goes on to a larger --steps (more steps alone are a different config).
    steps = diffusion.PRESETS["tiny"].loop.steps
    status, out, err = run_diffusion(argv + ["--steps", str(steps + 2)], capsys)
    assert_one_line_error(status, err, "different config")
    status, out, err = run_diffusion(argv + ["--extend"], capsys)
    assert_one_line_error(status, err, f"--extend: give --steps above the saved run's {steps}")
    status, out, err = run_diffusion(argv + ["--extend", "--steps", str(steps + 2)], capsys)
    assert status == 0, err
    assert f"resuming from step {steps}" in out
    assert max(row["step"] for row in read_history(workdir)) == steps + 2
    status, out, err = run_diffusion(["--data", field_data, "--workdir", os.path.join(str(tmp_path), "new"),
                                      "--preset", "tiny", "--extend", "--steps", "9"], capsys)
    assert_one_line_error(status, err, "holds no saved run to extend")

    # A saved config without a checkpoint has nothing to sample from.
    shutil.rmtree(os.path.join(workdir, "checkpoints"))
    status, out, err = run_diffusion(["--data", field_data, "--workdir", workdir, "--sample-only"], capsys)
    assert_one_line_error(status, err, "no trained run (no checkpoint yet")


def test_cli_class_conditional_writes_round_robin_labels(field_data, tmp_path, capsys):
    workdir = str(tmp_path / "conditional")
    status, out, err = run_diffusion(["--data", field_data, "--workdir", workdir, "--preset", "tiny",
                                      "--class-conditional", "--guidance-scale", "2", "--num-samples", "10",
                                      "--quiet"], capsys)
    assert status == 0, err
    num_classes = int(np.max(read_dataset(field_data).columns["label"])) + 1  # labels of both splits
    samples = read_dataset(os.path.join(workdir, "samples"))
    assert num_classes < 10  # so the labels wrap around
    np.testing.assert_array_equal(samples.columns["label"], np.arange(10) % num_classes)
    assert np.all(np.isfinite(samples.matrix))
    assert samples.metadata["generator"]["guidance_scale"] == 2.0


def test_cli_bad_input_is_one_line(field_data, tmp_path, capsys):
    status, _, err = run_diffusion(["--data", str(tmp_path / "missing"), "--workdir", str(tmp_path / "w"),
                                    "--preset", "tiny"], capsys)
    assert_one_line_error(status, err, "missing")
    status, _, err = run_diffusion(["--data", field_data, "--workdir", str(tmp_path / "w2"), "--sample-only"],
                                   capsys)
    assert_one_line_error(status, err, "no trained run")
    status, _, err = run_diffusion(["--data", field_data, "--workdir", str(tmp_path / "w3"), "--preset", "huge"],
                                   capsys)
    assert_one_line_error(status, err, "unknown preset")
