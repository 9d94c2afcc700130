"""Procedural test data shared by the tests."""

import numpy as np
import pytest

from fields.cli import run_main


def assert_one_line_error(status, err: str, expected: str) -> None:
    """A bad-input exit: status 2, exactly one non-empty stderr line containing ``expected``, no traceback."""
    assert status == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], err
    assert "Traceback" not in err


def procedural_image(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """A smooth, asymmetric ``[height, width, channels]`` image in [0, 1] (orientation is testable).

    Channel 0 ramps left->right, channel 1 top->bottom, channel 2 (if any) holds a soft disc in
    the upper-left quadrant; an alpha channel (if any) is a vertical ramp.
    """
    rng = np.random.default_rng(seed)
    y, x = np.meshgrid((np.arange(height) + 0.5) / height, (np.arange(width) + 0.5) / width, indexing="ij")
    centre = rng.uniform(0.2, 0.35, size=2)
    disc = 1.0 / (1.0 + np.exp(((x - centre[0]) ** 2 + (y - centre[1]) ** 2 - 0.02) * 200.0))
    planes = [x, y, disc, 0.25 + 0.5 * y][:channels]
    if channels == 1:
        planes = [0.5 * x + 0.5 * disc]
    return np.stack(planes, axis=-1).astype(np.float32)


def run_entry_point(main, argv, capsys):
    """Runs an entry point's ``main`` in-process as ``python -m`` would; returns (status, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        run_main(main, argv)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err
