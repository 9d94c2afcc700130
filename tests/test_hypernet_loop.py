"""The shared hypernetwork training loop and its data: splits, normalisation, batches, resume, errors."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fields import encode_dataset
from fields.checkpoint import Checkpointer
from fields.cli import ArgumentParser, UserError, run_main
from fields.config import check_run_config
from fields.field_datasets import read_dataset, write_shard
from fields.weights import NormalizationStats, section_slices
from hypernets.datasets import BatchStream, load_token_splits, load_weight_splits, split_by_source
from hypernets.loop import (
    LoopConfig,
    NonFiniteLoss,
    add_loop_arguments,
    loop_overrides,
    train,
)
from hypernets.runs import read_saved_run, write_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIM = 4


# ------------------------------------------------------------------------------------ toy task


@dataclasses.dataclass(frozen=True)
class LinearTask:
    """Linear regression ``y ~ x @ w + b`` with a little key-dependent noise (so the keys matter)."""

    noise: float = 0.01

    def init(self, key, batch):
        return {"w": jnp.zeros((batch["x"].shape[-1],), jnp.float32), "b": jnp.zeros((), jnp.float32)}

    def loss(self, params, batch, key):
        noise = jnp.float32(self.noise) * jax.random.normal(key, batch["y"].shape, jnp.float32)
        error = batch["x"] @ params["w"] + params["b"] - batch["y"] + noise
        return jnp.mean(jnp.square(error)), {"mae": jnp.mean(jnp.abs(error))}


@dataclasses.dataclass(frozen=True)
class NanTask(LinearTask):
    """``LinearTask`` whose loss is NaN on batches holding a row flagged in ``batch["bad"]``."""

    def loss(self, params, batch, key):
        loss, metrics = super().loss(params, batch, key)
        return jnp.where(jnp.sum(batch["bad"]) > jnp.float32(0), jnp.float32(jnp.nan), loss), metrics


def regression_arrays(rows: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, DIM)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5, 3.0], np.float32) + np.float32(0.5)).astype(np.float32)
    return {"x": x, "y": y}


def small_config(**changes) -> LoopConfig:
    base = LoopConfig(steps=10, batch_size=8, learning_rate=0.05, warmup_steps=2, ema_decay=0.9, log_every=1,
                      checkpoint_every=5, num_devices=1)
    return dataclasses.replace(base, **changes)


def leaves(tree) -> list[np.ndarray]:
    return [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(tree)]


def read_history(workdir) -> list[dict]:
    with open(os.path.join(workdir, "history.jsonl")) as handle:
        return [json.loads(line) for line in handle]


def latest_checkpoint(workdir) -> int | None:
    checkpoints = Checkpointer(os.path.join(str(workdir), "checkpoints"))
    try:
        return checkpoints.latest_step()
    finally:
        checkpoints.close()


# ------------------------------------------------------------------------------------ training


def test_training_reduces_the_loss_and_logs_history(tmp_path):
    config = small_config(steps=60, batch_size=16, learning_rate=0.1, log_every=10, checkpoint_every=60)
    result = train(LinearTask(), BatchStream(regression_arrays(), 16, seed=1), config, str(tmp_path), progress=False)
    assert result.step == 60
    assert [row["step"] for row in result.history] == [10, 20, 30, 40, 50, 60]
    assert read_history(tmp_path) == result.history
    first, last = result.history[0], result.history[-1]
    assert last["loss"] < 0.05 * first["loss"], result.history
    assert {"mae", "grad_norm", "learning_rate", "seconds"} <= set(last)
    assert np.allclose(np.asarray(result.params["w"]), [1.0, -2.0, 0.5, 3.0], atol=0.2)
    # The EMA trails the parameters but has followed them.
    assert not np.array_equal(np.asarray(result.ema_params["w"]), np.asarray(result.params["w"]))
    assert np.allclose(np.asarray(result.ema_params["w"]), np.asarray(result.params["w"]), atol=0.3)
    assert latest_checkpoint(tmp_path) == 60


def test_ema_decay_zero_keeps_ema_equal_to_params(tmp_path):
    config = small_config(steps=3, ema_decay=0.0)
    result = train(LinearTask(), BatchStream(regression_arrays(), 8), config, str(tmp_path), progress=False)
    for ema, params in zip(leaves(result.ema_params), leaves(result.params), strict=True):
        np.testing.assert_array_equal(ema, params)


def test_data_parallel_over_two_devices_matches_one(tmp_path):
    assert jax.local_device_count() >= 2, "tests/conftest.py should provide 2 fake CPU devices"
    results = {}
    for devices in (1, 2):
        config = small_config(steps=4, num_devices=devices, checkpoint_every=4)
        stream = BatchStream(regression_arrays(), 8, seed=3)
        results[devices] = train(LinearTask(), stream, config, str(tmp_path / f"d{devices}"), progress=False)
    assert len(results[2].params["w"].sharding.device_set) == 2
    for one, two in zip(leaves(results[1].params), leaves(results[2].params), strict=True):
        np.testing.assert_allclose(one, two, atol=1e-5)
    losses = [[row["loss"] for row in results[d].history] for d in (1, 2)]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
    # A checkpoint written on 2 devices resumes on 1.
    workdir = str(tmp_path / "switch")
    config = small_config(steps=4, num_devices=2, checkpoint_every=4)
    train(LinearTask(), BatchStream(regression_arrays(), 8, seed=3), config, workdir, progress=False, stop_at_step=2)
    config = dataclasses.replace(config, num_devices=1)
    switched = train(LinearTask(), BatchStream(regression_arrays(), 8, seed=3), config, workdir, progress=False)
    assert switched.step == 4 and len(switched.params["w"].sharding.device_set) == 1
    for one, other in zip(leaves(results[1].params), leaves(switched.params), strict=True):
        np.testing.assert_allclose(one, other, atol=1e-5)


def test_resume_matches_an_uninterrupted_run(tmp_path, capsys):
    config = small_config()
    whole = train(LinearTask(), BatchStream(regression_arrays(), 8, seed=5), config, str(tmp_path / "a"),
                  progress=False)
    part = train(LinearTask(), BatchStream(regression_arrays(), 8, seed=5), config, str(tmp_path / "b"),
                 progress=False, stop_at_step=5)
    assert part.step == 5
    capsys.readouterr()
    resumed = train(LinearTask(), BatchStream(regression_arrays(), 8, seed=5), config, str(tmp_path / "b"),
                    progress=False)
    assert "resuming from step 5" in capsys.readouterr().out
    assert resumed.step == 10
    for a, b in zip(leaves((whole.params, whole.ema_params)), leaves((resumed.params, resumed.ema_params)),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert [row["step"] for row in read_history(tmp_path / "b")] == list(range(1, 11))
    np.testing.assert_allclose([row["loss"] for row in read_history(tmp_path / "a")],
                               [row["loss"] for row in read_history(tmp_path / "b")], rtol=1e-6)
    # A finished run reruns as a no-op that returns the final state.
    again = train(LinearTask(), BatchStream(regression_arrays(), 8, seed=5), config, str(tmp_path / "b"),
                  progress=False)
    assert again.step == 10 and len(again.history) == 10
    np.testing.assert_array_equal(np.asarray(again.params["w"]), np.asarray(resumed.params["w"]))


@pytest.mark.parametrize("rows,batch_size,shuffle", [(10, 4, True), (3, 8, True), (6, 3, False)])
def test_batch_stream_restores_exactly(rows, batch_size, shuffle):
    arrays = {"x": np.arange(rows * 2, dtype=np.float32).reshape(rows, 2), "label": np.arange(rows)}
    whole = BatchStream(arrays, batch_size, seed=7, shuffle=shuffle)
    expected = [whole.next() for _ in range(10)]
    first = BatchStream(arrays, batch_size, seed=7, shuffle=shuffle)
    got = [first.next() for _ in range(5)]
    state = json.loads(json.dumps(first.state()))
    second = BatchStream(arrays, batch_size, seed=7, shuffle=shuffle)
    second.restore(state)
    got += [second.next() for _ in range(5)]
    for want, have in zip(expected, got, strict=True):
        assert want.keys() == have.keys() == {"x", "label", "index"}
        assert have["index"].dtype == np.int64 and have["index"].shape == (batch_size,)
        np.testing.assert_array_equal(want["index"], have["index"])
        np.testing.assert_array_equal(have["x"], arrays["x"][have["index"]])
    indices = np.stack([batch["index"] for batch in expected])
    if rows >= batch_size:  # within an epoch no row repeats, and the tail that does not fill a batch is dropped
        per_epoch = rows // batch_size
        epoch_rows = indices[:per_epoch].reshape(-1)
        assert len(set(epoch_rows.tolist())) == per_epoch * batch_size
    else:  # fewer rows than a batch: every batch is full and holds every row
        assert all(set(batch.tolist()) == set(range(rows)) for batch in indices)
    if shuffle:
        other = BatchStream(arrays, batch_size, seed=8)
        assert not all(np.array_equal(other.next()["index"], want["index"]) for want in expected[:3])
    else:
        np.testing.assert_array_equal(indices[:2].reshape(-1), np.arange(6))
    with pytest.raises(UserError, match="num_rows"):
        BatchStream({"x": np.zeros((rows + 1, 2))}, batch_size, seed=7).restore(state)


def test_killed_run_resumes_to_completion(tmp_path, capsys):
    workdir = str(tmp_path / "run")
    steps = 400
    script = (
        "from tests.test_hypernet_loop import LinearTask, BatchStream, regression_arrays, small_config, train\n"
        f"config = small_config(steps={steps}, log_every=10, checkpoint_every=20)\n"
        f"train(LinearTask(), BatchStream(regression_arrays(), 8, seed=2), config, {workdir!r}, progress=False)\n"
    )
    log_path = tmp_path / "stderr.txt"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.DEVNULL, stderr=log,
                                   start_new_session=True)
    checkpoint_dir = os.path.join(workdir, "checkpoints")
    deadline = time.time() + 120
    try:
        while time.time() < deadline and process.poll() is None:
            if os.path.isdir(checkpoint_dir) and any(name.isdigit() for name in os.listdir(checkpoint_dir)):
                break
            time.sleep(0.02)
        assert process.poll() is None, log_path.read_text()[-2000:]
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    config = small_config(steps=steps, log_every=10, checkpoint_every=20)
    capsys.readouterr()
    result = train(LinearTask(), BatchStream(regression_arrays(), 8, seed=2), config, workdir, progress=False)
    out = capsys.readouterr().out
    resumed_from = int(out.split("resuming from step ")[1].split()[0])
    assert 20 <= resumed_from < steps
    assert result.step == steps
    history_steps = [row["step"] for row in read_history(workdir)]
    assert history_steps == list(range(10, steps + 1, 10))


def test_non_finite_loss_names_the_step_and_keeps_the_checkpoint(tmp_path, capsys):
    arrays = regression_arrays(16)
    reference = BatchStream(arrays, 4, seed=4)
    third_rows = [reference.next()["index"] for _ in range(3)][2]
    arrays["bad"] = np.isin(np.arange(16), third_rows).astype(np.float32)
    config = small_config(steps=6, batch_size=4, checkpoint_every=2)
    workdir = str(tmp_path)
    with pytest.raises(NonFiniteLoss) as error:
        train(NanTask(), BatchStream(arrays, 4, seed=4), config, workdir, progress=False)
    message = str(error.value)
    assert "loss became nan at step 3 " in message and str(third_rows.tolist()) in message
    assert "checkpoint at step 2 is kept" in message and "\n" not in message
    assert latest_checkpoint(workdir) == 2
    assert [row["step"] for row in read_history(workdir)] == [1, 2]
    capsys.readouterr()
    result = train(LinearTask(), BatchStream(arrays, 4, seed=4), config, workdir, progress=False)
    assert "resuming from step 2" in capsys.readouterr().out
    assert result.step == 6 and [row["step"] for row in read_history(workdir)] == list(range(1, 7))


def test_evaluate_runs_every_eval_every_steps_and_at_the_end(tmp_path):
    calls = []

    def evaluate(ema_params, step):
        calls.append(step)
        return {"val_loss": float(jnp.sum(ema_params["w"])), "loss": 1.0}

    config = small_config(steps=5, eval_every=2, log_every=5)
    result = train(LinearTask(), BatchStream(regression_arrays(), 8), config, str(tmp_path), evaluate, progress=False)
    assert calls == [2, 4, 5]
    rows = {row["step"]: row for row in result.history}
    assert sorted(rows) == [2, 4, 5] and "val_loss" in rows[2] and "loss" not in rows[2] and "eval_loss" in rows[2]
    assert rows[5]["eval_loss"] == 1.0 and rows[5]["loss"] != 1.0
    assert result.evaluation["val_loss"] == rows[5]["val_loss"]


# ------------------------------------------------------------------------------------- errors


def test_loop_errors_are_one_line(tmp_path):
    arrays = regression_arrays()
    with pytest.raises(UserError, match="not divisible by the 2 devices") as error:
        train(LinearTask(), BatchStream(arrays, 3), small_config(batch_size=3, num_devices=0), str(tmp_path))
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match="only 2 are visible"):
        train(LinearTask(), BatchStream(arrays, 8), small_config(num_devices=5), str(tmp_path))
    with pytest.raises(ValueError, match="steps"):
        LoopConfig(steps=0)
    with pytest.raises(ValueError, match="wandb"):
        LoopConfig(wandb="sometimes")


def test_wandb_missing_is_a_user_error_and_runs_log_when_present(tmp_path, monkeypatch):
    config = small_config(steps=2, wandb="offline", log_every=1)
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(UserError, match="pip install"):
        train(LinearTask(), BatchStream(regression_arrays(), 8), config, str(tmp_path / "missing"), progress=False)

    logged, started = [], {}

    class FakeRun:
        def log(self, values, step):
            logged.append((step, values))

        def finish(self):
            started["finished"] = True

    def init(**kwargs):
        started.update(kwargs)
        return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    train(LinearTask(), BatchStream(regression_arrays(), 8), config, str(tmp_path / "run"), progress=False,
          run_config={"model": "toy"})
    assert started["mode"] == "offline" and started["dir"] == str(tmp_path / "run")
    assert started["config"] == {"model": "toy"} and started["finished"]
    assert [step for step, _ in logged] == [1, 2] and "loss" in logged[0][1]


def test_loop_arguments_and_run_config(tmp_path):
    parser = ArgumentParser()
    add_loop_arguments(parser)
    args = parser.parse_args(["--steps", "7", "--wandb", "offline", "--num-devices", "1"])
    overrides = loop_overrides(args)
    assert overrides == {"steps": 7, "wandb": "offline", "num_devices": 1}
    assert dataclasses.replace(LoopConfig(), **overrides).steps == 7
    # hypernets.runs: the run record is written once, the same run is accepted again, another refused.
    workdir = str(tmp_path)
    assert read_saved_run(workdir, "loop", "toy") is None
    write_run(workdir, {"loop": {"steps": 7}})
    saved = read_saved_run(workdir, "loop", "toy")
    assert saved == {"loop": {"steps": 7}} and os.listdir(workdir) == ["config.json"]  # no temporary file left
    check_run_config(workdir, saved, {"loop": {"steps": 7}})
    with pytest.raises(UserError, match=r"holds a run with a different config \(loop.steps: 7 there, 8 now\); use"):
        check_run_config(workdir, saved, {"loop": {"steps": 8}})
    check_run_config(workdir, saved, {"loop": {"steps": 8}}, free_fields=["loop.steps"])
    with pytest.raises(UserError, match="is not a toy run config"):
        read_saved_run(workdir, "diffusion", "toy")


# --------------------------------------------------------------------------------------- data


def test_split_by_source_is_stable_and_disjoint():
    ids = [f"image-{row // 3}" for row in range(300)]
    mask = split_by_source(ids, 0.2, seed=0)
    held_out = {ids[row] for row in np.flatnonzero(mask)}
    kept = {ids[row] for row in np.flatnonzero(~mask)}
    assert held_out and kept and not held_out & kept
    assert 0.1 < len(held_out) / 100 < 0.3
    np.testing.assert_array_equal(split_by_source(ids, 0.2, seed=0), mask)
    np.testing.assert_array_equal(split_by_source(ids[:150], 0.2, seed=0), mask[:150])  # more rows move nothing
    assert not np.array_equal(split_by_source(ids, 0.2, seed=1), mask)
    for fraction in (0.0, 0.99):
        two = split_by_source(["a", "b"], fraction, seed=0)
        assert two.sum() == 1
    assert split_by_source(["same"] * 4, 0.5, seed=0).sum() in (1, 2, 3)
    assert split_by_source(["", ""], 0.5, seed=0).sum() == 1
    assert not split_by_source(["only"], 0.5, seed=0).any()
    with pytest.raises(UserError, match="validation fraction"):
        split_by_source(ids, 1.0, seed=0)


@pytest.fixture(scope="module")
def field_dataset(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("fields") / "primitives")
    with pytest.raises(SystemExit) as status:
        run_main(encode_dataset.main, ["--source", "procedural:primitives", "--num", "8", "--size", "8x8",
                                       "--steps", "10", "--backend", "jax", "--quiet", "--out", out])
    assert status.value.code == 0
    return out


def test_load_weight_splits_normalises_with_train_statistics(field_dataset):
    train_split, validation = load_weight_splits(field_dataset, val_fraction=0.25, seed=0)
    raw = read_dataset(field_dataset)
    assert len(train_split) + len(validation) == len(raw) == 8 and len(train_split) and len(validation)
    assert not set(train_split.source_ids) & set(validation.source_ids)
    assert train_split.vectors.dtype == np.float32 and train_split.vectors.shape[1] == raw.matrix.shape[1]
    assert train_split.labels.dtype == np.int32 and train_split.mode == "section"
    assert train_split.field_kind == raw.field_kind and train_split.metadata["image_height"] == 8
    assert train_split.normalization is validation.normalization
    for section, columns in section_slices(train_split.param_map).items():
        values = train_split.vectors[:, columns]
        assert abs(values.mean()) < 1e-4, section
        assert abs(values.std() - 1.0) < 1e-3, section
    for split in (train_split, validation):
        np.testing.assert_allclose(split.denormalize(split.vectors), raw.matrix[split.rows], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(split.normalize(split.denormalize(split.vectors)), split.vectors, atol=1e-4)
    tensor_train, _ = load_weight_splits(field_dataset, val_fraction=0.25, seed=0, mode="tensor")
    np.testing.assert_array_equal(tensor_train.rows, train_split.rows)
    with pytest.raises(UserError, match="unknown normalisation mode"):
        load_weight_splits(field_dataset, mode="global")


def test_load_weight_splits_uses_stored_statistics(field_dataset, tmp_path):
    raw = read_dataset(field_dataset)
    stored = NormalizationStats.from_matrix(raw.matrix * np.float32(2.0), raw.param_map)
    path = str(tmp_path / "stored.parquet")
    write_shard(path, raw.matrix, raw.columns, raw.field_kind, raw.field_config, raw.param_map,
                extra_schema_metadata=raw.metadata, normalization=stored)
    train_split, _ = load_weight_splits(path, val_fraction=0.25)
    assert train_split.normalization.to_json() == stored.to_json()


def test_token_splits_and_wrong_kind_errors(field_dataset, tmp_path):
    from scripts import tokenize

    tokens_dir = str(tmp_path / "tokens")
    with pytest.raises(SystemExit) as status:
        run_main(tokenize.main, ["--fields", field_dataset, "--tokenizer", "fp8_e4m3", "--out", tokens_dir])
    assert status.value.code == 0
    train_tokens, validation_tokens = load_token_splits(tokens_dir, val_fraction=0.25, seed=0)
    train_weights, _ = load_weight_splits(field_dataset, val_fraction=0.25, seed=0)
    assert train_tokens.tokens.dtype == np.int32 and train_tokens.vocab_size == 256
    assert len(train_tokens) + len(validation_tokens) == 8
    np.testing.assert_array_equal(train_tokens.rows, train_weights.rows)
    assert train_tokens.dataset.tokenizer.vocab_size == 256
    with pytest.raises(UserError, match="dataset of tokens") as error:
        load_weight_splits(tokens_dir)
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match="dataset of field weights"):
        load_token_splits(field_dataset)
    for loader in (load_weight_splits, load_token_splits):
        with pytest.raises(UserError, match="not found") as error:
            loader(str(tmp_path / "missing"))
        assert "\n" not in str(error.value)
