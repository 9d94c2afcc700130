"""Split weight autoencoders: one encoder and one decoder per section of a field's weights.

A field's flat weight vector ``[P]`` is cut into its param-map sections (``hash``, ``mlp``, ...;
``fields.weights.section_slices``) by ``SectionLayout``. Each section gets its own encoder, which
maps its weights ``[S]`` to a latent ``[latent_dim]``, and its own decoder back; a field's latent
is the concatenation of its section latents, ``[D] = [sum of latent_dims]``. Two architectures:

- ``"conv"``: the section is read as a 1D signal of ``ceil(S / conv_channels)`` positions with
  ``conv_channels`` consecutive weights as the channels of a position (zero-padded to a multiple
  of ``2 ** len(conv_widths)`` positions), a stem convolution, one stride-2 convolution per entry of
  ``conv_widths``, and a dense bottleneck to the latent; the decoder mirrors it (dense, stride-2
  transposed convolutions, an output convolution) and crops the padding.
- ``"transformer"``: the section is cut into tokens of ``chunk_size`` consecutive weights (the last
  one zero-padded), embedded linearly with a learned position embedding; ``num_latent_tokens``
  learned latent tokens join them through ``depth`` pre-LayerNorm bidirectional transformer
  blocks, and the latent tokens' outputs are projected to the latent. The decoder projects the
  latent back to ``num_latent_tokens`` tokens, appends one learned query per weight token, runs
  ``depth`` blocks and reads each query out as ``chunk_size`` weights (the read-out starts at zero, so an
  untrained decoder outputs the normalised mean, zero).

``WeightAutoencoder`` ties the layout and the Flax module together with pure, jittable
``encode(params, vectors)``, ``decode(params, latents)`` and ``reconstruct(params, vectors)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fields.weights import ParamEntry, param_count, section_slices
from hypernets.models.transformer import EncoderBlock

KINDS = ("conv", "transformer")


class SectionLayout:
    """Flat weight vectors ``[batch, P]`` <-> per-section vectors ``([batch, S_0], [batch, S_1], ...)``.

    Attributes:
        names: the sections in order of first appearance in the param map.
        indices: per section, the int64 positions ``[S_i]`` of its weights in the vector.
        sizes: ``S_i`` per section.
        num_params: ``P``.
        inverse: ``[P]`` int64, position of each weight in the concatenation of the sections.
    """

    def __init__(self, pmap: Sequence[ParamEntry]):
        slices = section_slices(pmap)
        if not slices:
            raise ValueError("the param map is empty")
        self.names = list(slices)
        self.indices = [np.asarray(indices, np.int64) for indices in slices.values()]
        self.sizes = tuple(int(len(indices)) for indices in self.indices)
        self.num_params = param_count(pmap)
        self.inverse = np.argsort(np.concatenate(self.indices)).astype(np.int64)

    def split(self, vectors) -> tuple:
        """``[batch, P]`` -> one ``[batch, S_i]`` per section (numpy or jax, as given)."""
        if vectors.shape[-1] != self.num_params:
            raise ValueError(f"vectors have {vectors.shape[-1]} weights; the param map has {self.num_params}")
        return tuple(vectors[..., indices] for indices in self.indices)

    def merge(self, sections: Sequence) -> jax.Array:
        """Inverse of ``split``: one ``[batch, S_i]`` per section -> ``[batch, P]``."""
        xp = np if all(isinstance(section, np.ndarray) for section in sections) else jnp
        return xp.concatenate(list(sections), axis=-1)[..., self.inverse]


def _pad_to(section: jax.Array, length: int) -> jax.Array:
    """``[batch, S]`` -> ``[batch, length]`` with zeros appended (``length >= S``)."""
    return jnp.pad(section, ((0, 0), (0, length - section.shape[-1])))


def conv_length(size: int, channels: int, num_downsamples: int) -> int:
    """Positions of a section of ``size`` weights read with ``channels`` per position, rounded up to a
    multiple of ``2 ** num_downsamples`` (so every stride-2 layer halves it exactly)."""
    step = 1 << num_downsamples
    positions = -(-size // channels)
    return -(-positions // step) * step


# ------------------------------------------------------------------------------------ convolutional


class ConvSection(nn.Module):
    """What the convolutional section encoder and decoder share: ``size`` weights <-> a ``latent_dim`` latent
    through ``len(widths)`` stride-2 (transposed) convolutions over ``channels`` weights per position."""

    size: int
    latent_dim: int
    channels: int = 2
    widths: tuple[int, ...] = (32, 64, 128)
    kernel_size: int = 5

    @property
    def length(self) -> int:
        """Positions of the (zero-padded) section."""
        return conv_length(self.size, self.channels, len(self.widths))


class ConvSectionEncoder(ConvSection):
    """``[batch, size]`` section weights -> ``[batch, latent_dim]`` (see the module docstring)."""

    @nn.compact
    def __call__(self, section: jax.Array) -> jax.Array:
        batch, length = section.shape[0], self.length
        x = _pad_to(jnp.asarray(section, jnp.float32), length * self.channels).reshape(batch, length, self.channels)
        x = nn.gelu(nn.Conv(self.widths[0], (self.kernel_size,), name="stem")(x))
        for index, width in enumerate(self.widths):
            x = nn.gelu(nn.Conv(width, (self.kernel_size,), strides=(2,), name=f"down_{index}")(x))
        return nn.Dense(self.latent_dim, name="to_latent")(x.reshape(batch, -1))


class ConvSectionDecoder(ConvSection):
    """``[batch, latent_dim]`` -> ``[batch, size]`` section weights, mirroring ``ConvSectionEncoder``."""

    @nn.compact
    def __call__(self, latent: jax.Array) -> jax.Array:
        batch, length = latent.shape[0], self.length
        bottom = length >> len(self.widths)
        x = nn.Dense(bottom * self.widths[-1], name="from_latent")(jnp.asarray(latent, jnp.float32))
        x = nn.gelu(x.reshape(batch, bottom, self.widths[-1]))
        upsampling_widths = list(reversed(self.widths[:-1])) + [self.widths[0]]
        for index, width in enumerate(upsampling_widths):
            x = nn.gelu(nn.ConvTranspose(width, (self.kernel_size,), strides=(2,), padding="SAME",
                                         name=f"up_{index}")(x))
        x = nn.Conv(self.channels, (self.kernel_size,), name="output")(x)
        return x.reshape(batch, length * self.channels)[:, : self.size]


# ------------------------------------------------------------------------------------ transformer


class TransformerSection(nn.Module):
    """What the transformer section encoder and decoder share: ``size`` weights in ``chunk_size`` tokens,
    ``num_latent_tokens`` latent tokens, ``depth`` ``EncoderBlock``s of ``width``."""

    size: int
    latent_dim: int
    chunk_size: int = 32
    width: int = 128
    depth: int = 2
    num_heads: int = 4
    num_latent_tokens: int = 4
    mlp_ratio: float = 4.0

    @property
    def num_tokens(self) -> int:
        """Weight tokens of the section (the last one zero-padded)."""
        return -(-self.size // self.chunk_size)

    def blocks(self, x: jax.Array) -> jax.Array:
        """``depth`` bidirectional blocks over ``[batch, T, width]`` (call inside ``nn.compact``)."""
        for index in range(self.depth):
            x = EncoderBlock(self.width, self.num_heads, self.mlp_ratio, name=f"block_{index}")(x)
        return x


class TransformerSectionEncoder(TransformerSection):
    """``[batch, size]`` section weights -> ``[batch, latent_dim]`` through learned latent tokens."""

    @nn.compact
    def __call__(self, section: jax.Array) -> jax.Array:
        batch, num_tokens = section.shape[0], self.num_tokens
        tokens = _pad_to(jnp.asarray(section, jnp.float32), num_tokens * self.chunk_size)
        tokens = tokens.reshape(batch, num_tokens, self.chunk_size)
        positions = self.param("position_embedding", nn.initializers.normal(0.02), (num_tokens, self.width))
        x = nn.Dense(self.width, name="token_embedding")(tokens) + positions[None]
        latent_tokens = self.param("latent_tokens", nn.initializers.normal(0.02), (self.num_latent_tokens, self.width))
        x = jnp.concatenate([jnp.broadcast_to(latent_tokens[None], (batch,) + latent_tokens.shape), x], axis=1)
        x = nn.LayerNorm(name="final_norm")(self.blocks(x)[:, : self.num_latent_tokens])
        return nn.Dense(self.latent_dim, name="to_latent")(x.reshape(batch, -1))


class TransformerSectionDecoder(TransformerSection):
    """``[batch, latent_dim]`` -> ``[batch, size]`` section weights: latent tokens plus one learned query
    per weight token, read out as ``chunk_size`` weights each."""

    @nn.compact
    def __call__(self, latent: jax.Array) -> jax.Array:
        batch, num_tokens = latent.shape[0], self.num_tokens
        memory = nn.Dense(self.num_latent_tokens * self.width, name="from_latent")(jnp.asarray(latent, jnp.float32))
        memory = memory.reshape(batch, self.num_latent_tokens, self.width)
        # Unit-scale queries: their position information must survive next to the memory in the residual stream.
        queries = self.param("query_tokens", nn.initializers.normal(1.0), (num_tokens, self.width))
        x = jnp.concatenate([memory, jnp.broadcast_to(queries[None], (batch,) + queries.shape)], axis=1)
        x = nn.LayerNorm(name="final_norm")(self.blocks(x)[:, self.num_latent_tokens :])
        chunks = nn.Dense(self.chunk_size, kernel_init=nn.initializers.zeros, name="output")(x)
        return chunks.reshape(batch, num_tokens * self.chunk_size)[:, : self.size]


# ------------------------------------------------------------------------------------ the split model


class SplitAutoencoder(nn.Module):
    """One encoder/decoder pair per section; the latent is the concatenation of the section latents.

    Attributes:
        kind: ``"conv"`` or ``"transformer"``.
        section_sizes: ``S_i`` per section.
        latent_dims: latent size per section.
        conv_channels, conv_widths, conv_kernel: the convolutional variant.
        chunk_size, width, depth, num_heads, num_latent_tokens, mlp_ratio: the transformer variant.
    """

    kind: str
    section_sizes: tuple[int, ...]
    latent_dims: tuple[int, ...]
    conv_channels: int = 2
    conv_widths: tuple[int, ...] = (32, 64, 128)
    conv_kernel: int = 5
    chunk_size: int = 32
    width: int = 128
    depth: int = 2
    num_heads: int = 4
    num_latent_tokens: int = 4
    mlp_ratio: float = 4.0

    def setup(self):
        if self.kind == "conv":
            settings = {"channels": self.conv_channels, "widths": tuple(self.conv_widths),
                        "kernel_size": self.conv_kernel}
            encoder, decoder = ConvSectionEncoder, ConvSectionDecoder
        elif self.kind == "transformer":
            settings = {"chunk_size": self.chunk_size, "width": self.width, "depth": self.depth,
                        "num_heads": self.num_heads, "num_latent_tokens": self.num_latent_tokens,
                        "mlp_ratio": self.mlp_ratio}
            encoder, decoder = TransformerSectionEncoder, TransformerSectionDecoder
        else:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        pairs = list(zip(self.section_sizes, self.latent_dims, strict=True))
        self.encoders = [encoder(size, dim, **settings) for size, dim in pairs]
        self.decoders = [decoder(size, dim, **settings) for size, dim in pairs]

    def encode(self, sections: Sequence[jax.Array]) -> jax.Array:
        """One ``[batch, S_i]`` per section -> latents ``[batch, D]`` float32."""
        return jnp.concatenate([encode(section) for encode, section in zip(self.encoders, sections, strict=True)],
                               axis=-1)

    def decode(self, latents: jax.Array) -> tuple[jax.Array, ...]:
        """Latents ``[batch, D]`` -> one ``[batch, S_i]`` float32 per section."""
        bounds = np.cumsum((0,) + tuple(self.latent_dims))
        return tuple(decode(latents[:, start:stop])
                     for decode, start, stop in zip(self.decoders, bounds[:-1], bounds[1:], strict=True))

    def __call__(self, sections: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
        return self.decode(self.encode(sections))


class WeightAutoencoder:
    """A split autoencoder over flat weight vectors laid out by a param map.

    Args:
        pmap: the param map of the vectors.
        kind: ``"conv"`` or ``"transformer"``.
        latent_dims: latent size per section, in the order of ``section_names``; a single value
            applies to every section.
        **architecture: the remaining ``SplitAutoencoder`` attributes.

    Raises:
        ValueError: an unknown kind, or ``latent_dims`` that do not fit the sections.
    """

    def __init__(self, pmap: Sequence[ParamEntry], kind: str, latent_dims: Sequence[int], **architecture):
        if kind not in KINDS:
            raise ValueError(f"model must be one of {', '.join(KINDS)}, got {kind!r}")
        self.layout = SectionLayout(pmap)
        dims = tuple(int(dim) for dim in latent_dims)
        if len(dims) == 1:
            dims = dims * len(self.layout.names)
        if len(dims) != len(self.layout.names) or min(dims) < 1:
            raise ValueError(f"latent_dims {list(latent_dims)} do not fit the {len(self.layout.names)} section(s) "
                             f"{', '.join(self.layout.names)} (give one positive size, or one per section)")
        self.module = SplitAutoencoder(kind=kind, section_sizes=self.layout.sizes, latent_dims=dims, **architecture)

    @property
    def section_names(self) -> list[str]:
        return list(self.layout.names)

    @property
    def section_latent_dims(self) -> dict[str, int]:
        return dict(zip(self.layout.names, self.module.latent_dims, strict=True))

    @property
    def num_params(self) -> int:
        """``P``: weights per field."""
        return self.layout.num_params

    @property
    def latent_size(self) -> int:
        """``D``: latent values per field."""
        return int(sum(self.module.latent_dims))

    @property
    def compression(self) -> float:
        """``P / D``."""
        return self.num_params / self.latent_size

    def init(self, key: jax.Array, vectors: jax.Array):
        """Parameters for vectors ``[batch, P]``."""
        return self.module.init(key, self.layout.split(jnp.asarray(vectors, jnp.float32)))["params"]

    def encode(self, params, vectors: jax.Array) -> jax.Array:
        """Normalised weights ``[batch, P]`` -> latents ``[batch, D]`` float32 (pure, jittable)."""
        sections = self.layout.split(jnp.asarray(vectors, jnp.float32))
        return self.module.apply({"params": params}, sections, method=SplitAutoencoder.encode)

    def decode(self, params, latents: jax.Array) -> jax.Array:
        """Latents ``[batch, D]`` -> normalised weights ``[batch, P]`` float32 (pure, jittable)."""
        sections = self.module.apply({"params": params}, jnp.asarray(latents, jnp.float32),
                                     method=SplitAutoencoder.decode)
        return self.layout.merge(sections)

    def reconstruct(self, params, vectors: jax.Array) -> jax.Array:
        """``decode(encode(vectors))``: ``[batch, P]`` -> ``[batch, P]``."""
        return self.decode(params, self.encode(params, vectors))

    def section_errors(self, reconstruction: jax.Array, target: jax.Array) -> dict[str, jax.Array]:
        """Mean squared error per section, ``{name: scalar float32}``, of ``[batch, P]`` arrays."""
        pairs = zip(self.layout.names, self.layout.split(reconstruction), self.layout.split(target), strict=True)
        return {name: jnp.mean(jnp.square(jnp.asarray(got, jnp.float32) - jnp.asarray(want, jnp.float32)))
                for name, got, want in pairs}
