"""NeRF fitting end to end on a tiny procedural scene: outputs, resume after a real kill, bad input."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fields import ngp_nerf
from fields.cli import UserError
from fields.data.procgen_3d import ViewConfig, generate_scenes
from tests.helpers import assert_one_line_error, run_entry_point

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenes")
    generate_scenes(str(out), 1, ViewConfig(views={"train": 12, "val": 1, "test": 2}, resolution=32), seed=3,
                    progress=False)
    return str(out / "scene_0000")


def run_cli(argv, capsys):
    return run_entry_point(ngp_nerf.main, argv, capsys)


def test_tiny_fit_writes_everything(scene, tmp_path, capsys):
    workdir = tmp_path / "run"
    argv = ["--data", scene, "--workdir", str(workdir), "--preset", "tiny", "--steps", "48", "--quiet",
            "--scene-bound", "1.0", "--render-path", "orbit", "--orbit-frames", "3"]
    status, out, err = run_cli(argv, capsys)
    assert status == 0, err
    for name in ("field.safetensors", "metrics.json", "metrics.csv", "config.json", "orbit.mp4",
                 "renders/test_000.png", "renders/depth_001.png", "orbit/frame_0005.png"):
        assert (workdir / name).exists(), name
    results = json.loads((workdir / "metrics.json").read_text())
    assert len(results["views"]) == 2 and results["steps"] == 48
    assert results["psnr"] > 12.0 and results["rays_per_second"] > 0 and results["frames_per_second"] > 0
    assert (workdir / "metrics.csv").read_text().splitlines()[0] == "view,psnr,ssim"
    assert (workdir / "orbit.mp4").stat().st_size > 1000

    params, grid, config = ngp_nerf.load_nerf(str(workdir / "field.safetensors"))
    assert config.scene_bound == 1.0 and config.field.grid.num_levels == 4
    assert grid["bitfield"].dtype == np.uint8 and grid["bitfield"].shape == (16**3 // 8,)
    assert params["hash_table"].shape == (config.field.grid.num_entries, 2)

    # Mesh export at a level inside the field's density range.
    from fields.models.nerf import NeRFField
    from fields.nerf_fitting import density_grid, export_mesh

    model = NeRFField(config.field)
    density = density_grid(model, params, 24)
    level = float(density.min() + 0.5 * (density.max() - density.min()))
    vertices, faces = export_mesh(str(tmp_path / "mesh.ply"), model, params, config, 24, level)
    assert vertices > 0 and faces > 0
    header = (tmp_path / "mesh.ply").read_bytes()[:300].decode("ascii", "replace")
    assert header.startswith("ply\nformat binary_little_endian") and f"element face {faces}" in header
    with pytest.raises(ValueError, match="never crosses"):
        export_mesh(str(tmp_path / "none.ply"), model, params, config, 24, float(density.max()) + 1.0)

    # The same command again resumes at the final checkpoint and does not train.
    status, out, _ = run_cli(argv, capsys)
    assert status == 0 and "resuming from the checkpoint at step 48" in out and "compiled" not in out


def test_cli_rerun_resumes_after_kill(scene, tmp_path):
    """Kill the real command after a checkpoint, rerun the same command: it resumes at that step."""
    workdir = tmp_path / "rerun"
    command = [sys.executable, "-m", "fields.ngp_nerf", "--data", scene, "--workdir", str(workdir),
               "--preset", "tiny", "--steps", "400", "--checkpoint-every", "16", "--quiet", "--scene-bound", "1.0",
               "--max-test-views", "1"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    checkpoints = workdir / "checkpoints"
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            steps = [int(p.name) for p in checkpoints.glob("*") if p.name.isdigit()] if checkpoints.exists() else []
            if steps and max(steps) >= 32:
                break
            if process.poll() is not None:
                pytest.fail("the run finished before it could be killed")
            time.sleep(0.1)
        else:
            pytest.fail("no checkpoint appeared in time")
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    kept = max(int(p.name) for p in checkpoints.glob("*") if p.name.isdigit())
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resuming from the checkpoint at step {kept}" in result.stdout
    assert json.loads((workdir / "metrics.json").read_text())["steps"] == 400


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(scene, tmp_path):
    from fields.checkpoint import Checkpointer
    from fields.data.nerf_scenes import load_scene
    from fields.nerf_fitting import PRESETS, Trainer

    config = dataclasses.replace(PRESETS["tiny"], steps=32, scene_bound=1.0)
    train_scene = load_scene(scene, "train")
    ngp_nerf.train(Trainer(config, train_scene), str(tmp_path), quiet=True, checkpoint_every=16)
    train_scene.images = np.full_like(train_scene.images, np.nan)  # poisoned data: the loss turns NaN
    poisoned = Trainer(dataclasses.replace(config, steps=64), train_scene)
    with pytest.raises(UserError, match=r"loss became nan in steps 32\.\.48; the checkpoint at step 32 is kept"):
        ngp_nerf.train(poisoned, str(tmp_path), quiet=True, checkpoint_every=16)
    manager = Checkpointer(str(tmp_path / "checkpoints"))
    assert manager.latest_step() == 32
    restored = manager.restore(poisoned.state)
    manager.close()
    assert np.all(np.isfinite(np.asarray(restored["params"]["hash_table"])))


@pytest.mark.parametrize("argv,expected", [
    (["--data", "/nonexistent/scene"], "/nonexistent/scene"),
    (["--data", "SCENE", "--preset", "huge"], "unknown preset"),
    (["--data", "SCENE", "--steps", "0"], "steps must be > 0"),
    (["--data", "SCENE", "--downscale", "0"], "--downscale must be >= 1"),
    (["--data", "BROKEN"], "transforms_train.json"),
    ([], "give --data"),
])
def test_bad_input_exits_2_with_one_line(scene, tmp_path, capsys, argv, expected):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "transforms_train.json").write_text('{"camera_angle_x": 0.7, "frames": [{"file_path": "./a"}]}')
    argv = [{"SCENE": scene, "BROKEN": str(broken)}.get(a, a) for a in argv]
    status, _, err = run_cli(argv + ["--workdir", str(tmp_path / "w"), "--quiet"], capsys)
    assert_one_line_error(status, err, expected)
