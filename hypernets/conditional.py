"""HyperFields-style conditional hypernetwork: a condition -> image or NeRF field weights in one forward pass.

    python -m hypernets.conditional --make-teachers 512 --size 16 --workdir runs/conditional --preset cpu
    python -m hypernets.conditional --data data/fields/primitives --workdir runs/conditional-label \
--condition label --preset cpu
    python -m scripts.make_scenes --out data/scenes1 --num-scenes 64 --num-objects 1 --resolution 32 \
--train-views 12 --test-views 2 --val-views 0
    python -m fields.encode_dataset --source scenes:data/scenes1 --out data/fields/scenes1 --preset tiny
    python -m hypernets.conditional --data data/fields/scenes1 --workdir runs/conditional-nerf --preset nerf-cpu

The hypernetwork (``hypernets.models.conditional_hypernet``; variants ``static`` and ``dynamic``, see
there) maps a condition -- a class label, an attribute set (shape + colour of a 2D primitive) or a
caption read by a bag-of-words encoder learned from the dataset's own captions -- optionally with the
primitive's layout (centre, size, rotation), to the weights of an Instant-NGP image field.

Training is distillation from teacher fields: every step samples ``pixels_per_field`` random pixel
centres per field of the batch, renders the generated (student) field and the teacher field there
and takes the mean squared difference (the render loss), plus ``weight_loss`` times the mean squared
error of the normalised weights (optional; MLP permutation symmetry makes exact weights a poor target).

NeRF teachers (``--data`` of ``ngp_nerf`` fields written by ``fields.encode_dataset --source scenes:DIR``
from scenes of ``scripts.make_scenes``): the scene folders are found through the dataset's ``source``;
each scene's ``scene.json`` gives the caption, and its first object the attributes (shape, colour) and
the layout (position, size, rotation; ``--num-objects 1`` scenes are the intended case). The render
loss is taken on ``rays_per_field`` random rays per field through random pixels of the scene's training
cameras: both fields are volume-rendered with the NeRF's own marching step and compositing
(``fields.rendering.volume``, pure JAX) over a random background colour per ray; the teacher only in the
cells its occupancy grid marks (``nerf_bitfield``: the grid rebuilt from the field's own density, as the
datasets do not store grids), the student at every marching sample, so it also learns to be empty where
the teacher is. Every NeRF render of the evaluation uses the same renderer with the field's own rebuilt
grid (``render_rows``); PSNRs are against the scenes' true test views over white (``eval_views`` of them).

Teachers: ``--data FIELDS`` (a dataset made by ``python -m fields.encode_dataset``; label = shape for
``procedural:primitives``, whose attributes, captions and layouts are recovered from the source ids),
or ``--make-teachers N --size S``, which fits N procedural primitives itself and writes them with
``shape``, ``colour``, ``caption`` and layout columns to ``W/teachers/teachers.parquet``.

Zero-shot test: colour-shape pairs selected by a deterministic rule (``pair_is_held_out``) are held
out of training. After training, the fields of held-out items are generated in one forward pass and
scored by render PSNR against the true procedural images or scene test views (beside two baselines
that ignore the condition: the mean training render and the best single training teacher); then each
is finetuned with the teacher's own fitting step (``fields.image_fitting.train_chunk_function``, or the
vmapped ``fields.nerf_fitting.make_train_chunk`` with its occupancy grid) from the generated weights and
from scratch, counting the steps to reach the teacher's PSNR (capped at the teacher's step count).
"From scratch" starts from the teachers' own initial weights (their ``init_seed`` column: one shared
init for ``--make-teachers`` and ``encode_dataset --init shared``), i.e. it repeats the teacher's fit;
both runs sample pixels/rays with the same seeds (the teacher's seed + 1,000,003).
``W/zero_shot.json`` holds the numbers, ``W/zero_shot.png`` rows of true | generated | teacher.

A run is a config and a work directory (``W/config.json``); rerunning the same command resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fields.cli import ArgumentParser, UserError, prepare_workdir, run_main
from fields.config import check_run_config, config_to_dict, config_to_json
from fields.files import write_json
from fields.metrics import batch_psnr
from fields.weights import NORMALIZATION_MODES, ParamEntry, matrix_to_params, param_count, stacked_params_to_matrix
from hypernets.augment import PROCEDURAL_SOURCE, procedural_item, stored_fit_config
from hypernets.loop import LoopConfig, add_loop_arguments
from hypernets.models.conditional_hypernet import (
    CONDITION_KEYS,
    CONDITION_KINDS,
    FIRST_WORD,
    IMAGE_CHAINS,
    LAYOUT_HARMONICS,
    PAD_WORD,
    UNKNOWN_WORD,
    VARIANTS,
    ConditionalHypernet,
    ConditionSpec,
    TensorSpec,
    count_parameters,
    denormalize,
    kernel_chains,
    tensor_specs,
    vector_to_field_params,
)
from hypernets.runs import read_saved_run, rerun_free_fields, resolve_run_config, write_run

SECTION = "conditional"
PROGRAM = "hypernets.conditional"
TEACHERS_DIRECTORY = "teachers"
TEACHERS_SHARD = "teachers.parquet"
LAYOUT_COLUMNS = ("centre_x", "centre_y", "radius", "angle")
FIELDS_PER_FIT = 256
BASELINE_ROWS = 256  # training teachers the condition-free baselines of the zero-shot report use
NERF_BASELINE_ROWS = 16  # the same for NeRF teachers (each is rendered at every held-out item's cameras)
IMAGE_KIND = "ngp_image"
NERF_KIND = "ngp_nerf"
NERF_SAMPLES_PER_CALL = 1 << 19  # fields x rays x marching steps evaluated in one NeRF render call
FRESH_SEED_OFFSET = 1_000_003  # finetuning samples pixels/rays with the teacher's seed + this
# Fields that may differ between runs in one work directory (evaluation extent, logging, devices).
RERUN_FREE_FIELDS = ("zero_shot_items", "finetune_check_every", "loop.wandb", "loop.num_devices")


@dataclasses.dataclass(frozen=True)
class ConditionalConfig:
    """A conditional hypernetwork, its distillation objective and its zero-shot test.

    Attributes:
        loop: the training loop (steps, batch size, optimiser, EMA, checkpoints).
        condition: ``"label"``, ``"attributes"`` (shape + colour), ``"caption"`` (bag of words) or
            ``"text"`` (a pretrained offline sentence encoder, the ``[text]`` extra).
        layout: also condition on the primitive's centre, size and rotation (procedural primitives
            vary in all three, so without them a condition names a family of images, not one image).
        variant: ``"static"`` (context -> all weights) or ``"dynamic"`` (MLP layers generated one
            after the other from the activation statistics of the previous generated layer).
        width, depth: hypernetwork width and residual trunk blocks.
        chunk_size, chunk_embedding: hash-table chunk length and chunk position-embedding size.
        probe_grid: probe positions per axis of the dynamic variant.
        pixels_per_field: random pixel centres rendered per field and step for the render loss (images).
        rays_per_field: random rays rendered per field and step for the render loss (NeRFs).
        eval_views: test views of each scene scored (NeRFs).
        weight_loss: weight of the normalised-weight regression term (0: render loss only).
        normalization: per-``"tensor"`` or per-``"section"`` normalisation of the generated weights.
        holdout_modulus: colour-shape pair ``(s, c)`` (indices in ``SHAPES_2D`` / ``PALETTE``) is held
            out when ``(3 * s + c) % holdout_modulus == 0``; datasets without attributes hold out a
            ``1 / holdout_modulus`` fraction of sources by hash instead.
        zero_shot_items: held-out items generated, scored and finetuned at the end.
        finetune_check_every: finetuning steps between PSNR checks (the granularity of step counts).
        backend: hash-grid backend for teachers, students and finetuning (``jax``, ``kernel``, ``auto``).
    """

    loop: LoopConfig = dataclasses.field(default_factory=LoopConfig)
    condition: str = "attributes"
    layout: bool = True
    variant: str = "dynamic"
    width: int = 256
    depth: int = 2
    chunk_size: int = 64
    chunk_embedding: int = 32
    probe_grid: int = 8
    pixels_per_field: int = 256
    rays_per_field: int = 128
    eval_views: int = 2
    weight_loss: float = 0.0
    normalization: str = "tensor"
    holdout_modulus: int = 7
    zero_shot_items: int = 16
    finetune_check_every: int = 10
    backend: str = "jax"

    def __post_init__(self):
        from fields.models.hash_grid import BACKENDS

        for name in ("width", "depth", "chunk_size", "chunk_embedding", "probe_grid", "pixels_per_field",
                     "rays_per_field", "eval_views", "finetune_check_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.zero_shot_items < 0:
            raise ValueError(f"zero_shot_items must be >= 0, got {self.zero_shot_items}")
        if self.holdout_modulus < 2:
            raise ValueError(f"holdout_modulus must be >= 2, got {self.holdout_modulus}")
        if self.weight_loss < 0:
            raise ValueError(f"weight_loss must be >= 0, got {self.weight_loss}")
        choices = {"condition": CONDITION_KINDS, "variant": VARIANTS, "normalization": NORMALIZATION_MODES,
                   "backend": BACKENDS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")


PRESETS: dict[str, ConditionalConfig] = {
    # Test-sized: a few dozen steps on ~12 teacher fields of 8x8 or 16x16, seconds on a CPU; the render loss falls.
    #   python -m hypernets.conditional --make-teachers 12 --size 8 --teacher-steps 30 --workdir W --preset tiny
    "tiny": ConditionalConfig(
        loop=LoopConfig(steps=30, batch_size=4, learning_rate=3e-3, warmup_steps=2, ema_decay=0.0, log_every=5,
                        checkpoint_every=100),
        width=32, depth=1, chunk_size=32, chunk_embedding=8, probe_grid=4, pixels_per_field=64,
        holdout_modulus=4, zero_shot_items=2, finetune_check_every=5),
    # CPU-sized (minutes on 2 cores): 512 teachers of 16x16 (ngp "small" fields, ~1.6k weights each).
    # Expected: held-out render PSNR above both condition-free baselines of zero_shot.json and fewer finetuning
    # steps from the generated weights than from scratch; not yet measured.
    #   python -m hypernets.conditional --make-teachers 512 --size 16 --workdir runs/conditional-cpu --preset cpu
    "cpu": ConditionalConfig(
        loop=LoopConfig(steps=3000, batch_size=32, learning_rate=1e-3, warmup_steps=100, ema_decay=0.999,
                        log_every=50, checkpoint_every=500),
        width=256, depth=2, chunk_size=64, chunk_embedding=32, probe_grid=8, pixels_per_field=256,
        zero_shot_items=16, finetune_check_every=10),
    # Test-sized NeRF distillation: a few steps on ~a dozen tiny-preset NeRF teachers of 16x16 procedural scenes.
    #   python -m hypernets.conditional --data FIELDS --workdir W --preset nerf-tiny
    "nerf-tiny": ConditionalConfig(
        loop=LoopConfig(steps=12, batch_size=4, learning_rate=3e-3, warmup_steps=2, ema_decay=0.0, log_every=4,
                        checkpoint_every=100),
        width=32, depth=1, chunk_size=64, chunk_embedding=8, probe_grid=2, rays_per_field=32, eval_views=1,
        holdout_modulus=4, zero_shot_items=2, finetune_check_every=5),
    # The image part of scripts/bench_conditional.py (2 CPU cores, ~6 min of training): 2048 shared-init teachers
    # of 16x16. Tuning (BENCHMARKS.md): 384 teachers -> 2.5x fewer finetuning steps; 2048 -> 4.8x at 3000 steps,
    # 5.6x at 5000; weight_loss 0 collapsed (zero gradients), 0.3 gave 5.4x at 3000 steps.
    #   python -m hypernets.conditional --make-teachers 2048 --size 16 --workdir W --preset bench-image
    "bench-image": ConditionalConfig(
        loop=LoopConfig(steps=5000, batch_size=32, learning_rate=1e-3, warmup_steps=100, ema_decay=0.995,
                        log_every=50, checkpoint_every=500),
        width=256, depth=2, chunk_size=64, chunk_embedding=32, probe_grid=8, pixels_per_field=256,
        weight_loss=0.1, zero_shot_items=16, finetune_check_every=5),
    # The NeRF part of scripts/bench_conditional.py (2 CPU cores): 48 single-object 32x32 scenes, tiny NeRFs.
    #   python -m hypernets.conditional --data FIELDS --workdir W --preset bench-nerf
    # (400 steps: 16.7 dB zero-shot, below the condition-free baselines; 2.7x fewer finetuning steps.)
    "bench-nerf": ConditionalConfig(
        loop=LoopConfig(steps=800, batch_size=8, learning_rate=1e-3, warmup_steps=40, ema_decay=0.99,
                        log_every=25, checkpoint_every=200),
        width=128, depth=2, chunk_size=64, chunk_embedding=16, probe_grid=4, rays_per_field=128, eval_views=2,
        weight_loss=0.1, zero_shot_items=8, finetune_check_every=10),
    # One GPU: thousands of 28x28 teachers. Expected (not measured: it needs a GPU and none has been lent):
    # at least the "bench-image" preset's 22.9 dB zero-shot and 5.6x fewer finetuning steps.
    #   python -m hypernets.conditional --make-teachers 4096 --size 28 --workdir runs/conditional --preset default
    "default": ConditionalConfig(
        loop=LoopConfig(steps=30000, batch_size=64, learning_rate=5e-4, warmup_steps=1000, ema_decay=0.999,
                        log_every=100, checkpoint_every=2500),
        width=512, depth=4, chunk_size=128, chunk_embedding=64, probe_grid=16, pixels_per_field=512,
        zero_shot_items=32, finetune_check_every=10),
}


# ------------------------------------------------------------------------------------------- teachers


@dataclasses.dataclass(frozen=True)
class TeacherSpec:
    """What ``--make-teachers`` fits: ``num`` procedural primitives of ``size``x``size`` (generator ``seed``),
    ngp fields of the image preset ``preset`` for ``steps`` steps (0: the preset's). With ``shared_init``
    every teacher starts from the same initial weights (seeded by ``seed``), which aligns the teachers'
    weight spaces (a hypernetwork regresses aligned weights more easily); else teacher ``i`` from ``seed + i``."""

    num: int
    size: int = 16
    steps: int = 0
    preset: str = "small"
    seed: int = 0
    shared_init: bool = True


def primitive_description(index: int, seed: int) -> dict[str, Any]:
    """Attributes and layout of procedural primitive ``index`` of generator ``seed``.

    The layout (``centre_x``, ``centre_y``, ``radius`` as fractions of the image side, ``angle`` in
    radians; x to the right, y down) is recovered by replaying the random draws of
    ``fields.data.procgen_2d.primitive_image``, which does not return it; the replayed shape and colour
    are checked against the image's attributes.

    Returns:
        ``{"shape", "colour", "caption", "label", "centre_x", "centre_y", "radius", "angle"}``.
    """
    from fields.data.procgen_2d import SHAPES_2D, primitive_image
    from fields.data.procgen_3d import PALETTE

    rng = np.random.default_rng([seed, index])
    label = int(rng.integers(len(SHAPES_2D)))
    colour = list(PALETTE)[int(rng.integers(len(PALETTE)))]
    radius = float(rng.uniform(0.22, 0.4))
    centre_x = float(rng.uniform(radius, 1.0 - radius))
    centre_y = float(rng.uniform(radius, 1.0 - radius))
    angle = float(rng.uniform(0.0, 2.0 * math.pi))
    _, image_label, attributes = primitive_image(index, seed, 4)
    if image_label != label or attributes["colour"] != colour:
        raise UserError("fields.data.procgen_2d.primitive_image changed its random draws; update "
                        "hypernets.conditional.primitive_description")
    return {"shape": attributes["shape"], "colour": colour, "caption": attributes["caption"], "label": label,
            "centre_x": centre_x, "centre_y": centre_y, "radius": radius, "angle": angle}


def layout_features(layouts: np.ndarray) -> np.ndarray:
    """``[N, 4]`` (centre_x, centre_y, radius, angle) -> ``[N, LAYOUT_FEATURES]`` float32: centre and radius,
    then ``cos(k * angle), sin(k * angle)`` for ``k = 1..LAYOUT_HARMONICS`` (covers 2- to 5-fold symmetric shapes)."""
    layouts = np.asarray(layouts, np.float64)
    harmonics = np.arange(1, LAYOUT_HARMONICS + 1, dtype=np.float64)
    angles = layouts[:, 3:4] * harmonics[None, :]
    return np.concatenate([layouts[:, :3], np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)


def make_teachers(directory: str, spec: TeacherSpec, backend: str, progress: bool = True) -> str:
    """Fits ``spec.num`` procedural primitives with ``fields.image_fitting.fit_image_batch`` and writes them
    as a dataset of fields with ``shape``, ``colour``, ``caption`` and layout columns; returns its path.
    An existing shard (a resumed run) is kept."""
    from fields.config import resolve_preset
    from fields.data.procgen_2d import primitive_image
    from fields.field_datasets import write_shard
    from fields.image_fitting import PRESETS as IMAGE_PRESETS
    from fields.image_fitting import fit_image_batch
    from fields.weights import param_map

    path = os.path.join(directory, TEACHERS_SHARD)
    if os.path.exists(path):
        return path
    overrides = {"backend": backend, "steps": spec.steps or None}
    fit_config = resolve_preset(IMAGE_PRESETS, spec.preset, overrides, "ngp image preset")
    fit_config = dataclasses.replace(fit_config, field=dataclasses.replace(fit_config.field, output_dim=3))
    descriptions = [primitive_description(index, spec.seed) for index in range(spec.num)]
    images = np.stack([primitive_image(index, spec.seed, spec.size)[0] for index in range(spec.num)])
    field_seeds = [spec.seed + index for index in range(spec.num)]
    init_seeds = [spec.seed] * spec.num if spec.shared_init else field_seeds
    matrices, psnrs, pmap = [], [], None
    for start in range(0, spec.num, FIELDS_PER_FIT):
        stop = min(start + FIELDS_PER_FIT, spec.num)
        if progress:
            print(f"fitting teachers {start}..{stop - 1} of {spec.num} ({fit_config.steps} steps each)")
        try:
            result = fit_image_batch(images[start:stop], fit_config, field_seeds[start:stop], init_seeds[start:stop])
        except FloatingPointError as error:
            raise UserError(f"teacher fitting failed: {error}") from None
        if pmap is None:
            pmap = param_map(jax.tree_util.tree_map(lambda leaf: np.asarray(leaf[0]), result.params))
        matrices.append(stacked_params_to_matrix(result.params, pmap))
        psnrs.extend(float(value) for value in result.psnr)
    columns = {
        "source_id": [f"primitives/{spec.seed}/{index}" for index in range(spec.num)],
        "label": [item["label"] for item in descriptions],
        "psnr": psnrs,
        "seed": field_seeds,
        "init_seed": init_seeds,
        "steps": [fit_config.steps] * spec.num,
        **{name: [item[name] for item in descriptions] for name in ("shape", "colour", "caption")},
        **{name: [float(item[name]) for item in descriptions] for name in LAYOUT_COLUMNS},
    }
    extra = {"image_height": spec.size, "image_width": spec.size, "source": PROCEDURAL_SOURCE,
             "fit": config_to_dict(fit_config), "generator": PROGRAM}
    write_shard(path, np.concatenate(matrices), columns, fit_config.field.field_kind,
                config_to_dict(fit_config.field), pmap, extra_schema_metadata=extra)
    print(f"wrote {spec.num} teacher fields to {path} (mean PSNR {np.mean(psnrs):.2f} dB)")
    return path


@dataclasses.dataclass
class TeacherData:
    """The teacher fields of a run and what is known about each (rows in dataset order).

    Attributes:
        path: the dataset.
        matrix: ``[N, P]`` raw teacher weights.
        param_map: their layout.
        field_config: the shared ``NGPFieldConfig`` (images) or ``NeRFFieldConfig`` (NeRFs).
        fit_config: the ``ImageFitConfig`` / ``NeRFFitConfig`` that fitted them (finetuning reuses it).
        height, width: image size (NeRFs: of the test views).
        source_ids: ``[N]``.
        labels: ``[N]`` int32 (-1 unknown).
        shapes, colours, captions: ``[N]`` strings, or None when unknown.
        layouts: images: ``[N, 4]`` (centre_x, centre_y, radius, angle); NeRFs: ``[N, 15]`` (the first
            object's position, half extents and row-major rotation matrix); or None.
        procedural: ``[N]`` ``(generator seed, index)`` of each row's procedural image, or None.
        steps: ``[N]`` int64 steps each teacher was fitted for.
        seeds: ``[N]`` int64 each teacher's (sampling) seed.
        init_seeds: ``[N]`` int64 seed of each teacher's initial weights.
        field_kind: ``ngp_image`` or ``ngp_nerf``.
        scenes: NeRFs: the scenes' cameras and true test views (``SceneViews``); else None.
    """

    path: str
    matrix: np.ndarray
    param_map: list[ParamEntry]
    field_config: Any
    fit_config: Any
    height: int
    width: int
    source_ids: list[str]
    labels: np.ndarray
    shapes: list[str] | None
    colours: list[str] | None
    captions: list[str] | None
    layouts: np.ndarray | None
    procedural: list[tuple[int, int]] | None
    steps: np.ndarray
    seeds: np.ndarray
    init_seeds: np.ndarray | None = None
    field_kind: str = IMAGE_KIND
    scenes: SceneViews | None = None

    def __len__(self) -> int:
        return int(self.matrix.shape[0])

    @property
    def is_nerf(self) -> bool:
        return self.field_kind == NERF_KIND

    def layout_features(self) -> np.ndarray:
        """``[N, features]`` float32 layout inputs of the hypernetwork (images: ``layout_features``; NeRFs: the
        layouts as they are)."""
        if self.layouts is None:
            raise ValueError("no layouts")
        return self.layouts.astype(np.float32) if self.is_nerf else layout_features(self.layouts)

    def references(self, rows: np.ndarray) -> np.ndarray | None:
        """What the renders of ``rows`` are scored against: images ``[n, H, W, 3]`` (``true_images``, None when
        not procedural) or the scenes' test views over white ``[n, V, H, W, 3]``."""
        if self.is_nerf:
            return self.scenes.test_views[np.asarray(rows, np.int64)]
        return self.true_images(rows)

    def true_images(self, rows: np.ndarray) -> np.ndarray | None:
        """``[n, H, W, 3]`` procedural images of ``rows``, or None when the images are not procedural."""
        from fields.data.procgen_2d import primitive_image

        if self.procedural is None or self.is_nerf or self.height != self.width or self.field_config.output_dim != 3:
            return None
        if not len(rows):
            return np.zeros((0, self.height, self.width, 3), np.float32)
        return np.stack([primitive_image(self.procedural[row][1], self.procedural[row][0], self.height)[0]
                         for row in rows]).astype(np.float32)


def check_field_kind(kind: str, where: str) -> None:
    """One-line ``UserError`` unless ``kind`` is ``ngp_image`` or ``ngp_nerf``."""
    if kind not in (IMAGE_KIND, NERF_KIND):
        raise UserError(f"{where}: hypernets.conditional generates {IMAGE_KIND} and {NERF_KIND} fields; {kind!r} "
                        "fields are not supported yet")


def dataset_field_kind(path: str) -> str:
    """The ``field_kind`` of a dataset of fields, from its shard headers only (one-line ``UserError`` for a
    missing path, a token dataset or a file that is not a dataset of fields)."""
    import pyarrow.parquet as pq

    from fields.field_datasets import validate_shards

    shards = validate_shards(path)
    metadata = pq.read_schema(shards[0]).metadata or {}
    return metadata.get(b"field_kind", b"").decode("utf-8", "replace")


def _string_column(columns: dict, name: str, count: int) -> list[str] | None:
    if name not in columns:
        return None
    values = [("" if value is None else str(value)) for value in columns[name]]
    return values if len(values) == count and all(values) else None


def check_teacher_weights(dataset, path: str, what: str, chains: tuple[str, ...] | None = None) -> None:
    """One-line ``UserError`` unless ``dataset`` holds at least two fields of finite weights laid out as an
    Instant-NGP field (``kernel_chains``; with ``chains`` given, those MLP chains); ``what`` names the field."""
    count = len(dataset)
    if count < 2:
        raise UserError(f"{path} holds {count} field(s); distillation needs at least 2")
    total = param_count(dataset.param_map)
    try:
        found = kernel_chains(tensor_specs(dataset.param_map, np.zeros(total), np.ones(total)))
        if chains is not None and len(found) != len(chains):
            raise ValueError(f"{len(found)} MLP chain(s), expected {', '.join(chains)}")
    except ValueError as error:
        raise UserError(f"{path}: not an Instant-NGP {what} field layout ({error})") from None
    finite = np.all(np.isfinite(dataset.matrix), axis=1)
    if not np.all(finite):
        raise UserError(f"{path}: {int(np.sum(~finite))} field(s) hold NaN or infinite weights "
                        f"(first: row {int(np.flatnonzero(~finite)[0])})")


def fit_columns(columns: dict, count: int, fit_config) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(steps, seeds, init_seeds)``, each ``[N]`` int64, from the dataset's columns: unknown steps (absent or
    <= 0) are ``fit_config``'s, unknown seeds (-1) the row number, unknown init seeds each row's own seed."""
    rows = np.arange(count, dtype=np.int64)
    steps = np.asarray(columns["steps"], np.int64) if "steps" in columns else np.full(count, -1, np.int64)
    steps = np.where(steps > 0, steps, fit_config.steps)
    seeds = np.asarray(columns["seed"], np.int64) if "seed" in columns else rows
    seeds = np.where(seeds >= 0, seeds, rows)
    init_seeds = np.asarray(columns["init_seed"], np.int64) if "init_seed" in columns else seeds
    return steps, seeds, np.where(init_seeds >= 0, init_seeds, seeds)


def load_teachers(path: str, backend: str, eval_views: int = 2) -> TeacherData:
    """Reads a dataset of teacher fields and recovers what is known about each row.

    Image fields: attributes, captions and layouts come from the ``shape``/``colour``/``caption``/layout
    columns when present, else from ``primitives/SEED/INDEX`` source ids of a ``procedural:primitives``
    dataset. NeRF fields: see ``load_nerf_teachers`` (``eval_views`` test views per scene).

    Raises:
        UserError: not a dataset of fields, fields other than ``ngp_image``/``ngp_nerf``, no image size,
            fewer than two fields, or non-finite weights.
    """
    from fields.field_datasets import read_dataset
    from fields.image_fitting import field_config_from_dict
    from hypernets.rendering import image_size

    dataset = read_dataset(path)
    check_field_kind(dataset.field_kind, path)
    if dataset.field_kind == NERF_KIND:
        return load_nerf_teachers(dataset, path, backend, eval_views)
    field_config = field_config_from_dict(dataset.field_kind, dataset.field_config, f"{path}: field_config")
    height, width = image_size(dataset.metadata, path)
    count = len(dataset)
    check_teacher_weights(dataset, path, "image", IMAGE_CHAINS)
    columns = dataset.columns
    source_ids = [str(value) for value in columns.get("source_id", [""] * count)]
    labels = np.asarray(columns["label"]).astype(np.int32) if "label" in columns else np.full(count, -1, np.int32)
    procedural = None
    if dataset.metadata.get("source") == PROCEDURAL_SOURCE:
        items = [procedural_item(source_id) for source_id in source_ids]
        procedural = items if all(item is not None for item in items) else None
    descriptions = [primitive_description(index, seed) for seed, index in procedural] if procedural else None

    def described(name: str) -> list[str] | None:
        found = _string_column(columns, name, count)
        if found is None and descriptions is not None:
            found = [item[name] for item in descriptions]
        return found

    if all(name in columns for name in LAYOUT_COLUMNS):
        layouts = np.stack([np.asarray(columns[name], np.float64) for name in LAYOUT_COLUMNS], axis=1)
    elif descriptions is not None:
        layouts = np.asarray([[item[name] for name in LAYOUT_COLUMNS] for item in descriptions], np.float64)
    else:
        layouts = None
    fit_config = stored_fit_config(dataset.metadata, path, dataset.field_kind, field_config, backend)
    return TeacherData(path, dataset.matrix, list(dataset.param_map), field_config, fit_config, height, width,
                       source_ids, labels, described("shape"), described("colour"), described("caption"), layouts,
                       procedural, *fit_columns(columns, count, fit_config))


# ------------------------------------------------------------------------------------------- NeRF teachers


@dataclasses.dataclass
class SceneViews:
    """What the NeRF teachers' scenes provide (rows in dataset order).

    Attributes:
        folders: ``[N]`` scene folders.
        train_cameras, train_intrinsics: ``[N, V_train, 4, 4]`` camera-to-world, ``[N, V_train, 4]`` (fx, fy,
            cx, cy) of the training views (distillation rays go through their pixels).
        train_height, train_width: training view size.
        test_cameras, test_intrinsics: ``[N, V, 4, 4]``, ``[N, V, 4]`` of the scored test views.
        test_views: ``[N, V, H, W, 3]`` the true test views over white.
        bitfields: ``[N, cells / 8]`` uint8 occupancy of each teacher, rebuilt from its density (``nerf_grids``).
    """

    folders: list[str]
    train_cameras: np.ndarray
    train_intrinsics: np.ndarray
    train_height: int
    train_width: int
    test_cameras: np.ndarray
    test_intrinsics: np.ndarray
    test_views: np.ndarray
    bitfields: np.ndarray

    def train_splits(self, rows: np.ndarray) -> list:
        """The training splits (``SceneData``, images included) of ``rows``, read from disk."""
        from fields.data.nerf_scenes import load_scene

        return [load_scene(self.folders[int(row)], "train") for row in rows]


def _nerf_fit_config(metadata: dict, path: str, field_config, backend: str):
    """The ``NeRFFitConfig`` the teachers were fitted with: the ``fit`` entry of the schema metadata, else of
    ``field_config.json`` beside the shards; its field config is ``field_config``."""
    from fields.config import ConfigError, config_from_dict, read_config_record
    from fields.nerf_fitting import NeRFFitConfig

    values = metadata.get("fit")
    if values is None:
        folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
        manifest = read_config_record(os.path.join(folder, "field_config.json"))
        values = manifest.get("fit") if isinstance(manifest, dict) else None
    if not isinstance(values, dict):
        raise UserError(f"{path}: no NeRF fit config (a 'fit' entry in the schema metadata or in field_config.json "
                        "beside the shards, as fields.encode_dataset writes)")
    try:
        config = config_from_dict(NeRFFitConfig, values, f"{path}: fit")
    except ConfigError as error:
        raise UserError(str(error)) from None
    return dataclasses.replace(config, field=field_config, backend=backend)


def _scene_description(folder: str) -> tuple[str, str, str, np.ndarray]:
    """``(shape, colour, caption, layout [15])`` of a scene folder of ``scripts.make_scenes``: the caption of
    ``scene.json`` and its first object's shape, colour, position, half extents and rotation (row-major)."""
    path = os.path.join(folder, "scene.json")
    try:
        with open(path) as handle:
            info = json.load(handle)
        first = info["objects"][0]
        layout = np.concatenate([np.asarray(first["position"], np.float64).reshape(3),
                                 np.asarray(first["size"], np.float64).reshape(3),
                                 np.asarray(first["rotation"], np.float64).reshape(9)])
        return str(first["shape"]), str(first["colour"]), str(info.get("caption", "")), layout
    except FileNotFoundError:
        raise UserError(f"{folder}: no scene.json (NeRF teachers need the scene folders of scripts.make_scenes for "
                        "their attributes, captions and true views)") from None
    except (OSError, ValueError, KeyError, IndexError, TypeError) as error:
        raise UserError(f"{path}: unreadable scene attributes ({type(error).__name__}: {error})") from None


def load_nerf_teachers(dataset, path: str, backend: str, eval_views: int) -> TeacherData:
    """NeRF teacher fields (``fields.encode_dataset --source scenes:DIR``) with their scenes: the folders are
    ``DIR/source_id``; attributes, caption and layout come from each ``scene.json``; the first ``eval_views``
    test views (over white) are the references; every teacher's occupancy is rebuilt from its density.

    Raises:
        UserError: fewer than two fields, non-finite weights, a layout that is not an Instant-NGP NeRF's,
            a missing fit config, missing scene folders, or scenes whose splits differ in shape.
    """
    from fields.config import ConfigError, config_from_dict
    from fields.data.collection_sources import strip_family
    from fields.data.nerf_scenes import load_scene
    from fields.models.nerf import NeRFFieldConfig
    from fields.nerf_fitting import white_composite

    count = len(dataset)
    check_teacher_weights(dataset, path, "NeRF")
    try:
        field_config = config_from_dict(NeRFFieldConfig, dataset.field_config, f"{path}: field_config")
    except ConfigError as error:
        raise UserError(f"{path}: not an Instant-NGP NeRF field layout ({error})") from None
    fit_config = _nerf_fit_config(dataset.metadata, path, field_config, backend)
    source = str(dataset.metadata.get("source", ""))
    root = strip_family(source)
    if not source or not os.path.isdir(root):
        raise UserError(f"{path}: NeRF teachers need their scene folders (the dataset's source is {source!r}, not a "
                        "folder here; run from where fields.encode_dataset --source scenes:DIR was run)")
    columns = dataset.columns
    source_ids = [str(value) for value in columns.get("source_id", [""] * count)]
    folders = [os.path.join(root, source_id) for source_id in source_ids]
    shapes, colours, captions, layouts, train_splits, test_splits = [], [], [], [], [], []
    for folder in folders:
        shape, colour, caption, layout = _scene_description(folder)
        shapes.append(shape)
        colours.append(colour)
        captions.append(caption)
        layouts.append(layout)
        test_split = "test" if os.path.exists(os.path.join(folder, "transforms_test.json")) else "train"
        train_splits.append(load_scene(folder, "train"))
        test_splits.append(load_scene(folder, test_split))
    for name, splits in (("train", train_splits), ("test", test_splits)):
        sizes = {(split.height, split.width) for split in splits}
        if len(sizes) > 1 or (name == "train" and len({len(split) for split in splits}) > 1):
            raise UserError(f"{path}: the scenes' {name} splits differ in size or view count; use scenes made "
                            "with one scripts.make_scenes setting")
    views = min([eval_views] + [len(split) for split in test_splits])
    test_views = np.stack([white_composite(split.images[:views]) for split in test_splits]).astype(np.float32)
    labels = np.asarray(columns["label"]).astype(np.int32) if "label" in columns else np.full(count, -1, np.int32)
    teachers = TeacherData(
        path, dataset.matrix, list(dataset.param_map), field_config, fit_config, test_splits[0].height,
        test_splits[0].width, source_ids, labels, shapes, colours, captions, np.stack(layouts), None,
        *fit_columns(columns, count, fit_config), NERF_KIND)
    teachers.scenes = SceneViews(
        folders, np.stack([split.camera_to_world for split in train_splits]).astype(np.float32),
        np.stack([split.intrinsics for split in train_splits]).astype(np.float32), train_splits[0].height,
        train_splits[0].width, np.stack([split.camera_to_world[:views] for split in test_splits]).astype(np.float32),
        np.stack([split.intrinsics[:views] for split in test_splits]).astype(np.float32), test_views,
        nerf_grids(teachers.matrix, teachers)["bitfield"])
    return teachers


def nerf_render_rays(model, params, bitfield: jax.Array, origins: jax.Array, directions: jax.Array,
                     background: jax.Array, fit_config) -> jax.Array:
    """One NeRF's colours ``[R, 3]`` of rays ``origins, directions [R, 3]`` over ``background [R, 3]``.

    ``fields.nerf_fitting.march`` and ``shade`` with the pure-JAX marcher and compositor (so that the function
    vmaps over fields) and a sample budget of ``R * steps_per_diagonal``, which no ray can overflow: every
    sample in a cell marked in ``bitfield [cells / 8]`` is shaded. Differentiable in ``params``.
    """
    from fields.nerf_fitting import march, shade

    config = dataclasses.replace(fit_config, backend="jax")
    num_rays = origins.shape[0]
    samples = march(origins, directions, bitfield, config, num_rays * config.steps_per_diagonal)
    colour, _, _ = shade(model, params, samples, num_rays, config, background)
    return colour


def nerf_grid(model, params, fit_config) -> dict[str, jax.Array]:
    """One NeRF's occupancy grid rebuilt from its density: ``{"density": [cells], "bitfield": [cells / 8]}``.

    The optical thickness (density x marching step) is the maximum over 2^3 points per cell (at the quarter
    positions); a cell is occupied above ``min(threshold, mean)``, as ``fields.rendering.occupancy_grid.update``
    decides (the datasets do not store the grids the teachers were trained with).
    """
    from fields.models.nerf import NeRFField
    from fields.rendering import occupancy_grid

    grid = fit_config.occupancy
    corners = jnp.asarray(occupancy_grid.cell_centres(grid.resolution))  # lower corners [cells, 3]
    offsets = (np.stack(np.meshgrid(*([np.array([0.25, 0.75])] * 3), indexing="ij"), -1).reshape(-1, 3)
               / grid.resolution).astype(np.float32)
    points = (corners[:, None, :] + jnp.asarray(offsets)[None]).reshape(-1, 3)
    density = model.apply({"params": params}, points, method=NeRFField.density).reshape(-1, len(offsets))
    thickness = jnp.max(density, axis=1) * jnp.float32(fit_config.step_size)
    threshold = jnp.minimum(jnp.float32(grid.threshold), jnp.mean(thickness))
    return {"density": thickness, "bitfield": occupancy_grid.pack_bits(thickness > threshold)}


@functools.lru_cache(maxsize=8)
def _nerf_functions(fit_config, pmap: tuple[ParamEntry, ...]):
    """``(grids(matrix [n, P]) -> {density, bitfield}, render(matrix, bitfields, origins [n, C, 3], directions))``,
    jitted and vmapped over fields (colours over white)."""
    from fields.models.nerf import NeRFField

    model = NeRFField(fit_config.field, backend=fit_config.backend)
    total = param_count(pmap)
    specs = tensor_specs(pmap, np.zeros(total), np.ones(total))

    def grids(vector):
        return nerf_grid(model, vector_to_field_params(vector, specs), fit_config)

    def render(vector, bitfield, origins, directions):
        background = jnp.ones(origins.shape, jnp.float32)
        colour = nerf_render_rays(model, vector_to_field_params(vector, specs), bitfield, origins, directions,
                                  background, fit_config)
        return jnp.clip(colour, 0.0, 1.0)

    return jax.jit(jax.vmap(grids)), jax.jit(jax.vmap(render))


def nerf_grids(matrix: np.ndarray, teachers: TeacherData) -> dict[str, np.ndarray]:
    """Occupancy grids of NeRF weights ``[n, P]``: ``{"density": [n, cells], "bitfield": [n, cells / 8]}``."""
    grids, _ = _nerf_functions(teachers.fit_config, tuple(teachers.param_map))
    result = grids(jnp.asarray(matrix, jnp.float32))
    return {name: np.asarray(value) for name, value in result.items()}


def render_nerf_views(matrix: np.ndarray, teachers: TeacherData, cameras: np.ndarray, intrinsics: np.ndarray,
                      bitfields: np.ndarray | None = None) -> np.ndarray:
    """NeRF weights ``[n, P]`` rendered (each with its rebuilt occupancy grid, over white) at their own views
    ``cameras [n, V, 4, 4]``, ``intrinsics [n, V, 4]`` -> ``[n, V, H, W, 3]`` in [0, 1] (``H, W``: the test views').
    ``bitfields [n, cells / 8]``: those grids when already known (``nerf_grids`` of ``matrix``)."""
    from fields.nerf_fitting import pixel_rays

    matrix = jnp.asarray(matrix, jnp.float32)
    count, num_views = cameras.shape[:2]
    height, width = teachers.height, teachers.width
    grids, render = _nerf_functions(teachers.fit_config, tuple(teachers.param_map))
    bitfields = grids(matrix)["bitfield"] if bitfields is None else jnp.asarray(bitfields)
    pixels = np.arange(num_views * height * width)
    view_index, pixel = pixels // (height * width), pixels % (height * width)
    view_index, cols, rows = (jnp.asarray(values, jnp.int32) for values in (view_index, pixel % width, pixel // width))
    origins, directions = jax.vmap(lambda c2w, intr: pixel_rays(c2w, intr, view_index, cols, rows))(
        jnp.asarray(cameras, jnp.float32), jnp.asarray(intrinsics, jnp.float32))
    total = len(pixels)
    per_field = NERF_SAMPLES_PER_CALL // (count * teachers.fit_config.steps_per_diagonal)
    chunk = 1 << max(6, int(math.floor(math.log2(max(per_field, 1)))))
    chunk = min(chunk, 1 << int(math.ceil(math.log2(total))))
    outputs = []
    for start in range(0, total, chunk):
        index = jnp.asarray(np.minimum(np.arange(start, start + chunk), total - 1), jnp.int32)
        outputs.append(np.asarray(render(matrix, bitfields, origins[:, index], directions[:, index])))
    colours = np.concatenate(outputs, axis=1)[:, :total]
    return colours.reshape(count, num_views, height, width, 3)


def render_rows(matrix: np.ndarray, teachers: TeacherData, rows: np.ndarray, backend: str) -> np.ndarray:
    """Weights ``[n, P]`` standing for the dataset rows ``rows`` rendered as they are scored: images
    ``[n, H, W, C]`` (``render_matrix``), or NeRFs at the rows' test cameras ``[n, V, H, W, 3]``."""
    if teachers.is_nerf:
        rows = np.asarray(rows, np.int64)
        return render_nerf_views(matrix, teachers, teachers.scenes.test_cameras[rows],
                                 teachers.scenes.test_intrinsics[rows])
    return render_matrix(matrix, teachers, backend)


def field_psnr(references: np.ndarray, renders: np.ndarray) -> np.ndarray:
    """``[n]`` dB: per-image PSNR (``[n, H, W, C]``), or the mean over views of the per-view PSNR (``[n, V, H, W, C]``,
    as ``fields.nerf_fitting.evaluate_views`` scores a NeRF)."""
    references, renders = np.asarray(references), np.asarray(renders)
    if references.ndim == 5:
        count, views = references.shape[:2]
        flat = batch_psnr(references.reshape((count * views,) + references.shape[2:]),
                          renders.reshape((count * views,) + renders.shape[2:]))
        return flat.reshape(count, views).mean(axis=1)
    return batch_psnr(references, renders)


# ------------------------------------------------------------------------------------------- splits


def _attribute_index(value: str, known: list[str]) -> int:
    """Index of ``value`` in ``known``, or a stable hash for names outside it."""
    if value in known:
        return known.index(value)
    return int.from_bytes(hashlib.blake2b(value.encode(), digest_size=4).digest(), "big")


def pair_is_held_out(shape: str, colour: str, modulus: int, shapes: tuple[str, ...] | None = None) -> bool:
    """The zero-shot rule: the colour-shape pair is held out when ``(3 * s + c) % modulus == 0``, with ``s`` and
    ``c`` the indices of the shape in ``shapes`` (default ``SHAPES_2D``; NeRF scenes: ``procgen_3d.SHAPES``) and
    of the colour in ``PALETTE`` (a stable hash for other names). Every shape keeps training colours and every
    colour training shapes (for ``modulus >= 2``)."""
    from fields.data.procgen_2d import SHAPES_2D
    from fields.data.procgen_3d import PALETTE

    shape_index = _attribute_index(shape, list(SHAPES_2D if shapes is None else shapes))
    colour_index = _attribute_index(colour, list(PALETTE))
    return (3 * shape_index + colour_index) % modulus == 0


def shape_names(teachers: TeacherData) -> tuple[str, ...]:
    """The shape vocabulary of the held-out rule: ``procgen_3d.SHAPES`` for NeRF teachers, else ``SHAPES_2D``."""
    from fields.data.procgen_2d import SHAPES_2D
    from fields.data.procgen_3d import SHAPES

    return tuple(SHAPES) if teachers.is_nerf else tuple(SHAPES_2D)


def held_out_mask(teachers: TeacherData, modulus: int, seed: int) -> tuple[np.ndarray, str]:
    """``([N] bool, rule)``: True for the held-out rows (colour-shape pairs by ``pair_is_held_out``, or a
    ``1 / modulus`` fraction of sources by hash when the dataset has no attributes).

    Raises:
        UserError: every row would be held out.
    """
    from hypernets.datasets import split_by_source

    if teachers.shapes is not None and teachers.colours is not None:
        shapes = shape_names(teachers)
        mask = np.asarray([pair_is_held_out(shape, colour, modulus, shapes)
                           for shape, colour in zip(teachers.shapes, teachers.colours, strict=True)], bool)
        rule = f"colour-shape pairs with (3 * shape_index + colour_index) % {modulus} == 0 held out"
    else:
        mask = split_by_source(teachers.source_ids, 1.0 / modulus, seed)
        rule = f"no attributes: sources held out by hash (fraction 1/{modulus})"
    if np.all(mask):
        raise UserError(f"{teachers.path}: every field falls in a held-out colour-shape pair; use more teachers")
    return mask, rule


# ------------------------------------------------------------------------------------------- conditions


def caption_words(caption: str) -> list[str]:
    """Lower-case words (letters and digits) of a caption."""
    return re.findall(r"[a-z0-9]+", caption.lower())


def encode_captions(captions: list[str], words: list[str], length: int | None = None) -> np.ndarray:
    """Captions -> word ids ``[N, length]`` int32: ``FIRST_WORD + index`` in ``words``, ``UNKNOWN_WORD`` for
    other words, ``PAD_WORD`` after the end (``length``: the longest caption's word count, at least 1)."""
    index = {word: FIRST_WORD + position for position, word in enumerate(words)}
    tokenized = [[index.get(word, UNKNOWN_WORD) for word in caption_words(caption)] for caption in captions]
    length = length or max([len(ids) for ids in tokenized] + [1])
    ids = np.full((len(captions), length), PAD_WORD, np.int32)
    for row, row_ids in enumerate(tokenized):
        ids[row, :len(row_ids[:length])] = row_ids[:length]
    return ids


@dataclasses.dataclass
class ConditionData:
    """Model inputs of every row and the vocabulary they were built with.

    Attributes:
        spec: what the encoder reads.
        arrays: ``{key: [N, ...]}`` for the keys of ``CONDITION_KEYS`` the condition uses.
        vocabulary: JSON-able ``{"classes" | "shapes" + "colours" | "words": ...}`` (from the training rows).
    """

    spec: ConditionSpec
    arrays: dict[str, np.ndarray]
    vocabulary: dict

    def rows(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        return {name: array[rows] for name, array in self.arrays.items()}


def build_conditions(kind: str, use_layout: bool, teachers: TeacherData, train_rows: np.ndarray) -> ConditionData:
    """The condition inputs of every teacher row; vocabularies come from ``train_rows`` only.

    Raises:
        UserError: the dataset lacks what the condition needs (labels, attributes, captions or layouts).
    """
    where = teachers.path
    arrays: dict[str, np.ndarray] = {}
    if kind == "label":
        train_labels = teachers.labels[train_rows]
        if not np.any(train_labels >= 0):
            raise UserError(f"{where}: --condition label needs labels, but every training label is -1")
        num_classes = int(train_labels.max()) + 1
        arrays["labels"] = teachers.labels.astype(np.int32)
        vocabulary: dict = {"classes": num_classes}
        spec = ConditionSpec("label", num_classes=num_classes, use_layout=use_layout)
    elif kind == "attributes":
        if teachers.shapes is None or teachers.colours is None:
            raise UserError(f"{where}: --condition attributes needs 'shape' and 'colour' columns (or "
                            f"{PROCEDURAL_SOURCE} source ids); this dataset has neither")
        shapes = sorted({teachers.shapes[row] for row in train_rows})
        colours = sorted({teachers.colours[row] for row in train_rows})
        arrays["shape_ids"] = np.asarray([1 + shapes.index(value) if value in shapes else 0
                                          for value in teachers.shapes], np.int32)
        arrays["colour_ids"] = np.asarray([1 + colours.index(value) if value in colours else 0
                                           for value in teachers.colours], np.int32)
        vocabulary = {"shapes": shapes, "colours": colours}
        spec = ConditionSpec("attributes", num_shapes=len(shapes), num_colours=len(colours), use_layout=use_layout)
    else:
        if teachers.captions is None:
            raise UserError(f"{where}: --condition {kind} needs a 'caption' column (or {PROCEDURAL_SOURCE} "
                            "source ids); this dataset has neither")
    if kind == "text":
        from hypernets.text_encoder import TEXT_ENCODER, embed_captions

        arrays["text_embedding"] = embed_captions(teachers.captions)
        vocabulary = {"text_encoder": TEXT_ENCODER}
        spec = ConditionSpec("text", text_dim=arrays["text_embedding"].shape[1], use_layout=use_layout)
    elif kind == "caption":
        words = sorted({word for row in train_rows for word in caption_words(teachers.captions[row])})
        arrays["words"] = encode_captions(teachers.captions, words)
        vocabulary = {"words": words}
        spec = ConditionSpec("caption", vocab_size=FIRST_WORD + len(words), use_layout=use_layout)
    if use_layout:
        if teachers.layouts is None:
            raise UserError(f"{where}: layout conditioning needs {', '.join(LAYOUT_COLUMNS)} columns (or "
                            f"{PROCEDURAL_SOURCE} source ids); use --no-layout")
        arrays["layout"] = teachers.layout_features()
    return ConditionData(spec, arrays, vocabulary)


# ------------------------------------------------------------------------------------------- the task


@dataclasses.dataclass
class ConditionalTask:
    """Distillation for ``hypernets.loop.train``: batches hold the condition inputs, ``teacher`` ``[B, P]`` raw
    teacher weights and ``target`` ``[B, P]`` their normalised copy.

    Attributes:
        model: the hypernetwork (normalised weights out).
        field_model: the field module (``NGPField``) that renders a params pytree at positions.
        specs: the field's tensors (layout and normalisation).
        height, width: image size (pixel centres are sampled on this grid).
        pixels_per_field: pixels rendered per field and step.
        weight_loss: weight of the normalised-weight regression term.
        compiled_generate: ``make_generator``'s jitted function, made on first use.
    """

    model: ConditionalHypernet
    field_model: Any
    specs: tuple[TensorSpec, ...]
    height: int
    width: int
    pixels_per_field: int
    weight_loss: float = 0.0
    compiled_generate: Any = dataclasses.field(default=None, repr=False, compare=False)

    def init(self, key: jax.Array, batch: dict[str, jax.Array]) -> Any:
        return self.model.init(key, condition_inputs(batch))["params"]

    def generate(self, params: Any, conditions: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        """``(normalised, raw)`` weights ``[B, P]`` for the conditions."""
        normalized = self.model.apply({"params": params}, conditions)
        return normalized, denormalize(normalized, self.specs)

    def render_points(self, vector: jax.Array, positions: jax.Array) -> jax.Array:
        """One field's raw weights ``[P]`` at ``positions [R, 2]`` -> colours ``[R, channels]``."""
        return self.field_model.apply({"params": vector_to_field_params(vector, self.specs)}, positions)

    def loss(self, params: Any, batch: dict[str, jax.Array], key: jax.Array):
        from fields.image_fitting import _pixel_positions

        normalized, raw = self.generate(params, condition_inputs(batch))
        batch_size = normalized.shape[0]
        indices = jax.random.randint(key, (batch_size, self.pixels_per_field), 0, self.height * self.width,
                                     dtype=jnp.int32)
        positions = jax.vmap(lambda rows: _pixel_positions(rows, self.height, self.width))(indices)
        student = jax.vmap(self.render_points)(raw, positions)
        teacher = jax.lax.stop_gradient(jax.vmap(self.render_points)(jnp.asarray(batch["teacher"], jnp.float32),
                                                                     positions))
        render_loss = jnp.mean(jnp.square(student.astype(jnp.float32) - teacher.astype(jnp.float32)))
        weight_error = jnp.mean(jnp.square(normalized - jnp.asarray(batch["target"], jnp.float32)))
        loss = render_loss + jnp.float32(self.weight_loss) * weight_error
        return loss, {"render_loss": render_loss, "weight_error": weight_error}


@dataclasses.dataclass
class NeRFConditionalTask(ConditionalTask):
    """Distillation of NeRF teachers: batches also hold each teacher's rebuilt occupancy ``bitfield``
    ``[B, cells / 8]`` and its scene's training ``cameras [B, V, 4, 4]`` and ``intrinsics [B, V, 4]``.

    The loss renders ``rays_per_field`` rays per field through random points of random pixels of random
    training views (``height x width``), over a random background colour per ray, with ``nerf_render_rays``:
    the teacher inside its occupied cells, the student at every marching sample.
    """

    fit_config: Any = None
    rays_per_field: int = 128

    def loss(self, params: Any, batch: dict[str, jax.Array], key: jax.Array):
        from fields.nerf_fitting import pixel_rays

        normalized, raw = self.generate(params, condition_inputs(batch))
        batch_size, rays = normalized.shape[0], self.rays_per_field
        cameras = jnp.asarray(batch["cameras"], jnp.float32)
        intrinsics = jnp.asarray(batch["intrinsics"], jnp.float32)
        key_view, key_col, key_row, key_offset, key_background = jax.random.split(key, 5)
        views = jax.random.randint(key_view, (batch_size, rays), 0, cameras.shape[1], dtype=jnp.int32)
        cols = jax.random.randint(key_col, (batch_size, rays), 0, self.width, dtype=jnp.int32)
        rows = jax.random.randint(key_row, (batch_size, rays), 0, self.height, dtype=jnp.int32)
        offsets = jax.random.uniform(key_offset, (batch_size, rays, 2), jnp.float32)
        origins, directions = jax.vmap(pixel_rays)(cameras, intrinsics, views, cols, rows, offsets)
        background = jax.random.uniform(key_background, (batch_size, rays, 3), jnp.float32)
        bitfields = jnp.asarray(batch["bitfield"], jnp.uint8)
        everywhere = jnp.full(bitfields.shape[1:], 255, jnp.uint8)

        def render(vector, bitfield, ray_origins, ray_directions, ray_background):
            return nerf_render_rays(self.field_model, vector_to_field_params(vector, self.specs), bitfield,
                                    ray_origins, ray_directions, ray_background, self.fit_config)

        student = jax.vmap(render, in_axes=(0, None, 0, 0, 0))(raw, everywhere, origins, directions, background)
        teacher = jax.lax.stop_gradient(jax.vmap(render)(jnp.asarray(batch["teacher"], jnp.float32), bitfields,
                                                         origins, directions, background))
        render_loss = jnp.mean(jnp.square(student - teacher))
        weight_error = jnp.mean(jnp.square(normalized - jnp.asarray(batch["target"], jnp.float32)))
        loss = render_loss + jnp.float32(self.weight_loss) * weight_error
        return loss, {"render_loss": render_loss, "weight_error": weight_error}


def condition_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The condition entries of a batch (``CONDITION_KEYS`` present in it)."""
    return {name: batch[name] for name in CONDITION_KEYS if name in batch}


def build_task(config: ConditionalConfig, teachers: TeacherData, spec: ConditionSpec,
               column_mean: np.ndarray, column_std: np.ndarray) -> ConditionalTask:
    """The task for ``config`` on ``teachers`` with normalisation columns ``[P]``."""
    specs = tensor_specs(teachers.param_map, column_mean, column_std)
    model = ConditionalHypernet(specs=specs, field_config=teachers.field_config, condition=spec,
                                variant=config.variant, width=config.width, depth=config.depth,
                                chunk_size=config.chunk_size, chunk_embedding=config.chunk_embedding,
                                probe_grid=config.probe_grid, backend=config.backend)
    if teachers.is_nerf:
        from fields.models.nerf import NeRFField

        scenes = teachers.scenes
        return NeRFConditionalTask(model=model, field_model=NeRFField(teachers.field_config, backend=config.backend),
                                   specs=specs, height=scenes.train_height, width=scenes.train_width,
                                   pixels_per_field=config.pixels_per_field, weight_loss=config.weight_loss,
                                   fit_config=teachers.fit_config, rays_per_field=config.rays_per_field)
    return ConditionalTask(model=model, field_model=teachers.field_config.build(config.backend), specs=specs,
                           height=teachers.height, width=teachers.width, pixels_per_field=config.pixels_per_field,
                           weight_loss=config.weight_loss)


# ------------------------------------------------------------------------------------------- evaluation


def render_matrix(matrix: np.ndarray, teachers: TeacherData, backend: str) -> np.ndarray:
    """Raw weights ``[n, P]`` -> renders ``[n, H, W, channels]`` in [0, 1] (full image, pixel centres)."""
    from fields.image_fitting import render_batch

    return render_batch(matrix_to_params(np.asarray(matrix, np.float32), teachers.param_map), teachers.field_config,
                        teachers.height, teachers.width, backend)


def make_generator(task: ConditionalTask):
    """``generate(params, conditions) -> raw weights [n, P]`` numpy (jitted once per task)."""
    if task.compiled_generate is None:
        task.compiled_generate = jax.jit(lambda params, conditions: task.generate(params, conditions)[1])
    apply = task.compiled_generate
    return lambda params, conditions: np.asarray(apply(params, conditions))


def make_evaluate(task: ConditionalTask, teachers: TeacherData, conditions: ConditionData, rows: np.ndarray,
                  backend: str):
    """``evaluate(params, step)``: mean render PSNR of the generated held-out fields against their teachers'
    renders (and against the true images or test views when known); None without held-out rows."""
    if len(rows) == 0:
        return None
    generate = make_generator(task)
    inputs = conditions.rows(rows)
    teacher_renders = render_rows(teachers.matrix[rows], teachers, rows, backend)
    true_images = teachers.references(rows)

    def evaluate(params: Any, step: int) -> dict[str, float]:
        del step
        renders = render_rows(generate(params, inputs), teachers, rows, backend)
        results = {"heldout_psnr_vs_teacher": float(np.mean(field_psnr(teacher_renders, renders)))}
        if true_images is not None:
            results["heldout_psnr_vs_true"] = float(np.mean(field_psnr(true_images, renders)))
        return results

    return evaluate


def initial_weights(fit_config, pmap: list[ParamEntry], seeds: np.ndarray) -> np.ndarray:
    """Fresh field initialisations ``[n, P]``, each as ``fields.image_fitting.fit_image`` (or, for a
    ``NeRFFitConfig``, ``fields.nerf_fitting.initial_state``) draws it for its seed."""
    from fields.training import split_seed_keys

    if hasattr(fit_config, "occupancy"):
        from fields.models.nerf import NeRFField

        model = NeRFField(fit_config.field, backend=fit_config.backend)
        inputs = (jnp.zeros((1, 3), jnp.float32), jnp.ones((1, 3), jnp.float32) / jnp.float32(math.sqrt(3.0)))
        keys = jax.vmap(jax.random.PRNGKey)(jnp.asarray(np.asarray(seeds, np.int64) % (1 << 32), jnp.uint32))
    else:
        model = fit_config.field.build(fit_config.backend)
        inputs = (jnp.zeros((1, 2), jnp.float32),)
        keys, _ = split_seed_keys(seeds, None, len(seeds), "field")
    params = jax.jit(jax.vmap(lambda key: model.init(key, *inputs)["params"]))(keys)
    return stacked_params_to_matrix(params, pmap)


@dataclasses.dataclass
class FinetuneResult:
    """Steps each field needed to reach its target PSNR.

    Attributes:
        steps: ``[n]`` int64 steps (a multiple of the check interval, 0 when the start already reaches
            the target; ``max_steps`` when it was never reached).
        reached: ``[n]`` bool.
        final_psnr: ``[n]`` PSNR at the end (when all fields reached their target, or at the cap).
    """

    steps: np.ndarray
    reached: np.ndarray
    final_psnr: np.ndarray


def finetune_steps(start: np.ndarray, images: np.ndarray, target_psnr: np.ndarray, max_steps: np.ndarray,
                   fit_config, pmap: list[ParamEntry], seeds: np.ndarray, check_every: int) -> FinetuneResult:
    """Fits fields to ``images`` from the weights ``start`` with the teachers' own step (the compiled, vmapped
    train chunk of ``fields.image_fitting.fit_image_batch``: Adam on the teacher's cosine schedule, a fresh
    optimizer state) and counts the steps until each field's render PSNR reaches its target, checked every
    ``check_every`` steps (one render and host read per check).

    Args:
        start: ``[n, P]`` raw starting weights.
        images: ``[n, H, W, C]`` the images to fit.
        target_psnr: ``[n]`` dB to reach.
        max_steps: ``[n]`` step caps (the teachers' step counts).
        fit_config: the teachers' ``ImageFitConfig`` (optimiser, pixels per step, backend).
        pmap: layout of ``start``.
        seeds: ``[n]`` pixel-sampling seeds.
        check_every: steps between PSNR checks.
    """
    from fields.image_fitting import compiled_batch_functions, render_batch
    from fields.training import make_optimizer, split_seed_keys

    count, height, width, channels = images.shape
    max_steps = np.asarray(max_steps, np.int64)
    horizon = int(max_steps.max())
    schedule_config = dataclasses.replace(fit_config, steps=horizon)
    # Cached: the runs from generated and from fresh weights share one compiled chunk (params and state donated).
    _, train_chunk = compiled_batch_functions(schedule_config, fit_config.field, count, height, width)
    params = jax.tree_util.tree_map(jnp.asarray, matrix_to_params(np.asarray(start, np.float32), pmap))
    opt_state = jax.vmap(make_optimizer(schedule_config).init)(params)
    pixels = jnp.asarray(images.reshape(count, height * width, channels), jnp.float32)
    _, sample_keys = split_seed_keys(seeds, None, count, "field")
    target_psnr = np.asarray(target_psnr, np.float64)

    def current_psnr(values) -> np.ndarray:
        return batch_psnr(images, render_batch(values, fit_config.field, height, width, fit_config.backend))

    psnr = current_psnr(params)
    steps = np.where(psnr >= target_psnr, 0, -1).astype(np.int64)
    step = 0
    while step < horizon and np.any(steps < 0):
        chunk = min(check_every, horizon - step)
        params, opt_state, _ = train_chunk(params, opt_state, pixels, sample_keys, jnp.int32(step), jnp.int32(chunk))
        step += chunk
        psnr = current_psnr(params)
        newly = (steps < 0) & (psnr >= target_psnr) & (step <= max_steps)
        steps[newly] = step
    reached = steps >= 0
    return FinetuneResult(np.where(reached, steps, max_steps), reached, psnr)


def finetune_nerf_steps(start: np.ndarray, rows: np.ndarray, teachers: TeacherData, target_psnr: np.ndarray,
                        max_steps: np.ndarray, seeds: np.ndarray, check_every: int) -> FinetuneResult:
    """``finetune_steps`` for NeRF teachers: fits the scenes of ``rows`` from the weights ``start [n, P]`` with the
    teachers' own training chunk (``fields.nerf_fitting``'s, vmapped over fields: its ray sampling, occupancy
    grid updates, Adam on the teacher's schedule with a fresh state), the occupancy grid starting from the one
    the start weights imply (``nerf_grid``); every ``check_every`` steps the fields are rendered at the test
    views (``render_rows``) and counted when they reach ``target_psnr [n]``; caps ``max_steps [n]``; ray
    sampling seeds ``seeds [n]``."""
    from fields.nerf_fitting import compiled_nerf_batch, scene_arrays
    from fields.training import FieldSharding, make_optimizer

    rows = np.asarray(rows, np.int64)
    max_steps = np.asarray(max_steps, np.int64)
    horizon = int(max_steps.max())
    config = dataclasses.replace(teachers.fit_config, steps=horizon)
    optimizer = make_optimizer(config)
    params = jax.tree_util.tree_map(jnp.asarray, matrix_to_params(np.asarray(start, np.float32), teachers.param_map))
    grids = nerf_grids(start, teachers)
    state = {"params": params, "opt_state": jax.vmap(optimizer.init)(params),
             "grid": {name: jnp.asarray(value) for name, value in grids.items()}}
    splits = teachers.scenes.train_splits(rows)
    data = jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *[scene_arrays(split) for split in splits])
    keys = jnp.stack([jax.random.fold_in(jax.random.PRNGKey(int(seed) % (1 << 32)), 1) for seed in seeds])
    leaves, structure = jax.tree_util.tree_flatten((state, data))
    train_chunk = compiled_nerf_batch(config, structure, tuple((leaf.shape, str(leaf.dtype)) for leaf in leaves),
                                       FieldSharding())  # one device
    references = teachers.references(rows)
    target_psnr = np.asarray(target_psnr, np.float64)

    def current_psnr(state) -> np.ndarray:
        weights = stacked_params_to_matrix(jax.tree_util.tree_map(np.asarray, state["params"]), teachers.param_map)
        return field_psnr(references, render_rows(weights, teachers, rows, config.backend))

    psnr = current_psnr(state)
    steps = np.where(psnr >= target_psnr, 0, -1).astype(np.int64)
    step = 0
    while step < horizon and np.any(steps < 0):
        chunk = min(check_every, horizon - step)
        state, _ = train_chunk(state, data, keys, jnp.int32(step), jnp.int32(chunk))
        step += chunk
        psnr = current_psnr(state)
        newly = (steps < 0) & (psnr >= target_psnr) & (step <= max_steps)
        steps[newly] = step
    reached = steps >= 0
    return FinetuneResult(np.where(reached, steps, max_steps), reached, psnr)


def nerf_retrieval_baselines(teachers: TeacherData, train_rows: np.ndarray, held_rows: np.ndarray,
                             references: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``retrieval_baselines`` for NeRFs: every training teacher rendered at each held-out scene's test cameras."""
    mean_psnr, nearest_psnr = [], []
    scenes = teachers.scenes
    count = len(train_rows)
    for slot, row in enumerate(held_rows):
        cameras = np.repeat(scenes.test_cameras[row][None], count, axis=0)
        intrinsics = np.repeat(scenes.test_intrinsics[row][None], count, axis=0)
        renders = render_nerf_views(teachers.matrix[train_rows], teachers, cameras, intrinsics,
                                    scenes.bitfields[train_rows]).astype(np.float64)
        reference = references[slot][None]
        mean_psnr.append(field_psnr(reference, renders.mean(axis=0, keepdims=True))[0])
        nearest_psnr.append(field_psnr(np.repeat(reference, count, axis=0), renders).max())
    return np.asarray(mean_psnr), np.asarray(nearest_psnr)


def retrieval_baselines(teachers: TeacherData, train_rows: np.ndarray, references: np.ndarray,
                        backend: str, held_rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Baselines that ignore the condition, ``([n], [n])`` dB against ``references [n, H, W, C]``: the mean
    render of the training teachers ``train_rows``, and the best single training teacher's render (the
    PSNR a pure memoriser with an oracle choice would reach). NeRFs (``references [n, V, H, W, 3]``) need
    the ``held_rows`` the references belong to (the training teachers are rendered at their cameras)."""
    if teachers.is_nerf:
        return nerf_retrieval_baselines(teachers, train_rows, held_rows, references)
    renders = render_matrix(teachers.matrix[train_rows], teachers, backend).astype(np.float64)
    mean_image = np.repeat(renders.mean(axis=0, keepdims=True), len(references), axis=0)
    errors = np.mean(np.square(renders[None] - np.asarray(references, np.float64)[:, None]), axis=(2, 3, 4))
    nearest = -10.0 * np.log10(np.maximum(errors.min(axis=1), 1e-20))  # [n, teachers] -> best per reference
    return batch_psnr(references, mean_image), nearest


def _mean(values) -> float | None:
    values = [float(value) for value in values]
    return float(np.mean(values)) if values else None


def zero_shot(task: ConditionalTask, params: Any, teachers: TeacherData, conditions: ConditionData,
              held_out: np.ndarray, rule: str, config: ConditionalConfig, step: int, workdir: str) -> dict:
    """Generates, scores and finetunes up to ``config.zero_shot_items`` held-out items; writes
    ``W/zero_shot.json`` and (with items) ``W/zero_shot.png`` (rows: true | generated | teacher).

    PSNRs are against the true procedural images or the scenes' true test views when known (else against
    the teachers' renders, and ``reference`` says so). Finetuning targets each teacher's own PSNR against
    that reference, from the generated weights and from the teacher's own initial weights (``init_seeds``),
    both with the sampling seeds ``seeds + FRESH_SEED_OFFSET``.
    """
    from hypernets.rendering import image_previews, save_grid

    generate = make_generator(task)
    backend = config.backend
    held_rows = np.flatnonzero(held_out)[:config.zero_shot_items]
    train_rows = np.flatnonzero(~held_out)[:config.zero_shot_items]
    report: dict[str, Any] = {"step": int(step), "rule": rule, "num_held_out": int(np.sum(held_out)),
                              "num_training": int(np.sum(~held_out)), "num_evaluated": int(len(held_rows)),
                              "check_every": config.finetune_check_every, "items": []}
    true_images = teachers.references(np.concatenate([held_rows, train_rows]))
    report["field_kind"] = teachers.field_kind
    report["reference"] = (("true test views" if teachers.is_nerf else "true image") if true_images is not None
                           else "teacher render")
    if len(train_rows):
        train_renders = render_rows(generate(params, conditions.rows(train_rows)), teachers, train_rows, backend)
        train_reference = (true_images[len(held_rows):] if true_images is not None
                           else render_rows(teachers.matrix[train_rows], teachers, train_rows, backend))
        report["mean_train_generated_psnr"] = _mean(field_psnr(train_reference, train_renders))
    path = os.path.join(workdir, "zero_shot.json")
    if not len(held_rows):
        report["note"] = ("zero_shot_items is 0" if config.zero_shot_items == 0
                          else "no held-out items: the rule leaves none of this dataset's fields out")
        write_json(path, report)
        return report

    generated = generate(params, conditions.rows(held_rows))
    teacher_matrix = teachers.matrix[held_rows]
    teacher_renders = render_rows(teacher_matrix, teachers, held_rows, backend)
    generated_renders = render_rows(generated, teachers, held_rows, backend)
    reference = true_images[:len(held_rows)] if true_images is not None else teacher_renders
    generated_psnr = field_psnr(reference, generated_renders)
    teacher_psnr = field_psnr(reference, teacher_renders)
    versus_teacher = field_psnr(teacher_renders, generated_renders)
    caps = teachers.steps[held_rows]
    sample_seeds = teachers.seeds[held_rows] + FRESH_SEED_OFFSET
    init_seeds = teachers.init_seeds if teachers.init_seeds is not None else teachers.seeds
    scratch = initial_weights(teachers.fit_config, teachers.param_map, init_seeds[held_rows])
    runs = []
    for start in (generated, scratch):
        if teachers.is_nerf:
            runs.append(finetune_nerf_steps(start, held_rows, teachers, teacher_psnr, caps, sample_seeds,
                                            config.finetune_check_every))
        else:
            runs.append(finetune_steps(start, reference, teacher_psnr, caps, teachers.fit_config, teachers.param_map,
                                       sample_seeds, config.finetune_check_every))
    from_generated, from_fresh = runs
    for slot, row in enumerate(held_rows):
        item = {"row": int(row), "source_id": teachers.source_ids[row], "generated_psnr": float(generated_psnr[slot]),
                "teacher_psnr": float(teacher_psnr[slot]), "generated_vs_teacher_psnr": float(versus_teacher[slot]),
                "max_steps": int(caps[slot]),
                "finetune_steps_from_generated": int(from_generated.steps[slot]),
                "reached_from_generated": bool(from_generated.reached[slot]),
                "finetune_steps_from_fresh": int(from_fresh.steps[slot]),
                "reached_from_fresh": bool(from_fresh.reached[slot])}
        for name, values in (("shape", teachers.shapes), ("colour", teachers.colours), ("caption", teachers.captions)):
            if values is not None:
                item[name] = values[row]
        report["items"].append(item)
    mean_generated_steps = _mean(from_generated.steps)
    mean_fresh_steps = _mean(from_fresh.steps)
    baseline_rows = np.flatnonzero(~held_out)[:NERF_BASELINE_ROWS if teachers.is_nerf else BASELINE_ROWS]
    mean_baseline, nearest_baseline = retrieval_baselines(teachers, baseline_rows, reference, backend, held_rows)
    report.update({
        "mean_generated_psnr": _mean(generated_psnr), "mean_teacher_psnr": _mean(teacher_psnr),
        "mean_generated_vs_teacher_psnr": _mean(versus_teacher),
        "baseline_mean_image_psnr": _mean(mean_baseline), "baseline_nearest_training_psnr": _mean(nearest_baseline),
        "mean_finetune_steps_from_generated": mean_generated_steps, "mean_finetune_steps_from_fresh": mean_fresh_steps,
        "num_reached_from_generated": int(np.sum(from_generated.reached)),
        "num_reached_from_fresh": int(np.sum(from_fresh.reached)),
        "finetune_steps_ratio": (mean_generated_steps / mean_fresh_steps) if mean_fresh_steps else None,
        "finetune_speedup": (mean_fresh_steps / mean_generated_steps) if mean_generated_steps else None,
    })
    write_json(path, report)
    if teachers.is_nerf:  # the first test view of each scene
        reference, generated_renders, teacher_renders = reference[:, 0], generated_renders[:, 0], teacher_renders[:, 0]
    triples = np.stack([image_previews(reference), image_previews(generated_renders),
                        image_previews(teacher_renders)], axis=1)
    save_grid(os.path.join(workdir, "zero_shot.png"), triples.reshape((-1,) + triples.shape[2:]), columns=3)
    return report


# ------------------------------------------------------------------------------------------- the run


def resolve_config(args, saved: dict | None) -> ConditionalConfig:
    """The preset (or, without ``--preset``, the config saved in the workdir) with the command-line overrides."""
    overrides = {"condition": args.condition, "variant": args.variant, "layout": args.layout,
                 "weight_loss": args.weight_loss, "zero_shot_items": args.zero_shot_items,
                 "backend": args.backend}
    return resolve_run_config(ConditionalConfig, PRESETS, args, saved, SECTION, overrides)


def resolve_source(args, saved: dict | None) -> tuple[str | None, TeacherSpec | None]:
    """``(data path, None)`` for ``--data``, ``(None, TeacherSpec)`` for ``--make-teachers``, or the saved run's."""
    if args.data is not None and args.make_teachers is not None:
        raise UserError("give either --data FIELDS or --make-teachers N, not both")
    if args.make_teachers is None:
        for flag, value in (("--size", args.size), ("--teacher-steps", args.teacher_steps),
                            ("--teacher-preset", args.teacher_preset)):
            if value is not None:
                raise UserError(f"{flag} applies to --make-teachers")
    if args.data is not None:
        return os.path.abspath(args.data), None
    if args.make_teachers is not None:
        if args.make_teachers < 2:
            raise UserError(f"--make-teachers needs at least 2 fields, got {args.make_teachers}")
        size = 16 if args.size is None else args.size
        if size < 2:
            raise UserError(f"--size must be >= 2, got {size}")
        if args.teacher_steps is not None and args.teacher_steps < 1:
            raise UserError(f"--teacher-steps must be >= 1, got {args.teacher_steps}")
        return None, TeacherSpec(num=args.make_teachers, size=size, steps=args.teacher_steps or 0,
                                 preset=args.teacher_preset or "small")
    if saved is not None and saved.get("data"):
        return str(saved["data"]), None
    if saved is not None and isinstance(saved.get("teachers"), dict):
        try:
            return None, TeacherSpec(**saved["teachers"])
        except TypeError:
            raise UserError(f"{args.workdir}/config.json: malformed teachers entry") from None
    raise UserError("give --data FIELDS (a dataset of ngp_image or ngp_nerf fields) or --make-teachers N")


def run_record(data: str | None, teachers: TeacherSpec | None, config: ConditionalConfig) -> dict:
    """What ``W/config.json`` holds."""
    return {"data": data, "teachers": dataclasses.asdict(teachers) if teachers is not None else None,
            SECTION: config_to_dict(config)}


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=f"python -m {PROGRAM}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="dataset of ngp_image or ngp_nerf teacher fields (a .parquet shard or a "
                                       "folder; NeRF fields with their scene folders, see the module docstring)")
    parser.add_argument("--make-teachers", type=int, metavar="N",
                        help="fit N procedural primitives as teachers (with shape, colour, caption) into W/teachers")
    parser.add_argument("--size", type=int, help="--make-teachers: image side in pixels (default 16)")
    parser.add_argument("--teacher-steps", type=int, help="--make-teachers: fitting steps (default: the preset's)")
    parser.add_argument("--teacher-preset", help="--make-teachers: fields.image_fitting preset (default small)")
    parser.add_argument("--workdir", required=True, help="run directory (config, checkpoints, zero-shot results)")
    parser.add_argument("--preset", help=f"one of {', '.join(PRESETS)} (default: the workdir's saved config, "
                                         "else default)")
    parser.add_argument("--condition", choices=CONDITION_KINDS, help="what the hypernetwork is conditioned on")
    parser.add_argument("--variant", choices=VARIANTS, help="static or dynamic (HyperFields) hypernetwork")
    parser.add_argument("--layout", action=argparse.BooleanOptionalAction, default=None,
                        help="also condition on the primitive's centre, size and rotation (--no-layout: not)")
    parser.add_argument("--weight-loss", type=float, help="weight of the normalised-weight regression term")
    parser.add_argument("--zero-shot-items", type=int, help="held-out items generated, scored and finetuned")
    parser.add_argument("--backend", choices=("auto", "kernel", "jax"), help="hash-grid backend")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_loop_arguments(parser)
    return parser


def prepare_training(config: ConditionalConfig, teachers: TeacherData):
    """``(task, conditions, held_out [N] bool, rule, train_rows, stream arrays)`` for a run."""
    from fields.weights import NormalizationStats

    held_out, rule = held_out_mask(teachers, config.holdout_modulus, config.loop.seed)
    train_rows = np.flatnonzero(~held_out)
    conditions = build_conditions(config.condition, config.layout, teachers, train_rows)
    statistics = NormalizationStats.from_matrix(teachers.matrix[train_rows], teachers.param_map)
    column_mean, column_std = statistics.column_stats(config.normalization)
    task = build_task(config, teachers, conditions.spec, column_mean, column_std)
    teacher_matrix = teachers.matrix[train_rows].astype(np.float32)
    arrays = {**conditions.rows(train_rows), "teacher": teacher_matrix,
              "target": statistics.normalize(teacher_matrix, config.normalization)}
    if teachers.is_nerf:
        scenes = teachers.scenes
        arrays.update({"bitfield": scenes.bitfields[train_rows], "cameras": scenes.train_cameras[train_rows],
                       "intrinsics": scenes.train_intrinsics[train_rows]})
    return task, conditions, held_out, rule, train_rows, arrays


def main(argv: list[str] | None = None) -> int:
    from hypernets.datasets import BatchStream
    from hypernets.loop import train

    args = build_parser().parse_args(argv)
    if args.zero_shot_items is not None and args.zero_shot_items < 0:
        raise UserError(f"--zero-shot-items must be >= 0, got {args.zero_shot_items}")
    saved = read_saved_run(args.workdir, SECTION, PROGRAM)
    data, teacher_spec = resolve_source(args, saved)
    config = resolve_config(args, saved)
    if data is not None:  # refuse other field kinds before touching the work directory
        check_field_kind(dataset_field_kind(data), data)
    record = run_record(data, teacher_spec, config)
    check_run_config(args.workdir, saved, record, rerun_free_fields(SECTION, RERUN_FREE_FIELDS, args, saved))
    # Given teachers are read (NeRF scenes included) before the work directory is touched.
    teachers = load_teachers(data, config.backend, config.eval_views) if data is not None else None
    print(config_to_json(config))
    prepare_workdir(args.workdir)
    write_run(args.workdir, record)
    if teachers is None:
        data = make_teachers(os.path.join(args.workdir, TEACHERS_DIRECTORY), teacher_spec, config.backend,
                             progress=not args.quiet)
        teachers = load_teachers(data, config.backend, config.eval_views)
    task, conditions, held_out, rule, train_rows, arrays = prepare_training(config, teachers)
    write_json(os.path.join(args.workdir, "vocabulary.json"), conditions.vocabulary)
    print(f"{len(train_rows)} training teachers, {int(np.sum(held_out))} held out ({rule}); "
          f"{teachers.height}x{teachers.width} {'test views' if teachers.is_nerf else 'images'}, "
          f"{teachers.matrix.shape[1]} weights per {teachers.field_kind} field; "
          f"condition {config.condition}{' + layout' if config.layout else ''}, {config.variant} hypernetwork")

    stream = BatchStream(arrays, config.loop.batch_size, seed=config.loop.seed)
    evaluate = make_evaluate(task, teachers, conditions, np.flatnonzero(held_out)[:max(config.zero_shot_items, 1)],
                             config.backend)
    result = train(task, stream, config.loop, args.workdir, evaluate=evaluate, progress=not args.quiet,
                   run_config=record)
    params = jax.device_get(result.ema_params)
    print(f"hypernetwork: {count_parameters(params):,} parameters, step {result.step}")
    report = zero_shot(task, params, teachers, conditions, held_out, rule, config, result.step, args.workdir)
    if report["num_evaluated"]:
        ratio = report["finetune_steps_ratio"]
        steps_generated = report["mean_finetune_steps_from_generated"]
        steps_fresh = report["mean_finetune_steps_from_fresh"]
        print(f"zero-shot on {report['num_evaluated']} held-out items: generated "
              f"{report['mean_generated_psnr']:.2f} dB, teachers {report['mean_teacher_psnr']:.2f} dB "
              f"(vs {report['reference']}); finetuning steps to the teacher's PSNR: {steps_generated:.1f} from "
              f"generated weights, {steps_fresh:.1f} from scratch"
              + (f" (ratio {ratio:.2f})" if ratio is not None else "")
              + f"; {os.path.join(args.workdir, 'zero_shot.json')}")
    else:
        print(f"zero-shot: {report.get('note', 'nothing to evaluate')}")
    return 0


if __name__ == "__main__":
    run_main(main)
