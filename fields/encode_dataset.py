"""Encode many images into fields of one architecture, many at once, as parquet shards.

    python -m fields.encode_dataset --source procedural:primitives --num 1024 --out data/fields/primitives
    python -m fields.encode_dataset --source idx:/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz,\
/usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz --out data/fields/fmnist --shard 0/2

Items are split into batches of ``--fields-per-batch``; each batch is fitted in one vmapped call
(a leading field axis through the model, the compiled kernels and Adam; field ``i`` gets seed
``--seed + i``) and written atomically as ``fields-FIRST-LAST.parquet``. ``--shard i/n`` takes every
n-th batch, so processes or hosts can share the work. Rerunning the same command skips the shards
that exist: a killed job loses at most the batch in flight and never duplicates a field.
``field_config.json`` holds the field config and the param map (also in each shard's schema).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np
from tqdm.auto import tqdm

from fields.cli import ArgumentParser, UserError, run_main
from fields.config import config_to_dict, resolve_preset

FIELD_FAMILIES = ("ngp", "siren", "fourier")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m fields.encode_dataset", description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True,
                        help="procedural:primitives | idx:IMAGES[,LABELS] | parquet:FILE[#COLUMN] | DIR")
    parser.add_argument("--out", required=True, help="output folder for the parquet shards")
    parser.add_argument("--field", choices=FIELD_FAMILIES, default="ngp", help="field family (default: ngp)")
    parser.add_argument("--preset", default="small", help="field preset (default: small, for ~28x28 images)")
    parser.add_argument("--num", type=int, help="number of items (procedural: how many to make; others: a cap)")
    parser.add_argument("--size", help="resize images to HxW (e.g. 28x28)")
    parser.add_argument("--steps", type=int, help="steps per field (default: the preset's)")
    parser.add_argument("--fields-per-batch", type=int, default=256, help="fields fitted at once (default 256)")
    parser.add_argument("--shard", default="0/1", help="i/n: do every n-th batch starting at i (default 0/1)")
    parser.add_argument("--min-psnr", type=float, help="quality gate: refit fields below it once, then drop them")
    parser.add_argument("--seed", type=int, default=0, help="field i uses seed + i; procedural data seed")
    parser.add_argument("--backend", choices=("auto", "kernel", "jax"), default="auto")
    parser.add_argument("--quiet", action="store_true")
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


def resolve_config(args):
    from fields.image_fitting import MLP_PRESETS, PRESETS

    presets = PRESETS if args.field == "ngp" else MLP_PRESETS[args.field]
    return resolve_preset(presets, args.preset, {"backend": args.backend, "steps": args.steps}, f"{args.field} preset")


def batch_ranges(num_items: int, per_batch: int) -> list[tuple[int, int]]:
    """``[(first, stop), ...]`` covering ``range(num_items)``."""
    return [(first, min(first + per_batch, num_items)) for first in range(0, num_items, per_batch)]


def shard_name(first: int, stop: int) -> str:
    return f"fields-{first:07d}-{stop - 1:07d}.parquet"


def check_or_write_manifest(out: str, manifest: dict) -> None:
    """``field_config.json`` records what the folder holds; a different run into it is refused."""
    path = os.path.join(out, "field_config.json")
    if os.path.exists(path):
        try:
            with open(path) as handle:
                saved = json.load(handle)
        except (OSError, json.JSONDecodeError) as error:
            raise UserError(f"{path} is unreadable ({error}); remove it or use another --out") from None
        if saved != manifest:
            changed = sorted(key for key in set(saved) | set(manifest) if saved.get(key) != manifest.get(key))
            raise UserError(f"{out} holds fields of another configuration ({', '.join(changed)} differ); "
                            "use another --out")
        return
    temporary = path + ".tmp"
    with open(temporary, "w") as handle:
        json.dump(manifest, handle, indent=2, sort_keys=True)
    os.replace(temporary, path)


def field_param_map(field_config) -> list:
    """The param map of a field architecture (from its init shapes; no fitting needed)."""
    import jax
    import jax.numpy as jnp

    from fields.weights import param_map

    shapes = jax.eval_shape(lambda: field_config.build("jax").init(jax.random.PRNGKey(0),
                                                                   jnp.zeros((1, 2), jnp.float32)))["params"]
    return param_map(jax.tree_util.tree_map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), shapes))


def fit_with_gate(images, config, seeds, min_psnr, pmap):
    """Fits a batch; fields below ``min_psnr`` are refitted once (other seed, twice the steps), then
    dropped. Returns ``(params [M, P], kept indices [M], psnrs [M], seeds [M], steps [M], refits, drops)``."""
    from fields.image_fitting import fit_image_batch
    from fields.weights import params_to_vector

    result = fit_image_batch(images, config, seeds)
    matrix = np.stack([params_to_vector(_field(result.params, i), pmap) for i in range(len(seeds))])
    psnrs = result.psnr.copy()
    steps = np.full(len(seeds), config.steps, np.int32)
    seeds = np.asarray(seeds, np.int64)
    refits = drops = 0
    if min_psnr is not None:
        low = np.flatnonzero(psnrs < min_psnr)
        if len(low):
            refits = len(low)
            retry_seeds = [int(seed) + 1_000_003 for seed in seeds[low]]
            retry_config = dataclasses.replace(config, steps=2 * config.steps)
            retry = fit_image_batch(images[low], retry_config, retry_seeds)
            for slot, index in enumerate(low):
                if retry.psnr[slot] > psnrs[index]:
                    matrix[index] = params_to_vector(_field(retry.params, slot), pmap)
                    psnrs[index], seeds[index], steps[index] = retry.psnr[slot], retry_seeds[slot], retry_config.steps
        keep = np.flatnonzero(psnrs >= min_psnr)
        drops = len(seeds) - len(keep)
    else:
        keep = np.arange(len(seeds))
    return matrix[keep], keep, psnrs[keep], seeds[keep], steps[keep], refits, drops


def _field(params: dict, index: int) -> dict:
    """Field ``index`` of params whose leaves have a leading field axis."""
    return {name: _field(value, index) if isinstance(value, dict) else value[index] for name, value in params.items()}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    shard_index, shard_count = parse_shard(args.shard)
    size = parse_size(args.size)
    if args.fields_per_batch < 1:
        raise UserError(f"--fields-per-batch must be >= 1, got {args.fields_per_batch}")
    if args.num is not None and args.num < 1:
        raise UserError(f"--num must be >= 1, got {args.num}")
    config = resolve_config(args)

    from fields.data.image_sources import open_image_source
    from fields.field_datasets import write_shard

    source = open_image_source(args.source, args.num, args.seed, size)
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot write to --out {args.out}: {error.strerror or error}") from None
    field_config = dataclasses.replace(config.field, output_dim=source.channels)
    from fields.weights import param_map_to_json

    pmap = field_param_map(field_config)
    pmap_json = param_map_to_json(pmap)
    manifest = {"param_map": json.loads(pmap_json) if isinstance(pmap_json, str) else pmap_json,
                "source": args.source, "num_items": source.num_items, "image_height": source.height,
                "image_width": source.width, "field_kind": field_config.field_kind,
                "field_config": config_to_dict(field_config), "fit": config_to_dict(config), "seed": args.seed,
                "min_psnr": args.min_psnr, "fields_per_batch": args.fields_per_batch}
    check_or_write_manifest(args.out, manifest)

    batches = [batch for k, batch in enumerate(batch_ranges(source.num_items, args.fields_per_batch))
               if k % shard_count == shard_index]
    todo = [batch for batch in batches if not os.path.exists(os.path.join(args.out, shard_name(*batch)))]
    total = sum(stop - first for first, stop in batches)
    done = total - sum(stop - first for first, stop in todo)
    print(f"{source.name}: {source.num_items} items of {source.height}x{source.width}x{source.channels}; "
          f"shard {shard_index}/{shard_count}: {len(batches)} batches, {len(batches) - len(todo)} already written; "
          f"{field_config.field_kind} fields, {config.steps} steps each")
    bar = tqdm(total=total, initial=done, desc="encode", unit="field", disable=args.quiet, dynamic_ncols=True)
    start, fitted, psnr_sum, refits, drops = time.perf_counter(), 0, 0.0, 0, 0
    for first, stop in todo:
        indices = list(range(first, stop))
        images = source.load(indices)
        seeds = [args.seed + index for index in indices]
        try:
            matrix, keep, psnrs, used_seeds, steps, batch_refits, batch_drops = fit_with_gate(
                images, config, seeds, args.min_psnr, pmap)
        except FloatingPointError as error:
            raise UserError(f"batch {first}..{stop - 1}: {error}") from None
        columns = {
            "source_id": [source.source_id(indices[k]) for k in keep],
            "label": [int(source.labels[indices[k]]) for k in keep],
            "psnr": [float(p) for p in psnrs],
            "seed": [int(s) for s in used_seeds],
            "steps": [int(s) for s in steps],
        }
        write_shard(os.path.join(args.out, shard_name(first, stop)), matrix, columns, field_config.field_kind,
                    config_to_dict(field_config), pmap,
                    extra_schema_metadata={"image_height": source.height, "image_width": source.width,
                                           "source": args.source})
        fitted += len(keep)
        psnr_sum += float(np.sum(psnrs))
        refits, drops = refits + batch_refits, drops + batch_drops
        bar.update(stop - first)
        elapsed = time.perf_counter() - start
        bar.set_postfix(fields_per_s=f"{(fitted + drops) / elapsed:.1f}", mean_psnr=f"{psnr_sum / max(fitted, 1):.2f}")
    bar.close()
    elapsed = time.perf_counter() - start
    gate = f"; quality gate {args.min_psnr} dB: {refits} refitted, {drops} dropped" if args.min_psnr is not None else ""
    if todo:
        print(f"encoded {fitted} fields in {elapsed:.1f} s ({(fitted + drops) / elapsed:.1f} fields/s), "
              f"mean PSNR {psnr_sum / max(fitted, 1):.2f} dB{gate}; shards in {args.out}")
    else:
        print(f"nothing to do: every batch of shard {shard_index}/{shard_count} is already in {args.out}")
    return 0


if __name__ == "__main__":
    run_main(main)
