"""Autoregressive hypernetwork: a decoder-only transformer over weight tokens; samples new fields token by token.

    python -m scripts.tokenize --fields data/fields/primitives --tokenizer fp8_e4m3 --normalize section \\
        --out data/tokens/primitives_fp8
    python -m hypernets.autoregressive --data data/tokens/primitives_fp8 --workdir runs/ar --preset small
    python -m hypernets.autoregressive --data data/tokens/primitives_fp8 --workdir runs/ar --sample-only \\
        --num-samples 64 --temperature 0.9 --top-k 32

The input is a dataset of tokens (``fields-tokens/v1``, from ``scripts.tokenize``): fp8 (vocab 256),
k-bit uniform (vocab 2^k), bf16 (two byte tokens per weight) or fp16 (vocab 65536, predicted by a
factorised head: high byte, then low byte given the high byte). See
``hypernets.models.transformer`` and ``hypernets.objectives.autoregressive``.

A run is a config and a work directory: ``W/config.json`` holds the resolved config, the data path
and the model shape; rerunning resumes from the newest checkpoint in ``W/checkpoints`` (a different
config in the same directory is refused; the sampling options may change between runs). After
training (or, with ``--sample-only``, from the newest checkpoint, finished or not) samples drawn
with the EMA parameters are written twice: as a dataset of tokens in ``W/sample_tokens/`` (same tokenizer and
normalisation as the input) and, decoded and denormalised, as a dataset of fields in ``W/samples/``
(same field kind, config, param map and image size as the input; rows ``sample-000000``, ...).
For image fields ``W/samples.png`` shows the samples rendered.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fields.cli import ArgumentParser, UserError, prepare_workdir, run_main
from fields.config import check_run_config, config_to_dict, config_to_json
from hypernets.loop import LoopConfig, add_loop_arguments
from hypernets.models.transformer import LOW_VOCAB, TokenTransformer, TransformerConfig
from hypernets.objectives import autoregressive as objective_lib
from hypernets.runs import (
    CONFIG_NAME,
    SAMPLES_DIRECTORY,
    SAMPLES_SHARD,
    num_classes_of,
    read_saved_run,
    rerun_free_fields,
    resolve_run_config,
    restore_or_train,
    sample_columns,
    sample_labels,
    write_run,
    write_sample_fields,
    write_sample_grid,
)

SAMPLE_TOKENS_DIRECTORY = "sample_tokens"
GRID_NAME = "samples.png"
# Config fields that may change between runs in one work directory (sampling, logging, devices).
RERUN_FREE_FIELDS = ("num_samples", "temperature", "top_k", "sample_seed", "loop.wandb", "loop.num_devices")


@dataclasses.dataclass(frozen=True)
class AutoregressiveConfig:
    """The token model, its training and its sampling.

    Attributes:
        loop: the training loop (steps, batch size, optimiser, EMA, checkpoints).
        width, depth, num_heads, mlp_ratio, dropout: the transformer.
        class_conditional: condition on the dataset's labels (a label embedding added at the start).
        factorize_above: vocabularies larger than this (e.g. fp16's 65536) use the factorised
            (high byte, low byte) head; they must be multiples of 256.
        val_fraction: fields held out (by a hash of their source id) for a validation loss.
        num_samples: fields sampled into ``W/samples``.
        temperature: sampling temperature (0: greedy).
        top_k: sample among the ``top_k`` most likely tokens (0: all).
        sample_seed: sampling randomness.
    """

    loop: LoopConfig = dataclasses.field(default_factory=LoopConfig)
    width: int = 256
    depth: int = 8
    num_heads: int = 8
    mlp_ratio: int = 4
    dropout: float = 0.0
    class_conditional: bool = False
    factorize_above: int = 4096
    val_fraction: float = 0.1
    num_samples: int = 16
    temperature: float = 1.0
    top_k: int = 0
    sample_seed: int = 0

    def __post_init__(self):
        for name in ("width", "depth", "num_heads", "mlp_ratio", "num_samples", "factorize_above"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.width % self.num_heads:
            raise ValueError(f"width ({self.width}) must be divisible by num_heads ({self.num_heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        self.sampling()  # SamplingOptions checks temperature and top_k

    def sampling(self) -> objective_lib.SamplingOptions:
        return objective_lib.SamplingOptions(temperature=self.temperature, top_k=self.top_k)


PRESETS: dict[str, AutoregressiveConfig] = {
    # Test-sized: a few steps of a one-block transformer on a handful of 8x8 fields, seconds on a CPU.
    #   python -m hypernets.autoregressive --data TOKENS --workdir W --preset tiny
    "tiny": AutoregressiveConfig(
        loop=LoopConfig(steps=4, batch_size=4, learning_rate=1e-3, warmup_steps=1, ema_decay=0.0, log_every=2,
                        checkpoint_every=2),
        width=32, depth=1, num_heads=2, mlp_ratio=2, num_samples=4, val_fraction=0.2),
    # Primitives at 28x28 (ngp_image "small" fields, ~1.6k weights = ~1.6k fp8 tokens), one GPU.
    # Expected (not measured: it needs a GPU and none has been lent): validation loss well below
    # log(256) = 5.5 nats/token and at least the demo's 100 "cpu" steps on these fields (1-NNA 82%, 64 vs 64).
    #   python -m fields.encode_dataset --source procedural:primitives --num 1024 --out data/fields/primitives
    #   python -m scripts.tokenize --fields data/fields/primitives --tokenizer fp8_e4m3 --normalize section \
    #       --out data/tokens/primitives_fp8
    #   python -m hypernets.autoregressive --data data/tokens/primitives_fp8 --workdir runs/ar-small --preset small
    "small": AutoregressiveConfig(
        loop=LoopConfig(steps=20000, batch_size=32, learning_rate=3e-4, warmup_steps=500, ema_decay=0.999,
                        checkpoint_every=1000, eval_every=1000),
        width=192, depth=6, num_heads=6, dropout=0.1, num_samples=64),
    # CPU-sized, for budgets of minutes on 2 cores (scripts/bench_hypernets.py); 1.7 s per step on 2 idle
    # cores over 1,536-token fields. Measured (BENCHMARKS.md): its 1,000 steps (30 min) on 2,048 Fashion-MNIST
    # fields give garment-shaped noisy blobs, 1-NNA 80% (512 vs 512) but 23% class accuracy; make demo's
    # 100 steps on primitives give 1-NNA 82% (64 vs 64).
    #   python -m hypernets.autoregressive --data data/tokens/fmnist_fp8 --workdir runs/ar-cpu --preset cpu
    "cpu": AutoregressiveConfig(
        loop=LoopConfig(steps=1000, batch_size=8, learning_rate=1e-3, warmup_steps=100, ema_decay=0.99,
                        checkpoint_every=200, eval_every=500),
        width=64, depth=2, num_heads=4, num_samples=64),
    # Larger datasets of image fields (e.g. Fashion-MNIST fields), class-conditional.
    # Expected (not measured: it needs a GPU and none has been lent): recognisable class-conditional samples,
    # at least the "cpu" preset's figures on the same fields (1-NNA 80%, class accuracy 23%; BENCHMARKS.md).
    #   python -m hypernets.autoregressive --data data/tokens/fmnist_fp8 --workdir runs/ar --class-conditional
    "default": AutoregressiveConfig(
        loop=LoopConfig(steps=100000, batch_size=64, learning_rate=2e-4, warmup_steps=1000, ema_decay=0.9995,
                        checkpoint_every=2500, eval_every=2500),
        width=384, depth=12, num_heads=6, dropout=0.1, num_samples=64),
}


# ------------------------------------------------------------------------------------------- the model


def model_config_for(config: AutoregressiveConfig, vocab_size: int, sequence_length: int,
                     num_classes: int) -> TransformerConfig:
    """The transformer for sequences of ``sequence_length`` tokens in ``[0, vocab_size)``."""
    factorized = vocab_size > config.factorize_above
    if factorized and vocab_size % LOW_VOCAB:
        raise UserError(f"a vocabulary of {vocab_size} tokens is above factorize_above ({config.factorize_above}) "
                        f"but not a multiple of {LOW_VOCAB}, so it cannot be factorised")
    return TransformerConfig(
        vocab_size=vocab_size, max_length=sequence_length, width=config.width, depth=config.depth,
        num_heads=config.num_heads, mlp_ratio=config.mlp_ratio, dropout=config.dropout,
        num_classes=num_classes if config.class_conditional else 0, factorized=factorized)


def make_evaluate(model_config: TransformerConfig, tokens: np.ndarray, labels: np.ndarray, batch_size: int):
    """``evaluate(params, step) -> {"val_loss", "val_accuracy"}`` over every held-out row (None when empty)."""
    if len(tokens) == 0:
        return None
    rows = objective_lib.nll_function(model_config)

    def evaluate(params: Any, step: int) -> dict[str, float]:
        del step
        losses, accuracies = [], []
        for start in range(0, len(tokens), batch_size):
            loss, accuracy = rows(params, jnp.asarray(tokens[start : start + batch_size]),
                                  jnp.asarray(labels[start : start + batch_size], jnp.int32))
            losses.append(np.asarray(loss))
            accuracies.append(np.asarray(accuracy))
        return {"val_loss": float(np.mean(np.concatenate(losses))),
                "val_accuracy": float(np.mean(np.concatenate(accuracies)))}

    return evaluate


# ------------------------------------------------------------------------------------------- sampling


def draw_samples(model: TokenTransformer, params: Any, labels: np.ndarray, rules: objective_lib.TokenRules,
                 options: objective_lib.SamplingOptions, seed: int, batch_size: int) -> np.ndarray:
    """``[len(labels), T]`` int32 tokens, drawn ``batch_size`` at a time (batch ``b`` uses ``fold_in(key, b)``)."""
    key = jax.random.PRNGKey(seed)
    pieces = []
    for index, start in enumerate(range(0, len(labels), batch_size)):
        batch_labels = labels[start : start + batch_size]
        pieces.append(objective_lib.sample_tokens(model, params, jax.random.fold_in(key, index), len(batch_labels),
                                                  batch_labels, rules, options))
    return np.concatenate(pieces).astype(np.int32)


def write_samples(workdir: str, tokens: np.ndarray, labels: np.ndarray, dataset, generator: dict) -> np.ndarray:
    """Writes sampled tokens as a token dataset and their decoded weights as a field dataset.

    Args:
        tokens: ``[n, T]`` int32 samples.
        labels: ``[n]`` int32.
        dataset: the input ``fields.field_datasets.TokenDataset`` (tokenizer, normalisation, metadata).
        generator: JSON-able description of how the samples were made (stored in the schema metadata).

    Returns:
        ``[n, P]`` float32 raw weights (decoded, denormalised).

    Raises:
        UserError: decoded weights that are not finite.
    """
    from fields.field_datasets import write_token_shard

    extra = {key: value for key, value in dataset.metadata.items() if key != "source_dataset"}
    extra["generator"] = generator
    write_token_shard(
        os.path.join(workdir, SAMPLE_TOKENS_DIRECTORY, SAMPLES_SHARD), tokens, sample_columns(labels),
        dataset.tokenizer, dataset.field_kind, dataset.field_config, dataset.param_map,
        normalization_mode=dataset.normalization_mode, normalization=dataset.normalization,
        source_dataset=dataset.metadata.get("source_dataset"), extra_schema_metadata=extra)
    weights = dataclasses.replace(dataset, tokens=tokens).decode_weights()
    if not np.all(np.isfinite(weights)):
        bad = int(np.count_nonzero(~np.all(np.isfinite(weights), axis=1)))
        raise UserError(f"{bad} sampled field(s) decode to non-finite weights; see {SAMPLE_TOKENS_DIRECTORY}/")
    write_sample_fields(workdir, weights, labels, dataset, extra)
    return weights


# ------------------------------------------------------------------------------------------- the run


def resolve_config(args, saved: dict | None) -> AutoregressiveConfig:
    """The preset (or, without ``--preset``, the config saved in the workdir) with the command-line overrides."""
    overrides = {"class_conditional": args.class_conditional, "num_samples": args.num_samples,
                 "temperature": args.temperature, "top_k": args.top_k, "sample_seed": args.sample_seed}
    return resolve_run_config(AutoregressiveConfig, PRESETS, args, saved, "autoregressive", overrides)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m hypernets.autoregressive", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="dataset of tokens (from python -m scripts.tokenize)")
    parser.add_argument("--workdir", required=True, help="run directory (config, checkpoints, samples)")
    parser.add_argument("--preset", help=f"one of {', '.join(PRESETS)} (default: the workdir's saved config, "
                                         "else default)")
    parser.add_argument("--class-conditional", action="store_true", default=None,
                        help="condition on the dataset's labels")
    parser.add_argument("--num-samples", type=int, help="fields to sample into W/samples")
    parser.add_argument("--temperature", type=float, help="sampling temperature (0: greedy; default 1)")
    parser.add_argument("--top-k", type=int, help="sample among the K most likely tokens (0: all)")
    parser.add_argument("--sample-seed", type=int, help="sampling seed")
    parser.add_argument("--label", type=int, help="class-conditional models: sample this class only "
                                                  "(default: round-robin over the classes)")
    parser.add_argument("--sample-batch-size", type=int, default=64, help="samples drawn at once (default 64)")
    parser.add_argument("--sample-only", action="store_true", help="sample from the newest checkpoint, no training")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_loop_arguments(parser)  # with the multi-host arguments, joined in loop_overrides
    return parser


def _check_sampling_arguments(args, config: AutoregressiveConfig, num_classes: int) -> None:
    if args.sample_batch_size < 1:
        raise UserError(f"--sample-batch-size must be >= 1, got {args.sample_batch_size}")
    if args.label is not None:
        if not config.class_conditional:
            raise UserError("--label needs a class-conditional model (--class-conditional)")
        if not 0 <= args.label < num_classes:
            raise UserError(f"--label {args.label} is outside the dataset's classes [0, {num_classes})")


def main(argv: list[str] | None = None) -> int:
    from hypernets.datasets import BatchStream, load_token_splits

    args = build_parser().parse_args(argv)
    saved = read_saved_run(args.workdir, "autoregressive", "hypernets.autoregressive")
    if args.sample_only and saved is None:
        raise UserError(f"--sample-only: {args.workdir} holds no trained run (no {CONFIG_NAME})")
    config = resolve_config(args, saved)
    train_data, val_data = load_token_splits(args.data, config.val_fraction, config.loop.seed)
    dataset = train_data.dataset
    if len(train_data) == 0:
        raise UserError(f"{args.data}: no rows left for training after holding out validation rows")
    num_classes = num_classes_of(np.concatenate([train_data.labels, val_data.labels]))
    if config.class_conditional and num_classes == 0:
        raise UserError(f"--class-conditional: {args.data} has no labels (every label is -1)")
    _check_sampling_arguments(args, config, num_classes)
    model_config = model_config_for(config, train_data.vocab_size, int(train_data.tokens.shape[1]), num_classes)

    prepare_workdir(args.workdir)
    current = {"data": os.path.abspath(args.data), "autoregressive": config_to_dict(config),
               "model": config_to_dict(model_config), "tokenizer": json.loads(dataset.tokenizer.to_json())}
    check_run_config(args.workdir, saved, current, rerun_free_fields("autoregressive", RERUN_FREE_FIELDS, args, saved))
    write_run(args.workdir, current)
    print(config_to_json(config))
    print(f"{len(train_data)} training fields, {len(val_data)} held out; {model_config.max_length} tokens each, "
          f"{dataset.tokenizer.name} vocabulary of {model_config.vocab_size} "
          f"({'factorised high/low byte head' if model_config.factorized else 'plain head'})"
          + (f"; {num_classes} classes" if model_config.num_classes else ""))

    task = objective_lib.AutoregressiveTask(TokenTransformer(model_config))
    stream = BatchStream({"tokens": train_data.tokens, "labels": train_data.labels.astype(np.int32)},
                         config.loop.batch_size, seed=config.loop.seed)
    evaluate = None if args.sample_only else make_evaluate(model_config, val_data.tokens, val_data.labels,
                                                           config.loop.batch_size)
    result = restore_or_train(task, stream, config.loop, args.workdir, current, sample_only=args.sample_only,
                              evaluate=evaluate, progress=not args.quiet)
    params = jax.tree_util.tree_map(np.asarray, result.ema_params)  # sample on one device
    step = int(result.step)

    labels = sample_labels(config.num_samples, num_classes, config.class_conditional, args.label)
    rules = objective_lib.token_rules(dataset.tokenizer)
    tokens = draw_samples(task.model, params, labels, rules, config.sampling(), config.sample_seed,
                          args.sample_batch_size)
    generator = {"model": "hypernets.autoregressive", "workdir": os.path.abspath(args.workdir), "step": step,
                 "training_data": os.path.abspath(args.data), "temperature": config.temperature,
                 "top_k": config.top_k, "sample_seed": config.sample_seed}
    weights = write_samples(args.workdir, tokens, labels, dataset, generator)
    print(f"step {step}: wrote {len(weights)} sampled fields to {os.path.join(args.workdir, SAMPLES_DIRECTORY)} "
          f"(tokens in {os.path.join(args.workdir, SAMPLE_TOKENS_DIRECTORY)})")
    grid_path = os.path.join(args.workdir, GRID_NAME)
    if write_sample_grid(grid_path, weights, dataset):
        print(f"rendered samples: {grid_path}")
    return 0


if __name__ == "__main__":
    run_main(main)
