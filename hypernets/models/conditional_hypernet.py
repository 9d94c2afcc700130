"""Conditional hypernetworks (HyperFields-style): a condition -> the weights of an Instant-NGP field.

One forward pass maps a batch of conditions to the flat, *normalised* weight vectors ``[batch, P]``
of NGP image fields or NGP NeRF fields laid out by the dataset's param map (``denormalize`` turns
them into raw weights). Image fields have one MLP chain (``mlp/dense_k``); NeRF fields two
(``density_mlp/dense_k`` reading the hash features, then ``color_mlp/dense_k`` reading the density
MLP's output concatenated with the spherical-harmonics encoding of the view direction).

Conditions (``ConditionSpec.kind``), each embedded to ``[batch, width]``:

- ``"label"``: a class id (unknown ids share one learned "unknown" embedding);
- ``"attributes"``: a shape id plus a colour id (id 0 = unknown), the sum of two embeddings;
- ``"caption"``: a bag-of-words text encoder: word ids ``[batch, length]`` (0 = padding, 1 = unknown
  word) -> the mean of learned word embeddings over the non-padding words. Word order is ignored and
  the vocabulary is the training captions' words (nothing is downloaded);
- ``"text"``: a caption's embedding from a pretrained offline sentence encoder
  (``hypernets.text_encoder``, the ``[text]`` extra) ``[batch, text_dim]``, through a linear map;
- optionally (``use_layout``) layout features ``[batch, features]`` (a 2D primitive's centre, radius and
  rotation harmonics; a 3D object's position, size and rotation) through a linear map, added to the
  embedding.

A residual MLP trunk turns the embedding into a context vector. Then:

- the hash table (the ``hash`` section) is emitted in chunks of ``chunk_size`` weights: one small MLP
  shared by all chunks reads the context plus a learned embedding of the chunk's position, and a
  learned per-chunk bias is added (``ChunkedHead``);
- the MLP kernels of the field come from one of two variants:

  ``"static"``: one dense layer from the context to every MLP kernel at once.

  ``"dynamic"`` (after HyperFields' dynamic hypernetwork): the field's MLP layers are generated one
  after the other. The generated hash table is evaluated at a fixed grid of ``probe_grid**d`` probe
  positions (cell centres of a ``probe_grid^d`` grid over ``[0, 1]^d``, ``d`` = 2 for images, 3 for
  NeRFs); layer ``k``'s kernel is predicted from the context *and* the statistics (mean and standard
  deviation over the probes, per feature) of the activations entering layer ``k``, i.e. of the hash
  features for the first layer and otherwise of the output of the previously generated layer (after
  its ReLU). For NeRFs the colour chain's first layer reads the density MLP's (linear) output
  concatenated with the spherical harmonics of fixed probe directions (a Fibonacci sphere). The
  probes are fixed, so the generated weights remain a deterministic function of the condition: one
  field per condition, as in the static variant. (HyperFields feeds activation statistics of the
  points being rendered; fixed probes keep "one condition -> one field" exact.)
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fields.models import hash_grid
from fields.models.nerf import NeRFFieldConfig, spherical_harmonics
from fields.models.ngp import NGPFieldConfig

CONDITION_KINDS = ("label", "attributes", "caption", "text")
VARIANTS = ("static", "dynamic")
PAD_WORD = 0
UNKNOWN_WORD = 1
FIRST_WORD = 2
# Layout features: centre x, centre y, radius, then cos/sin of k * angle for k = 1..LAYOUT_HARMONICS.
LAYOUT_HARMONICS = 5
LAYOUT_FEATURES = 3 + 2 * LAYOUT_HARMONICS
# Batch keys of the condition inputs (only those of the configured kind are present).
CONDITION_KEYS = ("labels", "shape_ids", "colour_ids", "words", "text_embedding", "layout")
HASH_TABLE_NAME = "hash_table"
_CHAIN_KERNEL_NAME = re.compile(r"^(\w+)/dense_(\d+)/kernel$")
# The MLP chains of each supported field, in evaluation order.
IMAGE_CHAINS = ("mlp",)
NERF_CHAINS = ("density_mlp", "color_mlp")
STATISTICS_EPSILON = 1e-6


@dataclasses.dataclass(frozen=True)
class ConditionSpec:
    """What the condition encoder reads.

    Attributes:
        kind: ``"label"``, ``"attributes"``, ``"caption"`` or ``"text"``.
        num_classes: label classes ``[0, num_classes)`` (others share the "unknown" embedding).
        num_shapes, num_colours: attribute vocabulary sizes, without the "unknown" id 0.
        vocab_size: caption vocabulary size including the padding (0) and unknown (1) words.
        text_dim: width of the ``"text"`` condition's caption embeddings.
        use_layout: also read ``layout [batch, LAYOUT_FEATURES]``.
    """

    kind: str
    num_classes: int = 0
    num_shapes: int = 0
    num_colours: int = 0
    vocab_size: int = 0
    text_dim: int = 0
    use_layout: bool = False

    def __post_init__(self):
        if self.kind not in CONDITION_KINDS:
            raise ValueError(f"condition kind must be one of {', '.join(CONDITION_KINDS)}, got {self.kind!r}")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One tensor of the generated field: where it lies in the vector ``[P]`` and its normalisation.

    ``raw = normalised * std + mean`` (the scalar statistics of the tensor's column block, as
    ``NormalizationStats.column_stats`` gives them in "tensor" or "section" mode).
    """

    name: str
    shape: tuple[int, ...]
    offset: int
    size: int
    section: str
    mean: float
    std: float


def tensor_specs(pmap: Sequence, column_mean: np.ndarray, column_std: np.ndarray) -> tuple[TensorSpec, ...]:
    """``TensorSpec`` per param-map entry from per-column statistics ``[P]`` (constant within a tensor)."""
    return tuple(TensorSpec(entry.name, tuple(entry.shape), entry.offset, entry.size, entry.section,
                            float(column_mean[entry.offset]), float(column_std[entry.offset])) for entry in pmap)


def column_statistics(specs: Sequence[TensorSpec]) -> tuple[np.ndarray, np.ndarray]:
    """``(mean [P], std [P])`` float32 columns of ``specs``."""
    mean = np.concatenate([np.full(spec.size, spec.mean, np.float32) for spec in specs])
    std = np.concatenate([np.full(spec.size, spec.std, np.float32) for spec in specs])
    return mean, std


def denormalize(normalized: jax.Array, specs: Sequence[TensorSpec]) -> jax.Array:
    """Normalised weights ``[..., P]`` -> raw field weights ``[..., P]`` float32."""
    mean, std = column_statistics(specs)
    return normalized.astype(jnp.float32) * jnp.asarray(std) + jnp.asarray(mean)


def vector_to_field_params(vector: jax.Array, specs: Sequence[TensorSpec]) -> dict:
    """Raw weights ``[P]`` -> the field's params pytree (``{"hash_table": ..., "mlp": {"dense_0": {"kernel"}}}``)."""
    params: dict = {}
    for spec in specs:
        node = params
        *parents, leaf = spec.name.split("/")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = vector[spec.offset:spec.offset + spec.size].reshape(spec.shape)
    return params


def kernel_chains(specs: Sequence[TensorSpec]) -> list[list[TensorSpec]]:
    """The field's MLP kernels as chains in evaluation order: ``[[mlp/dense_0, ...]]`` for an image field,
    ``[[density_mlp/dense_0, ...], [color_mlp/dense_0, ...]]`` for a NeRF field.

    Raises:
        ValueError: not an Instant-NGP image or NeRF field layout (one ``hash_table`` tensor in section
            ``hash``, every other tensor ``PREFIX/dense_k/kernel`` with consecutive ``k``).
    """
    hash_specs = [spec for spec in specs if spec.section == "hash"]
    if len(hash_specs) != 1 or hash_specs[0].name != HASH_TABLE_NAME or len(hash_specs[0].shape) != 2:
        raise ValueError("expected exactly one 'hash_table' tensor [entries, features] in section 'hash'")
    groups: dict[str, list[tuple[int, TensorSpec]]] = {}
    for spec in specs:
        if spec.section == "hash":
            continue
        match = _CHAIN_KERNEL_NAME.match(spec.name)
        if match is None or len(spec.shape) != 2:
            raise ValueError(f"unexpected tensor {spec.name!r} {spec.shape}: expected PREFIX/dense_k/kernel matrices")
        groups.setdefault(match.group(1), []).append((int(match.group(2)), spec))
    order = next((chains for chains in (IMAGE_CHAINS, NERF_CHAINS) if set(groups) == set(chains)), None)
    if order is None:
        raise ValueError(f"MLP kernels of {sorted(groups)}: expected {list(IMAGE_CHAINS)} (image) or "
                         f"{list(NERF_CHAINS)} (NeRF)")
    chains = []
    for prefix in order:
        layers = sorted(groups[prefix], key=lambda item: item[0])
        if [index for index, _ in layers] != list(range(len(layers))):
            raise ValueError(f"the MLP kernels must be {prefix}/dense_0/kernel ... {prefix}/dense_K/kernel")
        chains.append([spec for _, spec in layers])
    return chains


def probe_positions(probe_grid: int, num_dims: int = 2) -> np.ndarray:
    """``[probe_grid**num_dims, num_dims]`` float32 cell centres (x, y[, z]) of a ``probe_grid^num_dims`` grid
    over ``[0, 1]^num_dims`` (x varies fastest)."""
    centres = (np.arange(probe_grid, dtype=np.float32) + np.float32(0.5)) / np.float32(probe_grid)
    grids = np.meshgrid(*([centres] * num_dims), indexing="ij")  # axis 0 is the slowest
    return np.stack([grid.reshape(-1) for grid in reversed(grids)], axis=-1).astype(np.float32)


def probe_directions(count: int) -> np.ndarray:
    """``[count, 3]`` float32 unit vectors spread over the sphere (a Fibonacci spiral)."""
    index = np.arange(count, dtype=np.float64) + 0.5
    z = 1.0 - 2.0 * index / count
    radius = np.sqrt(np.maximum(1.0 - z * z, 0.0))
    angle = np.pi * (3.0 - np.sqrt(5.0)) * index
    return np.stack([radius * np.cos(angle), radius * np.sin(angle), z], axis=-1).astype(np.float32)


# ------------------------------------------------------------------------------------------- modules


class BagOfWords(nn.Module):
    """Caption encoder: word ids ``[batch, length]`` (0 = padding) -> mean word embedding ``[batch, width]``.

    Equal bags of words give equal embeddings; an all-padding caption gives zeros.
    """

    vocab_size: int
    width: int

    @nn.compact
    def __call__(self, words: jax.Array) -> jax.Array:
        embeddings = nn.Embed(self.vocab_size, self.width, name="words")(words)  # [B, L, W]
        mask = (words != PAD_WORD).astype(jnp.float32)[..., None]
        count = jnp.maximum(jnp.sum(mask, axis=1), jnp.float32(1.0))
        return jnp.sum(embeddings * mask, axis=1) / count


class ConditionEncoder(nn.Module):
    """Condition inputs (``CONDITION_KEYS``) -> embedding ``[batch, width]`` (see the module docstring)."""

    spec: ConditionSpec
    width: int

    @nn.compact
    def __call__(self, conditions: dict[str, jax.Array]) -> jax.Array:
        spec = self.spec
        if spec.kind == "label":
            labels = jnp.asarray(conditions["labels"], jnp.int32)
            known = (labels >= 0) & (labels < spec.num_classes)
            ids = jnp.where(known, labels, jnp.int32(spec.num_classes))
            embedding = nn.Embed(spec.num_classes + 1, self.width, name="labels")(ids)
        elif spec.kind == "attributes":
            shapes = nn.Embed(spec.num_shapes + 1, self.width, name="shapes")(
                jnp.asarray(conditions["shape_ids"], jnp.int32))
            colours = nn.Embed(spec.num_colours + 1, self.width, name="colours")(
                jnp.asarray(conditions["colour_ids"], jnp.int32))
            embedding = shapes + colours
        elif spec.kind == "text":
            embedding = nn.Dense(self.width, name="text")(jnp.asarray(conditions["text_embedding"], jnp.float32))
        else:
            embedding = BagOfWords(spec.vocab_size, self.width, name="caption")(
                jnp.asarray(conditions["words"], jnp.int32))
        if spec.use_layout:
            layout = jnp.asarray(conditions["layout"], jnp.float32)
            embedding = embedding + nn.Dense(self.width, name="layout")(layout)
        return embedding


class ChunkedHead(nn.Module):
    """Context ``[batch, width]`` -> ``[batch, size]`` emitted in ``ceil(size / chunk_size)`` chunks.

    Chunk ``k`` = ``MLP(context, position_embedding[k]) + bias[k]``, the MLP shared by all chunks.
    """

    size: int
    chunk_size: int
    embedding_dim: int
    width: int

    @nn.compact
    def __call__(self, context: jax.Array) -> jax.Array:
        num_chunks = -(-self.size // self.chunk_size)
        positions = self.param("chunk_embeddings", nn.initializers.normal(1.0), (num_chunks, self.embedding_dim),
                               jnp.float32)
        bias = self.param("chunk_bias", nn.initializers.zeros, (num_chunks, self.chunk_size), jnp.float32)
        hidden = (nn.Dense(self.width, name="context")(context)[:, None, :]
                  + nn.Dense(self.width, use_bias=False, name="position")(positions)[None])  # [B, K, W]
        hidden = nn.Dense(self.width, name="hidden")(nn.gelu(hidden))
        chunks = nn.Dense(self.chunk_size, name="out")(nn.gelu(hidden)) + bias[None]  # [B, K, chunk]
        return chunks.reshape(chunks.shape[0], num_chunks * self.chunk_size)[:, :self.size]


class ConditionalHypernet(nn.Module):
    """Conditions -> normalised weights ``[batch, P]`` of NGP image or NeRF fields (see the module docstring).

    Attributes:
        specs: the field's tensors in param-map order (with their normalisation).
        field_config: the generated fields' architecture (``NGPFieldConfig`` or ``NeRFFieldConfig``; its hash
            grid is evaluated by the dynamic variant).
        condition: what the encoder reads.
        variant: ``"static"`` or ``"dynamic"``.
        width: embedding, trunk and head width.
        depth: residual trunk blocks.
        chunk_size, chunk_embedding: hash-table chunks and their position-embedding size.
        probe_grid: the dynamic variant's probes per axis.
        backend: hash-grid backend of the dynamic variant's probe evaluation.
    """

    specs: tuple[TensorSpec, ...]
    field_config: NGPFieldConfig | NeRFFieldConfig
    condition: ConditionSpec
    variant: str = "dynamic"
    width: int = 128
    depth: int = 2
    chunk_size: int = 64
    chunk_embedding: int = 32
    probe_grid: int = 8
    backend: str = "jax"

    @nn.compact
    def __call__(self, conditions: dict[str, jax.Array]) -> jax.Array:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        chains = kernel_chains(self.specs)
        table_spec = next(spec for spec in self.specs if spec.section == "hash")
        context = ConditionEncoder(self.condition, self.width, name="encoder")(conditions)
        context = nn.Dense(self.width, name="trunk_in")(nn.gelu(context))
        for block in range(self.depth):
            hidden = nn.LayerNorm(name=f"trunk_norm_{block}")(context)
            hidden = nn.Dense(self.width, name=f"trunk_{block}_hidden")(hidden)
            context = context + nn.Dense(self.width, name=f"trunk_{block}_out")(nn.gelu(hidden))
        context = nn.LayerNorm(name="trunk_norm")(context)

        pieces = {table_spec.name: ChunkedHead(table_spec.size, self.chunk_size, self.chunk_embedding, self.width,
                                               name="hash_head")(context)}
        if self.variant == "static":
            kernels = [spec for chain in chains for spec in chain]
            total = sum(spec.size for spec in kernels)
            flat = nn.Dense(total, name="mlp_head")(context)
            offset = 0
            for spec in kernels:
                pieces[spec.name] = flat[:, offset:offset + spec.size]
                offset += spec.size
        else:
            pieces.update(self._dynamic_kernels(context, pieces[table_spec.name], table_spec, chains))
        return jnp.concatenate([pieces[spec.name] for spec in self.specs], axis=-1)

    def _dynamic_kernels(self, context: jax.Array, table_normalized: jax.Array, table_spec: TensorSpec,
                         chains: list[list[TensorSpec]]) -> dict[str, jax.Array]:
        """The MLP kernels, layer by layer, each from the context and the probe activation statistics."""
        batch = context.shape[0]
        table = (table_normalized * jnp.float32(table_spec.std) + jnp.float32(table_spec.mean)).reshape(
            (batch,) + table_spec.shape)
        grid = self.field_config.grid
        probes = jnp.asarray(probe_positions(self.probe_grid, grid.num_dims))
        activations = jax.vmap(lambda rows: hash_grid.encode(rows, probes, grid, self.backend))(table)  # [B, M, F]
        generated = {}
        layer = 0
        for position, chain in enumerate(chains):
            if position > 0:  # a NeRF's colour chain: density MLP output + SH of the view direction
                directions = jnp.asarray(probe_directions(probes.shape[0]))
                view = spherical_harmonics(directions, self.field_config.sh_degree)  # [M, degree**2]
                activations = jnp.concatenate([activations, jnp.broadcast_to(view[None], (batch,) + view.shape)],
                                              axis=-1)
            for depth, spec in enumerate(chain):
                fan_in, fan_out = spec.shape
                mean = jnp.mean(activations, axis=1)
                deviation = jnp.sqrt(jnp.var(activations, axis=1) + jnp.float32(STATISTICS_EPSILON))
                statistics = jnp.concatenate([mean, deviation], axis=-1)  # [B, 2 * fan_in]
                hidden = (nn.Dense(self.width, name=f"layer_{layer}_context")(context)
                          + nn.Dense(self.width, name=f"layer_{layer}_statistics")(statistics))
                normalized = nn.Dense(spec.size, name=f"layer_{layer}_out")(nn.gelu(hidden))  # [B, in * out]
                generated[spec.name] = normalized
                kernel = (normalized * jnp.float32(spec.std) + jnp.float32(spec.mean)).reshape(batch, fan_in, fan_out)
                activations = jnp.einsum("bmi,bio->bmo", activations, kernel)
                if depth < len(chain) - 1:
                    activations = jax.nn.relu(activations)
                layer += 1
        return generated


def count_parameters(params) -> int:
    """Number of scalars in a params pytree."""
    return int(sum(math.prod(np.shape(leaf)) for leaf in jax.tree_util.tree_leaves(params)))
