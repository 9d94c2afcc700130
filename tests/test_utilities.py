"""Metrics, configs and weight files."""

import dataclasses
import os

import numpy as np
import pytest

from fields import metrics
from fields.cli import UserError
from fields.config import ConfigError, config_from_dict, config_to_dict
from fields.image_fitting import PRESETS, ImageFitConfig
from fields.weights import flatten_params, load_field, save_field, unflatten_params


def test_psnr_from_a_known_error():
    reference = np.zeros((8, 8, 3), np.float32)
    assert metrics.psnr(reference + 0.1, reference) == pytest.approx(20.0, abs=1e-6)  # mse 0.01
    assert metrics.mse_to_psnr(1e-4) == pytest.approx(40.0)


def test_ssim_identity_and_hand_value():
    rng = np.random.default_rng(0)
    image = rng.uniform(size=(32, 32, 3))
    assert metrics.ssim(image, image) == pytest.approx(1.0)
    # Constant images: SSIM reduces to the luminance term (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1).
    c1 = (0.01 * 1.0) ** 2
    expected = (2 * 0.2 * 0.6 + c1) / (0.2**2 + 0.6**2 + c1)
    assert metrics.ssim(np.full((32, 32, 1), 0.2), np.full((32, 32, 1), 0.6)) == pytest.approx(expected, rel=1e-6)
    assert metrics.ssim(image, np.clip(image + rng.normal(0, 0.2, image.shape), 0, 1)) < 0.9


def test_every_preset_round_trips_through_json():
    for name, config in PRESETS.items():
        assert config_from_dict(ImageFitConfig, config_to_dict(config)) == config, name


def test_config_errors_name_the_field():
    values = config_to_dict(PRESETS["tiny"])
    values["field"]["grid"]["num_levels"] = "many"
    with pytest.raises(ConfigError, match=r"field\.grid\.num_levels"):
        config_from_dict(ImageFitConfig, values)
    with pytest.raises(ConfigError, match="unknown field.*colour"):
        config_from_dict(ImageFitConfig, {"colour": 1})
    with pytest.raises(ConfigError, match="steps must be > 0"):
        config_from_dict(ImageFitConfig, {"steps": 0})


def test_flatten_round_trip_and_safetensors(tmp_path):
    params = {"hash_table": np.arange(6, dtype=np.float32).reshape(3, 2),
              "mlp": {"dense_0": {"kernel": np.ones((2, 4), np.float32)}, "dense_1": {"kernel": np.eye(4, 1)}}}
    flat = flatten_params(params)
    assert list(flat) == ["hash_table", "mlp/dense_0/kernel", "mlp/dense_1/kernel"]
    restored = unflatten_params(flat)
    path = tmp_path / "f.safetensors"
    save_field(str(path), params, "toy", {"width": 4}, note="hello")
    loaded, config, extra = load_field(str(path), kind="toy")
    assert config == {"width": 4} and extra == {"note": "hello", "kind": "toy"}
    for tree in (restored, loaded):
        np.testing.assert_array_equal(tree["mlp"]["dense_0"]["kernel"], params["mlp"]["dense_0"]["kernel"])
        np.testing.assert_array_equal(tree["hash_table"], params["hash_table"])
    with pytest.raises(UserError, match="expected 'other'"):
        load_field(str(path), kind="other")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:40])
    with pytest.raises(UserError, match="cannot read field file"):
        load_field(str(truncated))


def test_image_fit_config_validation():
    with pytest.raises(ValueError, match="backend"):
        dataclasses.replace(PRESETS["tiny"], backend="gpu-magic")


def test_prepare_workdir_is_safe_for_processes_preparing_one_workdir_at_once(tmp_path):
    # Every process of a multi-host run prepares the same work directory; a shared probe file name
    # made one process fail ("No such file or directory") when another removed the probe first.
    from concurrent.futures import ThreadPoolExecutor

    from fields.cli import prepare_workdir

    workdir = str(tmp_path / "run")
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: [prepare_workdir(workdir) for _ in range(50)], range(8)))
    assert os.listdir(workdir) == []
