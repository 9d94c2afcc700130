"""Fit an Instant-NGP field to one image, render fields, and the presets for doing so.

The training loop runs entirely on device: each call of the compiled ``train_chunk`` performs a
``fori_loop`` of steps (uniform random pixel sampling with replacement, forward, backward, Adam),
and the host only reads one averaged loss per chunk for the progress bar. The random key of step
``s`` is ``fold_in(seed_key, s)``, so results do not depend on how steps are split into chunks.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from fields import metrics
from fields.cli import UserError
from fields.config import ConfigError, config_from_dict, config_to_dict, config_to_json
from fields.data.images import save_image
from fields.models.hash_grid import BACKENDS, HashGridConfig, kernels_available
from fields.models.ngp import NGPField, NGPFieldConfig
from fields.weights import load_field, save_field

FIELD_KIND = "ngp_image"
RENDER_CHUNK = 1 << 16


@dataclasses.dataclass(frozen=True)
class ImageFitConfig:
    """How to fit an image field.

    Attributes:
        field: the field architecture (``output_dim`` is set from the image's channels).
        steps: optimisation steps.
        batch_size: pixels sampled (uniformly, with replacement) per step.
        learning_rate: Adam peak learning rate.
        final_learning_rate_fraction: the cosine schedule decays to this fraction of the peak.
        adam_beta1, adam_beta2, adam_eps: Adam hyper-parameters (Instant-NGP: 0.9, 0.99, 1e-15).
        seed: initialisation and sampling seed.
        backend: hash-grid backend, ``auto`` (compiled kernels when installed), ``kernel`` or ``jax``.
        log_every: steps per on-device chunk (one host read of the loss per chunk).
    """

    field: NGPFieldConfig = dataclasses.field(default_factory=NGPFieldConfig)
    steps: int = 2000
    batch_size: int = 1 << 14
    learning_rate: float = 1e-2
    final_learning_rate_fraction: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    adam_eps: float = 1e-15
    seed: int = 0
    backend: str = "auto"
    log_every: int = 50

    def __post_init__(self):
        if self.steps <= 0:
            raise ValueError(f"steps must be > 0, got {self.steps}")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {self.batch_size}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.log_every <= 0:
            raise ValueError(f"log_every must be > 0, got {self.log_every}")


def _preset(levels, log2_table, min_res, max_res, width, layers, batch_log2, steps) -> ImageFitConfig:
    grid = HashGridConfig(
        num_dims=2,
        num_levels=levels,
        features_per_level=2,
        log2_table_size=log2_table,
        min_resolution=min_res,
        max_resolution=max_res,
    )
    field = NGPFieldConfig(grid=grid, hidden_width=width, num_hidden_layers=layers)
    return ImageFitConfig(field=field, batch_size=1 << batch_log2, steps=steps)


PRESETS: dict[str, ImageFitConfig] = {
    # Test-sized: a 32x32 image in a few seconds.
    #   python -m fields.ngp_image --image skimage:astronaut --preset tiny
    "tiny": _preset(levels=4, log2_table=10, min_res=4, max_res=64, width=16, layers=1, batch_log2=10, steps=100),
    # The demo: skimage:astronaut (512x512) to about 37.5 dB in about 5 s of training on 2 CPU cores.
    #   python -m fields.ngp_image --image skimage:astronaut --workdir runs/astronaut
    "default": _preset(levels=8, log2_table=14, min_res=32, max_res=1024, width=32, layers=2, batch_log2=14,
                       steps=1000),
    # The benchmark configuration: L=8, T=2^14, F=2, N_min=64, N_max=2048, MLP 64x2, batch 2^15.
    # skimage:astronaut reaches >= 35 dB after 2000 steps (see BENCHMARKS.md).
    #   python -m scripts.bench_ngp_image
    "large": _preset(levels=8, log2_table=14, min_res=64, max_res=2048, width=64, layers=2, batch_log2=15,
                     steps=2000),
}


def preset(name: str) -> ImageFitConfig:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]


@dataclasses.dataclass
class FitResult:
    """What ``fit_image`` returns: final params, metrics and the render PSNR history."""

    params: dict
    field_config: NGPFieldConfig
    metrics: dict
    psnr_history: dict[int, float]


def _pixel_positions(indices: jax.Array, height: int, width: int) -> jax.Array:
    """Flat pixel indices ``[n]`` -> pixel-centre positions ``[n, 2]`` as (x, y) in [0, 1]."""
    rows = indices // width
    cols = indices - rows * width
    x = (cols.astype(jnp.float32) + 0.5) / jnp.float32(width)
    y = (rows.astype(jnp.float32) + 0.5) / jnp.float32(height)
    return jnp.stack([x, y], axis=-1)


def make_optimizer(config: ImageFitConfig) -> optax.GradientTransformation:
    schedule = optax.cosine_decay_schedule(
        config.learning_rate, config.steps, alpha=config.final_learning_rate_fraction
    )
    return optax.adam(schedule, b1=config.adam_beta1, b2=config.adam_beta2, eps=config.adam_eps)


def optimizer_step(optimizer: optax.GradientTransformation, grads, opt_state, params):
    """One optax update. optax mixes Python floats with int32 step counts, so its update runs
    under standard dtype promotion even where the project's own code is checked strictly."""
    with jax.numpy_dtype_promotion("standard"):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state


def make_train_chunk(model: NGPField, optimizer: optax.GradientTransformation, batch_size: int):
    """Returns ``train_chunk(params, opt_state, pixels, key, first_step, num_steps)``.

    ``pixels`` is the image ``[height * width, channels]``; the function runs ``num_steps`` steps
    on device and returns ``(params, opt_state, mean_loss)``. ``height`` and ``width`` are static.
    """

    def loss_fn(params, positions, targets):
        predictions = model.apply({"params": params}, positions)
        return jnp.mean(jnp.square(predictions - targets))

    def train_chunk(params, opt_state, pixels, key, first_step, num_steps, *, height, width):
        def body(offset, state):
            params, opt_state, loss_sum = state
            step_key = jax.random.fold_in(key, first_step + offset)
            indices = jax.random.randint(step_key, (batch_size,), 0, height * width)
            positions = _pixel_positions(indices, height, width)
            targets = jnp.take(pixels, indices, axis=0)
            loss, grads = jax.value_and_grad(loss_fn)(params, positions, targets)
            params, opt_state = optimizer_step(optimizer, grads, opt_state, params)
            return params, opt_state, loss_sum + loss

        params, opt_state, loss_sum = jax.lax.fori_loop(
            0, num_steps, body, (params, opt_state, jnp.float32(0.0))
        )
        return params, opt_state, loss_sum / num_steps.astype(jnp.float32)

    return jax.jit(train_chunk, static_argnames=("height", "width"), donate_argnums=(0, 1))


def make_renderer(field_config: NGPFieldConfig, backend: str = "auto") -> Callable:
    """Returns ``render(params, height, width) -> [height, width, channels]`` numpy in [0, 1]."""
    model = NGPField(field_config, backend=backend)

    @jax.jit
    def apply_chunk(params, positions):
        return model.apply({"params": params}, positions)

    def render(params, height: int, width: int) -> np.ndarray:
        total = height * width
        outputs = []
        for start in range(0, total, RENDER_CHUNK):
            indices = jnp.arange(start, start + RENDER_CHUNK, dtype=jnp.int32)
            indices = jnp.minimum(indices, total - 1)  # pad the last chunk to keep one compiled shape
            outputs.append(apply_chunk(params, _pixel_positions(indices, height, width)))
        flat = np.concatenate([np.asarray(chunk) for chunk in outputs])[:total]
        return flat.reshape(height, width, field_config.output_dim)

    return render


def fit_image(
    image: np.ndarray,
    config: ImageFitConfig,
    eval_at_steps: Sequence[int] = (),
    progress: bool = True,
) -> FitResult:
    """Fits an NGP field to ``image`` (``[height, width, channels]`` floats in [0, 1]).

    Args:
        eval_at_steps: steps after which the full render's PSNR is recorded (not timed).
        progress: show a progress bar with step, loss and PSNR.
    """
    height, width, channels = image.shape
    field_config = dataclasses.replace(config.field, output_dim=channels)
    backend = config.backend
    if backend == "kernel" and not kernels_available():
        raise UserError("backend 'kernel' asked for, but the ngp_kernels package is not installed")
    model = NGPField(field_config, backend=backend)
    optimizer = make_optimizer(config)
    key = jax.random.PRNGKey(config.seed)
    init_key, sample_key = jax.random.split(key)
    dummy = jnp.zeros((1, 2), jnp.float32)
    params = model.init(init_key, dummy)["params"]
    opt_state = optimizer.init(params)
    pixels = jnp.asarray(image.reshape(height * width, channels), jnp.float32)
    render = make_renderer(field_config, backend)

    train_chunk = make_train_chunk(model, optimizer, config.batch_size)
    compile_start = time.perf_counter()
    compiled = train_chunk.lower(
        params, opt_state, pixels, sample_key, jnp.int32(0), jnp.int32(1), height=height, width=width
    ).compile()
    compile_seconds = time.perf_counter() - compile_start

    boundaries = sorted({step for step in eval_at_steps if 0 < step < config.steps} | {config.steps})
    psnr_history: dict[int, float] = {}
    train_seconds = 0.0
    step = 0
    bar = tqdm(total=config.steps, desc="fit", unit="step", disable=not progress, dynamic_ncols=True)
    for boundary in boundaries:
        while step < boundary:
            num_steps = min(config.log_every, boundary - step)
            start = time.perf_counter()
            params, opt_state, loss = compiled(
                params, opt_state, pixels, sample_key, jnp.int32(step), jnp.int32(num_steps)
            )
            loss = float(loss)  # the one host read per chunk (also a barrier for timing)
            train_seconds += time.perf_counter() - start
            if not math.isfinite(loss):
                bar.close()
                raise FloatingPointError(f"loss became {loss} at step {step + num_steps}")
            step += num_steps
            bar.update(num_steps)
            bar.set_postfix(loss=f"{loss:.2e}", psnr=f"{metrics.mse_to_psnr(loss):.2f}")
        if boundary in eval_at_steps or boundary == config.steps:
            psnr_history[boundary] = metrics.psnr(render(params, height, width), image)
    bar.close()

    rendered = render(params, height, width)
    result_metrics = {
        "psnr": metrics.psnr(rendered, image),
        "ssim": metrics.ssim(rendered, image),
        "steps": config.steps,
        "train_seconds": train_seconds,
        "compile_seconds": compile_seconds,
        "ms_per_step": 1000.0 * train_seconds / config.steps,
        "num_params": int(sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(params))),
        "height": height,
        "width": width,
        "channels": channels,
        "backend": "kernel" if backend == "kernel" or (backend == "auto" and kernels_available()) else "jax",
    }
    params = jax.tree_util.tree_map(np.asarray, params)
    return FitResult(params, field_config, result_metrics, psnr_history)


def save_fit(workdir: str, result: FitResult, config: ImageFitConfig, source: str) -> dict[str, str]:
    """Writes ``render.png``, ``field.safetensors``, ``metrics.json`` and ``config.json``."""
    paths = {name: os.path.join(workdir, name) for name in ("render.png", "field.safetensors", "metrics.json")}
    height, width = result.metrics["height"], result.metrics["width"]
    render = make_renderer(result.field_config, config.backend)
    save_image(paths["render.png"], render(result.params, height, width))
    save_field(
        paths["field.safetensors"],
        result.params,
        FIELD_KIND,
        config_to_dict(result.field_config),
        image_height=height,
        image_width=width,
        source=source,
    )
    with open(paths["metrics.json"], "w") as handle:
        json.dump(result.metrics, handle, indent=2)
    return paths


def run_config_dict(config: ImageFitConfig, source: str) -> dict:
    """The resolved run configuration saved as ``config.json``."""
    return {"image": source, "fit": config_to_dict(config)}


def write_run_config(workdir: str, config: ImageFitConfig, source: str) -> None:
    with open(os.path.join(workdir, "config.json"), "w") as handle:
        json.dump(run_config_dict(config, source), handle, indent=2, sort_keys=True)


def field_config_from_dict(values: dict, where: str) -> NGPFieldConfig:
    try:
        return config_from_dict(NGPFieldConfig, values, where)
    except ConfigError as error:
        raise UserError(str(error)) from None


def render_saved_field(path: str, width: int | None, height: int | None, backend: str = "auto") -> np.ndarray:
    """Renders a ``field.safetensors`` written by ``save_fit`` at any resolution.

    Returns:
        ``[height, width, channels]`` floats in [0, 1]; size defaults to the fitted image's.
    """
    params, field_dict, extra = load_field(path, kind=FIELD_KIND)
    field_config = field_config_from_dict(field_dict, f"{path}: field_config")
    height = height or int(extra.get("image_height", 0))
    width = width or int(extra.get("image_width", 0))
    if height <= 0 or width <= 0:
        raise UserError(f"render size must be positive; give --width and --height (got {width}x{height})")
    expected = jax.eval_shape(
        lambda: NGPField(field_config, backend="jax").init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.float32))
    )["params"]
    expected_shapes = jax.tree_util.tree_map(lambda leaf: tuple(leaf.shape), expected)
    found_shapes = jax.tree_util.tree_map(np.shape, params)
    if expected_shapes != found_shapes:
        raise UserError(f"{path}: weights do not fit the stored field config ({found_shapes} vs {expected_shapes})")
    render = make_renderer(field_config, backend)
    return render(jax.tree_util.tree_map(jnp.asarray, params), height, width)


def describe(config: ImageFitConfig) -> str:
    return config_to_json(config)
