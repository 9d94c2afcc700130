"""Fit a plain-MLP image field (SIREN or Fourier-feature ReLU MLP), or render a saved one.

    python -m fields.mlp_image --model siren --image skimage:astronaut --workdir runs/siren
    python -m fields.mlp_image --model fourier --image skimage:camera --preset tiny
    python -m fields.mlp_image --render runs/siren/field.safetensors --width 1024 --height 1024 --out big.png

Same outputs as ``fields.ngp_image``: render.png, field.safetensors, metrics.json, config.json.
"""

from __future__ import annotations

from fields import image_cli
from fields.cli import run_main
from fields.image_fitting import MLP_PRESETS


def main(argv: list[str] | None = None) -> int:
    return image_cli.main(argv, "python -m fields.mlp_image",
                          "Fit a SIREN or Fourier-feature MLP field to one image, or render a saved field.",
                          MLP_PRESETS)


if __name__ == "__main__":
    run_main(main)
