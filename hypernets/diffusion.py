"""Weight-space diffusion: train a DiT over the (normalised, chunked) weights of a field dataset, then sample fields.

    python -m hypernets.diffusion --data data/fields/primitives --workdir runs/diffusion --preset small
    python -m hypernets.diffusion --data data/fields/primitives --workdir runs/diffusion --sample-only \
--num-samples 64 --sampler ddpm
    python -m hypernets.diffusion --latents runs/autoencoder --workdir runs/latent-diffusion --preset small

A run is a config and a work directory: ``W/config.json`` holds the resolved config and the data
path; rerunning resumes from the newest checkpoint in ``W/checkpoints`` (a different config in the
same directory is refused; the sampling options may change between runs). After training, samples
drawn with the EMA parameters are denormalised to raw weights and written as a dataset of fields in
``W/samples/`` (same field kind, config, param map and image size as the input, so every tool that
reads fields reads them), and for image fields ``W/samples.png`` shows them rendered.

Latent diffusion: with ``--latents AE_WORKDIR`` (instead of ``--data``) the same model trains on the
latents of a finished ``hypernets.autoencoder`` run, per-dimension standardised, with the
autoencoder's train/validation split and one section per autoencoder section; samples are decoded
back to field weights by the autoencoder and written to ``W/samples`` in the same format
(``hypernets.latent_data``). ``--normalization`` does not apply there.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fields.cli import ArgumentParser, UserError, prepare_workdir, run_main
from fields.config import check_run_config, config_to_dict, config_to_json
from fields.weights import NORMALIZATION_MODES
from hypernets.loop import LoopConfig, add_loop_arguments
from hypernets.models.dit import DiT, WeightChunker
from hypernets.objectives import diffusion as objective_lib
from hypernets.runs import (
    CONFIG_NAME,
    num_classes_of,
    read_saved_run,
    rerun_free_fields,
    resolve_run_config,
    restore_or_train,
    sample_labels,
    write_run,
    write_sample_fields,
    write_sample_grid,
)

# Fields that may differ between runs in one work directory (sampling options, logging, devices).
RERUN_FREE_FIELDS = ("num_samples", "sampler", "sample_steps", "eta", "guidance_scale", "clip_x0", "sample_seed",
                     "loop.wandb", "loop.num_devices")


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
    """Weight-space diffusion: model, objective, sampling.

    Attributes:
        loop: the training loop (steps, batch size, optimiser, EMA, checkpoints).
        chunk_size: weights per token (each param-map section is chunked on its own).
        width, depth, num_heads, mlp_ratio: the DiT.
        schedule: noise schedule, ``"cosine"`` or ``"linear"``.
        objective: what the model predicts: ``"epsilon"``, ``"x0"`` or ``"v"``.
        num_timesteps: diffusion steps of the forward process.
        class_conditional: condition on the dataset's labels (classifier-free guidance).
        label_dropout: probability of training a sample unconditionally (conditional models).
        sampler: ``"ddpm"`` (ancestral) or ``"ddim"``.
        sample_steps: timesteps visited when sampling (respaced).
        eta: DDIM noise (0: deterministic).
        guidance_scale: classifier-free guidance at sampling (1: plain conditional).
        clip_x0: clip the (normalised) x0 estimate to ``[-clip_x0, clip_x0]`` at each sampling step; 0: off.
            Worth setting for ``objective="epsilon"`` with DDIM: at the near-zero signal of the first
            step the epsilon-to-x0 conversion amplifies model error by ``1 / sqrt(abar)``.
        num_samples: fields written to ``W/samples``.
        sample_seed: sampling randomness; None: ``loop.seed + 1``. Like the other sampling options, a
            rerun in the same work directory without it keeps the saved run's.
        normalization: per-``"section"`` or per-``"tensor"`` normalisation of the weights.
        val_fraction: fields held out (by a hash of their source id) to report a validation loss.
    """

    loop: LoopConfig = dataclasses.field(default_factory=LoopConfig)
    chunk_size: int = 64
    width: int = 256
    depth: int = 8
    num_heads: int = 8
    mlp_ratio: float = 4.0
    schedule: str = "cosine"
    objective: str = "v"
    num_timesteps: int = 1000
    class_conditional: bool = False
    label_dropout: float = 0.1
    sampler: str = "ddim"
    sample_steps: int = 100
    eta: float = 0.0
    guidance_scale: float = 1.0
    clip_x0: float = 0.0
    num_samples: int = 16
    sample_seed: int | None = None
    normalization: str = "section"
    val_fraction: float = 0.1

    def __post_init__(self):
        positive = ("chunk_size", "width", "depth", "num_heads", "num_timesteps", "sample_steps", "num_samples")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.width % self.num_heads:
            raise ValueError(f"width ({self.width}) must be divisible by num_heads ({self.num_heads})")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        choices = {"schedule": objective_lib.SCHEDULES, "objective": objective_lib.OBJECTIVES,
                   "sampler": objective_lib.SAMPLERS, "normalization": NORMALIZATION_MODES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {self.label_dropout}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.eta < 0 or self.clip_x0 < 0:
            raise ValueError(f"eta and clip_x0 must be >= 0, got {self.eta} and {self.clip_x0}")


PRESETS: dict[str, DiffusionConfig] = {
    # Test-sized: a few steps of a one-block DiT on a handful of 8x8 fields, seconds on a CPU.
    #   python -m hypernets.diffusion --data DIR --workdir W --preset tiny
    "tiny": DiffusionConfig(
        loop=LoopConfig(steps=4, batch_size=4, learning_rate=1e-3, warmup_steps=1, ema_decay=0.9, log_every=2,
                        checkpoint_every=100),
        chunk_size=32, width=32, depth=1, num_heads=2, mlp_ratio=2.0, num_timesteps=50, sample_steps=5,
        num_samples=4, val_fraction=0.2),
    # Primitives at 28x28 (ngp_image "small" fields, ~1.6k weights -> ~50 tokens of 32), one GPU.
    # Expected (not measured: it needs a GPU and none has been lent): recognisable primitives in samples.png
    # and at least what the demo's 800 steps of the "cpu" preset reach on these fields (1-NNA 77%, 64 vs 64).
    #   python -m fields.encode_dataset --source procedural:primitives --num 1024 --out data/fields/primitives
    #   python -m hypernets.diffusion --data data/fields/primitives --workdir runs/diffusion-small --preset small
    "small": DiffusionConfig(
        loop=LoopConfig(steps=20000, batch_size=64, learning_rate=3e-4, warmup_steps=500, ema_decay=0.999,
                        checkpoint_every=1000, eval_every=1000),
        chunk_size=32, width=192, depth=6, num_heads=6, num_timesteps=1000, sample_steps=100, num_samples=64),
    # CPU-sized, for budgets of minutes on 2 cores (scripts/bench_hypernets.py); ~1.6k-weight image fields.
    # Measured on 2,048 shared-init Fashion-MNIST fields with --class-conditional (BENCHMARKS.md): 3,000 steps
    # (~13 min on 2 quiet cores) at --guidance-scale 3 sample recognisable garments, 77% class accuracy,
    # 1-NNA 92.7%; --steps 6000 (~26 min): 86% class accuracy at guidance 3, 1-NNA 73% at guidance 1;
    # --steps 24000 (86 min): 94% at guidance 3, 1-NNA 66% at guidance 1, and at --guidance-scale 1.5
    # --eta 1 --sample-steps 100 both targets at once (1-NNA 68%, class accuracy 84%).
    #   python -m hypernets.diffusion --data data/fields/fmnist --workdir runs/diffusion-cpu --preset cpu \
    #       --class-conditional --guidance-scale 3 --steps 3000
    "cpu": DiffusionConfig(
        loop=LoopConfig(steps=3000, batch_size=64, learning_rate=5e-4, warmup_steps=200, ema_decay=0.999,
                        checkpoint_every=500, eval_every=1000),
        chunk_size=32, width=128, depth=4, num_heads=4, num_timesteps=1000, sample_steps=50, sampler="ddim",
        num_samples=64),
    # CPU-sized, for occupancy fields of shapes (fields.occupancy_fitting "small": ~10k weights -> ~85
    # tokens of 128); scripts/bench_hypernets.py --parts shapes.
    #   python -m hypernets.diffusion --data data/fields/shapes --workdir runs/diffusion-shapes --preset cpu-shapes
    "cpu-shapes": DiffusionConfig(
        loop=LoopConfig(steps=3000, batch_size=32, learning_rate=5e-4, warmup_steps=200, ema_decay=0.999,
                        checkpoint_every=500, eval_every=1000),
        chunk_size=128, width=128, depth=4, num_heads=4, num_timesteps=1000, sample_steps=50, sampler="ddim",
        num_samples=64),
    # Larger datasets of image fields (e.g. Fashion-MNIST fields), class-conditional with guidance.
    # Expected (not measured: it needs a GPU and none has been lent): at least the "cpu" preset's figures on
    # the same fields (24,000 steps: class accuracy 94% at guidance 3, 1-NNA 66% at guidance 1, 512 vs 512),
    # from 4x the steps of a 3x wider DiT.
    #   python -m hypernets.diffusion --data data/fields/fmnist --workdir runs/diffusion --class-conditional \
    #       --guidance-scale 2
    "default": DiffusionConfig(
        loop=LoopConfig(steps=100000, batch_size=128, learning_rate=1e-4, warmup_steps=1000, ema_decay=0.9995,
                        checkpoint_every=2500, eval_every=2500),
        chunk_size=64, width=384, depth=12, num_heads=6, num_timesteps=1000, sample_steps=100, num_samples=64),
}


# ------------------------------------------------------------------------------------------- the task


@dataclasses.dataclass
class DiffusionTask:
    """The training task for ``hypernets.loop.train``: batches ``{"vectors": [B, P], "labels": [B]}``.

    Attributes:
        model: the denoiser over tokens ``[B, T, chunk_size]``.
        chunker: vectors <-> tokens.
        alphas_cumprod: ``[num_timesteps]`` float32.
        objective, label_dropout: as in ``DiffusionConfig``.
        num_classes: 0 for an unconditional model (labels ignored), else the null class id.
    """

    model: DiT
    chunker: WeightChunker
    alphas_cumprod: np.ndarray
    objective: str
    num_classes: int = 0
    label_dropout: float = 0.0

    def _labels(self, batch: dict[str, jax.Array]) -> jax.Array | None:
        return jnp.asarray(batch["labels"], jnp.int32) if self.num_classes > 0 else None

    def init(self, key: jax.Array, batch: dict[str, jax.Array]) -> Any:
        tokens = self.chunker.to_tokens(jnp.asarray(batch["vectors"], jnp.float32))
        timesteps = jnp.zeros(tokens.shape[:1], jnp.int32)
        return self.model.init(key, tokens, timesteps, self._labels(batch))["params"]

    def denoiser(self, params: Any):
        """``denoise(x_t, timesteps, labels)`` of the model with ``params``."""
        return lambda x_t, timesteps, labels: self.model.apply({"params": params}, x_t, timesteps, labels)

    def loss(self, params: Any, batch: dict[str, jax.Array], key: jax.Array):
        tokens = self.chunker.to_tokens(jnp.asarray(batch["vectors"], jnp.float32))
        return objective_lib.diffusion_loss(
            self.denoiser(params), tokens, key, jnp.asarray(self.alphas_cumprod), self.objective,
            labels=self._labels(batch), num_classes=self.num_classes, label_dropout=self.label_dropout,
            mask=jnp.asarray(self.chunker.mask))


def build_task(config: DiffusionConfig, param_map: list, num_classes: int) -> DiffusionTask:
    """The task (model, chunker, schedule) for ``config`` on fields laid out by ``param_map``."""
    chunker = WeightChunker(param_map, config.chunk_size)
    model = DiT(num_tokens=chunker.num_tokens, chunk_size=chunker.chunk_size,
                section_ids=tuple(int(s) for s in chunker.section_ids), width=config.width, depth=config.depth,
                num_heads=config.num_heads, mlp_ratio=config.mlp_ratio,
                num_classes=num_classes if config.class_conditional else 0)
    return DiffusionTask(model=model, chunker=chunker,
                         alphas_cumprod=objective_lib.alphas_cumprod(config.schedule, config.num_timesteps),
                         objective=config.objective, num_classes=model.num_classes,
                         label_dropout=config.label_dropout)


def make_evaluate(task: DiffusionTask, vectors: np.ndarray, labels: np.ndarray, batch_size: int, seed: int):
    """``evaluate(params, step) -> {"val_loss": ...}``: the loss on up to 4 batches of held-out fields
    with fixed noise (an empty split reports nothing)."""
    if len(vectors) == 0:
        return None
    num_batches = min(4, -(-len(vectors) // batch_size))
    rows = (np.arange(num_batches * batch_size) % len(vectors)).reshape(num_batches, batch_size)
    # The same batches and noise at every evaluation: placed once, not per call.
    batches = [{"vectors": jnp.asarray(vectors[picked]), "labels": jnp.asarray(labels[picked], jnp.int32)}
               for picked in rows]
    keys = [jax.random.fold_in(jax.random.PRNGKey(seed), index) for index in range(num_batches)]
    loss = jax.jit(task.loss)

    def evaluate(params: Any, step: int) -> dict[str, float]:
        del step
        values = [loss(params, batch, key)[0] for batch, key in zip(batches, keys, strict=True)]
        return {"val_loss": float(jnp.mean(jnp.stack(values)))}

    return evaluate


def sample_vectors(task: DiffusionTask, params: Any, config: DiffusionConfig, labels: np.ndarray, seed: int,
                   chunk: int = 256) -> np.ndarray:
    """Draws ``config.num_samples`` normalised weight vectors ``[num_samples, P]`` float32.

    Args:
        labels: ``[num_samples]`` int class ids (``sample_labels``); an unconditional model ignores them.
        seed: sampling randomness.
        chunk: samples drawn per compiled call.
    """
    abar = jnp.asarray(task.alphas_cumprod)
    shape_tail = (task.chunker.num_tokens, task.chunker.chunk_size)

    @jax.jit
    def draw(params, key, chunk_labels):
        tokens = objective_lib.sample(
            task.denoiser(params), key, (chunk_labels.shape[0],) + shape_tail, abar, task.objective,
            sampler=config.sampler, num_steps=config.sample_steps, eta=config.eta,
            labels=chunk_labels if task.num_classes > 0 else None, guidance_scale=config.guidance_scale,
            null_class=task.num_classes, clip_x0=config.clip_x0 or None)
        return task.chunker.from_tokens(tokens)

    pieces = []
    for start in range(0, config.num_samples, chunk):
        stop = min(start + chunk, config.num_samples)
        key = jax.random.fold_in(jax.random.PRNGKey(seed), start)
        pieces.append(np.asarray(draw(params, key, jnp.asarray(labels[start:stop], jnp.int32))))
    return np.concatenate(pieces).astype(np.float32)


# ------------------------------------------------------------------------------------------- outputs


def write_samples(workdir: str, raw: np.ndarray, labels: np.ndarray, data, generator: dict,
                  directory: str | None = None) -> str:
    """Writes raw sampled weights ``[n, P]`` as a dataset of fields in ``workdir/samples`` (or ``directory``);
    returns its path."""
    extra = dict(data.metadata)  # read_dataset's metadata holds no reserved keys
    extra["source"] = f"hypernets.diffusion samples ({generator.get('workdir', workdir)})"
    extra["generator"] = generator
    return write_sample_fields(workdir, raw, labels, data, extra, directory)


# ------------------------------------------------------------------------------------------- the run


def run_record(data_path: str | None, config: DiffusionConfig, latents=None) -> dict:
    """What ``W/config.json`` holds: ``{"data": absolute path, "diffusion": config dict}``, or with
    ``latents`` (a ``hypernets.latent_data.LatentSource``) ``{"latents": {workdir, step, latent_dim}, ...}``."""
    if latents is not None:
        return {"latents": latents.record(), "diffusion": config_to_dict(config)}
    return {"data": os.path.abspath(data_path), "diffusion": config_to_dict(config)}


def resolve_config(args, saved: dict | None) -> DiffusionConfig:
    """The preset (or, without ``--preset``, the config saved in the workdir) with the command-line overrides."""
    overrides = {
        "class_conditional": args.class_conditional, "num_samples": args.num_samples, "sampler": args.sampler,
        "sample_steps": args.sample_steps, "guidance_scale": args.guidance_scale, "eta": args.eta,
        "clip_x0": args.clip_x0, "sample_seed": args.sample_seed, "objective": args.objective,
        "schedule": args.schedule, "normalization": args.normalization,
    }
    return resolve_run_config(DiffusionConfig, PRESETS, args, saved, "diffusion", overrides)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m hypernets.diffusion", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="dataset of fields (a .parquet shard or a folder of them)")
    parser.add_argument("--latents", metavar="AE_WORKDIR",
                        help="instead of --data: train on the latents of a hypernets.autoencoder run (latent "
                             "diffusion; samples are decoded to fields by that autoencoder)")
    parser.add_argument("--workdir", required=True, help="run directory (config, checkpoints, samples)")
    parser.add_argument("--preset", help=f"one of {', '.join(PRESETS)} (default: the workdir's saved config, "
                                         "else default)")
    parser.add_argument("--class-conditional", action="store_true", default=None,
                        help="condition on the dataset's labels (classifier-free guidance)")
    parser.add_argument("--num-samples", type=int, help="fields to sample into W/samples")
    parser.add_argument("--sampler", choices=objective_lib.SAMPLERS)
    parser.add_argument("--sample-steps", type=int, help="timesteps visited when sampling")
    parser.add_argument("--eta", type=float, help="DDIM noise (0: deterministic)")
    parser.add_argument("--guidance-scale", type=float, help="classifier-free guidance scale (1: none)")
    parser.add_argument("--sample-seed", type=int,
                        help="sampling seed (default: the saved run's, else the training seed + 1)")
    parser.add_argument("--clip-x0", type=float,
                        help="clip normalised x0 estimates to +-this while sampling (0: off; helps epsilon + DDIM)")
    parser.add_argument("--objective", choices=objective_lib.OBJECTIVES)
    parser.add_argument("--schedule", choices=objective_lib.SCHEDULES)
    parser.add_argument("--normalization", choices=NORMALIZATION_MODES)
    parser.add_argument("--sample-only", action="store_true", help="sample from the last checkpoint, no training")
    parser.add_argument("--samples-out", metavar="DIR",
                        help="write the sampled fields to DIR (and their grid to DIR.png) instead of W/samples, "
                             "e.g. to compare guidance scales of one trained model with --sample-only")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_loop_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    from hypernets.datasets import BatchStream, load_weight_splits

    args = build_parser().parse_args(argv)
    if args.data is not None and args.latents is not None:
        raise UserError("--latents trains on an autoencoder's latents instead of --data: give one of them, not both")
    if args.data is None and args.latents is None:
        raise UserError("give --data (a dataset of fields) or --latents (an autoencoder's work directory)")
    saved = read_saved_run(args.workdir, "diffusion", "hypernets.diffusion")
    if args.sample_only and saved is None:
        raise UserError(f"--sample-only: {args.workdir} holds no trained run (no {CONFIG_NAME})")
    config = resolve_config(args, saved)
    latents = None
    if args.latents is not None:
        from hypernets.latent_data import load_latent_source

        latents = load_latent_source(args.latents)
    run_config = run_record(args.data, config, latents)
    check_run_config(args.workdir, saved, run_config, rerun_free_fields("diffusion", RERUN_FREE_FIELDS, args, saved))
    print(config_to_json(config))

    if latents is None:
        train_data, val_data = load_weight_splits(args.data, config.val_fraction, config.loop.seed,
                                                  config.normalization)
        to_fields, fields, data_name = train_data.denormalize, train_data, args.data
    else:
        train_data, val_data = latents.train, latents.validation
        to_fields, fields, data_name = latents.to_fields, latents.fields, f"the latents of {args.latents}"
    prepare_workdir(args.workdir)
    write_run(args.workdir, run_config)
    num_classes = num_classes_of(np.concatenate([train_data.labels, val_data.labels]))
    if config.class_conditional and num_classes == 0:
        raise UserError(f"--class-conditional: {data_name} has no labels (every label is -1)")
    task = build_task(config, train_data.param_map, num_classes)
    print(f"{len(train_data.labels)} training fields, {len(val_data.labels)} held out; "
          f"{task.chunker.num_params} {'weights' if latents is None else 'latents'} -> "
          f"{task.chunker.num_tokens} tokens of {config.chunk_size} "
          f"(sections: {', '.join(task.chunker.section_names)})"
          + (f"; {num_classes} classes" if config.class_conditional else ""))

    stream = BatchStream({"vectors": train_data.vectors, "labels": train_data.labels.astype(np.int32)},
                         config.loop.batch_size, seed=config.loop.seed)
    evaluate = None if args.sample_only else make_evaluate(task, val_data.vectors, val_data.labels,
                                                           config.loop.batch_size, config.loop.seed)
    result = restore_or_train(task, stream, config.loop, args.workdir, run_config, sample_only=args.sample_only,
                              evaluate=evaluate, progress=not args.quiet)
    params, step = jax.device_get(result.ema_params), result.step

    labels = sample_labels(config.num_samples, num_classes, config.class_conditional)
    sample_seed = config.loop.seed + 1 if config.sample_seed is None else config.sample_seed
    normalized = sample_vectors(task, params, config, labels, seed=sample_seed)
    raw = to_fields(normalized)
    if not np.all(np.isfinite(raw)):
        raise UserError(f"sampling produced non-finite weights (step {step}); train longer or lower the learning rate")
    generator = {"model": "hypernets.diffusion", "workdir": os.path.abspath(args.workdir), "step": int(step),
                 "training_data": os.path.abspath(args.data) if latents is None else fields.path,
                 "sampler": config.sampler, "sample_steps": config.sample_steps, "eta": config.eta,
                 "guidance_scale": config.guidance_scale, "clip_x0": config.clip_x0,
                 "sample_seed": sample_seed}
    if latents is not None:
        generator["latents"] = latents.record()
    directory = write_samples(args.workdir, raw, labels, fields, generator, args.samples_out)
    print(f"step {step}: wrote {len(raw)} sampled fields to {directory}")
    grid_path = (args.samples_out.rstrip("/") + ".png" if args.samples_out
                 else os.path.join(args.workdir, "samples.png"))
    if write_sample_grid(grid_path, raw, fields):
        print(f"rendered samples: {grid_path}")
    return 0


if __name__ == "__main__":
    run_main(main)
