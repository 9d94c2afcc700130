"""Image fields: fitting, outputs, rendering, and one-line errors on bad input."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fields import ngp_image
from fields.data.images import load_image, save_image
from fields.image_fitting import fit_image, preset, render_saved_field
from fields.weights import load_field
from tests.helpers import assert_one_line_error, procedural_image, run_entry_point

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(argv, capsys):
    return run_entry_point(ngp_image.main, argv, capsys)


def test_tiny_fit_learns_a_non_square_image_in_the_right_orientation():
    image = procedural_image(24, 40)
    config = dataclasses.replace(preset("tiny"), steps=300, backend="jax")
    result = fit_image(image, config, eval_at_steps=(50,), progress=False)
    assert result.metrics["psnr"] > 28.0, result.metrics
    assert result.psnr_history[50] < result.metrics["psnr"]
    assert 0.0 < result.metrics["ssim"] <= 1.0
    for name in ("steps", "train_seconds", "compile_seconds", "ms_per_step"):
        assert result.metrics[name] > 0
    # A transposed or flipped render would not correlate with the ramps.
    from fields.image_fitting import make_renderer

    rendered = make_renderer(result.field_config, "jax")(result.params, 24, 40)
    assert rendered.shape == (24, 40, 3)
    for channel in range(3):
        correlation = np.corrcoef(rendered[..., channel].ravel(), image[..., channel].ravel())[0, 1]
        assert correlation > 0.98, (channel, correlation)


def test_fit_is_deterministic_given_the_seed():
    image = procedural_image(16, 16, channels=1)
    config = dataclasses.replace(preset("tiny"), steps=20, backend="jax", log_every=7)
    first = fit_image(image, config, progress=False)
    second = fit_image(image, dataclasses.replace(config, log_every=20), progress=False)  # other chunking
    np.testing.assert_allclose(first.params["hash_table"], second.params["hash_table"], rtol=1e-6, atol=1e-9)


def test_cli_writes_outputs_renders_and_does_not_refit(tmp_path, capsys):
    source = tmp_path / "input.png"
    save_image(str(source), procedural_image(20, 36, channels=4))
    workdir = tmp_path / "run"
    argv = ["--image", str(source), "--preset", "tiny", "--steps", "60", "--workdir", str(workdir),
            "--backend", "jax", "--quiet"]
    status, out, err = run_cli(argv, capsys)
    assert status == 0, err
    for name in ("render.png", "field.safetensors", "metrics.json", "config.json"):
        assert (workdir / name).exists(), name
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert {"psnr", "ssim", "steps", "train_seconds", "compile_seconds", "ms_per_step"} <= set(metrics)
    assert metrics["steps"] == 60 and metrics["channels"] == 4
    with Image.open(workdir / "render.png") as render:
        assert render.size == (36, 20) and render.mode == "RGBA"
    config = json.loads((workdir / "config.json").read_text())
    assert config["fit"]["steps"] == 60 and config["image"] == str(source)

    params, field_config, extra = load_field(str(workdir / "field.safetensors"), kind="ngp_image")
    assert field_config["output_dim"] == 4 and field_config["grid"]["num_levels"] == 4
    assert extra["image_height"] == 20 and extra["image_width"] == 36
    assert params["hash_table"].shape[1] == 2

    # Same command again: reports the finished fit instead of refitting.
    status, out, _ = run_cli(argv, capsys)
    assert status == 0 and "already holds this fit" in out
    # A different configuration in the same work directory is refused.
    status, _, err = run_cli(argv[:-3] + ["--steps", "61", "--backend", "jax", "--quiet"], capsys)
    assert status == 2 and "different configuration" in err

    # Render the saved field at another resolution and aspect ratio.
    out_png = tmp_path / "big.png"
    status, _, err = run_cli(["--render", str(workdir / "field.safetensors"), "--width", "72", "--height", "40",
                              "--out", str(out_png), "--backend", "jax"], capsys)
    assert status == 0, err
    with Image.open(out_png) as big:
        assert big.size == (72, 40)
    small = render_saved_field(str(workdir / "field.safetensors"), None, None, backend="jax")
    assert small.shape == (20, 36, 4)


@pytest.mark.parametrize(
    "argv_builder,expected",
    [
        (lambda d: ["--image", str(d / "missing.png")], "image not found"),
        (lambda d: ["--image", str(d / "not_an_image.png")], "cannot read image"),
        (lambda d: ["--image", "skimage:no_such_picture"], "unknown scikit-image image"),
        (lambda d: ["--image", "skimage:camera", "--preset", "huge"], "unknown preset"),
        (lambda d: ["--image", "skimage:camera", "--steps", "0"], "steps must be > 0"),
        (lambda d: ["--image", "skimage:camera", "--steps", "-5"], "steps must be > 0"),
        (lambda d: ["--image", "skimage:camera", "--steps", "ten"], "invalid int value"),
        (lambda d: ["--image", "skimage:camera", "--workdir", str(d / "a_file" / "run")], "cannot write to workdir"),
        (lambda d: ["--render", str(d / "missing.safetensors")], "field file not found"),
        (lambda d: ["--render", str(d / "not_an_image.png")], "cannot read field file"),
        (lambda d: ["--render", str(d / "f.safetensors"), "--width", "0"], "--width must be > 0"),
        (lambda d: [], "give --image"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, argv_builder, expected):
    (tmp_path / "not_an_image.png").write_text("this is text, not a PNG")
    (tmp_path / "a_file").write_text("a file where a directory should be")
    status, _, err = run_cli(argv_builder(tmp_path) + ["--workdir", str(tmp_path / "w")]
                             if "--workdir" not in argv_builder(tmp_path) else argv_builder(tmp_path), capsys)
    assert_one_line_error(status, err, expected)


def test_bad_input_as_a_real_process(tmp_path):
    """The module entry point itself: exit status 2, one line, no traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "fields.ngp_image", "--image", str(tmp_path / "nope.jpg"), "--workdir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: image not found: {tmp_path / 'nope.jpg'}"]


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    from fields.weights import save_field

    path = tmp_path / "bad.safetensors"
    config = dataclasses.replace(preset("tiny").field, output_dim=3)
    from fields.config import config_to_dict

    save_field(str(path), {"hash_table": np.zeros((5, 2), np.float32)}, "ngp_image", config_to_dict(config),
               image_height=4, image_width=4)
    from fields.cli import UserError

    with pytest.raises(UserError, match="do not fit"):
        render_saved_field(str(path), None, None, backend="jax")


@pytest.mark.parametrize("mode,channels", [("L", 1), ("RGB", 3), ("RGBA", 4), ("P", 3), ("LA", 4), ("I;16", 1)])
def test_image_modes_load_with_their_channels(tmp_path, mode, channels):
    base = Image.fromarray((procedural_image(9, 13, 3) * 255).astype(np.uint8), "RGB")
    image = base.convert(mode) if mode != "I;16" else Image.fromarray(
        (procedural_image(9, 13, 1)[..., 0] * 65535).astype(np.uint16))
    path = tmp_path / f"image_{mode.replace(';', '')}.png"
    image.save(path)
    array = load_image(str(path))
    assert array.shape == (9, 13, channels) and array.dtype == np.float32
    assert 0.0 <= array.min() and array.max() <= 1.0


def test_skimage_images_load():
    assert load_image("skimage:camera").shape == (512, 512, 1)
    assert load_image("skimage:astronaut").shape == (512, 512, 3)
