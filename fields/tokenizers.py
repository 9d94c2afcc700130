"""Weight tokenizers: float32 weight vectors <-> integer token sequences, each with its inverse.

Every tokenizer maps ``weights float32 [..., P]`` to ``tokens int32 [..., T]`` with
``T = P * tokens_per_weight`` and back, vectorised in NumPy:

- ``fp16``: the IEEE binary16 bit pattern of each weight (vocab 65536, one token per weight).
  Round to nearest, ties to even. Finite values beyond the float16 range saturate at ±65504
  (they never become ±inf). Decoding is exact for float16-representable values.
- ``fp8_e4m3``: OCP FP8 E4M3FN (sign, 4 exponent bits with bias 7, 3 mantissa bits; subnormals;
  no infinities; ``S.1111.111`` is NaN; largest normal 448). Round to nearest, ties to even;
  values beyond ±448 saturate at ±448, so finite inputs never produce a NaN code (vocab 256).
- ``bf16``: bfloat16 (round to nearest even from float32) as TWO tokens per weight, the high
  byte then the low byte of its 16 bits (vocab 256). Finite values that would round past the
  bfloat16 range saturate at ±3.3895e38.
- ``uniform``: ``bits``-bit uniform quantisation (2..16 bits, vocab ``2**bits``) with a stored
  ``[min, max]`` range per section of the param map; ``decode(encode(x))`` is within half a step
  of ``x`` for in-range values, and out-of-range values clip to the range.

Conventions:

- ``encode`` returns int32 tokens (room for special tokens such as a start token
  ``vocab_size`` without wrapping, the pitfall of uint8 storage); ``storage_dtype`` is the
  smallest unsigned type holding ``[0, vocab_size)``, used on disk.
- Special tokens are never produced by ``encode`` and are rejected by ``decode``: models add and
  strip them.
- Non-finite inputs (NaN, ±inf) make ``encode`` raise ``ValueError``: a field with such weights
  diverged and must be filtered out, and a NaN code in the data would poison the vocabulary.
- ±0 keep their sign in the floating-point tokenizers (``-0.0`` has its own code).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fields.weights import ParamEntry, param_count, param_map_from_json, param_map_to_json, section_slices

FP16_MAX = 65504.0
FP8_E4M3_MAX = 448.0
BF16_MAX = float(np.array(0x7F7F0000, np.uint32).view(np.float32))  # 3.3895314e38
TOKENIZER_NAMES = ("fp16", "fp8_e4m3", "bf16", "uniform")


def _fp8_e4m3_magnitudes() -> np.ndarray:
    """The 127 non-negative finite E4M3FN values, indexed by code ``0x00..0x7E`` (increasing)."""
    codes = np.arange(127)
    exponent = codes >> 3
    mantissa = (codes & 7).astype(np.float64)
    subnormal = mantissa / 8.0 * 2.0**-6
    normal = (1.0 + mantissa / 8.0) * np.exp2(exponent.astype(np.float64) - 7.0)
    return np.where(exponent == 0, subnormal, normal)


FP8_E4M3_MAGNITUDES = _fp8_e4m3_magnitudes()  # [127] float64, exactly representable in float32
FP8_E4M3_MIDPOINTS = (FP8_E4M3_MAGNITUDES[:-1] + FP8_E4M3_MAGNITUDES[1:]) / 2.0  # [126], exact
FP8_E4M3_NAN_CODES = (0x7F, 0xFF)


def _check_finite(weights: np.ndarray, name: str) -> np.ndarray:
    weights = np.asarray(weights, np.float32)
    if not np.all(np.isfinite(weights)):
        bad = int(np.size(weights) - np.count_nonzero(np.isfinite(weights)))
        raise ValueError(f"{name}: {bad} non-finite weight(s) (NaN/inf); filter diverged fields before tokenizing")
    return weights


class Tokenizer:
    """Base class: ``encode [..., P] -> int32 [..., T]``, ``decode [..., T] -> float32 [..., P]``."""

    name: str = ""
    vocab_size: int = 0
    tokens_per_weight: int = 1

    @property
    def storage_dtype(self) -> np.dtype:
        """Smallest unsigned dtype holding every token (uint8, uint16, else int32)."""
        if self.vocab_size <= 1 << 8:
            return np.dtype(np.uint8)
        if self.vocab_size <= 1 << 16:
            return np.dtype(np.uint16)
        return np.dtype(np.int32)

    def num_tokens(self, num_weights: int) -> int:
        return num_weights * self.tokens_per_weight

    def encode(self, weights: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "vocab_size": self.vocab_size, "tokens_per_weight": self.tokens_per_weight}

    def to_json(self) -> str:
        return json.dumps(self.spec())

    def _check_tokens(self, tokens: np.ndarray) -> np.ndarray:
        tokens = np.asarray(tokens)
        if not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"{self.name}: tokens must be integers, got {tokens.dtype}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(
                f"{self.name}: tokens outside [0, {self.vocab_size}) (strip special tokens before decoding)"
            )
        if tokens.ndim < 1 or tokens.shape[-1] % self.tokens_per_weight:
            raise ValueError(f"{self.name}: last axis {tokens.shape} is not a multiple of {self.tokens_per_weight}")
        return tokens.astype(np.int64)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.to_json()})"


class FP16Tokenizer(Tokenizer):
    """IEEE binary16 bits as tokens (vocab 65536); saturates at ±65504."""

    name = "fp16"
    vocab_size = 1 << 16

    def encode(self, weights: np.ndarray) -> np.ndarray:
        weights = _check_finite(weights, self.name)
        half = np.clip(weights, -FP16_MAX, FP16_MAX).astype(np.float16)  # numpy rounds to nearest even
        return half.view(np.uint16).astype(np.int32)

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        tokens = self._check_tokens(tokens)
        return tokens.astype(np.uint16).view(np.float16).astype(np.float32)


class FP8E4M3Tokenizer(Tokenizer):
    """OCP FP8 E4M3FN codes as tokens (vocab 256); saturates at ±448, never emits the NaN codes."""

    name = "fp8_e4m3"
    vocab_size = 1 << 8

    def encode(self, weights: np.ndarray) -> np.ndarray:
        weights = _check_finite(weights, self.name)
        magnitude = np.abs(weights).astype(np.float64)
        # Nearest of the bracketing codes lo = hi - 1 and hi (by the exact midpoint), ties to the even code.
        high = np.clip(np.searchsorted(FP8_E4M3_MAGNITUDES, magnitude, side="left"), 1, 126)
        low = high - 1
        midpoint = FP8_E4M3_MIDPOINTS[low]
        tie_choice = np.where(low % 2 == 0, low, high)
        code = np.where(magnitude < midpoint, low, np.where(magnitude > midpoint, high, tie_choice))
        code = np.where(magnitude >= FP8_E4M3_MAX, 126, code)  # saturate (beyond 464 E4M3FN would be NaN)
        sign = np.signbit(weights).astype(np.int64) << 7
        return (code | sign).astype(np.int32)

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        tokens = self._check_tokens(tokens)
        magnitude_code = tokens & 0x7F
        values = FP8_E4M3_MAGNITUDES[np.minimum(magnitude_code, 126)]
        values = np.where(magnitude_code == 0x7F, np.nan, values)
        return np.where(tokens & 0x80, -values, values).astype(np.float32)


class BF16Tokenizer(Tokenizer):
    """bfloat16 as two byte tokens per weight, ``[high byte, low byte]`` (vocab 256)."""

    name = "bf16"
    vocab_size = 1 << 8
    tokens_per_weight = 2

    @staticmethod
    def to_bits(weights: np.ndarray) -> np.ndarray:
        """float32 ``[...]`` -> bfloat16 bit patterns uint32 ``[...]`` (round to nearest even, saturating)."""
        clipped = np.clip(np.asarray(weights, np.float32), -BF16_MAX, BF16_MAX)
        bits = clipped.view(np.uint32)
        rounding = np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
        return (bits + rounding) >> np.uint32(16)

    def encode(self, weights: np.ndarray) -> np.ndarray:
        weights = _check_finite(weights, self.name)
        bits = self.to_bits(weights).astype(np.int32)
        pairs = np.stack([bits >> 8, bits & 0xFF], axis=-1)
        return pairs.reshape(weights.shape[:-1] + (2 * weights.shape[-1],)) if weights.ndim else pairs

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        tokens = self._check_tokens(tokens)
        pairs = tokens.reshape(tokens.shape[:-1] + (tokens.shape[-1] // 2, 2))
        bits = ((pairs[..., 0] << 8) | pairs[..., 1]).astype(np.uint32) << np.uint32(16)
        return bits.view(np.float32)


class UniformTokenizer(Tokenizer):
    """``bits``-bit uniform quantisation with a ``[min, max]`` range per section.

    Code ``q`` of a weight ``x`` in section ``s`` with range ``[lo, hi]`` is
    ``round((clip(x, lo, hi) - lo) / step)`` with ``step = (hi - lo) / (2**bits - 1)`` (round half to
    even, computed in float64); it decodes to ``lo + q * step``. A section with ``hi == lo`` has every
    code 0. Tokens -> weights -> tokens is exact while ``step`` is well above the float32 spacing of
    the range's values (always, for ranges of normalised or typical weights).

    Args:
        bits: 2..16.
        ranges: ``{section: (min, max)}``; with ``param_map=None`` a single ``"all"`` section.
        param_map: the layout of the weight vectors (sections come from it).
    """

    name = "uniform"

    def __init__(
        self,
        bits: int,
        ranges: Mapping[str, Sequence[float]],
        param_map: Sequence[ParamEntry] | None = None,
    ):
        if not 2 <= int(bits) <= 16:
            raise ValueError(f"uniform tokenizer bits must be in [2, 16], got {bits}")
        self.bits = int(bits)
        self.vocab_size = 1 << self.bits
        self.param_map = tuple(param_map) if param_map is not None else None
        self.ranges = {str(section): (float(lo), float(hi)) for section, (lo, hi) in ranges.items()}
        sections = list(section_slices(self.param_map)) if self.param_map is not None else ["all"]
        missing = [section for section in sections if section not in self.ranges]
        if missing:
            raise ValueError(f"uniform tokenizer: no range for section(s) {missing}")
        for section, (lo, hi) in self.ranges.items():
            if not (np.isfinite(lo) and np.isfinite(hi) and lo <= hi):
                raise ValueError(f"uniform tokenizer: bad range for section {section!r}: [{lo}, {hi}]")
        self._column_lo, self._column_step = self._column_ranges()

    @classmethod
    def from_matrix(
        cls, bits: int, matrix: np.ndarray, param_map: Sequence[ParamEntry] | None = None
    ) -> UniformTokenizer:
        """Ranges = per-section min and max of a dataset matrix ``[N, P]``."""
        return cls(bits, section_ranges(matrix, param_map), param_map)

    def _column_ranges(self) -> tuple[np.ndarray | float, np.ndarray | float]:
        levels = float(self.vocab_size - 1)
        if self.param_map is None:
            lo, hi = self.ranges["all"]
            return lo, (hi - lo) / levels
        total = param_count(self.param_map)
        column_lo = np.empty(total, np.float64)
        column_step = np.empty(total, np.float64)
        for section, indices in section_slices(self.param_map).items():
            lo, hi = self.ranges[section]
            column_lo[indices] = lo
            column_step[indices] = (hi - lo) / levels
        return column_lo, column_step

    def _check_width(self, width: int) -> None:
        if self.param_map is not None and width != param_count(self.param_map):
            raise ValueError(f"uniform: last axis {width} does not match the param map's {param_count(self.param_map)}")

    def encode(self, weights: np.ndarray) -> np.ndarray:
        weights = _check_finite(weights, self.name)
        self._check_width(weights.shape[-1])
        step = self._column_step
        safe_step = np.where(np.asarray(step) > 0, step, 1.0)
        scaled = (weights.astype(np.float64) - self._column_lo) / safe_step
        codes = np.clip(np.rint(scaled), 0, self.vocab_size - 1)
        return np.where(np.asarray(step) > 0, codes, 0).astype(np.int32)

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        tokens = self._check_tokens(tokens)
        self._check_width(tokens.shape[-1])
        return (self._column_lo + tokens.astype(np.float64) * self._column_step).astype(np.float32)

    def step_sizes(self) -> dict[str, float]:
        """``{section: quantisation step}``."""
        return {section: (hi - lo) / (self.vocab_size - 1) for section, (lo, hi) in self.ranges.items()}

    def spec(self) -> dict[str, Any]:
        spec = super().spec()
        spec.update(bits=self.bits, ranges={section: list(bounds) for section, bounds in self.ranges.items()})
        spec["param_map"] = json.loads(param_map_to_json(self.param_map)) if self.param_map is not None else None
        return spec


def section_ranges(matrix: np.ndarray, param_map: Sequence[ParamEntry] | None = None) -> dict[str, tuple[float, float]]:
    """``{section: (min, max)}`` of a matrix ``[N, P]`` (``{"all": ...}`` without a param map)."""
    matrix = np.asarray(matrix, np.float32)
    if param_map is None:
        groups = {"all": slice(None)}
    else:
        groups = section_slices(param_map)
    ranges = {}
    for section, indices in groups.items():
        block = matrix[..., indices]
        if block.size == 0:
            ranges[section] = (0.0, 0.0)
        else:
            ranges[section] = (float(np.min(block)), float(np.max(block)))
    return ranges


def merge_ranges(*parts: Mapping[str, Sequence[float]]) -> dict[str, tuple[float, float]]:
    """Union of several ``{section: (min, max)}`` (e.g. one per shard)."""
    merged: dict[str, tuple[float, float]] = {}
    for part in parts:
        for section, (lo, hi) in part.items():
            if section in merged:
                merged[section] = (min(merged[section][0], lo), max(merged[section][1], hi))
            else:
                merged[section] = (float(lo), float(hi))
    return merged


def make_tokenizer(
    name: str,
    bits: int | None = None,
    param_map: Sequence[ParamEntry] | None = None,
    ranges: Mapping[str, Sequence[float]] | None = None,
) -> Tokenizer:
    """Builds a tokenizer by name; ``uniform`` needs ``bits`` and ``ranges`` (``section_ranges`` of
    the data, or ``UniformTokenizer.from_matrix``)."""
    if name == "fp16":
        return FP16Tokenizer()
    if name == "fp8_e4m3":
        return FP8E4M3Tokenizer()
    if name == "bf16":
        return BF16Tokenizer()
    if name == "uniform":
        if bits is None or ranges is None:
            raise ValueError("the uniform tokenizer needs bits and ranges")
        return UniformTokenizer(bits, ranges, param_map)
    raise ValueError(f"unknown tokenizer {name!r}; choose one of {TOKENIZER_NAMES}")


def tokenizer_from_json(text: str | bytes | Mapping[str, Any]) -> Tokenizer:
    """Inverse of ``Tokenizer.to_json`` (also accepts the decoded dict)."""
    spec = json.loads(text) if isinstance(text, str | bytes) else dict(text)
    name = spec.get("name")
    if name == "uniform":
        try:
            param_map = param_map_from_json(spec["param_map"]) if spec.get("param_map") is not None else None
            return UniformTokenizer(int(spec["bits"]), spec["ranges"], param_map)
        except (KeyError, TypeError) as error:
            raise ValueError(f"malformed uniform tokenizer spec: {error!r}") from None
    return make_tokenizer(str(name))
