"""Benchmark: fit the ``large`` image preset to an image and report speed and quality as JSON.

    python -m scripts.bench_ngp_image                       # skimage:astronaut, every backend available
    python -m scripts.bench_ngp_image --backends jax --repeats 3

For each backend, ``--repeats`` fits with seeds 0, 1, ...: steady-state ms/step (train time / steps,
compile excluded; median over the fits), compile seconds, and the full-render PSNR after 500, 1000
and 2000 steps (median over seeds, and the seed-to-seed range). When both backends run,
``speedup_vs_jax`` is the ratio of their median step times and ``psnr_difference_at_steps`` the
kernel-minus-JAX difference of the median PSNRs, both from this run. Two backends differ in float
rounding, so single trajectories diverge by about the seed-to-seed spread; medians over seeds are
the fair comparison.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics

import jax

from fields.data.images import load_image
from fields.image_fitting import fit_image, preset
from fields.models.hash_grid import kernels_available

EVAL_STEPS = (500, 1000, 2000)


def bench_backend(image, config, repeats: int) -> dict:
    runs = []
    for repeat in range(repeats):
        result = fit_image(image, dataclasses.replace(config, seed=repeat), eval_at_steps=EVAL_STEPS, progress=False)
        runs.append(result)
        print(f"# {config.backend} repeat {repeat}: {result.metrics['ms_per_step']:.2f} ms/step, "
              f"PSNR {result.metrics['psnr']:.2f} dB", flush=True)
    ms = [run.metrics["ms_per_step"] for run in runs]
    return {
        "ms_per_step_median": statistics.median(ms),
        "ms_per_step_all": ms,
        "compile_seconds_median": statistics.median(run.metrics["compile_seconds"] for run in runs),
        "psnr_at_steps": {
            str(step): statistics.median(run.psnr_history[step] for run in runs) for step in EVAL_STEPS
        },
        "psnr_range_at_steps": {
            str(step): [min(run.psnr_history[step] for run in runs), max(run.psnr_history[step] for run in runs)]
            for step in EVAL_STEPS
        },
        "ssim_final_median": statistics.median(run.metrics["ssim"] for run in runs),
        "num_params": runs[0].metrics["num_params"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", default="skimage:astronaut")
    parser.add_argument("--preset", default="large")
    parser.add_argument("--backends", default="auto", help="comma list of kernel,jax (auto: all available)")
    parser.add_argument("--repeats", type=int, default=3, help="fits per backend, with seeds 0..repeats-1")
    parser.add_argument("--steps", type=int, default=max(EVAL_STEPS))
    args = parser.parse_args()

    backends = args.backends.split(",") if args.backends != "auto" else (
        ["kernel", "jax"] if kernels_available() else ["jax"]
    )
    image = load_image(args.image)
    config = dataclasses.replace(preset(args.preset), steps=args.steps)
    report = {
        "image": args.image,
        "preset": args.preset,
        "steps": args.steps,
        "batch_size": config.batch_size,
        "machine": {"processor": platform.processor() or platform.machine(), "devices": str(jax.devices())},
        "backends": {},
    }
    for backend in backends:
        report["backends"][backend] = bench_backend(image, dataclasses.replace(config, backend=backend), args.repeats)
    if "kernel" in report["backends"] and "jax" in report["backends"]:
        kernel, jax_only = report["backends"]["kernel"], report["backends"]["jax"]
        report["speedup_vs_jax"] = jax_only["ms_per_step_median"] / kernel["ms_per_step_median"]
        report["psnr_difference_at_steps"] = {
            step: kernel["psnr_at_steps"][step] - jax_only["psnr_at_steps"][step] for step in kernel["psnr_at_steps"]
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
