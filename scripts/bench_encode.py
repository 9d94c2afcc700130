"""Benchmark: encode many 28x28 images into NGP fields, batched vs one field at a time.

    python -m scripts.bench_encode                  # 1,024 Fashion-MNIST train images if installed
    python -m scripts.bench_encode --num 256 --loop-fields 32

Source: Debian's ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``) when present,
else the procedural primitives at 28x28. Field: the ``small`` NGP preset (about 1.5k parameters).
Batched: ``fit_image_batch`` over ``--fields-per-batch`` fields per call (compile included in the
wall clock, as a user sees it). One at a time: the same step compiled once and run field after
field (``--loop-fields`` fields, timed, then fields/s extrapolated). Library loop: ``fit_image`` called
once per field (``--library-fields`` of them), which is what ``python -m fields.ngp_image`` does per
image (it compiles its step for every call and records a PSNR history). Prints JSON: fields/s, mean
and 5th-percentile PSNR of each path, and the ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from fields import metrics
from fields.data.image_sources import open_image_source
from fields.image_fitting import PRESETS, fit_image, fit_image_batch, make_renderer, train_chunk_function
from fields.training import make_optimizer

FASHION_MNIST = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"


def one_at_a_time(images: np.ndarray, config, seeds) -> tuple[float, np.ndarray, float]:
    """Fits fields sequentially with one compiled step; returns (seconds excluding compile, psnrs,
    seconds inside the training steps alone)."""
    _, height, width, channels = images.shape
    field_config = dataclasses.replace(config.field, output_dim=channels)
    model = field_config.build(config.backend)
    optimizer = make_optimizer(config)
    step = jax.jit(train_chunk_function(model, optimizer, config.batch_size, height, width), donate_argnums=(0, 1))
    init = jax.jit(lambda key: model.init(key, jnp.zeros((1, 2), jnp.float32))["params"])
    render = make_renderer(field_config, config.backend)

    step_seconds = [0.0]

    def fit(image, seed):
        init_key, sample_key = jax.random.split(jax.random.PRNGKey(seed))
        params = init(init_key)
        opt_state = optimizer.init(params)
        pixels = jnp.asarray(image.reshape(height * width, channels))
        done, start = 0, time.perf_counter()
        while done < config.steps:
            count = min(config.log_every, config.steps - done)
            params, opt_state, loss = step(params, opt_state, pixels, sample_key, jnp.int32(done), jnp.int32(count))
            float(loss)
            done += count
        step_seconds[0] += time.perf_counter() - start
        return metrics.psnr(render(params, height, width), image)

    fit(images[0], seeds[0])  # compile
    step_seconds[0] = 0.0
    start = time.perf_counter()
    psnrs = np.asarray([fit(image, seed) for image, seed in zip(images, seeds, strict=True)])
    return time.perf_counter() - start, psnrs, step_seconds[0]


def library_loop(images: np.ndarray, config, seeds) -> tuple[float, np.ndarray]:
    """``fit_image`` once per field (compile and evaluation included, as the CLI runs it)."""
    start = time.perf_counter()
    psnrs = np.asarray([fit_image(image, dataclasses.replace(config, seed=seed), progress=False).metrics["psnr"]
                        for image, seed in zip(images, seeds, strict=True)])
    return time.perf_counter() - start, psnrs


def summary(seconds: float, psnrs: np.ndarray) -> dict:
    return {"fields": len(psnrs), "seconds": seconds, "fields_per_second": len(psnrs) / seconds,
            "psnr_mean": float(np.mean(psnrs)), "psnr_p5": float(np.percentile(psnrs, 5)),
            "psnr_min": float(np.min(psnrs))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num", type=int, default=1024)
    parser.add_argument("--fields-per-batch", type=int, default=256)
    parser.add_argument("--loop-fields", type=int, default=64, help="fields timed in the one-at-a-time loop")
    parser.add_argument("--library-fields", type=int, default=16, help="fields timed in the fit_image loop")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args()

    spec = f"idx:{FASHION_MNIST}" if os.path.exists(FASHION_MNIST) else "procedural:primitives"
    source = open_image_source(spec, args.num, 0, (28, 28))
    images = source.load(range(source.num_items))
    config = dataclasses.replace(PRESETS[args.preset], backend=args.backend)
    if args.steps:
        config = dataclasses.replace(config, steps=args.steps)
    num_params = sum(int(np.prod(np.shape(x))) for x in jax.tree_util.tree_leaves(jax.eval_shape(
        lambda: dataclasses.replace(config.field, output_dim=source.channels).build("jax").init(
            jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.float32)))))

    start = time.perf_counter()
    batched_psnrs, batched_step_seconds = [], 0.0
    for first in range(0, len(images), args.fields_per_batch):
        chunk = images[first:first + args.fields_per_batch]
        result = fit_image_batch(chunk, config, list(range(first, first + len(chunk))))
        batched_psnrs.append(result.psnr)
        batched_step_seconds += result.train_seconds
        print(f"# batch {first}: {len(chunk)} fields, mean PSNR {np.mean(result.psnr):.2f} dB", flush=True)
    batched_psnrs = np.concatenate(batched_psnrs)
    batched = summary(time.perf_counter() - start, batched_psnrs)

    loop_count = min(args.loop_fields, len(images))
    loop_seconds, loop_psnrs, loop_step_seconds = one_at_a_time(images[:loop_count], config,
                                                                list(range(loop_count)))
    loop = summary(loop_seconds, loop_psnrs)
    library_count = min(args.library_fields, len(images))
    library = summary(*library_loop(images[:library_count], config, list(range(library_count))))
    pixels = images.shape[1] * images.shape[2]
    report = {
        "source": spec, "num_fields": len(images), "image_shape": list(images.shape[1:]), "preset": args.preset,
        "steps": config.steps, "num_params": num_params, "fields_per_batch": args.fields_per_batch,
        "devices": str(jax.devices()), "batched": batched, "one_at_a_time": loop,
        "one_at_a_time_fit_image": library,
        "speedup": batched["fields_per_second"] / loop["fields_per_second"],
        "speedup_vs_fit_image_loop": batched["fields_per_second"] / library["fields_per_second"],
        # Cost of the training steps alone (compile, init and renders excluded): both paths are compute
        # bound when these are close.
        "ns_per_pixel_step": {
            "batched": 1e9 * batched_step_seconds / (len(images) * config.steps * pixels),
            "one_at_a_time": 1e9 * loop_step_seconds / (loop_count * config.steps * pixels)},
        # The same fields (same seeds) fitted both ways: batched minus one-at-a-time PSNR.
        "psnr_difference_same_fields": float(np.mean(batched_psnrs[:loop_count] - loop_psnrs)),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
