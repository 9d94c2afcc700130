"""Latent diffusion: python -m hypernets.diffusion --latents AE_WORKDIR trains on a tiny autoencoder's latents,
decodes its samples to a field dataset, resumes, conditions on labels, and refuses bad input in one line."""

import json
import os
import shutil

import numpy as np
import pytest

from fields import encode_dataset
from fields.field_datasets import read_dataset
from fields.weights import param_count
from hypernets import autoencoder, diffusion
from hypernets.latent_data import latent_param_map, load_latent_source
from tests.helpers import assert_one_line_error, run_entry_point

NUM_FIELDS = 12
LATENT_DIMS = "6,4"


@pytest.fixture(scope="module")
def field_data(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("fields") / "primitives")
    status = encode_dataset.main(["--source", "procedural:primitives", "--num", str(NUM_FIELDS), "--size", "8x8",
                                  "--steps", "10", "--backend", "jax", "--quiet", "--out", out])
    assert status in (0, None)
    return out


@pytest.fixture(scope="module")
def autoencoder_run(field_data, tmp_path_factory):
    """A finished tiny conv autoencoder run (latents 6 + 4) on the fields."""
    workdir = str(tmp_path_factory.mktemp("autoencoder") / "ae")
    with pytest.raises(SystemExit) as exit_info:
        from fields.cli import run_main

        run_main(autoencoder.main, ["--data", field_data, "--workdir", workdir, "--preset", "tiny", "--quiet",
                                    "--latent-dims", LATENT_DIMS])
    assert exit_info.value.code == 0
    return workdir


def run_diffusion(argv, capsys):
    return run_entry_point(diffusion.main, argv, capsys)


def read_history(workdir):
    with open(os.path.join(workdir, "history.jsonl")) as handle:
        return [json.loads(line) for line in handle if line.strip()]


# ------------------------------------------------------------------------------------------- the data


def test_latent_param_map_has_one_section_per_autoencoder_section():
    entries = latent_param_map({"hash": 6, "mlp": 4})
    assert [(entry.name, entry.shape, entry.offset, entry.size, entry.section) for entry in entries] == [
        ("latent/hash", (6,), 0, 6, "hash"), ("latent/mlp", (4,), 6, 4, "mlp")]
    assert param_count(entries) == 10


def test_latent_source_keeps_the_autoencoders_split_and_decodes_to_its_fields(autoencoder_run, field_data):
    source = load_latent_source(autoencoder_run)
    latents, columns, metadata = autoencoder.read_latents(os.path.join(autoencoder_run, "latents"))
    model, _, _, data_info = autoencoder.load_autoencoder(autoencoder_run)
    train_rows = [row for row, split in enumerate(columns["split"]) if split == "train"]
    val_rows = [row for row, split in enumerate(columns["split"]) if split == "val"]
    assert len(source.train) == len(train_rows) and len(source.validation) == len(val_rows) > 0
    assert source.train.source_ids == [columns["source_id"][row] for row in train_rows]
    np.testing.assert_array_equal(source.train.labels, np.asarray(columns["label"])[train_rows])
    assert [entry.section for entry in source.train.param_map] == ["hash", "mlp"]
    # Standardised per dimension with the training latents' statistics.
    assert source.train.vectors.shape == (len(train_rows), 10) and source.train.vectors.dtype == np.float32
    np.testing.assert_allclose(np.mean(source.train.vectors, axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(np.std(source.train.vectors, axis=0), 1.0, atol=1e-3)
    np.testing.assert_allclose(source.mean, metadata["latent_mean"], rtol=1e-6)
    # Back to fields: destandardise and decode with the autoencoder.
    decoded = source.to_fields(source.train.vectors)
    np.testing.assert_allclose(decoded, model.decode_to_fields(latents[train_rows]), rtol=1e-4, atol=1e-5)
    assert decoded.shape == (len(train_rows), param_count(read_dataset(field_data).param_map))
    assert source.fields.param_map == data_info.param_map
    assert source.record() == {"workdir": os.path.abspath(autoencoder_run), "step": metadata["step"],
                               "latent_dim": 10}


# ------------------------------------------------------------------------------------------- the CLI


def test_cli_latent_diffusion_samples_fields_resumes_and_refuses_changes(autoencoder_run, field_data, tmp_path,
                                                                         capsys):
    workdir = str(tmp_path / "latent")
    argv = ["--latents", autoencoder_run, "--workdir", workdir, "--preset", "tiny", "--quiet"]
    status, out, err = run_diffusion(argv, capsys)
    assert status == 0, err
    assert "10 latents -> " in out and "sections: hash, mlp" in out
    source = read_dataset(field_data)
    samples = read_dataset(os.path.join(workdir, "samples"))
    assert len(samples) == diffusion.PRESETS["tiny"].num_samples
    # Decoded to the autoencoder's fields: same kind, config, param map and image size as its training data.
    assert samples.param_map == source.param_map and samples.matrix.shape[1] == param_count(source.param_map)
    assert samples.field_kind == source.field_kind and samples.field_config == source.field_config
    for key in ("image_height", "image_width"):
        assert samples.metadata[key] == source.metadata[key]
    assert np.all(np.isfinite(samples.matrix)) and np.std(samples.matrix) > 0
    np.testing.assert_array_equal(samples.columns["label"], -1)
    generator = samples.metadata["generator"]
    assert generator["latents"]["workdir"] == os.path.abspath(autoencoder_run)
    assert generator["training_data"] == os.path.abspath(field_data)
    model, _, _, _ = autoencoder.load_autoencoder(autoencoder_run)
    assert samples.matrix.shape[1] == model.num_params
    assert os.path.exists(os.path.join(workdir, "samples.png"))
    with open(os.path.join(workdir, "config.json")) as handle:
        record = json.load(handle)
    assert record["latents"]["workdir"] == os.path.abspath(autoencoder_run) and "data" not in record
    assert max(row["step"] for row in read_history(workdir)) == diffusion.PRESETS["tiny"].loop.steps
    assert np.isfinite(read_history(workdir)[-1]["val_loss"])

    # The same command resumes; sampling options may change; the training config may not.
    status, out, err = run_diffusion(argv, capsys)
    assert status == 0, err
    assert f"resuming from step {diffusion.PRESETS['tiny'].loop.steps}" in out
    status, out, err = run_diffusion(["--latents", autoencoder_run, "--workdir", workdir, "--sample-only",
                                      "--num-samples", "3", "--quiet"], capsys)
    assert status == 0, err
    resampled = read_dataset(os.path.join(workdir, "samples"))
    assert len(resampled) == 3 and resampled.matrix.shape[1] == model.num_params
    status, _, err = run_diffusion(argv + ["--learning-rate", "0.5"], capsys)
    assert_one_line_error(status, err, "different config")
    # The same work directory with field weights instead of latents is another run.
    status, _, err = run_diffusion(["--data", field_data, "--workdir", workdir, "--preset", "tiny"], capsys)
    assert_one_line_error(status, err, "different config")


def test_cli_latent_diffusion_class_conditional(autoencoder_run, field_data, tmp_path, capsys):
    workdir = str(tmp_path / "conditional")
    status, out, err = run_diffusion(["--latents", autoencoder_run, "--workdir", workdir, "--preset", "tiny",
                                      "--class-conditional", "--guidance-scale", "2", "--num-samples", "10",
                                      "--quiet"], capsys)
    assert status == 0, err
    num_classes = int(np.max(read_dataset(field_data).columns["label"])) + 1
    assert f"{num_classes} classes" in out and num_classes < 10
    samples = read_dataset(os.path.join(workdir, "samples"))
    np.testing.assert_array_equal(samples.columns["label"], np.arange(10) % num_classes)
    assert np.all(np.isfinite(samples.matrix))


def test_cli_latent_bad_input_is_one_line(autoencoder_run, field_data, tmp_path, capsys):
    def check(argv, expected):
        status, _, err = run_diffusion(argv + ["--preset", "tiny", "--quiet"], capsys)
        assert_one_line_error(status, err, expected)

    check(["--latents", str(tmp_path / "missing"), "--workdir", str(tmp_path / "w1")], "not found")
    check(["--latents", autoencoder_run, "--data", field_data, "--workdir", str(tmp_path / "w2")], "not both")
    check(["--workdir", str(tmp_path / "w3")], "give --data")
    empty = tmp_path / "empty"
    empty.mkdir()
    check(["--latents", str(empty), "--workdir", str(tmp_path / "w4")], "no autoencoder run")
    # A diffusion run's folder is not an autoencoder's.
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"data": field_data, "diffusion": {}}))
    check(["--latents", str(other), "--workdir", str(tmp_path / "w5")], "not a hypernets.autoencoder run")
    # An unfinished run (config but no parameters), and a finished one whose latents are gone or do not fit.
    broken = tmp_path / "broken"
    shutil.copytree(autoencoder_run, broken)
    os.remove(broken / "autoencoder.msgpack")
    check(["--latents", str(broken), "--workdir", str(tmp_path / "w6")], "has not finished")
    shutil.rmtree(broken)
    shutil.copytree(autoencoder_run, broken)
    shutil.rmtree(broken / "latents")
    check(["--latents", str(broken), "--workdir", str(tmp_path / "w7")], "latents not found")
    shutil.rmtree(broken)
    shutil.copytree(autoencoder_run, broken)
    latents, columns, metadata = autoencoder.read_latents(str(broken / "latents"))
    autoencoder.write_latent_shard(str(broken), latents[:, :8], columns,
                                   {**metadata, "section_latent_dims": {"hash": 4, "mlp": 4}, "latent_dim": 8})
    check(["--latents", str(broken), "--workdir", str(tmp_path / "w8")], "do not fit the autoencoder")
    autoencoder.write_latent_shard(str(broken), latents, {**columns, "split": ["test"] * len(latents)}, metadata)
    check(["--latents", str(broken), "--workdir", str(tmp_path / "w9")], "unknown split")
    autoencoder.write_latent_shard(str(broken), latents, {**columns, "split": ["val"] * len(latents)}, metadata)
    check(["--latents", str(broken), "--workdir", str(tmp_path / "w10")], "no training latents")
    # Field weights given as latents, and a run without labels asked to condition on them.
    check(["--latents", field_data, "--workdir", str(tmp_path / "w11")], "no autoencoder run")
    autoencoder.write_latent_shard(str(broken), latents, {**columns, "label": [-1] * len(latents)}, metadata)
    check(["--latents", str(broken), "--workdir", str(tmp_path / "w12"), "--class-conditional"], "has no labels")
