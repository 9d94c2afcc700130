"""Fit an Instant-NGP image field (hash grid + MLP), or render a saved one.

Fit:     python -m fields.ngp_image --image skimage:astronaut --preset default --workdir runs/astronaut
Render:  python -m fields.ngp_image --render runs/astronaut/field.safetensors --width 1024 --height 1024 \
             --out big.png

A fit writes to the work directory: render.png, field.safetensors (weights + field config in the
metadata), metrics.json (psnr, ssim, steps, train_seconds, compile_seconds, ms_per_step) and
config.json (the resolved configuration). Rerunning a finished fit in the same work directory
reports its metrics instead of fitting again (``--overwrite`` refits).
"""

from __future__ import annotations

from fields import image_cli
from fields.cli import run_main
from fields.image_fitting import PRESETS


def main(argv: list[str] | None = None) -> int:
    return image_cli.main(argv, "python -m fields.ngp_image",
                          "Fit an Instant-NGP (hash grid + MLP) field to one image, or render a saved field.",
                          {"": PRESETS})


if __name__ == "__main__":
    run_main(main)
