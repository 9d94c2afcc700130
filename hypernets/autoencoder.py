"""Split weight autoencoders: compress each field's weights to a small latent, section by section.

    python -m hypernets.autoencoder --data data/fields/primitives --workdir runs/autoencoder --preset small
    python -m hypernets.autoencoder --data data/fields/primitives --workdir runs/ae-transformer --model transformer
    python -m hypernets.autoencoder --model sane ...      (runs hypernets.sane, the SANE-style autoencoder)

Each section of the weights (hash grid, MLP; ``fields.weights.section_slices``), normalised per
section, gets its own encoder and decoder (``hypernets.models.weight_autoencoders``): 1D
convolutions (``--model conv``) or a transformer over weight chunks (``--model transformer``). A
field's latent is the concatenation of its section latents; ``compression = P / D``. The loss is the
mean squared error of the normalised weights.

A run is a config and a work directory: ``W/config.json`` holds the resolved config and the data
path; rerunning resumes from the newest checkpoint in ``W/checkpoints`` (a different config in the
same directory is refused). Evaluation (every ``eval_every`` steps and at the end) reports the
validation weight MSE and, for image fields, the PSNR of each decoded field's render against the
original field's render. At the end the run writes:

- ``W/latents/latents-000000.parquet``: every field's latent (``latent: fixed_size_list<float32>[D]``,
  ``source_id``, ``label``, ``split``, ``row``), with the autoencoder's work directory, the data path and
  the section latent sizes in the schema metadata;
- ``W/autoencoder.msgpack`` (the EMA parameters) and ``W/data_info.json`` (param map, normalisation,
  field kind and config), read back by ``load_autoencoder(W)`` for the latent diffusion;
- ``W/reconstruction.png`` (image fields): original and reconstructed renders side by side;
- ``W/evaluation.json``: the final evaluation and the compression ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fields.cli import ArgumentParser, UserError, prepare_workdir, run_main
from fields.config import ConfigError, check_run_config, config_from_dict, config_to_dict, config_to_json
from fields.files import write_atomic, write_json
from fields.metrics import batch_psnr
from fields.weights import NORMALIZATION_MODES, NormalizationStats, ParamEntry, param_map_from_json, param_map_to_json
from hypernets.loop import LoopConfig, add_loop_arguments
from hypernets.models.weight_autoencoders import KINDS, WeightAutoencoder
from hypernets.runs import read_saved_run, rerun_free_fields, resolve_run_config, write_run

SECTION = "autoencoder"
PROGRAM = "hypernets.autoencoder"
MODEL_CHOICES = KINDS + ("sane",)
LOSS_WEIGHTINGS = ("weight", "section")
LATENTS_DIRECTORY = "latents"
LATENTS_SHARD = "latents-000000.parquet"
LATENTS_FORMAT = "latents/v1"
LATENT_COLUMN = "latent"
PARAMS_NAME = "autoencoder.msgpack"
DATA_INFO_NAME = "data_info.json"
EVALUATION_NAME = "evaluation.json"
GRID_NAME = "reconstruction.png"
APPLY_BATCH = 256  # fields per compiled encode/decode call
# Fields that may differ between runs in one work directory (reporting, logging, devices).
RERUN_FREE_FIELDS = ("eval_fields", "grid_pairs", "loop.wandb", "loop.num_devices")


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
    """A split weight autoencoder: architecture, loss, evaluation.

    Attributes:
        loop: the training loop (steps, batch size, optimiser, EMA, checkpoints).
        model: ``"conv"`` or ``"transformer"``.
        latent_dims: latent size per section, in the dataset's section order (``hash``, ``mlp`` for
            NGP fields); a single value applies to every section.
        conv_channels: consecutive weights read as the channels of one position (conv).
        conv_widths: channels of the stride-2 convolutions, one per halving of the length (conv).
        conv_kernel: convolution kernel size (conv).
        chunk_size: weights per token (transformer).
        width, depth, num_heads, mlp_ratio: transformer size (encoder and decoder each ``depth`` blocks).
        num_latent_tokens: learned latent tokens per section (transformer).
        loss_weighting: ``"weight"`` (every weight counts the same) or ``"section"`` (every section's
            MSE counts the same, so the small MLP section is not drowned by the hash grid).
        render_weight: image fields only: adds ``render_weight`` times the pixel MSE between the
            decoded field's render and the original field's render (a functional loss; 0: off).
            Fitted fields have many weight directions that do not change their image (more weights
            than pixels, and a random pixel order while fitting), so the weight MSE alone spends the
            latent on noise; the render term tells the decoder which weights matter.
        normalization: per-``"section"`` or per-``"tensor"`` normalisation of the weights.
        val_fraction: fields held out (by a hash of their source id) for the evaluation.
        eval_fields: held-out fields evaluated (weight MSE and render PSNR).
        grid_pairs: original/reconstruction pairs drawn in ``reconstruction.png``.
    """

    loop: LoopConfig = dataclasses.field(default_factory=LoopConfig)
    model: str = "conv"
    latent_dims: tuple[int, ...] = (64,)
    conv_channels: int = 2
    conv_widths: tuple[int, ...] = (32, 64, 128)
    conv_kernel: int = 5
    chunk_size: int = 32
    width: int = 128
    depth: int = 2
    num_heads: int = 4
    mlp_ratio: float = 4.0
    num_latent_tokens: int = 4
    loss_weighting: str = "weight"
    render_weight: float = 0.0
    normalization: str = "section"
    val_fraction: float = 0.1
    eval_fields: int = 64
    grid_pairs: int = 8

    def __post_init__(self):
        if self.model not in KINDS:
            raise ValueError(f"model must be one of {', '.join(KINDS)}, got {self.model!r}")
        for name in ("latent_dims", "conv_widths"):
            values = getattr(self, name)
            if not values or min(values) < 1:
                raise ValueError(f"{name} must be a non-empty list of positive sizes, got {list(values)}")
        positive = ("conv_channels", "conv_kernel", "chunk_size", "width", "depth", "num_heads", "num_latent_tokens",
                    "eval_fields")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.width % self.num_heads:
            raise ValueError(f"width ({self.width}) must be divisible by num_heads ({self.num_heads})")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting must be one of {', '.join(LOSS_WEIGHTINGS)}, got {self.loss_weighting!r}")
        if not self.render_weight >= 0:
            raise ValueError(f"render_weight must be >= 0, got {self.render_weight}")
        if self.normalization not in NORMALIZATION_MODES:
            raise ValueError(f"normalization must be one of {', '.join(NORMALIZATION_MODES)}, "
                             f"got {self.normalization!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.grid_pairs < 0:
            raise ValueError(f"grid_pairs must be >= 0, got {self.grid_pairs}")


PRESETS: dict[str, AutoencoderConfig] = {
    # Test-sized: a few steps of small conv/transformer section autoencoders on 8x8 fields, seconds on a CPU.
    #   python -m hypernets.autoencoder --data DIR --workdir W --preset tiny [--model transformer]
    "tiny": AutoencoderConfig(
        loop=LoopConfig(steps=6, batch_size=4, learning_rate=3e-3, warmup_steps=1, ema_decay=0.5, log_every=1,
                        checkpoint_every=100),
        latent_dims=(8,), conv_widths=(8, 16), conv_kernel=3, chunk_size=32, width=16, depth=1, num_heads=2,
        mlp_ratio=2.0, num_latent_tokens=2, val_fraction=0.25, eval_fields=4, grid_pairs=4),
    # CPU-sized, minutes on 2 cores; ngp_image "small" fields (~1.2k hash + ~0.4k MLP weights) -> 64 + 32 latents,
    # compression ~17. Expected: a falling validation MSE; render PSNR not yet measured.
    #   python -m hypernets.autoencoder --data data/fields/primitives --workdir runs/ae-cpu --preset cpu
    "cpu": AutoencoderConfig(
        loop=LoopConfig(steps=3000, batch_size=64, learning_rate=1e-3, warmup_steps=100, ema_decay=0.99,
                        checkpoint_every=500, eval_every=500),
        latent_dims=(64, 32), conv_widths=(32, 64, 64), conv_kernel=5, chunk_size=32, width=64, depth=2,
        num_heads=4, num_latent_tokens=4),
    # Primitives at 28x28 (ngp_image "small" fields), one GPU. Expected (not measured: it needs a GPU and none
    # has been lent): decoded renders close to the originals, render PSNR above the "cpu" preset's.
    #   python -m fields.encode_dataset --source procedural:primitives --num 1024 --out data/fields/primitives
    #   python -m hypernets.autoencoder --data data/fields/primitives --workdir runs/ae-small --preset small
    "small": AutoencoderConfig(
        loop=LoopConfig(steps=20000, batch_size=64, learning_rate=5e-4, warmup_steps=500, ema_decay=0.999,
                        checkpoint_every=1000, eval_every=1000),
        latent_dims=(128, 64), conv_widths=(64, 128, 128), conv_kernel=5, chunk_size=32, width=192, depth=4,
        num_heads=6, num_latent_tokens=8),
    # Fashion-MNIST NGP "small" fields (1,536 weights: hash 1,136 + MLP 400) on a shared 2-core CPU, at 4x
    # compression (latents 288 + 96), with the render loss; conv reads 8 weights per position (short sequences:
    # XLA's CPU convolutions are slow). Measured (scripts/bench_autoencoder.py, BENCHMARKS.md): conv, 800 steps,
    # 20.4 dB render PSNR against the original fields (render-PSNR drop ~20 dB; the 1 dB target needs far more
    # training); the transformer, 500 steps, 15.3 dB.
    #   python -m hypernets.autoencoder --data runs/bench_autoencoder/fields_train --workdir W --preset fmnist-cpu
    "fmnist-cpu": AutoencoderConfig(
        loop=LoopConfig(steps=800, batch_size=64, learning_rate=1e-3, warmup_steps=100, ema_decay=0.99,
                        checkpoint_every=200, eval_every=400),
        latent_dims=(288, 96), conv_channels=8, conv_widths=(64, 128), conv_kernel=5, chunk_size=32, width=64,
        depth=2, num_heads=4, num_latent_tokens=4, render_weight=1e4, eval_fields=128),
    # Larger datasets of image fields (e.g. Fashion-MNIST fields). Expected (not measured: it needs a GPU and
    # none has been lent): render PSNR above the "fmnist-cpu" preset's 20.4 dB on Fashion-MNIST fields.
    #   python -m hypernets.autoencoder --data data/fields/fmnist --workdir runs/ae --preset default
    "default": AutoencoderConfig(
        loop=LoopConfig(steps=100000, batch_size=128, learning_rate=3e-4, warmup_steps=1000, ema_decay=0.9995,
                        checkpoint_every=2500, eval_every=2500),
        latent_dims=(256, 64), conv_widths=(64, 128, 256, 256), conv_kernel=5, chunk_size=64, width=256, depth=6,
        num_heads=8, num_latent_tokens=8),
}


# ------------------------------------------------------------------------------------------- model and task


def build_network(config: AutoencoderConfig, param_map: Sequence[ParamEntry]) -> WeightAutoencoder:
    """The split autoencoder of ``config`` for vectors laid out by ``param_map``.

    Raises:
        UserError: ``latent_dims`` that do not fit the param map's sections.
    """
    try:
        return WeightAutoencoder(
            param_map, config.model, config.latent_dims, conv_channels=config.conv_channels,
            conv_widths=tuple(config.conv_widths), conv_kernel=config.conv_kernel, chunk_size=config.chunk_size,
            width=config.width, depth=config.depth, num_heads=config.num_heads,
            num_latent_tokens=config.num_latent_tokens, mlp_ratio=config.mlp_ratio)
    except ValueError as error:
        raise UserError(f"--latent-dims: {error}") from None


@dataclasses.dataclass
class AutoencoderTask:
    """The training task for ``hypernets.loop.train``: batches ``{"vectors": [B, P]}`` of normalised weights.

    The loss is the reconstruction MSE in float32: over all weights (``loss_weighting="weight"``) or
    the mean of the per-section MSEs (``"section"``); the metrics hold each section's MSE (``mse_<name>``).
    With a ``renderer`` and ``render_weight > 0`` it adds ``render_weight`` times the pixel MSE of the
    reconstruction's render against the input's render (metric ``render_mse``).
    """

    network: WeightAutoencoder
    loss_weighting: str = "weight"
    renderer: Callable | None = None
    render_weight: float = 0.0

    def init(self, key: jax.Array, batch: dict[str, jax.Array]) -> Any:
        return self.network.init(key, jnp.asarray(batch["vectors"], jnp.float32))

    def loss(self, params: Any, batch: dict[str, jax.Array], key: jax.Array):
        del key  # deterministic
        vectors = jnp.asarray(batch["vectors"], jnp.float32)
        reconstruction = self.network.reconstruct(params, vectors)
        errors = self.network.section_errors(reconstruction, vectors)
        layout = self.network.layout
        if self.loss_weighting == "section":
            loss = sum(errors.values()) / jnp.float32(len(errors))
        else:
            loss = sum(errors[name] * jnp.float32(size / layout.num_params)
                       for name, size in zip(layout.names, layout.sizes, strict=True))
        metrics = {f"mse_{name}": value for name, value in errors.items()}
        if self.renderer is not None and self.render_weight > 0:
            target = jax.lax.stop_gradient(self.renderer(vectors))
            render_mse = jnp.mean(jnp.square(self.renderer(reconstruction) - target))
            loss = loss + jnp.float32(self.render_weight) * render_mse
            metrics["render_mse"] = render_mse
        return jnp.asarray(loss, jnp.float32), metrics


def make_image_renderer(data) -> Callable:
    """Differentiable renders of image fields: normalised vectors ``[B, P]`` laid out like ``data`` (a
    ``WeightData`` or ``DataInfo``) -> ``[B, height * width, channels]`` float32, clipped to [0, 1] as
    ``render_psnr``'s renders are (pure JAX, jittable; the hash grid's pure-JAX backend)."""
    from fields.image_fitting import batch_renderer, field_config_from_dict
    from fields.weights import unflatten_params
    from hypernets.rendering import image_size

    config = field_config_from_dict(data.field_kind, data.field_config, "autoencoder: field_config")
    # render_batch's renderer (vmapped over fields, cached per config): inlined into the caller's jit.
    apply = batch_renderer(config, *image_size(data.metadata, "autoencoder"), "jax")
    mean, std = (jnp.asarray(values, jnp.float32) for values in data.normalization.column_stats(data.mode))
    param_map = list(data.param_map)

    def render(vectors: jax.Array) -> jax.Array:
        raw = jnp.asarray(vectors, jnp.float32) * std + mean
        lead = raw.shape[:-1]
        params = unflatten_params({entry.name: raw[..., entry.offset: entry.offset + entry.size].reshape(
            lead + tuple(entry.shape)) for entry in param_map})
        return jnp.clip(apply(params), 0.0, 1.0)

    return render


def apply_in_batches(function: Callable, params: Any, rows: np.ndarray, output_width: int,
                     batch_size: int = APPLY_BATCH) -> np.ndarray:
    """``function(params, rows[i:i+b])`` over ``rows [N, ...]`` in padded batches -> ``[N, output_width]`` float32.

    Batches are padded with zero rows to one size (a power of two up to ``batch_size``), so a jitted
    ``function`` compiles once.
    """
    rows = np.asarray(rows, np.float32)
    if not len(rows):
        return np.zeros((0, output_width), np.float32)
    size = min(batch_size, 1 << int(np.ceil(np.log2(len(rows)))))
    outputs = []
    for start in range(0, len(rows), size):
        block = rows[start:start + size]
        padded = np.concatenate([block, np.zeros((size - len(block),) + block.shape[1:], np.float32)])
        outputs.append(np.asarray(function(params, jnp.asarray(padded)), np.float32)[: len(block)])
    return np.concatenate(outputs)


# ------------------------------------------------------------------------------------------- data description


@dataclasses.dataclass
class DataInfo:
    """What the autoencoder's vectors are: layout, normalisation and field description of its dataset.

    Attributes:
        path: the training dataset.
        field_kind, field_config: what the fields are.
        param_map: layout of the vectors ``[P]``.
        metadata: the dataset's other schema metadata (``image_height``, ``image_width``, ...).
        normalization, mode: how raw weights were normalised (``normalize`` / ``denormalize``).
    """

    path: str
    field_kind: str
    field_config: dict
    param_map: list[ParamEntry]
    metadata: dict
    normalization: NormalizationStats
    mode: str

    @classmethod
    def from_weight_data(cls, data, path: str) -> DataInfo:
        """From a ``hypernets.datasets.WeightData`` split."""
        return cls(os.path.abspath(path), data.field_kind, dict(data.field_config), list(data.param_map),
                   dict(data.metadata), data.normalization, data.mode)

    def normalize(self, weights: np.ndarray) -> np.ndarray:
        """Raw weights ``[n, P]`` -> normalised ``[n, P]`` float32."""
        return self.normalization.normalize(weights, self.mode)

    def denormalize(self, vectors: np.ndarray) -> np.ndarray:
        """Normalised ``[n, P]`` -> raw weights ``[n, P]`` float32."""
        return self.normalization.denormalize(vectors, self.mode)

    def to_dict(self) -> dict:
        return {"data": self.path, "field_kind": self.field_kind, "field_config": self.field_config,
                "param_map": json.loads(param_map_to_json(self.param_map)), "metadata": self.metadata,
                "normalization": json.loads(self.normalization.to_json()), "mode": self.mode}

    @classmethod
    def from_dict(cls, values: dict, where: str) -> DataInfo:
        try:
            return cls(str(values["data"]), str(values["field_kind"]), dict(values["field_config"]),
                       param_map_from_json(values["param_map"]), dict(values["metadata"]),
                       NormalizationStats.from_json(values["normalization"]), str(values["mode"]))
        except (KeyError, TypeError, ValueError) as error:
            raise UserError(f"{where}: malformed data description ({error})") from None


# ------------------------------------------------------------------------------------------- trained model


class TrainedAutoencoder:
    """A trained autoencoder with its parameters and data description bound: numpy in, numpy out.

    Attributes:
        network: the ``WeightAutoencoder`` (pure ``encode(params, x)`` / ``decode(params, z)`` for jitted use).
        params: its parameters.
        data_info: layout and normalisation of the weights.
    """

    def __init__(self, network: WeightAutoencoder, params: Any, data_info: DataInfo):
        self.network = network
        self.params = jax.tree_util.tree_map(jnp.asarray, params)
        self.data_info = data_info
        self._encode = jax.jit(network.encode)
        self._decode = jax.jit(network.decode)

    @property
    def latent_size(self) -> int:
        return self.network.latent_size

    @property
    def num_params(self) -> int:
        return self.network.num_params

    @property
    def compression(self) -> float:
        return self.network.compression

    def encode(self, weights_normalised: np.ndarray) -> np.ndarray:
        """Normalised weights ``[N, P]`` -> latents ``[N, D]`` float32."""
        weights_normalised = np.asarray(weights_normalised, np.float32)
        if weights_normalised.ndim != 2 or weights_normalised.shape[1] != self.num_params:
            raise ValueError(f"expected weights [N, {self.num_params}], got {weights_normalised.shape}")
        return apply_in_batches(self._encode, self.params, weights_normalised, self.latent_size)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Latents ``[N, D]`` -> normalised weights ``[N, P]`` float32."""
        latents = np.asarray(latents, np.float32)
        if latents.ndim != 2 or latents.shape[1] != self.latent_size:
            raise ValueError(f"expected latents [N, {self.latent_size}], got {latents.shape}")
        return apply_in_batches(self._decode, self.params, latents, self.num_params)

    def decode_to_fields(self, latents: np.ndarray) -> np.ndarray:
        """Latents ``[N, D]`` -> raw field weights ``[N, P]`` float32 (denormalised)."""
        return self.data_info.denormalize(self.decode(latents))

    def encode_fields(self, weights: np.ndarray) -> np.ndarray:
        """Raw field weights ``[N, P]`` -> latents ``[N, D]`` (normalised first)."""
        return self.encode(self.data_info.normalize(weights))


def save_params(workdir: str, params: Any) -> None:
    """Writes the parameters to ``W/autoencoder.msgpack`` (atomically)."""
    from flax import serialization

    write_atomic(os.path.join(workdir, PARAMS_NAME), serialization.msgpack_serialize(jax.device_get(params)))


def load_autoencoder(workdir: str) -> tuple[TrainedAutoencoder, Any, AutoencoderConfig, DataInfo]:
    """Reads a finished autoencoder run.

    Returns:
        ``(model, params, config, data_info)``: ``model.encode(weights_normalised [N, P]) -> [N, D]``,
        ``model.decode(latents [N, D]) -> [N, P]`` (normalised), ``model.decode_to_fields(latents)``
        -> raw weights ``[N, P]``; ``params`` the (EMA) parameters of ``model.network``.

    Raises:
        UserError: no run in ``workdir``, an unfinished run, or files that do not fit together.
    """
    from flax import serialization

    saved = read_saved_run(workdir, SECTION, PROGRAM)
    if saved is None:
        raise UserError(f"{workdir} holds no autoencoder run (no config.json)")
    try:
        config = config_from_dict(AutoencoderConfig, saved[SECTION], "config.json: autoencoder")
    except ConfigError as error:
        raise UserError(str(error)) from None
    paths = {name: os.path.join(workdir, name) for name in (DATA_INFO_NAME, PARAMS_NAME)}
    for path in paths.values():
        if not os.path.exists(path):
            raise UserError(f"{path} is missing: the run in {workdir} has not finished (rerun its command)")
    try:
        with open(paths[DATA_INFO_NAME]) as handle:
            data_info = DataInfo.from_dict(json.load(handle), paths[DATA_INFO_NAME])
        with open(paths[PARAMS_NAME], "rb") as handle:
            params = serialization.msgpack_restore(handle.read())
    except (OSError, json.JSONDecodeError, ValueError) as error:
        raise UserError(f"cannot read the autoencoder in {workdir}: {error}") from None
    network = build_network(config, data_info.param_map)
    expected = jax.eval_shape(network.init, jax.random.PRNGKey(0),
                              jax.ShapeDtypeStruct((1, network.num_params), jnp.float32))
    expected_shapes = jax.tree_util.tree_map(lambda leaf: tuple(leaf.shape), expected)
    try:
        found_shapes = jax.tree_util.tree_map(np.shape, params)
    except TypeError:
        found_shapes = None
    if found_shapes != expected_shapes:
        raise UserError(f"{paths[PARAMS_NAME]}: parameters do not fit the saved config")
    return TrainedAutoencoder(network, params, data_info), params, config, data_info


# ------------------------------------------------------------------------------------------- evaluation


def renders_images(data) -> bool:
    """Whether fields described by ``data`` (``field_kind``, ``metadata``) render as images of known size."""
    from hypernets.rendering import IMAGE_KINDS

    return data.field_kind in IMAGE_KINDS and "image_height" in data.metadata and "image_width" in data.metadata


def render(raw: np.ndarray, data, where: str = "dataset"):
    """``hypernets.rendering.Renders`` of raw weights ``[N, P]`` laid out like ``data``."""
    from hypernets.rendering import RenderSettings, render_fields

    return render_fields(raw, data.field_kind, data.field_config, data.param_map, data.metadata, RenderSettings(),
                         where=where)


def render_psnr(original: np.ndarray, reconstructed: np.ndarray, data) -> np.ndarray:
    """PSNR (dB) of each reconstructed field's render against the original field's render.

    Args:
        original, reconstructed: raw (denormalised) weights ``[N, P]``.
        data: the field description (``field_kind``, ``field_config``, ``param_map``, ``metadata``).

    Returns:
        ``[N]`` float64; 200 dB for identical renders.
    """
    return batch_psnr(render(reconstructed, data).values, render(original, data).values)


def make_evaluate(network: WeightAutoencoder, validation, config: AutoencoderConfig):
    """``evaluate(params, step)``: on up to ``eval_fields`` held-out fields, the weight MSE (``val_mse``
    and ``val_mse_<section>``) and, for image fields, the render PSNR against the original fields'
    renders (``val_render_psnr``: mean, ``val_render_psnr_min``). None when nothing is held out."""
    if len(validation) == 0:
        return None
    vectors = validation.vectors[: config.eval_fields]
    original_raw = validation.denormalize(vectors)
    reference = render(original_raw, validation).values if renders_images(validation) else None
    reconstruct = jax.jit(network.reconstruct)

    def evaluate(params: Any, step: int) -> dict[str, float]:
        del step
        reconstruction = apply_in_batches(reconstruct, params, vectors, network.num_params)
        errors = network.section_errors(jnp.asarray(reconstruction), jnp.asarray(vectors))
        results = {"val_mse": float(np.mean(np.square(reconstruction - vectors)))}
        results.update({f"val_mse_{name}": float(value) for name, value in errors.items()})
        if reference is not None:
            psnrs = batch_psnr(render(validation.denormalize(reconstruction), validation).values, reference)
            results["val_render_psnr"] = float(np.mean(psnrs))
            results["val_render_psnr_min"] = float(np.min(psnrs))
        return results

    return evaluate


# ------------------------------------------------------------------------------------------- outputs


def write_latent_shard(workdir: str, latents: np.ndarray, columns: dict[str, Sequence], metadata: dict) -> str:
    """Writes ``latents [N, D]`` (``latent: fixed_size_list<float32>[D]``) and per-row ``columns`` atomically to
    ``W/latents/latents-000000.parquet``, with ``hfn_format`` ``latents/v1`` and each ``metadata`` value as JSON
    in the schema (what ``read_latents`` reads); returns the folder. Shared with ``hypernets.sane``.

    Column types: ``source_id`` and ``split`` string, ``label`` and ``rotation`` int32, ``row`` int64, others
    as pyarrow infers them.
    """
    import pyarrow as pa

    from fields.field_datasets import _write_atomic

    types = {"source_id": pa.string(), "label": pa.int32(), "split": pa.string(), "rotation": pa.int32(),
             "row": pa.int64()}
    latents = np.ascontiguousarray(latents, np.float32)
    flat = pa.array(latents.reshape(-1), type=pa.float32())
    arrays = {LATENT_COLUMN: pa.FixedSizeListArray.from_arrays(flat, int(latents.shape[1]))}
    arrays.update({name: pa.array(values, type=types.get(name)) for name, values in columns.items()})
    encoded = {b"hfn_format": LATENTS_FORMAT.encode()}
    encoded.update({key.encode(): json.dumps(value).encode() for key, value in metadata.items()})
    directory = os.path.join(workdir, LATENTS_DIRECTORY)
    _write_atomic(os.path.join(directory, LATENTS_SHARD), pa.table(arrays).replace_schema_metadata(encoded))
    return directory


def write_latents(workdir: str, model: TrainedAutoencoder, splits: Sequence, step: int) -> str:
    """Encodes every field of ``splits`` (``(train, validation)`` ``WeightData``) and writes them, in
    the dataset's row order, to ``W/latents/latents-000000.parquet``; returns the folder."""
    names = ("train", "val")
    latents = np.concatenate([model.encode(split.vectors) for split in splits])
    rows = np.concatenate([np.asarray(split.rows, np.int64) for split in splits])
    order = np.argsort(rows, kind="stable")
    split_names = [name for name, split in zip(names, splits, strict=True) for _ in range(len(split))]
    source_ids = [source for split in splits for source in split.source_ids]
    labels = np.concatenate([np.asarray(split.labels, np.int32) for split in splits])
    columns = {"source_id": [source_ids[index] for index in order], "label": labels[order],
               "split": [split_names[index] for index in order], "row": rows[order]}
    train_latents = latents[: len(splits[0])]
    info = model.data_info
    metadata = {
        "autoencoder_workdir": os.path.abspath(workdir), "data": info.path, "step": int(step),
        "latent_dim": model.latent_size, "section_latent_dims": model.network.section_latent_dims,
        "num_params": model.num_params, "compression": model.compression, "model": model.network.module.kind,
        "field_kind": info.field_kind, "normalization_mode": info.mode,
        "latent_mean": np.mean(train_latents, axis=0).tolist() if len(train_latents) else [],
        "latent_std": np.std(train_latents, axis=0).tolist() if len(train_latents) else [],
    }
    return write_latent_shard(workdir, latents[order], columns, metadata)


def read_latents(path: str) -> tuple[np.ndarray, dict[str, Any], dict[str, Any]]:
    """Reads ``W/latents`` (or one shard): ``(latents [N, D] float32, columns {name: list}, metadata)``.

    Raises:
        UserError: a missing or unreadable file, or one that is not a dataset of latents.
    """
    import pyarrow.parquet as pq

    shard = os.path.join(path, LATENTS_SHARD) if os.path.isdir(path) else path
    if not os.path.exists(shard):
        raise UserError(f"latents not found: {shard}")
    try:
        table = pq.read_table(shard)
    except Exception as error:  # noqa: BLE001 - any decoding failure is a bad file
        raise UserError(f"cannot read {shard}: {error}") from None
    raw = table.schema.metadata or {}
    if raw.get(b"hfn_format", b"").decode() != LATENTS_FORMAT or LATENT_COLUMN not in table.column_names:
        raise UserError(f"{shard} is not a dataset of latents ({LATENTS_FORMAT})")
    metadata = {key.decode(): json.loads(value) for key, value in raw.items() if key != b"hfn_format"}
    column = table.column(LATENT_COLUMN).combine_chunks()
    latents = column.flatten().to_numpy().astype(np.float32).reshape(len(table), column.type.list_size)
    columns = {name: table.column(name).to_pylist() for name in table.column_names if name != LATENT_COLUMN}
    return latents, columns, metadata


def write_reconstruction_grid(path: str, model: TrainedAutoencoder, splits: Sequence, pairs: int) -> bool:
    """Draws up to ``pairs`` fields (held-out first) as original/reconstruction pairs in a PNG.

    Returns False (nothing written) for fields that do not render as images, or ``pairs == 0``.
    """
    from hypernets.rendering import save_grid

    info = model.data_info
    if pairs == 0 or not renders_images(info):
        return False
    vectors = np.concatenate([split.vectors for split in reversed(splits)])[:pairs]
    if not len(vectors):
        return False
    original = render(info.denormalize(vectors), info, path).previews
    reconstructed = render(model.decode_to_fields(model.encode(vectors)), info, path).previews
    interleaved = np.stack([original, reconstructed], axis=1).reshape((-1,) + original.shape[1:])
    save_grid(path, interleaved, columns=2 * min(4, len(vectors)), group=2)
    return True


# ------------------------------------------------------------------------------------------- the run


def run_record(data_path: str, config: AutoencoderConfig) -> dict:
    """What ``W/config.json`` holds: ``{"data": absolute path, "autoencoder": config dict}``."""
    return {"data": os.path.abspath(data_path), SECTION: config_to_dict(config)}


def resolve_config(args, saved: dict | None) -> AutoencoderConfig:
    """The preset (or, without ``--preset``, the config saved in the workdir) with the command-line overrides."""
    overrides = {"model": args.model, "latent_dims": args.latent_dims, "normalization": args.normalization,
                 "loss_weighting": args.loss_weighting, "render_weight": args.render_weight}
    return resolve_run_config(AutoencoderConfig, PRESETS, args, saved, SECTION, overrides)


def _latent_dims(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated sizes such as 64,32, got {text!r}") from None


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m hypernets.autoencoder", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="dataset of fields (a .parquet shard or a folder of them)")
    parser.add_argument("--workdir", required=True, help="run directory (config, checkpoints, latents)")
    parser.add_argument("--preset", help=f"one of {', '.join(PRESETS)} (default: the workdir's saved config, "
                                         "else default)")
    parser.add_argument("--model", choices=MODEL_CHOICES,
                        help="section encoders/decoders: conv, transformer, or sane (runs hypernets.sane)")
    parser.add_argument("--latent-dims", type=_latent_dims,
                        help="latent size per section in the dataset's order (e.g. 64,32 for hash,mlp), or one size")
    parser.add_argument("--normalization", choices=NORMALIZATION_MODES)
    parser.add_argument("--loss-weighting", choices=LOSS_WEIGHTINGS)
    parser.add_argument("--render-weight", type=float,
                        help="image fields: weight of the render MSE (decoded vs original field's render) in the loss")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_loop_arguments(parser)
    return parser


def _model_choice(argv: list[str]) -> tuple[str | None, list[str]]:
    """``(--model value, the other arguments)``."""
    parser = ArgumentParser(prog="python -m hypernets.autoencoder", add_help=False, allow_abbrev=False)
    parser.add_argument("--model")
    known, rest = parser.parse_known_args(argv)
    return known.model, rest


def describe_sections(network: WeightAutoencoder) -> str:
    sections = ", ".join(f"{name} {size} -> {dim}" for name, size, dim in
                         zip(network.section_names, network.layout.sizes, network.module.latent_dims, strict=True))
    return (f"{network.num_params} weights ({sections}): latent {network.latent_size}, "
            f"compression {network.compression:.1f}x")


def main(argv: list[str] | None = None) -> int:
    from hypernets.datasets import BatchStream, load_weight_splits
    from hypernets.loop import train

    argv = sys.argv[1:] if argv is None else list(argv)
    model_choice, rest = _model_choice(argv)
    if model_choice == "sane":  # imported by name (not at the top): hypernets.sane imports this module
        return importlib.import_module("hypernets.sane").main(rest)

    args = build_parser().parse_args(argv)
    saved = read_saved_run(args.workdir, SECTION, PROGRAM)
    config = resolve_config(args, saved)
    run_config = run_record(args.data, config)
    check_run_config(args.workdir, saved, run_config, rerun_free_fields(SECTION, RERUN_FREE_FIELDS, args, saved))
    print(config_to_json(config))

    train_data, val_data = load_weight_splits(args.data, config.val_fraction, config.loop.seed, config.normalization)
    network = build_network(config, train_data.param_map)
    prepare_workdir(args.workdir)
    write_run(args.workdir, run_config)
    data_info = DataInfo.from_weight_data(train_data, args.data)
    write_json(os.path.join(args.workdir, DATA_INFO_NAME), data_info.to_dict())
    print(f"{len(train_data)} training fields, {len(val_data)} held out; {config.model} autoencoder: "
          f"{describe_sections(network)}")

    renderer = None
    if config.render_weight > 0:
        if not renders_images(train_data):
            raise UserError(f"--render-weight: {args.data} holds {train_data.field_kind} fields; the render loss "
                            "needs image fields of known size")
        renderer = make_image_renderer(train_data)
    task = AutoencoderTask(network, config.loss_weighting, renderer, config.render_weight)
    stream = BatchStream({"vectors": train_data.vectors}, config.loop.batch_size, seed=config.loop.seed)
    evaluate = make_evaluate(network, val_data, config)
    result = train(task, stream, config.loop, args.workdir, evaluate=evaluate, progress=not args.quiet,
                   run_config=run_config)
    params = jax.device_get(result.ema_params)
    save_params(args.workdir, params)
    model = TrainedAutoencoder(network, params, data_info)

    splits = (train_data, val_data)
    directory = write_latents(args.workdir, model, splits, result.step)
    summary = {"step": int(result.step), "model": config.model, "num_params": network.num_params,
               "latent_size": network.latent_size, "section_latent_dims": network.section_latent_dims,
               "compression": network.compression, **result.evaluation}
    write_json(os.path.join(args.workdir, EVALUATION_NAME), summary)
    print(f"step {result.step}: compression {network.compression:.1f}x ({network.num_params} weights -> "
          f"{network.latent_size} latents)" + "".join(f", {name} {value:.4g}" for name, value in
                                                     result.evaluation.items()))
    print(f"wrote the latents of {len(train_data) + len(val_data)} fields to {directory}")
    grid_path = os.path.join(args.workdir, GRID_NAME)
    if write_reconstruction_grid(grid_path, model, splits, config.grid_pairs):
        print(f"originals and reconstructions: {grid_path}")
    return 0


if __name__ == "__main__":
    run_main(main)
