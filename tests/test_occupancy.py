"""Occupancy fields of meshes: winding-number labels, fitting, marching cubes, the CLI."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fields import occupancy
from fields.data import meshes
from fields.data.mesh_sampling import (
    SamplingConfig,
    boundary_edges,
    inside,
    is_watertight,
    mesh_from_spec,
    mesh_volume,
    sample_labelled_points,
    surface_points,
    winding_numbers,
)
from fields.models.occupancy_mlp import OccupancyFieldConfig, OccupancyMLP, init_params
from fields.occupancy_fitting import PRESETS, extract_mesh, fit_occupancy, load_occupancy_field
from fields.weights import load_field
from tests.helpers import assert_one_line_error, run_entry_point

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(argv, capsys):
    return run_entry_point(occupancy.main, argv, capsys)


def test_winding_numbers_match_the_analytic_inside_test():
    rng = np.random.default_rng(0)
    points = rng.uniform(-1.0, 1.0, size=(6000, 3))
    sphere = meshes.sphere(0.7, segments=48, rings=24)
    radius = np.linalg.norm(points, axis=-1)
    away = np.abs(radius - 0.7) > 0.02  # the polygonal sphere lies within 0.006 of the round one
    labels = inside(points, sphere)
    assert np.mean(labels[away] == (radius[away] < 0.7)) > 0.99

    half = np.array([0.8, 0.5, 0.3])
    box = meshes.box(half)
    distance = np.max(np.abs(points) - half, axis=-1)  # < 0 inside
    away = np.abs(distance) > 0.01
    winding = winding_numbers(points, box, num_threads=2, dtype=np.float64)
    assert np.mean((winding[away] > 0.5) == (distance[away] < 0)) > 0.99
    # Closed mesh: exactly 0 or 1 away from the surface; float32 (the default) is close to float64.
    np.testing.assert_allclose(winding[away], (distance[away] < 0).astype(float), atol=1e-6)
    np.testing.assert_allclose(winding_numbers(points, box), winding, atol=2e-3)
    # Flipped faces turn the winding number negative.
    flipped = meshes.Mesh(box.vertices, -box.normals, box.faces[:, ::-1], box.colors)
    np.testing.assert_allclose(winding_numbers(points[:50], flipped, dtype=np.float64),
                               -winding_numbers(points[:50], box, dtype=np.float64), atol=1e-9)


def test_surface_points_sampling_and_mesh_checks():
    sphere = meshes.sphere(0.6, segments=32, rings=16)
    points = surface_points(sphere, 2000, seed=3)
    assert points.shape == (2000, 3) and points.dtype == np.float32
    radius = np.linalg.norm(points, axis=-1)
    assert radius.max() <= 0.6 + 1e-5 and radius.min() > 0.6 * 0.97
    np.testing.assert_array_equal(points, surface_points(sphere, 2000, seed=3))
    # Area-weighted: each octant holds about 1/8 of the points.
    octants = np.bincount((points > 0).astype(int) @ np.array([1, 2, 4]), minlength=8) / 2000
    assert np.all(np.abs(octants - 0.125) < 0.03), octants

    assert is_watertight(sphere) and is_watertight(meshes.box()) and is_watertight(meshes.torus())
    open_box = meshes.Mesh(meshes.box().vertices, meshes.box().normals, meshes.box().faces[:-1], meshes.box().colors)
    assert boundary_edges(open_box.vertices, open_box.faces) == 3
    assert mesh_volume(meshes.box().vertices, meshes.box().faces) == pytest.approx(8.0)

    config = SamplingConfig(num_points=3000, near_fraction=0.3, far_fraction=0.3)
    first = sample_labelled_points(sphere, config, seed=1)
    again = sample_labelled_points(sphere, config, seed=1)
    other = sample_labelled_points(sphere, config, seed=1, stream=1)
    np.testing.assert_array_equal(first.points, again.points)
    assert not np.array_equal(first.points, other.points)
    assert first.uniform.sum() == 1200 and np.all(np.abs(first.points) <= 1.0)
    assert first.labels.dtype == np.float32 and set(np.unique(first.labels)) == {0.0, 1.0}
    near = ~first.uniform
    assert 0.2 < first.labels[near].mean() < 0.8  # near-surface points fall on both sides


@pytest.fixture(scope="module")
def sphere_fit():
    mesh = mesh_from_spec("procedural:sphere")
    config = PRESETS["tiny"]
    return mesh, config, fit_occupancy(mesh, config, progress=False)


def test_tiny_fit_of_a_sphere(sphere_fit):
    _, config, result = sphere_fit
    m = result.metrics
    assert m["iou"] > 0.9 and m["iou_uniform"] > 0.9 and m["accuracy"] > 0.95, m
    for name in ("steps", "train_seconds", "compile_seconds", "ms_per_step", "num_params"):
        assert m[name] > 0, name
    assert m["steps"] == config.steps and m["mesh_boundary_edges"] == 0
    assert list(result.loss_history)[-1] == config.steps
    assert result.loss_history[config.steps] < result.loss_history[config.log_every]


def test_marching_cubes_gives_a_closed_mesh_of_the_right_volume(sphere_fit):
    mesh, config, result = sphere_fit
    vertices, faces = extract_mesh(result.params, config, resolution=40)
    assert len(faces) > 100 and vertices.dtype == np.float32 and faces.dtype == np.int32
    assert boundary_edges(vertices, faces) == 0
    reference = mesh_volume(mesh.vertices, mesh.faces)
    assert reference == pytest.approx(4.0 / 3.0 * np.pi * 0.9**3, rel=0.02)
    assert mesh_volume(vertices, faces) == pytest.approx(reference, rel=0.15)
    radius = np.linalg.norm(vertices, axis=-1)
    assert np.all(np.abs(radius - 0.9) < 0.15), (radius.min(), radius.max())


def test_vmapped_apply_over_params_equals_single_applies():
    config = OccupancyFieldConfig(num_frequencies=3, hidden_width=16, num_hidden_layers=2)
    model = OccupancyMLP(config)
    stacked = jax.jit(jax.vmap(lambda key: init_params(config, key)))(jax.random.split(jax.random.PRNGKey(1), 3))
    points = jax.random.uniform(jax.random.PRNGKey(2), (50, 3), jnp.float32, -1.0, 1.0)
    apply = jax.jit(lambda params: model.apply({"params": params}, points))
    batched = jax.jit(jax.vmap(apply))(stacked)
    assert batched.shape == (3, 50) and batched.dtype == jnp.float32
    for index in range(3):
        single = apply(jax.tree_util.tree_map(lambda leaf, i=index: leaf[i], stacked))
        np.testing.assert_allclose(batched[index], single, rtol=1e-5, atol=1e-6)
    assert not np.allclose(batched[0], batched[1])
    hyperdiffusion = OccupancyFieldConfig()
    shapes = jax.eval_shape(lambda: init_params(hyperdiffusion, jax.random.PRNGKey(0)))
    assert sum(np.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(shapes)) == hyperdiffusion.num_params == 36737


def test_cli_writes_its_files(tmp_path, capsys):
    workdir = tmp_path / "run"
    argv = ["--mesh", "procedural:torus", "--preset", "tiny", "--steps", "60", "--resolution", "24",
            "--workdir", str(workdir), "--quiet"]
    status, out, err = run_cli(argv, capsys)
    assert status == 0, err
    assert "warning" not in err and "IoU" in out
    for name in ("field.safetensors", "mesh.ply", "metrics.json", "config.json"):
        assert (workdir / name).exists(), name
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert {"iou", "accuracy", "steps", "train_seconds", "compile_seconds", "ms_per_step"} <= set(metrics)
    assert metrics["steps"] == 60 and metrics["extracted_faces"] > 0
    config = json.loads((workdir / "config.json").read_text())
    assert config["mesh"] == "procedural:torus" and config["fit"]["steps"] == 60
    _, field_dict, extra = load_field(str(workdir / "field.safetensors"), kind="occupancy")
    assert field_dict["hidden_width"] == 32 and extra["source"] == "procedural:torus"
    params, field_config = load_occupancy_field(str(workdir / "field.safetensors"))
    assert field_config == PRESETS["tiny"].field
    assert (workdir / "mesh.ply").read_bytes().startswith(b"ply\nformat binary_little_endian")


def test_a_mesh_with_a_hole_is_fitted_with_a_warning(tmp_path, capsys):
    box = meshes.box((0.5, 0.4, 0.3))
    path = tmp_path / "open_box.obj"
    meshes.save_obj(str(path), meshes.Mesh(box.vertices, box.normals, box.faces[:-1], box.colors))
    argv = ["--mesh", str(path), "--preset", "tiny", "--steps", "20", "--resolution", "16",
            "--workdir", str(tmp_path / "run"), "--quiet"]
    status, _, err = run_cli(argv, capsys)
    assert status == 0, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning:") and "not watertight" in lines[0]


@pytest.mark.parametrize(
    "argv,expected",
    [
        (lambda d: ["--mesh", str(d / "missing.obj")], "mesh file not found"),
        (lambda d: ["--mesh", str(d / "garbage.stl")], "mesh"),
        (lambda d: ["--mesh", str(d / "notes.txt")], "unsupported mesh format"),
        (lambda d: ["--mesh", "procedural:teapot"], "unknown procedural mesh"),
        (lambda d: ["--mesh", "procedural:sphere", "--preset", "huge"], "unknown preset"),
        (lambda d: ["--mesh", "procedural:sphere", "--steps", "0"], "steps must be > 0"),
        (lambda d: ["--mesh", "procedural:sphere", "--steps", "-3"], "steps must be > 0"),
        (lambda d: ["--mesh", "procedural:sphere", "--workdir", str(d / "a_file" / "run")], "cannot write to workdir"),
        (lambda d: [], "--mesh"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, argv, expected):
    (tmp_path / "garbage.stl").write_bytes(b"\x00\x01 not a mesh at all")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "a_file").write_text("a file where a directory should be")
    arguments = argv(tmp_path)
    if "--workdir" not in arguments:
        arguments += ["--workdir", str(tmp_path / "w")]
    status, _, err = run_cli(arguments, capsys)
    assert_one_line_error(status, err, expected)


def test_bad_input_as_a_real_process(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "fields.occupancy", "--mesh", str(tmp_path / "nope.obj"), "--workdir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: mesh file not found: {tmp_path / 'nope.obj'}"]
