"""encode_dataset over folders of meshes (occupancy fields) and of scenes (NeRF fields)."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from fields import encode_dataset
from fields.data import meshes
from fields.data.collection_sources import mesh_folder_source, scene_folder_source, source_family
from fields.data.mesh_sampling import SamplingConfig, mesh_from_spec, sample_labelled_points
from fields.field_datasets import read_dataset
from fields.occupancy_fitting import PRESETS as OCCUPANCY_PRESETS
from fields.occupancy_fitting import evaluate, fit_occupancy, fit_occupancy_batch
from fields.weights import vector_to_params
from tests.helpers import assert_one_line_error, run_entry_point

TINY_OCCUPANCY = dataclasses.replace(OCCUPANCY_PRESETS["tiny"], steps=60, log_every=30,
                                     sampling=SamplingConfig(num_points=4000),
                                     eval_sampling=SamplingConfig(num_points=2000, near_fraction=0.25,
                                                                  far_fraction=0.25))


@pytest.fixture(scope="module")
def mesh_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("meshes")
    for folder, name in (("round", "sphere"), ("round", "torus"), ("square", "box")):
        os.makedirs(root / folder, exist_ok=True)
        meshes.save_obj(str(root / folder / f"{name}.obj"), mesh_from_spec(f"procedural:{name}"))
    return root


@pytest.fixture(scope="module")
def scene_folder(tmp_path_factory):
    from fields.data.procgen_3d import ViewConfig, generate_scenes

    root = tmp_path_factory.mktemp("scenes")
    generate_scenes(str(root), 2, ViewConfig(views={"train": 6, "val": 0, "test": 2}, resolution=16), seed=3,
                    progress=False)
    return root


def test_sources_are_sniffed_and_labelled(mesh_folder, scene_folder, tmp_path):
    assert source_family(str(mesh_folder)) == "meshes" and source_family(f"meshes:{mesh_folder}") == "meshes"
    assert source_family(str(scene_folder)) == "scenes" and source_family("procedural:primitives") == "images"
    source = mesh_folder_source(str(mesh_folder))
    assert source.items == ["round/sphere.obj", "round/torus.obj", "square/box.obj"]
    assert source.labels.tolist() == [0, 0, 1]
    loaded = source.load([2])[0]
    assert np.abs(loaded.vertices).max() <= 1.0
    scenes = scene_folder_source(str(scene_folder))
    assert scenes.items == ["scene_0000", "scene_0001"] and scenes.caption(1).startswith("a")
    train, test = scenes.load([0])[0]
    assert train.images.shape == (6, 16, 16, 4) and len(test) == 2


def test_batched_occupancy_fits_equal_single_fits():
    shapes = [mesh_from_spec("procedural:sphere"), mesh_from_spec("procedural:torus")]
    batch = fit_occupancy_batch(shapes, TINY_OCCUPANCY, seeds=[4, 5])
    assert batch.metrics["iou"].shape == (2,)
    for index, seed in enumerate([4, 5]):
        single = fit_occupancy(shapes[index], dataclasses.replace(TINY_OCCUPANCY, seed=seed), progress=False)
        assert abs(single.metrics["iou"] - float(batch.metrics["iou"][index])) < 0.01
        batch_field = jax.tree_util.tree_map(lambda x, i=index: x[i], batch.params)
        for a, b in zip(jax.tree_util.tree_leaves(single.params), jax.tree_util.tree_leaves(batch_field), strict=True):
            np.testing.assert_allclose(b, a, rtol=2e-3, atol=2e-5)


def test_encode_mesh_folder_into_occupancy_fields(mesh_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(OCCUPANCY_PRESETS, "test", TINY_OCCUPANCY)
    out = tmp_path / "occupancy"
    argv = ["--source", f"meshes:{mesh_folder}", "--preset", "test", "--fields-per-batch", "2", "--out", str(out),
            "--quiet"]
    status, stdout, err = run_entry_point(encode_dataset.main, argv, capsys)
    assert status == 0, err
    dataset = read_dataset(str(out))
    assert dataset.field_kind == "occupancy" and dataset.matrix.shape[0] == 3
    assert dataset.columns["label"].tolist() == [0, 0, 1]
    assert np.all((dataset.columns["iou"] > 0.3) & (dataset.columns["iou"] <= 1.0))
    # A stored row, unflattened with the stored param map, scores the stored IoU.
    params = vector_to_params(dataset.matrix[1], dataset.param_map)
    held_out = sample_labelled_points(mesh_from_spec(str(mesh_folder / "round" / "torus.obj")),
                                      TINY_OCCUPANCY.eval_sampling, seed=int(dataset.columns["seed"][1]), stream=1)
    assert abs(evaluate(params, TINY_OCCUPANCY.field, held_out)["iou"] - dataset.columns["iou"][1]) < 1e-5
    status, stdout, _ = run_entry_point(encode_dataset.main, argv, capsys)
    assert status == 0 and "nothing to do" in stdout
    assert_opens_with_hugging_face_datasets(out, dataset, tmp_path, monkeypatch)
    # The IoU gate: an unreachable threshold refits, then drops, every field.
    status, stdout, err = run_entry_point(encode_dataset.main, argv[:-3] + ["--out", str(tmp_path / "gated"),
                                                                             "--min-iou", "1.0", "--quiet"], capsys)
    assert status == 0, err
    assert "3 refitted" in stdout and "dropped" in stdout


def test_unreadable_meshes_stop_with_one_line_or_are_skipped(mesh_folder, tmp_path, capsys, monkeypatch):
    import shutil

    monkeypatch.setitem(OCCUPANCY_PRESETS, "test", TINY_OCCUPANCY)
    folder = tmp_path / "with_broken"
    shutil.copytree(mesh_folder / "round", folder)
    # pybullet_data ships meshes like this one: every vertex NaN.
    (folder / "broken.obj").write_text("v nan nan nan\nv nan nan nan\nv nan nan nan\nf 1 2 3\n")
    argv = ["--source", f"meshes:{folder}", "--preset", "test", "--fields-per-batch", "2", "--quiet"]
    status, _, err = run_entry_point(encode_dataset.main, argv + ["--out", str(tmp_path / "stop")], capsys)
    assert_one_line_error(status, err, "broken.obj: the mesh has non-finite vertex positions")
    out = tmp_path / "skip"
    status, stdout, err = run_entry_point(encode_dataset.main, argv + ["--out", str(out), "--skip-unreadable"], capsys)
    assert status == 0, err
    assert "1 unreadable item(s) skipped" in stdout
    dataset = read_dataset(str(out))
    assert dataset.matrix.shape[0] == 2 and "broken.obj" not in list(dataset.columns["source_id"])
    skipped = json.loads((out / "skipped.json").read_text())
    assert list(skipped) == ["broken.obj"] and "non-finite" in skipped["broken.obj"]
    status, stdout, _ = run_entry_point(encode_dataset.main, argv + ["--out", str(out), "--skip-unreadable"], capsys)
    assert status == 0 and "nothing to do" in stdout


def assert_opens_with_hugging_face_datasets(folder, dataset, tmp_path, monkeypatch):
    import glob

    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    shards = sorted(glob.glob(os.path.join(folder, "*.parquet")))
    loaded = datasets.load_dataset("parquet", data_files=shards, split="train", cache_dir=str(tmp_path / "hf_cache"))
    assert loaded.num_rows == dataset.matrix.shape[0]
    np.testing.assert_array_equal(np.asarray(loaded["params"], np.float32), dataset.matrix)
    assert loaded["source_id"] == list(dataset.columns["source_id"])


def test_encode_scene_folder_into_nerf_fields(scene_folder, tmp_path, capsys):
    from fields.nerf_fitting import PRESETS as NERF_PRESETS
    from fields.nerf_fitting import Trainer, fit_nerf_batch
    from fields.weights import params_to_vector

    config = dataclasses.replace(NERF_PRESETS["tiny"], steps=8, backend="jax")
    pairs = scene_folder_source(str(scene_folder)).load([0, 1])
    batch = fit_nerf_batch(pairs, config, seeds=[0, 1], max_eval_views=1)
    single = Trainer(dataclasses.replace(config, seed=1), pairs[1][0])
    single.run(8)
    for a, b in zip(jax.tree_util.tree_leaves(single.state["params"]),
                    jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda x: x[1], batch.params)), strict=True):
        np.testing.assert_allclose(b, np.asarray(a), rtol=2e-3, atol=2e-5)

    out = tmp_path / "nerf"
    argv = ["--source", str(scene_folder), "--preset", "tiny", "--steps", "8", "--eval-views", "1", "--out", str(out),
            "--backend", "jax", "--init", "per-field", "--quiet"]
    status, _, err = run_entry_point(encode_dataset.main, argv, capsys)
    assert status == 0, err
    dataset = read_dataset(str(out))
    assert dataset.field_kind == "ngp_nerf" and dataset.matrix.shape[0] == 2
    assert np.all(np.isfinite(dataset.columns["psnr"])) and dataset.columns["caption"][0].startswith("a")
    np.testing.assert_allclose(dataset.columns["psnr"], batch.psnr, atol=1e-4)
    for index in range(2):  # the stored rows are the batch fit with seeds 0 and 1
        field = jax.tree_util.tree_map(lambda x, i=index: x[i], batch.params)
        np.testing.assert_allclose(dataset.matrix[index], params_to_vector(field, dataset.param_map), atol=1e-6)


@pytest.mark.parametrize("argv,expected", [
    (["--source", "meshes:/no/such/folder"], "mesh folder not found"),
    (["--source", "scenes:/no/such/folder"], "scene folder not found"),
    (["--source", "MESHES", "--min-psnr", "20"], "use --min-iou"),
    (["--source", "MESHES", "--size", "8x8"], "--size applies to image sources"),
    (["--source", "MESHES", "--min-iou", "2"], "[0, 1]"),
    (["--source", "procedural:primitives", "--min-iou", "0.5"], "--min-iou is for occupancy"),
    (["--source", "SCENES", "--preset", "huge"], "unknown NeRF preset"),
])
def test_bad_collection_input_exits_2_with_one_line(mesh_folder, scene_folder, tmp_path, capsys, argv, expected):
    replace = {"MESHES": str(mesh_folder), "SCENES": str(scene_folder)}
    argv = [replace.get(a, a) for a in argv] + ["--out", str(tmp_path / "out"), "--quiet"]
    status, _, err = run_entry_point(encode_dataset.main, argv, capsys)
    assert_one_line_error(status, err, expected)


def test_scenes_of_different_shapes_get_a_clear_error(tmp_path, capsys):
    from fields.data.procgen_3d import ViewConfig, generate_scenes

    generate_scenes(str(tmp_path / "a"), 1, ViewConfig(views={"train": 3, "val": 0, "test": 1}, resolution=8),
                    progress=False)
    generate_scenes(str(tmp_path / "b"), 1, ViewConfig(views={"train": 4, "val": 0, "test": 1}, resolution=8),
                    progress=False)
    argv = ["--source", f"scenes:{tmp_path}", "--preset", "tiny", "--steps", "2", "--out", str(tmp_path / "out"),
            "--quiet", "--backend", "jax"]
    status, _, err = run_entry_point(encode_dataset.main, argv, capsys)
    assert_one_line_error(status, err, "train splits of one shape")
