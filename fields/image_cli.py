"""The command line shared by the image-field entry points (``fields.ngp_image``, ``fields.mlp_image``).

A fit writes to the work directory: render.png, field.safetensors (weights + field config in the
metadata), metrics.json (psnr, ssim, steps, train_seconds, compile_seconds, ms_per_step) and
config.json (the resolved configuration). Rerunning a finished fit in the same work directory
reports its metrics instead of fitting again (``--overwrite`` refits).
"""

from __future__ import annotations

import json
import os

from fields.cli import ArgumentParser, UserError, prepare_workdir
from fields.config import check_run_config, read_config_record, resolve_preset
from fields.image_fitting import (
    describe,
    fit_image,
    render_saved_field,
    run_config_dict,
    save_fit,
    write_run_config,
)


def build_parser(prog: str, description: str, presets: dict, models: tuple[str, ...] = ()) -> ArgumentParser:
    parser = ArgumentParser(prog=prog, description=description)
    if models:
        parser.add_argument("--model", choices=models, default=models[0],
                            help=f"field family (default: {models[0]})")
    fit = parser.add_argument_group("fitting")
    fit.add_argument("--image", help="PNG/JPEG path (grey, RGB or RGBA), or skimage:NAME (e.g. skimage:astronaut)")
    fit.add_argument(
        "--preset", default="default", help=f"configuration preset: {', '.join(presets)} (default: default)"
    )
    fit.add_argument("--steps", type=int, help="optimisation steps (default: the preset's)")
    fit.add_argument("--batch-size", type=int, help="pixels per step (default: the preset's)")
    fit.add_argument("--learning-rate", type=float, help="Adam peak learning rate (default: the preset's)")
    fit.add_argument("--seed", type=int, default=0, help="init and sampling seed (default: 0)")
    fit.add_argument("--workdir", default="runs/ngp_image", help="output directory (default: runs/ngp_image)")
    fit.add_argument(
        "--backend", choices=("auto", "kernel", "jax"), default="auto",
        help="hash-grid backend: compiled kernels when installed (auto), kernel, or pure jax",
    )
    fit.add_argument("--overwrite", action="store_true", help="refit even if the work directory holds a finished fit")
    fit.add_argument("--quiet", action="store_true", help="no progress bar")
    render = parser.add_argument_group("rendering a saved field")
    render.add_argument("--render", metavar="FIELD", help="a field.safetensors to render instead of fitting")
    render.add_argument("--width", type=int, help="render width in pixels (default: the fitted image's)")
    render.add_argument("--height", type=int, help="render height in pixels (default: the fitted image's)")
    render.add_argument("--out", default="render.png", help="output image for --render (default: render.png)")
    return parser


def resolve_config(args, presets: dict):
    return resolve_preset(presets, args.preset, {"seed": args.seed, "backend": args.backend, "steps": args.steps,
                                                 "batch_size": args.batch_size,
                                                 "learning_rate": args.learning_rate})


def finished_run(workdir: str, run_config: dict) -> dict | None:
    """Metrics of a finished fit with the same configuration in ``workdir``, else None.

    Raises:
        UserError: the work directory holds a different configuration.
    """
    saved = read_config_record(os.path.join(workdir, "config.json"))
    if saved is None:
        return None
    check_run_config(workdir, saved, run_config, holds="a fit with a different configuration",
                     option="--workdir or --overwrite")
    metrics_path = os.path.join(workdir, "metrics.json")
    if not (os.path.exists(metrics_path) and os.path.exists(os.path.join(workdir, "field.safetensors"))):
        return None
    with open(metrics_path) as handle:
        return json.load(handle)


def main(argv: list[str] | None, prog: str, description: str, presets_by_model: dict[str, dict]) -> int:
    """Parses ``argv`` and fits or renders. ``presets_by_model``: ``{model: {preset name: config}}``
    (one model, ``""``, for entry points without ``--model``)."""
    models = tuple(name for name in presets_by_model if name)
    first = next(iter(presets_by_model.values()))
    args = build_parser(prog, description, first, models).parse_args(argv)
    presets = presets_by_model[getattr(args, "model", "")]
    for name in ("width", "height"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UserError(f"--{name} must be > 0, got {value}")

    if args.render:
        from fields.data.images import save_image

        image = render_saved_field(args.render, args.width, args.height, args.backend)
        try:
            save_image(args.out, image)
        except (OSError, ValueError) as error:
            raise UserError(f"cannot write {args.out}: {error}") from None
        print(f"wrote {args.out} ({image.shape[1]}x{image.shape[0]})")
        return 0

    if not args.image:
        raise UserError("give --image PATH (or skimage:NAME) to fit, or --render FIELD to render")
    config = resolve_config(args, presets)
    prepare_workdir(args.workdir)
    run_config = run_config_dict(config, args.image)
    if args.overwrite:
        done = None
    else:
        done = finished_run(args.workdir, run_config)
    if done is not None:
        print(f"{args.workdir} already holds this fit (--overwrite to refit): "
              f"PSNR {done['psnr']:.2f} dB, SSIM {done['ssim']:.4f}")
        return 0

    from fields.data.images import load_image

    image = load_image(args.image)
    print(f"fitting {args.image} ({image.shape[1]}x{image.shape[0]}, {image.shape[2]} channels), "
          f"{run_config['model']} preset {args.preset}:\n{describe(config)}")
    write_run_config(args.workdir, run_config)
    result = fit_image(image, config, progress=not args.quiet)
    paths = save_fit(args.workdir, result, config, args.image)
    m = result.metrics
    print(
        f"PSNR {m['psnr']:.2f} dB, SSIM {m['ssim']:.4f}, {m['ms_per_step']:.1f} ms/step "
        f"({m['backend']} backend), compile {m['compile_seconds']:.1f} s; wrote {', '.join(paths.values())}"
    )
    return 0

