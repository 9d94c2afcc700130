"""Encode many images into fields of one architecture, many at once, as parquet shards.

    python -m fields.encode_dataset --source procedural:primitives --num 1024 --out data/fields/primitives
    python -m fields.encode_dataset --source idx:/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz,\
/usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz --out data/fields/fmnist --shard 0/2

Items are split into batches of ``--fields-per-batch``; each batch is fitted in one vmapped call
(a leading field axis through the model, the compiled kernels and Adam) and written atomically as
``fields-FIRST-LAST.parquet``. Field ``i`` samples its pixels/points/rays with seed ``--seed + i``;
by default every field starts from the same initial weights, seeded by ``--init-seed`` (default
``--seed``), which keeps the fields' weight spaces aligned. ``--shard i/n`` takes every n-th batch,
so processes or hosts can share the work; in a multi-process run (``--coordinator HOST:PORT
--num-processes N --process-id I``, see ``fields.distributed``) the shard defaults to ``I/N``. Each
process fits its batches over all of its local devices (the field axis split over them). Rerunning
the same command skips the shards that exist: a killed job loses at most the batch in flight and
never duplicates a field.
``field_config.json`` holds the field config and the param map (also in each shard's schema).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from fields.cli import ArgumentParser, UserError, run_main
from fields.config import check_run_config, config_to_dict, read_config_record, resolve_preset
from fields.distributed import add_distributed_arguments, initialize_distributed_from_args, process_shard
from fields.files import write_json

FIELD_FAMILIES = ("ngp", "siren", "fourier")
INIT_MODES = ("shared", "per-field")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m fields.encode_dataset", description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True,
                        help="procedural:primitives | idx:IMAGES[,LABELS] | parquet:FILE[#COLUMN] | DIR (images) | "
                             "meshes:DIR (occupancy fields) | scenes:DIR (NeRF fields)")
    parser.add_argument("--out", required=True, help="output folder for the parquet shards")
    parser.add_argument("--field", choices=FIELD_FAMILIES, help="image field family (default: ngp)")
    parser.add_argument("--preset", help="field preset (default: small for images, default for meshes and scenes)")
    parser.add_argument("--num", type=int, help="number of items (procedural: how many to make; others: a cap)")
    parser.add_argument("--size", help="resize images to HxW (e.g. 28x28)")
    parser.add_argument("--steps", type=int, help="steps per field (default: the preset's)")
    parser.add_argument("--fields-per-batch", type=int,
                        help="fields fitted at once (default: 256 images, 16 meshes, 2 scenes)")
    parser.add_argument("--shard", help="i/n: do every n-th batch starting at i (default: this process's index/count "
                                         "in a multi-process run, else 0/1)")
    parser.add_argument("--min-psnr", type=float,
                        help="quality gate for image and NeRF fields: refit fields below it once, then drop them")
    parser.add_argument("--min-iou", type=float, help="the same gate for occupancy fields (IoU in [0, 1])")
    parser.add_argument("--skip-unreadable", action="store_true",
                        help="leave out items that cannot be loaded (a broken image or mesh file) instead of stopping; "
                             "they are listed in OUT/skipped.json")
    parser.add_argument("--eval-views", type=int, default=10, help="NeRF fields: test views scored (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="field i uses seed + i; procedural data seed")
    parser.add_argument("--init", choices=INIT_MODES, default="shared",
                        help="shared (default): every field starts from the same weights (from --seed), so the "
                             "fields' weight spaces are aligned, as generative models over weights need; "
                             "per-field: field i's weights start from seed + i")
    parser.add_argument("--init-seed", type=int,
                        help="with --init shared: the seed of the shared initial weights (default: --seed); give "
                             "the train and test splits of one dataset the same value")
    parser.add_argument("--backend", choices=("auto", "kernel", "jax"), default="auto")
    parser.add_argument("--quiet", action="store_true")
    add_distributed_arguments(parser)
    return parser


def parse_shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise UserError(f"--shard must look like i/n, got {text!r}") from None
    if not 0 <= index < count:
        raise UserError(f"--shard i/n needs 0 <= i < n, got {text}")
    return index, count


def parse_size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--size must look like HxW, got {text!r}") from None
    if height < 1 or width < 1:
        raise UserError(f"--size must be positive, got {text}")
    return height, width


@dataclasses.dataclass
class EncodeJob:
    """One family of fields to encode: where the items come from and how a batch is fitted.

    ``fit(items, config, seeds, init_seeds) -> (params with a leading field axis, quality [N])``
    (``init_seeds`` None: each field's init comes from its seed); ``quality``
    names the per-field score (``psnr`` in dB, or ``iou``) and ``threshold`` the gate on it.
    """

    family: str
    source: Any
    config: Any
    field_config: Any
    field_kind: str
    pmap: list
    quality: str
    threshold: float | None
    describe: str
    schema_metadata: dict
    fit: Callable
    load: Callable[[list[int]], Any]
    extra_columns: Callable[[list[int]], dict]


def _take(items, positions):
    return items[positions] if isinstance(items, np.ndarray) else [items[int(k)] for k in positions]


def _params_map(params) -> list:
    from fields.weights import param_map

    return param_map(jax.tree_util.tree_map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), params))


def image_job(args, size) -> EncodeJob:
    from fields.data.image_sources import open_image_source
    from fields.image_fitting import MLP_PRESETS, PRESETS, fit_image_batch

    family = args.field or "ngp"
    presets = PRESETS if family == "ngp" else MLP_PRESETS[family]
    config = resolve_preset(presets, args.preset or "small", {"backend": args.backend, "steps": args.steps},
                            f"{family} preset")
    if args.min_iou is not None:
        raise UserError("--min-iou is for occupancy fields (meshes:DIR); use --min-psnr for images")
    source = open_image_source(args.source, args.num, args.seed, size)
    config = dataclasses.replace(config, field=dataclasses.replace(config.field, output_dim=source.channels))

    def fit(images, fit_config, seeds, init_seeds):
        result = fit_image_batch(images, fit_config, seeds, init_seeds)
        return result.params, result.psnr

    shapes = jax.eval_shape(lambda: config.field.build("jax").init(jax.random.PRNGKey(0),
                                                                   jnp.zeros((1, 2), jnp.float32)))["params"]
    return EncodeJob("images", source, config, config.field, config.field.field_kind, _params_map(shapes), "psnr",
                     args.min_psnr,
                     f"{source.num_items} images of {source.height}x{source.width}x{source.channels}",
                     {"image_height": source.height, "image_width": source.width}, fit, source.load,
                     lambda indices: {})


def mesh_job(args) -> EncodeJob:
    from fields.data.collection_sources import mesh_folder_source, strip_family
    from fields.models.occupancy_mlp import init_params
    from fields.occupancy_fitting import FIELD_KIND, PRESETS, fit_occupancy_batch

    _refuse_image_options(args, "meshes")
    if args.min_psnr is not None:
        raise UserError("--min-psnr is for image and NeRF fields; use --min-iou for occupancy fields")
    if args.min_iou is not None and not 0.0 <= args.min_iou <= 1.0:
        raise UserError(f"--min-iou must lie in [0, 1], got {args.min_iou}")
    config = resolve_preset(PRESETS, args.preset or "default", {"steps": args.steps}, "occupancy preset")
    source = mesh_folder_source(strip_family(args.source), args.num)

    def fit(meshes, fit_config, seeds, init_seeds):
        result = fit_occupancy_batch(meshes, fit_config, seeds, init_seeds)
        return result.params, result.metrics["iou"]

    shapes = jax.eval_shape(lambda: init_params(config.field, jax.random.PRNGKey(0)))
    return EncodeJob("meshes", source, config, config.field, FIELD_KIND, _params_map(shapes), "iou", args.min_iou,
                     f"{source.num_items} meshes", {}, fit, source.load, lambda indices: {})


def scene_job(args) -> EncodeJob:
    from fields.data.collection_sources import scene_folder_source, strip_family
    from fields.models.nerf import NeRFField
    from fields.nerf_fitting import FIELD_KIND, PRESETS, fit_nerf_batch

    _refuse_image_options(args, "scenes")
    if args.min_iou is not None:
        raise UserError("--min-iou is for occupancy fields (meshes:DIR); use --min-psnr for NeRF fields")
    if args.eval_views < 1:
        raise UserError(f"--eval-views must be >= 1, got {args.eval_views}")
    config = resolve_preset(PRESETS, args.preset or "default", {"backend": args.backend, "steps": args.steps},
                            "NeRF preset")
    source = scene_folder_source(strip_family(args.source), args.num)

    def fit(scenes, fit_config, seeds, init_seeds):
        try:
            result = fit_nerf_batch(scenes, fit_config, seeds, max_eval_views=args.eval_views, init_seeds=init_seeds)
        except ValueError as error:
            raise UserError(f"{source.name}: {error}; fit them in separate runs or use --fields-per-batch 1") from None
        return result.params, result.psnr

    model = NeRFField(config.field, backend="jax")
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 3), jnp.float32),
                                               jnp.ones((1, 3), jnp.float32))["params"])
    return EncodeJob("scenes", source, config, config.field, FIELD_KIND, _params_map(shapes), "psnr", args.min_psnr,
                     f"{source.num_items} scenes", {"scene_bound": config.scene_bound}, fit, source.load,
                     lambda indices: {"caption": [source.caption(k) for k in indices]})


def _refuse_image_options(args, family: str) -> None:
    for flag, value in (("--field", args.field), ("--size", args.size)):
        if value is not None:
            raise UserError(f"{flag} applies to image sources, not to {family}")


def open_job(args) -> EncodeJob:
    from fields.data.collection_sources import source_family

    family = source_family(args.source)
    if family == "meshes":
        return mesh_job(args)
    if family == "scenes":
        return scene_job(args)
    return image_job(args, parse_size(args.size))


DEFAULT_FIELDS_PER_BATCH = {"images": 256, "meshes": 16, "scenes": 2}


def batch_ranges(num_items: int, per_batch: int) -> list[tuple[int, int]]:
    """``[(first, stop), ...]`` covering ``range(num_items)``."""
    return [(first, min(first + per_batch, num_items)) for first in range(0, num_items, per_batch)]


def shard_name(first: int, stop: int) -> str:
    return f"fields-{first:07d}-{stop - 1:07d}.parquet"


def check_or_write_manifest(out: str, manifest: dict) -> None:
    """``field_config.json`` records what the folder holds; a different run into it is refused."""
    path = os.path.join(out, "field_config.json")
    saved = read_config_record(path)
    check_run_config(out, saved, manifest, holds="fields of another configuration", option="--out")
    if saved is None:
        write_json(path, manifest)


def load_items(job: EncodeJob, indices: list[int], skip_unreadable: bool) -> tuple[list[int], Any, dict]:
    """``(loaded indices, items, {index: error})``: every item, or with ``skip_unreadable`` those that load."""
    if not skip_unreadable:
        return indices, job.load(indices), {}
    kept, parts, errors = [], [], {}
    for index in indices:
        try:
            parts.append(job.load([index]))
            kept.append(index)
        except UserError as error:
            errors[index] = str(error)
    if not parts:
        return [], None, errors
    items = np.concatenate(parts) if isinstance(parts[0], np.ndarray) else [item for part in parts for item in part]
    return kept, items, errors


def fit_with_gate(job: EncodeJob, items, seeds, init_seed: int | None = None):
    """Fits a batch (every field's initial weights from ``init_seed`` when given, else from its own
    seed); fields whose quality is below ``job.threshold`` are refitted once (other sampling seed,
    twice the steps, same init), then dropped. Returns ``(params [M, P], kept indices [M],
    quality [M], seeds [M], steps [M], refits, drops)``."""
    from fields.weights import stacked_params_to_matrix

    def init_seeds(count):
        return None if init_seed is None else [init_seed] * count

    params, quality = job.fit(items, job.config, seeds, init_seeds(len(seeds)))
    matrix = stacked_params_to_matrix(params, job.pmap)
    quality = np.asarray(quality, np.float32).copy()
    steps = np.full(len(seeds), job.config.steps, np.int32)
    seeds = np.asarray(seeds, np.int64)
    refits = drops = 0
    if job.threshold is not None:
        low = np.flatnonzero(~(quality >= job.threshold))
        if len(low):
            refits = len(low)
            retry_seeds = [int(seed) + 1_000_003 for seed in seeds[low]]
            retry_config = dataclasses.replace(job.config, steps=2 * job.config.steps)
            retry_params, retry_quality = job.fit(_take(items, low), retry_config, retry_seeds,
                                                  init_seeds(len(low)))
            retry_matrix = stacked_params_to_matrix(retry_params, job.pmap)
            for slot, index in enumerate(low):
                if retry_quality[slot] > quality[index] or not np.isfinite(quality[index]):
                    matrix[index] = retry_matrix[slot]
                    quality[index], seeds[index] = retry_quality[slot], retry_seeds[slot]
                    steps[index] = retry_config.steps
        keep = np.flatnonzero(quality >= job.threshold)
        drops = len(seeds) - len(keep)
    else:
        keep = np.arange(len(seeds))
    return matrix[keep], keep, quality[keep], seeds[keep], steps[keep], refits, drops


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    initialize_distributed_from_args(args)
    shard_index, shard_count = process_shard() if args.shard is None else parse_shard(args.shard)
    if args.fields_per_batch is not None and args.fields_per_batch < 1:
        raise UserError(f"--fields-per-batch must be >= 1, got {args.fields_per_batch}")
    if args.num is not None and args.num < 1:
        raise UserError(f"--num must be >= 1, got {args.num}")
    if args.init_seed is not None and args.init != "shared":
        raise UserError("--init-seed applies to --init shared")
    init_seed = (args.seed if args.init_seed is None else args.init_seed) if args.init == "shared" else None
    job = open_job(args)
    per_batch = args.fields_per_batch or DEFAULT_FIELDS_PER_BATCH[job.family]

    from fields.field_datasets import write_shard
    from fields.weights import param_count, param_map_to_json

    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot write to --out {args.out}: {error.strerror or error}") from None
    manifest = {"param_map": json.loads(param_map_to_json(job.pmap)),
                "source": args.source, "num_items": job.source.num_items, **job.schema_metadata,
                "field_kind": job.field_kind, "field_config": config_to_dict(job.field_config),
                "fit": config_to_dict(job.config), "seed": args.seed, "init": args.init,
                "init_seed": init_seed, "quality": job.quality,
                f"min_{job.quality}": job.threshold, "fields_per_batch": per_batch}
    check_or_write_manifest(args.out, manifest)

    batches = [batch for k, batch in enumerate(batch_ranges(job.source.num_items, per_batch))
               if k % shard_count == shard_index]
    todo = [batch for batch in batches if not os.path.exists(os.path.join(args.out, shard_name(*batch)))]
    total = sum(stop - first for first, stop in batches)
    done = total - sum(stop - first for first, stop in todo)
    print(f"{job.source.name}: {job.describe}; shard {shard_index}/{shard_count}: {len(batches)} batches, "
          f"{len(batches) - len(todo)} already written; {job.field_kind} fields, {job.config.steps} steps each")
    bar = tqdm(total=total, initial=done, desc="encode", unit="field", disable=args.quiet, dynamic_ncols=True)
    start, fitted, quality_sum, refits, drops = time.perf_counter(), 0, 0.0, 0, 0
    skipped_path = os.path.join(args.out, "skipped.json")
    skipped: dict[str, str] = read_config_record(skipped_path) or {}  # source id -> error; kept on resume
    for first, stop in todo:
        indices, items, unreadable = load_items(job, list(range(first, stop)), args.skip_unreadable)
        if unreadable:
            skipped.update({str(job.source.source_id(index)): error for index, error in unreadable.items()})
            write_json(skipped_path, skipped)
            tqdm.write(f"skipped {len(unreadable)} unreadable item(s) of batch {first}..{stop - 1}: "
                       f"{next(iter(unreadable.values()))}" + (" ..." if len(unreadable) > 1 else ""))
        seeds = [args.seed + index for index in indices]
        if not indices:
            matrix, keep, quality, used_seeds, steps, batch_refits, batch_drops = (
                np.zeros((0, param_count(job.pmap)), np.float32), [], [], [], [], 0, 0)
        else:
            try:
                matrix, keep, quality, used_seeds, steps, batch_refits, batch_drops = fit_with_gate(
                    job, items, seeds, init_seed)
            except FloatingPointError as error:
                raise UserError(f"batch {first}..{stop - 1}: {error}") from None
        kept = [indices[k] for k in keep]
        columns = {
            "source_id": [job.source.source_id(index) for index in kept],
            "label": [int(job.source.labels[index]) for index in kept],
            job.quality: [float(value) for value in quality],
            "seed": [int(s) for s in used_seeds],
            "init_seed": [int(s) if init_seed is None else init_seed for s in used_seeds],
            "steps": [int(s) for s in steps],
            **job.extra_columns(kept),
        }
        write_shard(os.path.join(args.out, shard_name(first, stop)), matrix, columns, job.field_kind,
                    config_to_dict(job.field_config), job.pmap,
                    extra_schema_metadata={**job.schema_metadata, "source": args.source})
        fitted += len(keep)
        quality_sum += float(np.sum(quality))
        refits, drops = refits + batch_refits, drops + batch_drops
        bar.update(stop - first)
        elapsed = time.perf_counter() - start
        bar.set_postfix({"fields_per_s": f"{(fitted + drops) / elapsed:.2f}",
                         f"mean_{job.quality}": f"{quality_sum / max(fitted, 1):.3f}"})
    bar.close()
    elapsed = time.perf_counter() - start
    gate = (f"; quality gate {job.quality} >= {job.threshold}: {refits} refitted, {drops} dropped"
            if job.threshold is not None else "")
    if skipped:
        gate += f"; {len(skipped)} unreadable item(s) skipped (listed in {skipped_path})"
    if todo:
        print(f"encoded {fitted} fields in {elapsed:.1f} s ({(fitted + drops) / elapsed:.2f} fields/s), "
              f"mean {job.quality} {quality_sum / max(fitted, 1):.3f}{gate}; shards in {args.out}")
    else:
        print(f"nothing to do: every batch of shard {shard_index}/{shard_count} is already in {args.out}")
    return 0


if __name__ == "__main__":
    run_main(main)
