"""SANE-style weight autoencoder over Instant-NGP image fields: tokens of hash-grid features sampled in
space and of MLP neurons, a transformer encoder/decoder, reconstruction + NT-Xent contrastive loss.

    python -m hypernets.sane --data data/fields/primitives --workdir runs/sane --preset cpu
    python -m hypernets.sane --data data/fields/primitives --workdir runs/sane-rot --preset cpu --rotated-copies \
--rotation-weight 0.5

Tokens of one field (``FieldTokenizer``; weights normalised per section first):

- hash tokens: the hash grid's features of every level evaluated at a fixed ``G x G`` lattice of
  positions (pixel centres ``(i + 0.5) / G``) as the pure-JAX reference encoding interpolates them (the
  lattice's table rows and corner weights are computed once; the corner weights sum to 1, so features of
  the normalised table are the normalised features); the lattice is
  cut into ``p x p`` patches and one token holds one level's features over one patch
  (``p * p * features_per_level`` values), with a positional encoding of ``(level, x, y)``, ``x, y``
  the patch centre. The hash table is reconstructed in this feature space, not entry by entry
  (SANE's idea: tokens of what the weights compute where, not of the raw hashed table);
- neuron tokens: hidden neuron ``j`` of hidden layer ``k`` gives one token, its incoming weights
  (column ``j`` of ``dense_k``) then its outgoing weights (row ``j`` of ``dense_{k+1}``), each padded
  to the widest layer, with a positional encoding of ``(layer, neuron index)``.

A transformer encoder maps the tokens to latent tokens (``latent_dim`` each); their mean is the
field's latent vector. A transformer decoder maps the latent tokens back to the tokens. Training
(``hypernets.loop.train``) minimises the reconstruction MSE (hash features and MLP weights, equally
weighted) plus ``contrastive_weight`` times NT-Xent between the projected latents of two augmented
views of each field (hidden-neuron permutation, which keeps the function exactly, and weight noise;
with rotated copies of the data, the two views are fields of the same source at two rotations), and
optionally a rotation-prediction head (4 classes) on the latent.

Outputs in the work directory: ``config.json``, ``checkpoints/``, ``history.jsonl`` (with the
validation reconstruction errors and ``val_mlp_psnr``: the PSNR of each held-out field's render with
its MLP replaced by the decoded one, hash table kept, against its original render), ``latents/``
(parquet: ``latent`` fixed_size_list<float32>, ``source_id``, ``label``, ``split``, ``rotation``,
``row``) and ``probe.json`` (linear-probe accuracy of the class, and of the rotation when known, on
the validation split, from latents of the training split; plus the same probe on the raw normalised
weights as a baseline).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fields.cli import ArgumentParser, UserError, prepare_workdir, run_main
from fields.config import check_run_config, config_to_dict, config_to_json
from fields.files import write_json
from fields.models.hash_grid import corner_indices_and_weights
from fields.weights import NORMALIZATION_MODES, ParamEntry
from hypernets.augment import NGPLayout, augment, read_rotation_column, rotate_dataset_images
from hypernets.autoencoder import render_psnr, renders_images, write_latent_shard
from hypernets.loop import LoopConfig, add_loop_arguments
from hypernets.models.transformer import EncoderBlock
from hypernets.objectives.contrastive import nt_xent
from hypernets.runs import read_saved_run, rerun_free_fields, resolve_run_config, write_run

NUM_ROTATIONS = 4
PROBE_NAME = "probe.json"
ROTATED_DIRECTORY = "rotated"
MAX_EVAL_FIELDS = 64
FORWARD_CHUNK = 64
MAX_BASELINE_WEIGHTS = 1 << 15  # the raw-weight probe baseline is skipped above this many weights per field
XY_FREQUENCIES = 4
# Fields that may differ between runs in one work directory (probe, logging, devices).
RERUN_FREE_FIELDS = ("probe_steps", "loop.wandb", "loop.num_devices")


@dataclasses.dataclass(frozen=True)
class SANEConfig:
    """The SANE autoencoder: tokenization, model, objective, data.

    Attributes:
        loop: the training loop.
        lattice_size: ``G``, hash features are sampled at ``G x G`` positions per level.
        patch_size: ``p``, lattice points per token along each axis (``G`` must divide by it).
        width, encoder_depth, decoder_depth, num_heads, mlp_ratio: the transformers.
        latent_dim: size of each latent token and of the pooled latent vector.
        projection_dim: output of the contrastive projection head.
        temperature: NT-Xent temperature.
        reconstruction_weight, contrastive_weight, rotation_weight: loss weights (rotation: the
            4-class rotation head, which needs rotated copies).
        permute: augment by permuting hidden neurons.
        noise_std: weight noise of the augmentation, in normalised units (0: none).
        rotated_copies: fit rotated copies of the (``procedural:primitives``) dataset into
            ``W/rotated`` and train on them (two views of a source may be two rotations).
        rotation_positives: with rotated copies, pair two different rotations of a source as the
            positive views (False: two augmentations of one field).
        normalization: per-``"section"`` or per-``"tensor"`` normalisation of the weights.
        val_fraction: sources held out for validation and the probe's test split.
        probe_steps: optimizer steps of the linear probe.
    """

    loop: LoopConfig = dataclasses.field(default_factory=LoopConfig)
    lattice_size: int = 16
    patch_size: int = 2
    width: int = 256
    encoder_depth: int = 4
    decoder_depth: int = 4
    num_heads: int = 8
    mlp_ratio: float = 4.0
    latent_dim: int = 32
    projection_dim: int = 64
    temperature: float = 0.1
    reconstruction_weight: float = 1.0
    contrastive_weight: float = 0.1
    rotation_weight: float = 0.0
    permute: bool = True
    noise_std: float = 0.05
    rotated_copies: bool = False
    rotation_positives: bool = True
    normalization: str = "section"
    val_fraction: float = 0.2
    probe_steps: int = 500

    def __post_init__(self):
        positive = ("lattice_size", "patch_size", "width", "encoder_depth", "decoder_depth", "num_heads",
                    "latent_dim", "projection_dim", "probe_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lattice_size % self.patch_size:
            raise ValueError(f"lattice_size ({self.lattice_size}) must be divisible by patch_size ({self.patch_size})")
        if self.width % self.num_heads:
            raise ValueError(f"width ({self.width}) must be divisible by num_heads ({self.num_heads})")
        if not self.temperature > 0 or not self.mlp_ratio > 0:
            raise ValueError(f"temperature and mlp_ratio must be > 0, got {self.temperature} and {self.mlp_ratio}")
        for name in ("reconstruction_weight", "contrastive_weight", "rotation_weight", "noise_std"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.normalization not in NORMALIZATION_MODES:
            raise ValueError(f"normalization must be one of {', '.join(NORMALIZATION_MODES)}, "
                             f"got {self.normalization!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1) (the probe tests on it), got {self.val_fraction}")


PRESETS: dict[str, SANEConfig] = {
    # Test-sized: 30 steps of a one-block encoder and decoder on a dozen 8x8 fields, seconds on a CPU.
    #   python -m hypernets.sane --data DIR --workdir W --preset tiny
    "tiny": SANEConfig(
        loop=LoopConfig(steps=30, batch_size=4, learning_rate=2e-3, warmup_steps=3, ema_decay=0.9, log_every=5,
                        checkpoint_every=100),
        lattice_size=4, patch_size=2, width=32, encoder_depth=1, decoder_depth=1, num_heads=2, mlp_ratio=2.0,
        latent_dim=8, projection_dim=16, temperature=0.5, val_fraction=0.25, probe_steps=100),
    # CPU-sized (minutes on 2 cores; scripts/bench_hypernets.py), ngp_image "small" fields (~1.6k weights:
    # 4 levels x 16 hash tokens + 32 neuron tokens). Measured after 300 of its 3,000 steps on 1,024
    # primitives with rotated copies: class probe 41.8% (raw weights 55.6%, chance 14.5%), rotation at
    # chance (BENCHMARKS.md); the full run was not measured.
    #   python -m fields.encode_dataset --source procedural:primitives --num 1024 --out data/fields/primitives
    #   python -m hypernets.sane --data data/fields/primitives --workdir runs/sane-cpu --preset cpu
    "cpu": SANEConfig(
        loop=LoopConfig(steps=3000, batch_size=64, learning_rate=5e-4, warmup_steps=200, ema_decay=0.999,
                        checkpoint_every=500, eval_every=500),
        lattice_size=8, patch_size=2, width=96, encoder_depth=2, decoder_depth=2, num_heads=4, mlp_ratio=2.0,
        latent_dim=16, projection_dim=64, temperature=0.1, val_fraction=0.2),
    # One GPU, primitives at 28x28. Expected (not measured: it needs a GPU and none has been lent): a class
    # probe above the "cpu" preset's 41.8% and the raw-weight baseline's 55.6%.
    #   python -m hypernets.sane --data data/fields/primitives --workdir runs/sane-small --preset small
    "small": SANEConfig(
        loop=LoopConfig(steps=20000, batch_size=128, learning_rate=3e-4, warmup_steps=500, ema_decay=0.999,
                        checkpoint_every=1000, eval_every=1000),
        lattice_size=16, patch_size=2, width=192, encoder_depth=4, decoder_depth=4, num_heads=6, latent_dim=32),
    # Larger datasets (e.g. Fashion-MNIST fields), one GPU. Expected (not measured: it needs a GPU and none
    # has been lent): a class probe above the raw-weight baseline of the same fields.
    #   python -m hypernets.sane --data data/fields/fmnist --workdir runs/sane --preset default
    "default": SANEConfig(
        loop=LoopConfig(steps=50000, batch_size=256, learning_rate=2e-4, warmup_steps=1000, ema_decay=0.9995,
                        checkpoint_every=2500, eval_every=2500),
        lattice_size=16, patch_size=2, width=256, encoder_depth=6, decoder_depth=6, num_heads=8, latent_dim=64),
}


# ------------------------------------------------------------------------------------------- tokens


@dataclasses.dataclass(frozen=True)
class TokenSpec:
    """Static shape of a field's token set (hashable, so the model can hold it).

    Attributes:
        num_levels, features_per_level: the hash grid.
        lattice_size, patch_size: ``G`` and ``p`` of the hash tokens.
        hidden_widths: neurons of each hidden MLP layer.
        max_in, max_out: incoming / outgoing weights of the widest layer (the token halves).
    """

    num_levels: int
    features_per_level: int
    lattice_size: int
    patch_size: int
    hidden_widths: tuple[int, ...]
    max_in: int
    max_out: int

    @property
    def patches_per_side(self) -> int:
        return self.lattice_size // self.patch_size

    @property
    def num_hash_tokens(self) -> int:
        return self.num_levels * self.patches_per_side**2

    @property
    def hash_token_dim(self) -> int:
        return self.patch_size**2 * self.features_per_level

    @property
    def num_neuron_tokens(self) -> int:
        return sum(self.hidden_widths)

    @property
    def neuron_token_dim(self) -> int:
        return self.max_in + self.max_out

    @property
    def num_tokens(self) -> int:
        return self.num_hash_tokens + self.num_neuron_tokens

    def hash_positions(self) -> tuple[np.ndarray, np.ndarray]:
        """``(level [Th] int32, xy [Th, 2] float32)``: each hash token's level and patch centre in [0, 1]."""
        count = self.patches_per_side
        level, patch_y, patch_x = np.meshgrid(np.arange(self.num_levels), np.arange(count), np.arange(count),
                                              indexing="ij")
        centre = lambda index: (index * self.patch_size + self.patch_size / 2.0) / self.lattice_size
        xy = np.stack([centre(patch_x.reshape(-1)), centre(patch_y.reshape(-1))], axis=-1)
        return level.reshape(-1).astype(np.int32), xy.astype(np.float32)

    def neuron_positions(self) -> tuple[np.ndarray, np.ndarray]:
        """``(layer [Tn] int32, index [Tn] int32)``: each neuron token's hidden layer and neuron index."""
        layers = np.concatenate([np.full(width, layer, np.int32) for layer, width in enumerate(self.hidden_widths)])
        indices = np.concatenate([np.arange(width, dtype=np.int32) for width in self.hidden_widths])
        return layers, indices


class FieldTokenizer:
    """Normalised NGP field vectors ``[B, P]`` <-> hash tokens and neuron tokens (see the module docstring).

    Attributes:
        layout: where the table and kernels are in a vector.
        grid: the hash grid config.
        spec: the token shapes.
        lattice_positions: ``[G * G, 2]`` float32 (x, y), y-major.
        neuron_mask: ``[Tn, neuron_token_dim]`` float32, 1 where a neuron token holds a weight, 0 on padding.
    """

    def __init__(self, param_map: Sequence[ParamEntry], field_config, lattice_size: int, patch_size: int,
                 where: str = "dataset"):
        self.layout = NGPLayout.from_param_map(param_map, where)
        grid = getattr(field_config, "grid", None)
        if grid is None or grid.num_dims != 2:
            raise UserError(f"{where}: hypernets.sane needs 2-D Instant-NGP image fields (a hash grid over x, y)")
        if self.layout.table_shape != (grid.num_entries, grid.features_per_level):
            raise UserError(f"{where}: hash_table {self.layout.table_shape} does not fit the field config's grid "
                            f"({grid.num_entries}, {grid.features_per_level})")
        if not self.layout.hidden_widths:
            raise UserError(f"{where}: the field MLP has no hidden layer, so there are no neurons to tokenize")
        if lattice_size % patch_size:
            raise ValueError(f"lattice_size {lattice_size} must be divisible by patch_size {patch_size}")
        self.grid = grid
        shapes = self.layout.kernel_shapes
        self.input_dims = tuple(shape[0] for shape in shapes[:-1])  # incoming weights of each hidden layer's neurons
        self.output_dims = tuple(shape[1] for shape in shapes[1:])  # outgoing weights
        self.spec = TokenSpec(grid.num_levels, grid.features_per_level, int(lattice_size), int(patch_size),
                              self.layout.hidden_widths, max(self.input_dims), max(self.output_dims))
        centres = (np.arange(lattice_size, dtype=np.float32) + np.float32(0.5)) / np.float32(lattice_size)
        y, x = np.meshgrid(centres, centres, indexing="ij")
        self.lattice_positions = np.stack([x.reshape(-1), y.reshape(-1)], axis=-1).astype(np.float32)
        rows, weights = jax.jit(corner_indices_and_weights, static_argnums=1)(self.lattice_positions, grid)
        self.corner_rows = np.asarray(rows)  # [G * G, num_levels, 2**2] int32 table rows
        self.corner_weights = np.asarray(weights)  # [G * G, num_levels, 2**2] float32
        mask = []
        for width, incoming, outgoing in zip(self.spec.hidden_widths, self.input_dims, self.output_dims, strict=True):
            row = np.zeros(self.spec.neuron_token_dim, np.float32)
            row[:incoming] = 1.0
            row[self.spec.max_in : self.spec.max_in + outgoing] = 1.0
            mask.append(np.tile(row, (width, 1)))
        self.neuron_mask = np.concatenate(mask).astype(np.float32)

    def hash_features(self, vectors: jax.Array) -> jax.Array:
        """``[B, P]`` -> hash features at the lattice ``[B, G * G, num_levels, features_per_level]``.

        The same d-linear interpolation as ``fields.models.hash_grid.encode_reference``, with the table
        rows and corner weights of the fixed lattice computed once (``corner_indices_and_weights``).
        """
        tables = self.layout.table(jnp.asarray(vectors, jnp.float32))  # [B, num_entries, F]
        corners = jnp.take(tables, jnp.asarray(self.corner_rows), axis=1, mode="clip")  # [B, G*G, L, C, F]
        return jnp.einsum("nlc,bnlcf->bnlf", jnp.asarray(self.corner_weights), corners)

    def hash_tokens(self, vectors: jax.Array) -> jax.Array:
        """``[B, P]`` -> ``[B, num_hash_tokens, p * p * features_per_level]``, level-major, then patch row, column."""
        spec = self.spec
        features = self.hash_features(vectors)
        batch, count, patch = features.shape[0], spec.patches_per_side, spec.patch_size
        # lattice index = y * G + x with y = patch_y * p + inner_y (same for x).
        features = features.reshape(batch, count, patch, count, patch, spec.num_levels, spec.features_per_level)
        features = features.transpose(0, 5, 1, 3, 2, 4, 6)  # [B, level, patch_y, patch_x, inner_y, inner_x, F]
        return features.reshape(batch, spec.num_hash_tokens, spec.hash_token_dim)

    def neuron_tokens(self, vectors: jax.Array) -> jax.Array:
        """``[B, P]`` -> ``[B, num_neuron_tokens, max_in + max_out]``: per hidden neuron, its incoming weights
        then its outgoing weights, zero-padded; hidden layer 0's neurons first."""
        spec = self.spec
        kernels = self.layout.kernels(jnp.asarray(vectors, jnp.float32))
        tokens = []
        for layer in range(len(spec.hidden_widths)):
            incoming = jnp.swapaxes(kernels[layer], -1, -2)  # [B, H, in]
            outgoing = kernels[layer + 1]  # [B, H, out]
            incoming = jnp.pad(incoming, ((0, 0), (0, 0), (0, spec.max_in - incoming.shape[-1])))
            outgoing = jnp.pad(outgoing, ((0, 0), (0, 0), (0, spec.max_out - outgoing.shape[-1])))
            tokens.append(jnp.concatenate([incoming, outgoing], axis=-1))
        return jnp.concatenate(tokens, axis=1)

    def tokens(self, vectors: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``[B, P]`` -> ``(hash tokens, neuron tokens)``."""
        return self.hash_tokens(vectors), self.neuron_tokens(vectors)

    def kernels_from_neuron_tokens(self, tokens: jax.Array) -> list[jax.Array]:
        """Neuron tokens ``[B, Tn, max_in + max_out]`` -> MLP kernels ``[B, in_k, out_k]``.

        A kernel between two hidden layers appears in two token sets (outgoing weights of the layer
        before, incoming weights of the layer after); it is their mean. Exact on tokens from
        ``neuron_tokens``.
        """
        spec = self.spec
        starts = np.concatenate([[0], np.cumsum(spec.hidden_widths)]).astype(int)
        incoming, outgoing = [], []
        for layer in range(len(spec.hidden_widths)):
            block = tokens[:, starts[layer] : starts[layer + 1]]
            incoming.append(jnp.swapaxes(block[..., : self.input_dims[layer]], -1, -2))
            outgoing.append(block[..., spec.max_in : spec.max_in + self.output_dims[layer]])
        kernels = [incoming[0]]
        for layer in range(1, len(spec.hidden_widths)):
            kernels.append(jnp.float32(0.5) * (outgoing[layer - 1] + incoming[layer]))
        kernels.append(outgoing[-1])
        return kernels

    def replace_mlp(self, vectors: jax.Array, neuron_tokens: jax.Array) -> jax.Array:
        """``vectors [B, P]`` with the MLP decoded from ``neuron_tokens`` (hash table kept)."""
        return self.layout.replace_kernels(jnp.asarray(vectors, jnp.float32),
                                           self.kernels_from_neuron_tokens(neuron_tokens))


# ------------------------------------------------------------------------------------------- model


def fourier_features(xy: np.ndarray, num_frequencies: int = XY_FREQUENCIES) -> np.ndarray:
    """``[T, 2]`` positions in [0, 1] -> ``[T, 4 * num_frequencies]`` float32 sin/cos at ``2^k * pi``."""
    frequencies = (2.0 ** np.arange(num_frequencies)) * np.pi
    angles = (xy[:, :, None] * frequencies[None, None, :]).reshape(len(xy), -1)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=-1).astype(np.float32)


class PositionalEncoding(nn.Module):
    """Learned encodings of every token's position: ``(level, x, y)`` for hash tokens (level embedding +
    a linear map of Fourier features of x, y), ``(layer, neuron index)`` for neuron tokens, plus a
    token-kind embedding. Returns ``[num_tokens, width]``, hash tokens first."""

    spec: TokenSpec
    width: int

    @nn.compact
    def __call__(self) -> jax.Array:
        init = nn.initializers.normal(0.02)
        levels, xy = self.spec.hash_positions()
        layers, indices = self.spec.neuron_positions()
        hash_part = (nn.Embed(self.spec.num_levels, self.width, embedding_init=init, name="level")(jnp.asarray(levels))
                     + nn.Dense(self.width, name="xy")(jnp.asarray(fourier_features(xy))))
        neuron_part = (
            nn.Embed(len(self.spec.hidden_widths), self.width, embedding_init=init, name="layer")(jnp.asarray(layers))
            + nn.Embed(max(self.spec.hidden_widths), self.width, embedding_init=init, name="neuron")(
                jnp.asarray(indices)))
        kind = self.param("kind", init, (2, self.width))
        return jnp.concatenate([hash_part + kind[0], neuron_part + kind[1]], axis=0)


class SANEModel(nn.Module):
    """Token encoder -> latent tokens -> token decoder, plus projection and rotation heads on the pooled latent."""

    spec: TokenSpec
    width: int = 128
    encoder_depth: int = 2
    decoder_depth: int = 2
    num_heads: int = 4
    mlp_ratio: float = 4.0
    latent_dim: int = 16
    projection_dim: int = 64

    def setup(self):
        self.hash_in = nn.Dense(self.width, name="hash_in")
        self.neuron_in = nn.Dense(self.width, name="neuron_in")
        self.encoder_positions = PositionalEncoding(self.spec, self.width, name="encoder_positions")
        self.encoder_blocks = [EncoderBlock(self.width, self.num_heads, self.mlp_ratio, name=f"encoder_{index}")
                               for index in range(self.encoder_depth)]
        self.encoder_norm = nn.LayerNorm(name="encoder_norm")
        self.to_latent = nn.Dense(self.latent_dim, name="to_latent")
        self.from_latent = nn.Dense(self.width, name="from_latent")
        self.decoder_positions = PositionalEncoding(self.spec, self.width, name="decoder_positions")
        self.decoder_blocks = [EncoderBlock(self.width, self.num_heads, self.mlp_ratio, name=f"decoder_{index}")
                               for index in range(self.decoder_depth)]
        self.decoder_norm = nn.LayerNorm(name="decoder_norm")
        self.hash_out = nn.Dense(self.spec.hash_token_dim, name="hash_out")
        self.neuron_out = nn.Dense(self.spec.neuron_token_dim, name="neuron_out")
        self.projection_hidden = nn.Dense(self.width, name="projection_hidden")
        self.projection_out = nn.Dense(self.projection_dim, name="projection_out")
        self.rotation_head = nn.Dense(NUM_ROTATIONS, name="rotation_head")

    def encode(self, hash_tokens: jax.Array, neuron_tokens: jax.Array) -> jax.Array:
        """``[B, Th, hash_token_dim]``, ``[B, Tn, neuron_token_dim]`` -> latent tokens ``[B, Th + Tn, latent_dim]``."""
        x = jnp.concatenate([self.hash_in(jnp.asarray(hash_tokens, jnp.float32)),
                             self.neuron_in(jnp.asarray(neuron_tokens, jnp.float32))], axis=1)
        x = x + self.encoder_positions()[None]
        for block in self.encoder_blocks:
            x = block(x)
        return self.to_latent(self.encoder_norm(x))

    def decode(self, latent_tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Latent tokens ``[B, T, latent_dim]`` -> ``(hash tokens [B, Th, .], neuron tokens [B, Tn, .])``."""
        x = self.from_latent(latent_tokens) + self.decoder_positions()[None]
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_norm(x)
        split = self.spec.num_hash_tokens
        return self.hash_out(x[:, :split]), self.neuron_out(x[:, split:])

    def latent(self, hash_tokens: jax.Array, neuron_tokens: jax.Array) -> jax.Array:
        """The field's latent vector ``[B, latent_dim]``: the mean of its latent tokens."""
        return jnp.mean(self.encode(hash_tokens, neuron_tokens), axis=1)

    def project(self, latent: jax.Array) -> jax.Array:
        """Contrastive projection head: ``[B, latent_dim]`` -> ``[B, projection_dim]``."""
        return self.projection_out(nn.gelu(self.projection_hidden(latent)))

    def __call__(self, hash_tokens: jax.Array, neuron_tokens: jax.Array) -> dict[str, jax.Array]:
        """Everything at once: ``latent [B, latent_dim]``, reconstructed ``hash``/``neuron`` tokens,
        ``projection [B, projection_dim]`` and ``rotation_logits [B, 4]``."""
        latent_tokens = self.encode(hash_tokens, neuron_tokens)
        latent = jnp.mean(latent_tokens, axis=1)
        hash_reconstruction, neuron_reconstruction = self.decode(latent_tokens)
        return {"latent": latent, "hash": hash_reconstruction, "neuron": neuron_reconstruction,
                "projection": self.project(latent), "rotation_logits": self.rotation_head(latent)}


# -------------------------------------------------------------------------------------------- task


def pick_views(key: jax.Array, batch_size: int, num_views: int, different: bool) -> tuple[jax.Array, jax.Array]:
    """Two view indices ``[B]`` int32 in ``[0, num_views)`` per source; distinct when ``different`` and possible."""
    first_key, offset_key = jax.random.split(key)
    first = jax.random.randint(first_key, (batch_size,), 0, num_views, dtype=jnp.int32)
    if not different or num_views < 2:
        return first, first
    offset = jax.random.randint(offset_key, (batch_size,), 1, num_views, dtype=jnp.int32)
    return first, (first + offset) % num_views


def masked_squared_error(prediction: jax.Array, target: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Per-field mean squared error ``[B]`` over ``[B, T, d]`` tokens (only where ``mask [T, d]`` is 1)."""
    squared = jnp.square(jnp.asarray(prediction, jnp.float32) - jnp.asarray(target, jnp.float32))
    if mask is None:
        return jnp.mean(squared, axis=(1, 2))
    mask = jnp.asarray(mask, jnp.float32)
    return jnp.sum(squared * mask[None], axis=(1, 2)) / jnp.sum(mask)


@dataclasses.dataclass
class SANETask:
    """The training task for ``hypernets.loop.train``: batches ``{"views": [B, R, P], "rotations": [B, R]}``
    (``R`` fields of each source: its rotated copies, or just the field itself with ``R = 1``).

    Attributes:
        model: the autoencoder.
        tokenizer: vectors <-> tokens.
        config: the objective's settings.
    """

    model: SANEModel
    tokenizer: FieldTokenizer
    config: SANEConfig
    _clean_forward: Any = dataclasses.field(init=False, repr=False, default=None)

    def __post_init__(self):
        self._clean_forward = jax.jit(self.clean_forward)

    def init(self, key: jax.Array, batch: dict[str, jax.Array]) -> Any:
        del batch  # the token shapes come from the tokenizer
        spec = self.tokenizer.spec
        hash_tokens = jnp.zeros((1, spec.num_hash_tokens, spec.hash_token_dim), jnp.float32)
        neuron_tokens = jnp.zeros((1, spec.num_neuron_tokens, spec.neuron_token_dim), jnp.float32)
        return self.model.init(key, hash_tokens, neuron_tokens)["params"]

    def loss(self, params: Any, batch: dict[str, jax.Array], key: jax.Array):
        config = self.config
        views = jnp.asarray(batch["views"], jnp.float32)
        rotations = jnp.asarray(batch["rotations"], jnp.int32)
        batch_size, num_views = views.shape[0], views.shape[1]
        pick_key, augment_key = jax.random.split(key)
        first, second = pick_views(pick_key, batch_size, num_views, config.rotation_positives)
        rows = jnp.arange(batch_size)
        views = jnp.concatenate([views[rows, first], views[rows, second]])  # [2B, P]: both views of each source
        clean, noisy = augment(views, self.tokenizer.layout, augment_key, config.permute, config.noise_std)
        hash_tokens, neuron_tokens = self.tokenizer.tokens(jnp.concatenate([clean, noisy]))  # [4B, ...]
        hash_target, hash_input = jnp.split(hash_tokens, 2)  # clean (permuted) views are the targets
        neuron_target, neuron_input = jnp.split(neuron_tokens, 2)
        outputs = self.model.apply({"params": params}, hash_input, neuron_input)
        hash_error = jnp.mean(masked_squared_error(outputs["hash"], hash_target))
        mlp_error = jnp.mean(masked_squared_error(outputs["neuron"], neuron_target, self.tokenizer.neuron_mask))
        reconstruction = jnp.float32(0.5) * (hash_error + mlp_error)
        projection_first, projection_second = jnp.split(outputs["projection"], 2)
        contrastive = nt_xent(projection_first, projection_second, config.temperature)
        loss = config.reconstruction_weight * reconstruction + config.contrastive_weight * contrastive
        metrics = {"reconstruction": reconstruction, "hash_mse": hash_error, "mlp_mse": mlp_error,
                   "contrastive": contrastive}
        if config.rotation_weight > 0:
            targets = jnp.concatenate([rotations[rows, first], rotations[rows, second]])
            rotation_loss, rotation_accuracy = rotation_objective(outputs["rotation_logits"], targets)
            loss = loss + config.rotation_weight * rotation_loss
            metrics.update(rotation=rotation_loss, rotation_accuracy=rotation_accuracy)
        return jnp.asarray(loss, jnp.float32), metrics

    def clean_forward(self, params: Any, vectors: jax.Array):
        """Unaugmented fields ``[n, P]`` -> ``(latent [n, D], hash error [n], mlp error [n], vectors with the
        decoded MLP [n, P])``."""
        vectors = jnp.asarray(vectors, jnp.float32)
        hash_tokens, neuron_tokens = self.tokenizer.tokens(vectors)
        outputs = self.model.apply({"params": params}, hash_tokens, neuron_tokens)
        hash_error = masked_squared_error(outputs["hash"], hash_tokens)
        mlp_error = masked_squared_error(outputs["neuron"], neuron_tokens, self.tokenizer.neuron_mask)
        return outputs["latent"], hash_error, mlp_error, self.tokenizer.replace_mlp(vectors, outputs["neuron"])

    def forward_all(self, params: Any, vectors: np.ndarray, chunk: int = FORWARD_CHUNK) -> tuple[np.ndarray, ...]:
        """``clean_forward`` over any number of fields, in padded chunks (one compiled shape); numpy outputs."""
        if not len(vectors):
            width = vectors.shape[1]
            return (np.zeros((0, self.config.latent_dim), np.float32), np.zeros(0, np.float32),
                    np.zeros(0, np.float32), np.zeros((0, width), np.float32))
        pieces = []
        for start in range(0, len(vectors), chunk):
            block = np.asarray(vectors[start:start + chunk], np.float32)
            padded = np.concatenate([block, np.zeros((chunk - len(block), block.shape[1]), np.float32)])
            outputs = jax.device_get(self._clean_forward(params, padded))
            pieces.append([np.asarray(output)[: len(block)] for output in outputs])
        return tuple(np.concatenate([piece[k] for piece in pieces]) for k in range(4))


def rotation_objective(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Cross entropy and accuracy of ``logits [n, 4]`` on rotation targets ``[n]`` (quarter turns; -1 = unknown,
    ignored)."""
    valid = targets >= 0
    classes = jnp.where(valid, targets % NUM_ROTATIONS, 0)
    log_probabilities = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    picked = jnp.take_along_axis(log_probabilities, classes[:, None], axis=1)[:, 0]
    weight = valid.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(weight), jnp.float32(1.0))
    correct = (jnp.argmax(logits, axis=-1) == classes).astype(jnp.float32)
    return -jnp.sum(picked * weight) / count, jnp.sum(correct * weight) / count


def build_task(config: SANEConfig, param_map: Sequence[ParamEntry], field_kind: str, field_config: dict,
               where: str = "dataset") -> SANETask:
    """The task (tokenizer and model) for ``config`` on NGP image fields described by the arguments."""
    from fields.image_fitting import field_config_from_dict

    if field_kind != "ngp_image":
        raise UserError(f"{where}: hypernets.sane needs ngp_image fields (hash grid + MLP), got {field_kind!r}")
    tokenizer = FieldTokenizer(param_map, field_config_from_dict(field_kind, field_config, f"{where}: field_config"),
                               config.lattice_size, config.patch_size, where)
    model = SANEModel(tokenizer.spec, width=config.width, encoder_depth=config.encoder_depth,
                      decoder_depth=config.decoder_depth, num_heads=config.num_heads, mlp_ratio=config.mlp_ratio,
                      latent_dim=config.latent_dim, projection_dim=config.projection_dim)
    return SANETask(model=model, tokenizer=tokenizer, config=config)


# ------------------------------------------------------------------------------------------- views


@dataclasses.dataclass
class ViewGroups:
    """The training fields grouped by source: ``views [S, R, P]``, ``rotations [S, R]`` int32 (-1 unknown),
    ``labels [S]`` int32; ``dropped``: sources left out for lacking some rotation."""

    views: np.ndarray
    rotations: np.ndarray
    labels: np.ndarray
    dropped: int = 0


def group_views(vectors: np.ndarray, labels: np.ndarray, source_ids: Sequence[str],
                rotations: np.ndarray | None) -> ViewGroups:
    """One group per source holding its field at every rotation of the data (``R = 1`` without rotations).

    Sources that lack one of the rotations present in the data are dropped (counted); of several fields
    of one source at one rotation, the first is used.
    """
    if rotations is None or not np.any(rotations >= 0):
        return ViewGroups(vectors[:, None], np.full((len(vectors), 1), -1, np.int32), labels.astype(np.int32))
    values = sorted({int(value) for value in rotations if value >= 0})
    rows_by_source: dict[str, dict[int, int]] = {}
    for row, (source, rotation) in enumerate(zip(source_ids, rotations, strict=True)):
        if rotation >= 0:
            rows_by_source.setdefault(source, {}).setdefault(int(rotation), row)
    complete = [rows for rows in rows_by_source.values() if len(rows) == len(values)]
    index = np.asarray([[rows[value] for value in values] for rows in complete], np.int64).reshape(-1, len(values))
    return ViewGroups(vectors[index], np.tile(np.asarray(values, np.int32), (len(index), 1)),
                      labels[index[:, 0]].astype(np.int32), len(rows_by_source) - len(complete))


# -------------------------------------------------------------------------------------- evaluation


def mlp_token_psnr(original: np.ndarray, replaced: np.ndarray, data) -> float | None:
    """Mean PSNR (dB, each field's capped at 100) of the renders of raw fields ``replaced [n, P]`` (decoded MLP)
    against those of ``original [n, P]``; None when the dataset does not record an image size."""
    if not renders_images(data) or not len(original):
        return None
    return float(np.mean(np.minimum(render_psnr(original, replaced, data), 100.0)))


def reconstruction_report(task: SANETask, params: Any, data, limit: int = MAX_EVAL_FIELDS) -> dict[str, float]:
    """Reconstruction of up to ``limit`` unaugmented fields of ``data`` (a ``WeightData``):
    ``val_hash_mse``, ``val_mlp_mse`` (normalised units) and ``val_mlp_psnr`` (see ``mlp_token_psnr``)."""
    vectors = data.vectors[:limit]
    _, hash_error, mlp_error, replaced = task.forward_all(params, vectors)
    report = {"val_hash_mse": float(np.mean(hash_error)), "val_mlp_mse": float(np.mean(mlp_error))}
    psnr = mlp_token_psnr(data.denormalize(vectors), data.denormalize(replaced), data)
    if psnr is not None:
        report["val_mlp_psnr"] = psnr
    return report


def make_evaluate(task: SANETask, val_data):
    """``evaluate(params, step) -> reconstruction_report`` on the held-out fields (None when there are none)."""
    if len(val_data) == 0:
        return None
    return lambda params, step: reconstruction_report(task, params, val_data)


def _fit_logistic(features: np.ndarray, targets: np.ndarray, num_classes: int, steps: int, learning_rate: float,
                  weight_decay: float) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression by full-batch Adam: ``features [n, d]``, ``targets [n]`` int ->
    ``(weights [d, C], bias [C])``."""
    optimizer = optax.adam(learning_rate)
    params = {"weights": jnp.zeros((features.shape[1], num_classes), jnp.float32),
              "bias": jnp.zeros((num_classes,), jnp.float32)}
    inputs, labels = jnp.asarray(features, jnp.float32), jnp.asarray(targets, jnp.int32)

    def objective(params):
        logits = inputs @ params["weights"] + params["bias"]
        data_term = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
        return data_term + jnp.float32(weight_decay) * jnp.sum(jnp.square(params["weights"]))

    @jax.jit
    def fit(params):
        def step(carry, _):
            params, state = carry
            grads = jax.grad(objective)(params)
            with jax.numpy_dtype_promotion("standard"):  # optax mixes Python floats and int32 counts
                updates, state = optimizer.update(grads, state, params)
                params = optax.apply_updates(params, updates)
            return (params, state), None

        with jax.numpy_dtype_promotion("standard"):
            state = optimizer.init(params)
        (params, _), _ = jax.lax.scan(step, (params, state), None, length=steps)
        return params

    fitted = jax.device_get(fit(params))
    return np.asarray(fitted["weights"]), np.asarray(fitted["bias"])


def linear_probe(latents_train: np.ndarray, labels_train: np.ndarray, latents_test: np.ndarray,
                 labels_test: np.ndarray, steps: int = 500, learning_rate: float = 0.05,
                 weight_decay: float = 1e-4) -> dict[str, Any]:
    """Linear probe: multinomial logistic regression on standardised features, trained on one split and
    scored on the other.

    Args:
        latents_train: ``[n, d]`` features of the training rows; ``labels_train``: ``[n]`` int (-1: unknown, unused).
        latents_test: ``[m, d]``; ``labels_test``: ``[m]`` int (-1 rows are not scored; classes absent from
            training count as errors).
        steps, learning_rate, weight_decay: the optimisation (full-batch Adam, L2 on the weights).

    Returns:
        ``{"accuracy", "train_accuracy", "majority_baseline", "num_train", "num_test", "num_classes"}``;
        ``accuracy`` is None (with a ``note``) when training has fewer than 2 classes or nothing is scored.
    """
    latents_train, latents_test = np.asarray(latents_train, np.float32), np.asarray(latents_test, np.float32)
    labels_train, labels_test = np.asarray(labels_train, np.int64), np.asarray(labels_test, np.int64)
    train_rows, test_rows = labels_train >= 0, labels_test >= 0
    classes = np.unique(labels_train[train_rows])
    report: dict[str, Any] = {"num_train": int(train_rows.sum()), "num_test": int(test_rows.sum()),
                              "num_classes": int(len(classes))}
    if len(classes) < 2:
        return {**report, "accuracy": None, "note": "fewer than 2 classes among the training rows"}
    if not test_rows.any():
        return {**report, "accuracy": None, "note": "no labelled test rows"}
    features, test_features = latents_train[train_rows], latents_test[test_rows]
    mean, std = features.mean(axis=0), features.std(axis=0)
    std = np.where(std > 1e-6, std, 1.0).astype(np.float32)
    features, test_features = (features - mean) / std, (test_features - mean) / std
    targets = np.searchsorted(classes, labels_train[train_rows])
    weights, bias = _fit_logistic(features, targets, len(classes), steps, learning_rate, weight_decay)
    predicted = classes[np.argmax(test_features @ weights + bias, axis=1)]
    predicted_train = classes[np.argmax(features @ weights + bias, axis=1)]
    majority = classes[np.argmax([np.sum(labels_train[train_rows] == value) for value in classes])]
    return {**report, "accuracy": float(np.mean(predicted == labels_test[test_rows])),
            "train_accuracy": float(np.mean(predicted_train == labels_train[train_rows])),
            "majority_baseline": float(np.mean(labels_test[test_rows] == majority))}


# ------------------------------------------------------------------------------------------- outputs


def probe_report(config: SANEConfig, train_latents: np.ndarray, val_latents: np.ndarray, train_data, val_data,
                 train_rotations: np.ndarray, val_rotations: np.ndarray) -> dict[str, Any]:
    """The linear probes: class from latents, class from raw normalised weights (baseline, when small
    enough), and rotation from latents when the data has rotated copies."""
    probe = lambda train, train_labels, test, test_labels: linear_probe(train, train_labels, test, test_labels,
                                                                        steps=config.probe_steps)
    report: dict[str, Any] = {"class": probe(train_latents, train_data.labels, val_latents, val_data.labels)}
    if train_data.vectors.shape[1] <= MAX_BASELINE_WEIGHTS:
        report["class_from_weights"] = probe(train_data.vectors, train_data.labels, val_data.vectors,
                                             val_data.labels)
    if np.any(train_rotations >= 0):
        report["rotation"] = probe(train_latents, train_rotations, val_latents, val_rotations)
    return report


def _format_accuracy(result: dict | None) -> str:
    if not result or result.get("accuracy") is None:
        return "n/a"
    return f"{100.0 * result['accuracy']:.1f}%"


# ------------------------------------------------------------------------------------------- the run


def run_record(data_path: str, config: SANEConfig) -> dict:
    """What ``W/config.json`` holds: ``{"data": absolute path, "sane": config dict}``."""
    return {"data": os.path.abspath(data_path), "sane": config_to_dict(config)}


def resolve_config(args, saved: dict | None) -> SANEConfig:
    """The preset (or, without ``--preset``, the config saved in the workdir) with the command-line overrides."""
    overrides = {"temperature": args.temperature, "contrastive_weight": args.contrastive_weight,
                 "rotation_weight": args.rotation_weight, "noise_std": args.noise_std, "permute": args.permute,
                 "rotated_copies": args.rotated_copies, "normalization": args.normalization,
                 "latent_dim": args.latent_dim, "probe_steps": args.probe_steps}
    return resolve_run_config(SANEConfig, PRESETS, args, saved, "sane", overrides)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m hypernets.sane", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="dataset of ngp_image fields (a .parquet shard or a folder)")
    parser.add_argument("--workdir", required=True, help="run directory (config, checkpoints, latents, probe.json)")
    parser.add_argument("--preset", help=f"one of {', '.join(PRESETS)} (default: the workdir's saved config, "
                                         "else default)")
    parser.add_argument("--temperature", type=float, help="NT-Xent temperature")
    parser.add_argument("--contrastive-weight", type=float, help="weight of the NT-Xent loss")
    parser.add_argument("--rotation-weight", type=float, help="weight of the rotation head (needs rotated copies)")
    parser.add_argument("--noise-std", type=float, help="weight noise of the augmentation (normalised units)")
    parser.add_argument("--permute", action=argparse.BooleanOptionalAction,
                        help="permute hidden neurons as an augmentation")
    parser.add_argument("--rotated-copies", action="store_true", default=None,
                        help="fit rotated copies of a procedural:primitives dataset into W/rotated and train on them")
    parser.add_argument("--normalization", choices=NORMALIZATION_MODES)
    parser.add_argument("--latent-dim", type=int, help="latent size per token and per field")
    parser.add_argument("--probe-steps", type=int, help="optimizer steps of the linear probe")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_loop_arguments(parser)
    return parser


def training_data_path(args, config: SANEConfig) -> str:
    """``--data``, or with ``rotated_copies`` the rotated dataset in ``W/rotated`` (made on first use)."""
    if not config.rotated_copies:
        return args.data
    if read_rotation_column(args.data) is not None:
        raise UserError(f"{args.data} already has a rotation column; drop --rotated-copies")
    out = os.path.join(args.workdir, ROTATED_DIRECTORY)
    print(f"fitting rotated copies of {args.data} into {out} (kept for reruns)")
    return rotate_dataset_images(args.data, out, progress=not args.quiet)


def split_rotations(path: str, train_data, val_data) -> tuple[np.ndarray, np.ndarray]:
    """``(train [N_train], val [N_val])`` int32 rotations of the split rows (-1 when the data has none)."""
    column = read_rotation_column(path)
    if column is None:
        return np.full(len(train_data), -1, np.int32), np.full(len(val_data), -1, np.int32)
    return column[train_data.rows].astype(np.int32), column[val_data.rows].astype(np.int32)


def main(argv: list[str] | None = None) -> int:
    from hypernets.datasets import BatchStream, load_weight_splits
    from hypernets.loop import train

    args = build_parser().parse_args(argv)
    saved = read_saved_run(args.workdir, "sane", "hypernets.sane")
    config = resolve_config(args, saved)
    run_config = run_record(args.data, config)
    check_run_config(args.workdir, saved, run_config, rerun_free_fields("sane", RERUN_FREE_FIELDS, args, saved))
    print(config_to_json(config))

    prepare_workdir(args.workdir)
    data_path = training_data_path(args, config)
    train_data, val_data = load_weight_splits(data_path, config.val_fraction, config.loop.seed, config.normalization)
    if len(val_data) == 0:
        raise UserError(f"{data_path}: the linear probe needs fields of at least 2 sources (one is held out)")
    task = build_task(config, train_data.param_map, train_data.field_kind, train_data.field_config, data_path)
    train_rotations, val_rotations = split_rotations(data_path, train_data, val_data)
    if config.rotation_weight > 0 and not np.any(train_rotations >= 0):
        raise UserError(f"--rotation-weight needs rotated copies: {data_path} has no rotation column "
                        "(use --rotated-copies)")
    write_run(args.workdir, run_config)
    groups = group_views(train_data.vectors, train_data.labels, train_data.source_ids, train_rotations)
    if len(groups.views) == 0:
        raise UserError(f"{data_path}: no training source has a field at every rotation")
    spec = task.tokenizer.spec
    print(f"{len(train_data)} training fields ({len(groups.views)} sources x {groups.views.shape[1]} views"
          + (f", {groups.dropped} incomplete sources left out" if groups.dropped else "")
          + f"), {len(val_data)} held out; tokens: {spec.num_hash_tokens} hash ({spec.num_levels} levels x "
          f"{spec.patches_per_side}x{spec.patches_per_side} patches of {spec.hash_token_dim}) + "
          f"{spec.num_neuron_tokens} neurons (width {spec.neuron_token_dim})")

    stream = BatchStream({"views": groups.views, "rotations": groups.rotations}, config.loop.batch_size,
                         seed=config.loop.seed)
    result = train(task, stream, config.loop, args.workdir, evaluate=make_evaluate(task, val_data),
                   progress=not args.quiet, run_config=run_config)
    params, step = result.ema_params, result.step  # as evaluate saw them (one compiled forward)

    train_latents = task.forward_all(params, train_data.vectors)[0]
    val_latents = task.forward_all(params, val_data.vectors)[0]
    columns = {
        "source_id": list(train_data.source_ids) + list(val_data.source_ids),
        "label": np.concatenate([train_data.labels, val_data.labels]).astype(int).tolist(),
        "split": ["train"] * len(train_data) + ["val"] * len(val_data),
        "rotation": np.concatenate([train_rotations, val_rotations]).astype(int).tolist(),
        "row": np.concatenate([train_data.rows, val_data.rows]).astype(int).tolist(),
    }
    generator = {"model": "hypernets.sane", "workdir": os.path.abspath(args.workdir), "step": int(step),
                 "data": os.path.abspath(data_path), "latent_dim": config.latent_dim}
    directory = write_latent_shard(args.workdir, np.concatenate([train_latents, val_latents]), columns,
                                   {"generator": generator})
    report = {"step": int(step), "data": os.path.abspath(data_path), "latent_dim": config.latent_dim,
              "num_train": len(train_data), "num_val": len(val_data),
              **probe_report(config, train_latents, val_latents, train_data, val_data, train_rotations,
                             val_rotations),
              "reconstruction": reconstruction_report(task, params, val_data)}
    write_json(os.path.join(args.workdir, PROBE_NAME), report)
    reconstruction = report["reconstruction"]
    psnr = reconstruction.get("val_mlp_psnr")
    print(f"step {step}: latents of {len(train_data) + len(val_data)} fields in {directory}; linear probe on "
          f"{len(val_data)} held-out fields: class {_format_accuracy(report['class'])} (raw weights "
          f"{_format_accuracy(report.get('class_from_weights'))})"
          + (f", rotation {_format_accuracy(report['rotation'])}" if "rotation" in report else "")
          + f"; held-out hash-feature MSE {reconstruction['val_hash_mse']:.4f}, MLP MSE "
          f"{reconstruction['val_mlp_mse']:.4f}"
          + (f", render PSNR with the decoded MLP {psnr:.2f} dB" if psnr is not None else "")
          + f" ({os.path.join(args.workdir, PROBE_NAME)})")
    return 0


if __name__ == "__main__":
    run_main(main)
