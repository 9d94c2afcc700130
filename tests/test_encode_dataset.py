"""Batched field fitting, image sources, and python -m fields.encode_dataset (resume after a real kill)."""

import dataclasses
import gzip
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pyarrow.parquet as pq
import pytest

from fields import encode_dataset, mlp_image
from fields.data.image_sources import open_image_source, read_idx
from fields.data.procgen_2d import SHAPES_2D, primitive_image
from fields.image_fitting import MLP_PRESETS, PRESETS, fit_image, fit_image_batch
from tests.helpers import assert_one_line_error, run_entry_point

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(main, argv, capsys):
    return run_entry_point(main, argv, capsys)


def read_rows(folder):
    tables = [pq.read_table(os.path.join(folder, name)) for name in sorted(os.listdir(folder))
              if name.endswith(".parquet")]
    return tables, [row for table in tables for row in table.column("source_id").to_pylist()]


def test_primitives_are_deterministic_and_labelled():
    first, label, attributes = primitive_image(5, seed=1, size=20)
    again, _, _ = primitive_image(5, seed=1, size=20)
    np.testing.assert_array_equal(first, again)
    assert first.shape == (20, 20, 3) and 0 <= label < len(SHAPES_2D)
    assert attributes["shape"] == SHAPES_2D[label] and attributes["caption"].endswith(attributes["shape"])
    assert first.max() > 0.3 and first[0, 0].max() == 0.0  # a shape on a black background


@pytest.mark.parametrize("family", ["ngp", "siren"])
def test_batched_fits_equal_single_fits(family):
    images = np.stack([primitive_image(i, 0, 16)[0] for i in range(3)])
    base = PRESETS["small"] if family == "ngp" else MLP_PRESETS["siren"]["small"]
    config = dataclasses.replace(base, steps=20, log_every=10, backend="jax")
    batch = fit_image_batch(images, config, seeds=[7, 8, 9])
    assert batch.psnr.shape == (3,) and np.all(np.isfinite(batch.psnr))
    for index, seed in enumerate([7, 8, 9]):
        single = fit_image(images[index], dataclasses.replace(config, seed=seed), progress=False)
        # Same keys, same steps: equal up to float rounding of batched vs single matmuls over 20 steps.
        assert abs(single.metrics["psnr"] - float(batch.psnr[index])) < 0.05
        leaf = "hash_table" if family == "ngp" else "dense_0"
        single_leaf = single.params[leaf] if family == "ngp" else single.params[leaf]["kernel"]
        batch_leaf = batch.params[leaf][index] if family == "ngp" else batch.params[leaf]["kernel"][index]
        np.testing.assert_allclose(batch_leaf, single_leaf, rtol=2e-3, atol=2e-5)


def test_shared_init_starts_every_field_from_the_same_weights():
    # One image three times. Field 0 of the shared-init fit is the single fit with seed 5; fields 1
    # and 2 start from the same weights but sample other pixels, so they stay far closer to field 0
    # than fields fitted from their own initial weights.
    from fields.weights import param_map, stacked_params_to_matrix

    images = np.stack([primitive_image(0, 0, 16)[0]] * 3)
    config = dataclasses.replace(PRESETS["small"], steps=10, log_every=5, backend="jax")
    shared = fit_image_batch(images, config, seeds=[5, 8, 9], init_seeds=[5, 5, 5])
    own = fit_image_batch(images, config, seeds=[5, 8, 9])
    reference = fit_image(images[0], dataclasses.replace(config, seed=5), progress=False).params
    for stacked, expected in zip(jax.tree_util.tree_leaves(shared.params), jax.tree_util.tree_leaves(reference),
                                 strict=True):
        np.testing.assert_allclose(stacked[0], expected, rtol=2e-3, atol=2e-5)
    pmap = param_map(reference)
    shared_rows, own_rows = (stacked_params_to_matrix(fit.params, pmap) for fit in (shared, own))
    for index in (1, 2):
        shared_gap = np.abs(shared_rows[index] - shared_rows[0]).mean()
        assert shared_gap < 0.2 * np.abs(own_rows[index] - own_rows[0]).mean()
    with pytest.raises(ValueError, match="one init seed per image"):
        fit_image_batch(images, config, seeds=[7, 8, 9], init_seeds=[5])


def test_idx_source_round_trip(tmp_path):
    images = (np.arange(5 * 6 * 7) % 256).astype(np.uint8).reshape(5, 6, 7)
    labels = np.arange(5, dtype=np.uint8)
    image_path, label_path = tmp_path / "images-idx3-ubyte.gz", tmp_path / "labels-idx1-ubyte"
    with gzip.open(image_path, "wb") as handle:
        handle.write(bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in images.shape) + images.tobytes())
    label_path.write_bytes(bytes([0, 0, 8, 1]) + (5).to_bytes(4, "big") + labels.tobytes())
    np.testing.assert_array_equal(read_idx(str(image_path)), images)
    source = open_image_source(f"idx:{image_path},{label_path}", num_items=4)
    assert (source.num_items, source.height, source.width, source.channels) == (4, 6, 7, 1)
    np.testing.assert_allclose(source.load([2])[0, ..., 0], images[2] / 255.0, atol=1e-7)
    assert source.labels.tolist() == [0, 1, 2, 3]
    bad = tmp_path / "bad.idx"
    bad.write_bytes(b"\x00\x00\x08\x03" + (9).to_bytes(4, "big") * 3)
    from fields.cli import UserError

    with pytest.raises(UserError, match="header promises"):
        read_idx(str(bad))


def test_folder_and_parquet_sources(tmp_path):
    from PIL import Image

    for label, name in enumerate(["cats", "dogs"]):
        (tmp_path / "images" / name).mkdir(parents=True)
        for k in range(2):
            array = (np.random.default_rng(label * 10 + k).uniform(size=(8, 8, 3)) * 255).astype(np.uint8)
            Image.fromarray(array).save(tmp_path / "images" / name / f"{k}.png")
    folder = open_image_source(str(tmp_path / "images"))
    assert folder.num_items == 4 and folder.labels.tolist() == [0, 0, 1, 1] and folder.source_id(2) == "dogs/0.png"
    import io

    import pyarrow as pa

    blobs = []
    for k in range(3):
        buffer = io.BytesIO()
        Image.fromarray(np.full((5, 4), 40 * k, np.uint8)).save(buffer, format="PNG")
        blobs.append({"bytes": buffer.getvalue(), "path": None})
    pq.write_table(pa.table({"image": blobs, "label": [3, 4, 5]}), tmp_path / "images.parquet")
    table_source = open_image_source(f"parquet:{tmp_path / 'images.parquet'}")
    assert (table_source.num_items, table_source.height, table_source.width) == (3, 5, 4)
    assert table_source.labels.tolist() == [3, 4, 5]
    np.testing.assert_allclose(table_source.load([2])[0], 80 / 255.0, atol=1e-7)
    # A cell that points at a file (Hugging Face's {"bytes": None, "path": ...}) is read from it; a
    # missing file is a one-line error naming the row and the path.
    image_path = tmp_path / "images" / "cats" / "0.png"
    cells = [{"bytes": None, "path": str(image_path)}, {"bytes": None, "path": str(tmp_path / "gone.png")}]
    pq.write_table(pa.table({"image": cells}), tmp_path / "paths.parquet")
    path_source = open_image_source(f"parquet:{tmp_path / 'paths.parquet'}")
    assert path_source.load([0])[0].shape == (8, 8, 3)
    from fields.cli import UserError

    with pytest.raises(UserError, match="row 1: cannot read the image file .*gone.png"):
        path_source.load([1])


def test_encode_dataset_writes_shards_and_resumes(tmp_path, capsys):
    out = tmp_path / "fields"
    argv = ["--source", "procedural:primitives", "--num", "10", "--size", "16x16", "--steps", "30",
            "--fields-per-batch", "4", "--out", str(out), "--quiet", "--backend", "jax"]
    status, stdout, err = run_cli(encode_dataset.main, argv, capsys)
    assert status == 0, err
    tables, ids = read_rows(out)
    assert len(tables) == 3 and len(ids) == 10 and len(set(ids)) == 10
    manifest = json.loads((out / "field_config.json").read_text())
    assert manifest["field_kind"] == "ngp_image" and manifest["param_map"]
    num_params = sum(entry["size"] for entry in manifest["param_map"])
    assert all(table.schema.field("params").type.list_size == num_params for table in tables)
    assert {"source_id", "label", "psnr", "seed", "init_seed", "steps"} <= set(tables[0].column_names)
    # The default --init shared: every row is a fit from seed 0's initial weights.
    assert set(tables[0].column("init_seed").to_pylist()) == {0} and manifest["init"] == "shared"
    assert all(0 <= label < len(SHAPES_2D) for label in tables[0].column("label").to_pylist())
    from fields.field_datasets import read_dataset

    dataset = read_dataset(str(out))
    assert dataset.matrix.shape[0] == 10 and dataset.field_kind == "ngp_image"
    # Rerun: nothing to do.
    status, stdout, _ = run_cli(encode_dataset.main, argv, capsys)
    assert status == 0 and "nothing to do" in stdout
    # Another configuration into the same folder is refused.
    other = [("31" if previous == "--steps" else value) for previous, value in zip([""] + argv[:-1], argv, strict=True)]
    status, _, err = run_cli(encode_dataset.main, other, capsys)
    assert status == 2 and "another configuration" in err


def test_shards_split_the_work(tmp_path, capsys):
    out = tmp_path / "split"
    common = ["--source", "procedural:primitives", "--num", "9", "--size", "12x12", "--steps", "10",
              "--fields-per-batch", "3", "--out", str(out), "--quiet", "--backend", "jax"]
    for shard in ("0/2", "1/2"):
        status, _, err = run_cli(encode_dataset.main, common + ["--shard", shard], capsys)
        assert status == 0, err
    _, ids = read_rows(out)
    assert sorted(ids) == sorted(f"primitives/0/{i}" for i in range(9))


def test_quality_gate_refits_then_drops(tmp_path, capsys):
    out = tmp_path / "gate"
    argv = ["--source", "procedural:primitives", "--num", "4", "--size", "12x12", "--steps", "10",
            "--fields-per-batch", "4", "--out", str(out), "--quiet", "--backend", "jax", "--min-psnr", "200"]
    status, stdout, err = run_cli(encode_dataset.main, argv, capsys)
    assert status == 0, err
    assert "4 refitted, 4 dropped" in stdout
    _, ids = read_rows(out)
    assert ids == []


def test_killed_encoding_resumes_without_loss_or_duplicates(tmp_path):
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "fields.encode_dataset", "--source", "procedural:primitives", "--num", "24",
               "--size", "16x16", "--steps", "300", "--fields-per-batch", "4", "--out", str(out), "--quiet"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            if out.exists() and any(name.endswith(".parquet") for name in os.listdir(out)):
                break
            if process.poll() is not None:
                pytest.fail("the job finished before it could be killed")
            time.sleep(0.05)
        else:
            pytest.fail("no shard appeared in time")
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    written_before = sorted(name for name in os.listdir(out) if name.endswith(".parquet"))
    assert 1 <= len(written_before) < 6
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    tables, ids = read_rows(out)
    assert len(ids) == 24 and len(set(ids)) == 24
    assert not [name for name in os.listdir(out) if name.endswith(".tmp")]


@pytest.mark.parametrize("argv,expected", [
    (["--source", "procedural:blobs", "--out", "OUT"], "unknown procedural source"),
    (["--source", "/no/such/folder", "--out", "OUT"], "image source not found"),
    (["--source", "procedural:primitives", "--out", "OUT", "--shard", "2/2"], "0 <= i < n"),
    (["--source", "procedural:primitives", "--out", "OUT", "--size", "big"], "HxW"),
    (["--source", "procedural:primitives", "--out", "OUT", "--preset", "huge"], "unknown ngp preset"),
    (["--source", "procedural:primitives", "--out", "OUT", "--init", "per-field", "--init-seed", "3"],
     "--init-seed applies to --init shared"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, argv, expected):
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    status, _, err = run_cli(encode_dataset.main, argv + ["--quiet"], capsys)
    assert_one_line_error(status, err, expected)


@pytest.mark.parametrize("model", ["siren", "fourier"])
def test_mlp_image_cli(tmp_path, capsys, model):
    from fields.data.images import save_image

    source = tmp_path / "in.png"
    save_image(str(source), primitive_image(3, 0, 24)[0])
    workdir = tmp_path / model
    status, out, err = run_cli(mlp_image.main, ["--model", model, "--image", str(source), "--preset", "tiny",
                                                "--workdir", str(workdir), "--quiet"], capsys)
    assert status == 0, err
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert metrics["psnr"] > 10 and metrics["steps"] == 100
    from fields.image_fitting import render_saved_field

    assert render_saved_field(str(workdir / "field.safetensors"), 30, 20).shape == (20, 30, 3)
