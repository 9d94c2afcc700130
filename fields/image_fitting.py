"""Fit image fields (Instant-NGP, SIREN, Fourier features), one or many at once; render them.

The training loop runs entirely on device: each call of the compiled ``train_chunk`` performs a
``fori_loop`` of steps (uniform random pixel sampling with replacement, or every pixel when the
batch covers the image; forward, backward, Adam), and the host only reads one averaged loss per
chunk for the progress bar. The random key of step ``s`` is ``fold_in(seed_key, s)``, so results
do not depend on how steps are split into chunks. ``fit_image_batch`` runs the same step under
``jax.vmap`` over a leading field axis: many fields, one compiled call, each field its own seed.
"""

from __future__ import annotations

import dataclasses
import functools
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
from fields.config import ConfigError, config_from_dict, config_to_dict, config_to_json, resolve_preset
from fields.data.images import save_image
from fields.files import write_json
from fields.models.hash_grid import BACKENDS, HashGridConfig, kernels_available
from fields.models.ngp import NGPFieldConfig
from fields.models.siren import MLPFieldConfig
from fields.training import (
    ONE_DEVICE,
    FieldSharding,
    TrainingConfig,
    make_optimizer,
    optimizer_step,
    run_batched_chunks,
    split_seed_keys,
)
from fields.weights import load_field, save_field

RENDER_CHUNK = 1 << 16
# Saved field kinds and the config classes that rebuild them.
FIELD_CONFIGS = {"ngp_image": NGPFieldConfig, "siren_image": MLPFieldConfig, "fourier_image": MLPFieldConfig}


@dataclasses.dataclass(frozen=True)
class ImageTrainingConfig(TrainingConfig):
    """How to train an image field (the architecture is the subclass's ``field``).

    Attributes (besides ``TrainingConfig``'s):
        batch_size: pixels sampled (uniformly, with replacement) per step; a batch of at least
            the image's pixel count uses every pixel once per step instead.
        backend: hash-grid backend, ``auto`` (compiled kernels when installed), ``kernel`` or ``jax``.
    """

    batch_size: int = 1 << 14
    backend: str = "auto"

    def __post_init__(self):
        super().__post_init__()
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {self.batch_size}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")


@dataclasses.dataclass(frozen=True)
class ImageFitConfig(ImageTrainingConfig):
    """Fitting an Instant-NGP image field (``field.output_dim`` is set from the image's channels)."""

    field: NGPFieldConfig = dataclasses.field(default_factory=NGPFieldConfig)


@dataclasses.dataclass(frozen=True)
class MLPImageFitConfig(ImageTrainingConfig):
    """Fitting a SIREN or Fourier-feature image field."""

    field: MLPFieldConfig = dataclasses.field(default_factory=MLPFieldConfig)


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
    # For dataset encoding of ~28x28 images (Fashion-MNIST size): ~1.6k parameters, full-batch steps.
    #   python -m fields.encode_dataset --source procedural:primitives --num 1024 --out data/fields/primitives
    "small": dataclasses.replace(
        _preset(levels=4, log2_table=8, min_res=4, max_res=28, width=16, layers=2, batch_log2=10, steps=400),
        log_every=100),
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


def _mlp_preset(kind, width, layers, batch_log2, steps, learning_rate, **field) -> MLPImageFitConfig:
    return MLPImageFitConfig(field=MLPFieldConfig(kind=kind, hidden_width=width, num_hidden_layers=layers, **field),
                             batch_size=1 << batch_log2, steps=steps, learning_rate=learning_rate,
                             adam_beta2=0.999, adam_eps=1e-8)


# Plain-MLP fields (python -m fields.mlp_image --model siren|fourier --preset NAME).
MLP_PRESETS: dict[str, dict[str, MLPImageFitConfig]] = {
    "siren": {
        "small": _mlp_preset("siren", width=24, layers=2, batch_log2=10, steps=400, learning_rate=1e-3),
        "tiny": _mlp_preset("siren", width=16, layers=2, batch_log2=10, steps=100, learning_rate=1e-3),
        "default": _mlp_preset("siren", width=64, layers=3, batch_log2=14, steps=2000, learning_rate=5e-4),
        "large": _mlp_preset("siren", width=256, layers=3, batch_log2=15, steps=3000, learning_rate=1e-4),
    },
    "fourier": {
        "small": _mlp_preset("fourier", width=32, layers=2, batch_log2=10, steps=400, learning_rate=5e-3,
                             num_features=16),
        "tiny": _mlp_preset("fourier", width=16, layers=2, batch_log2=10, steps=100, learning_rate=1e-2,
                            num_features=16),
        "default": _mlp_preset("fourier", width=64, layers=3, batch_log2=14, steps=2000, learning_rate=2e-3,
                               num_features=64),
        "large": _mlp_preset("fourier", width=256, layers=3, batch_log2=15, steps=3000, learning_rate=1e-3,
                             num_features=256),
    },
}


def preset(name: str) -> ImageFitConfig:
    return resolve_preset(PRESETS, name, {})


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


def train_chunk_function(model, optimizer: optax.GradientTransformation, batch_size: int, height: int,
                         width: int) -> Callable:
    """``train_chunk(params, opt_state, pixels, key, first_step, num_steps) -> (params, opt_state, mean_loss)``
    for one field (not jitted: ``make_train_chunk`` jits it, ``fit_image_batch`` vmaps it first).

    ``pixels`` is the image ``[height * width, channels]``; ``model.apply`` maps positions
    ``[n, 2]`` to ``[n, channels]``.
    """
    num_pixels = height * width
    full_batch = batch_size >= num_pixels

    def loss_fn(params, positions, targets):
        predictions = model.apply({"params": params}, positions)
        return jnp.mean(jnp.square(predictions - targets))

    def train_chunk(params, opt_state, pixels, key, first_step, num_steps):
        def body(offset, state):
            params, opt_state, loss_sum = state
            if full_batch:
                indices = jnp.arange(num_pixels, dtype=jnp.int32)
            else:
                step_key = jax.random.fold_in(key, first_step + offset)
                indices = jax.random.randint(step_key, (batch_size,), 0, num_pixels)
            positions = _pixel_positions(indices, height, width)
            targets = jnp.take(pixels, indices, axis=0)
            loss, grads = jax.value_and_grad(loss_fn)(params, positions, targets)
            params, opt_state = optimizer_step(optimizer, grads, opt_state, params)
            return params, opt_state, loss_sum + loss

        params, opt_state, loss_sum = jax.lax.fori_loop(
            0, num_steps, body, (params, opt_state, jnp.float32(0.0))
        )
        return params, opt_state, loss_sum / num_steps.astype(jnp.float32)

    return train_chunk


def make_train_chunk(model, optimizer: optax.GradientTransformation, batch_size: int, height: int, width: int):
    """The jitted single-field ``train_chunk`` (params and optimizer state donated)."""
    return jax.jit(train_chunk_function(model, optimizer, batch_size, height, width), donate_argnums=(0, 1))


@functools.lru_cache(maxsize=8)
def make_renderer(field_config, backend: str = "auto") -> Callable:
    """Returns ``render(params, height, width) -> [height, width, channels]`` numpy in [0, 1]
    for any image field config (``NGPFieldConfig``, ``MLPFieldConfig``); cached per config and
    backend, so ``fit_image`` and ``save_fit`` share one compiled renderer."""
    model = field_config.build(backend)

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
        return np.clip(flat.reshape(height, width, field_config.output_dim), 0.0, 1.0)

    return render


def fit_image(
    image: np.ndarray,
    config: ImageTrainingConfig,
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
    model = field_config.build(backend)
    optimizer = make_optimizer(config)
    key = jax.random.PRNGKey(config.seed)
    init_key, sample_key = jax.random.split(key)
    dummy = jnp.zeros((1, 2), jnp.float32)
    params = model.init(init_key, dummy)["params"]
    opt_state = optimizer.init(params)
    pixels = jnp.asarray(image.reshape(height * width, channels), jnp.float32)
    render = make_renderer(field_config, backend)

    train_chunk = make_train_chunk(model, optimizer, config.batch_size, height, width)
    compile_start = time.perf_counter()
    compiled = train_chunk.lower(params, opt_state, pixels, sample_key, jnp.int32(0), jnp.int32(1)).compile()
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


@dataclasses.dataclass
class BatchFitResult:
    """What ``fit_image_batch`` returns.

    Attributes:
        params: the fields' params, every leaf with a leading field axis ``[N, ...]`` (numpy).
        field_config: the shared architecture.
        psnr: ``[N]`` full-render PSNR of each field against its image.
        final_loss: ``[N]`` each field's mean training loss over the last chunk.
        train_seconds, compile_seconds: wall-clock totals for the batch.
    """

    params: dict
    field_config: object
    psnr: np.ndarray
    final_loss: np.ndarray
    train_seconds: float
    compile_seconds: float


@functools.lru_cache(maxsize=8)
def compiled_batch_functions(config: ImageTrainingConfig, field_config, num_fields: int, height: int, width: int,
                              sharding: FieldSharding = ONE_DEVICE):
    """``(init(keys [N, 2]) -> (params, opt_state), compiled train chunk)`` for ``num_fields`` fields
    (a multiple of ``sharding``'s device count), cached so that successive batches of one shape
    (``fields.encode_dataset``) compile once."""
    model = field_config.build(config.backend)
    optimizer = make_optimizer(config)
    dummy = jnp.zeros((1, 2), jnp.float32)

    @jax.jit
    def init(init_keys):
        params = jax.vmap(lambda key: model.init(key, dummy)["params"])(init_keys)
        return params, jax.vmap(optimizer.init)(params)

    params, opt_state = jax.eval_shape(init, jax.ShapeDtypeStruct((num_fields, 2), jnp.uint32))
    pixels = jax.ShapeDtypeStruct((num_fields, height * width, field_config.output_dim), jnp.float32)
    keys = jax.ShapeDtypeStruct((num_fields, 2), jnp.uint32)
    single = train_chunk_function(model, optimizer, config.batch_size, height, width)
    batched = jax.vmap(single, in_axes=(0, 0, 0, 0, None, None))
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    return init, sharding.compile(batched, (params, opt_state, pixels, keys, scalar, scalar), num_batched=4,
                                  donate_argnums=(0, 1))


def fit_image_batch(images: np.ndarray, config: ImageTrainingConfig, seeds: Sequence[int],
                    init_seeds: Sequence[int] | None = None, num_devices: int = 0) -> BatchFitResult:
    """Fits one field per image, all at once: the single-field step under ``jax.vmap``.

    Field ``i`` is initialised and sampled exactly as ``fit_image(images[i], replace(config,
    seed=seeds[i]))`` would (same keys), so batched and one-at-a-time fits agree up to float
    rounding.

    Args:
        images: ``[N, height, width, channels]`` floats in [0, 1].
        seeds: ``[N]`` per-field seeds.
        init_seeds: ``[N]`` seeds of the initial weights when they differ from ``seeds`` (one shared
            seed aligns the fields' weight spaces, which generative models over weights need).
        num_devices: local devices the fields are split over (0: all; see ``fields.training.FieldSharding``).
    """
    num_fields, height, width, channels = images.shape
    init_keys, sample_keys = split_seed_keys(seeds, init_seeds, num_fields, "image")
    field_config = dataclasses.replace(config.field, output_dim=channels)
    sharding = FieldSharding.over(num_devices)
    pixels = np.asarray(images, np.float32).reshape(num_fields, height * width, channels)
    pixels, init_keys, sample_keys = sharding.place(sharding.pad((pixels, init_keys, sample_keys), num_fields))
    compile_start = time.perf_counter()
    init, compiled = compiled_batch_functions(config, field_config, sharding.padded(num_fields), height, width,
                                               sharding)
    params, opt_state = sharding.place(init(init_keys))
    compile_seconds = time.perf_counter() - compile_start

    (params, opt_state), losses, train_seconds = run_batched_chunks(
        lambda params, opt_state, first, count: compiled(params, opt_state, pixels, sample_keys, first, count),
        (params, opt_state), config.steps, config.log_every, num_fields=num_fields)

    params = jax.tree_util.tree_map(lambda leaf: np.asarray(leaf)[:num_fields], params)
    renders = render_batch(params, field_config, height, width, config.backend)
    psnrs = metrics.batch_psnr(renders, images).astype(np.float32)
    return BatchFitResult(params, field_config, psnrs, losses, train_seconds, compile_seconds)


@functools.lru_cache(maxsize=8)
def batch_renderer(field_config, height: int, width: int, backend: str):
    """``render(params with a leading field axis) -> [N, height * width, channels]``: jitted and
    vmapped over fields, cached per config, size and backend (also traced inside other jits, e.g.
    the autoencoder's render loss)."""
    model = field_config.build(backend)
    positions = _pixel_positions(jnp.arange(height * width, dtype=jnp.int32), height, width)
    return jax.jit(jax.vmap(lambda p: model.apply({"params": p}, positions)))


def render_batch(params, field_config, height: int, width: int, backend: str = "auto") -> np.ndarray:
    """Renders fields with a leading axis: params leaves ``[N, ...]`` -> ``[N, height, width, channels]``."""
    outputs = batch_renderer(field_config, height, width, backend)(params)
    return np.clip(np.asarray(outputs), 0.0, 1.0).reshape(-1, height, width, field_config.output_dim)


def save_fit(workdir: str, result: FitResult, config: ImageTrainingConfig, source: str) -> dict[str, str]:
    """Writes ``render.png``, ``field.safetensors``, ``metrics.json`` and ``config.json``."""
    paths = {name: os.path.join(workdir, name) for name in ("render.png", "field.safetensors", "metrics.json")}
    height, width = result.metrics["height"], result.metrics["width"]
    render = make_renderer(result.field_config, config.backend)
    save_image(paths["render.png"], render(result.params, height, width))
    save_field(
        paths["field.safetensors"],
        result.params,
        result.field_config.field_kind,
        config_to_dict(result.field_config),
        image_height=height,
        image_width=width,
        source=source,
    )
    with open(paths["metrics.json"], "w") as handle:
        json.dump(result.metrics, handle, indent=2)
    return paths


def run_config_dict(config: ImageTrainingConfig, source: str) -> dict:
    """The resolved run configuration saved as ``config.json``."""
    return {"image": source, "model": config.field.field_kind, "fit": config_to_dict(config)}


def write_run_config(workdir: str, run_config: dict) -> None:
    write_json(os.path.join(workdir, "config.json"), run_config)


def field_config_from_dict(kind: str, values: dict, where: str):
    """Rebuilds a saved image field's config from its kind (``ngp_image``, ``siren_image``, ...)."""
    if kind not in FIELD_CONFIGS:
        raise UserError(f"{where}: not an image field (kind {kind!r}; expected one of {', '.join(FIELD_CONFIGS)})")
    try:
        return config_from_dict(FIELD_CONFIGS[kind], values, where)
    except ConfigError as error:
        raise UserError(str(error)) from None


def render_saved_field(path: str, width: int | None, height: int | None, backend: str = "auto") -> np.ndarray:
    """Renders a ``field.safetensors`` written by ``save_fit`` at any resolution.

    Returns:
        ``[height, width, channels]`` floats in [0, 1]; size defaults to the fitted image's.
    """
    params, field_dict, extra = load_field(path)
    field_config = field_config_from_dict(extra.get("kind", ""), field_dict, f"{path}: field_config")
    height = height or int(extra.get("image_height", 0))
    width = width or int(extra.get("image_width", 0))
    if height <= 0 or width <= 0:
        raise UserError(f"render size must be positive; give --width and --height (got {width}x{height})")
    expected = jax.eval_shape(
        lambda: field_config.build("jax").init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.float32))
    )["params"]
    expected_shapes = jax.tree_util.tree_map(lambda leaf: tuple(leaf.shape), expected)
    found_shapes = jax.tree_util.tree_map(np.shape, params)
    if expected_shapes != found_shapes:
        raise UserError(f"{path}: weights do not fit the stored field config ({found_shapes} vs {expected_shapes})")
    render = make_renderer(field_config, backend)
    return render(jax.tree_util.tree_map(jnp.asarray, params), height, width)


def describe(config: ImageTrainingConfig) -> str:
    return config_to_json(config)
