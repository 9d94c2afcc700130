"""Turn a dataset of fields into a dataset of tokens (one token shard per field shard).

    python -m scripts.tokenize --fields data/fields/mnist --tokenizer fp8_e4m3 --normalize section \\
        --out data/tokens/mnist_fp8 --report

Weights are optionally normalised first (``--normalize section|tensor``, with the dataset's stored
statistics if it has them, else statistics computed over all its shards), then tokenized. The
token shards keep the metadata columns and the source's field metadata, and store the tokenizer
spec (with the uniform tokenizer's ranges) and the normalisation statistics in their schema
metadata, so ``fields.field_datasets.read_token_dataset(OUT).decode_weights()`` recovers weights.

``--report`` measures what the tokenization loses: for image fields (``ngp_image``, ``siren_image``,
``fourier_image``) it renders each field
and its token-decoded copy and reports the PSNR of the decoded render against the original render
at ``--render-size`` (default: the dataset's ``image_height``/``image_width``, else 28x28): mean,
worst and best field (higher is better, 200 dB means identical), plus per-section weight errors for
every kind; it prints the JSON and writes it to ``OUT/_report.json`` (the leading underscore makes
``pyarrow.parquet.read_table(OUT)`` skip it, so the folder still reads as one table).

Run it as a module (``python -m scripts.tokenize``): run as a file path, its name would shadow the
standard library's ``tokenize`` module.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from tqdm.auto import tqdm

from fields.cli import ArgumentParser, UserError, run_main
from fields.field_datasets import FIELDS_FORMAT, read_dataset, validate_shards, write_token_shard
from fields.tokenizers import TOKENIZER_NAMES, Tokenizer, make_tokenizer, merge_ranges, section_ranges
from fields.weights import NormalizationStats, section_slices

DEFAULT_RENDER_SIZE = (28, 28)
DEFAULT_UNIFORM_BITS = 8
REPORT_NAME = "_report.json"  # "_" prefix: pyarrow's dataset discovery ignores it
CACHE_BYTES = 1 << 30  # keep shards in memory between passes up to this size


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="python -m scripts.tokenize",
        description="Tokenize a dataset of fields (parquet shards) into a dataset of tokens.",
    )
    parser.add_argument("--fields", required=True, metavar="DIR_OR_SHARD", help="field dataset: a folder or one shard")
    parser.add_argument("--tokenizer", required=True, choices=TOKENIZER_NAMES, help="weight tokenizer")
    parser.add_argument(
        "--bits", type=int, help=f"bits of the uniform tokenizer, 2..16 (default: {DEFAULT_UNIFORM_BITS})"
    )
    parser.add_argument(
        "--normalize", choices=("none", "section", "tensor"), default="none",
        help="normalise weights per section or per tensor before tokenizing (default: none)",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder for the token shards")
    parser.add_argument("--overwrite", action="store_true", help="replace the shards of an earlier run in --out")
    parser.add_argument("--report", action="store_true", help="measure the fidelity lost (writes OUT/_report.json)")
    parser.add_argument(
        "--render-size", metavar="H,W",
        help="render size for --report (default: the dataset's image_height/image_width, else 28,28)",
    )
    parser.add_argument(
        "--backend", choices=("auto", "kernel", "jax"), default="auto", help="hash-grid backend for --report renders"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def parse_render_size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        height, width = (int(part) for part in text.split(","))
    except ValueError:
        raise UserError(f"--render-size must be H,W (two integers), got {text!r}") from None
    if height <= 0 or width <= 0:
        raise UserError(f"--render-size must be positive, got {text!r}")
    return height, width


class _ShardCache:
    """Reads shards, keeping them in memory between passes while they fit in ``CACHE_BYTES``."""

    def __init__(self, paths: list[str]):
        self.keep = sum(os.path.getsize(path) for path in paths) * 2 <= CACHE_BYTES
        self.cache: dict[str, object] = {}

    def __call__(self, path: str):
        if path in self.cache:
            return self.cache[path]
        dataset = read_dataset(path)
        if self.keep:
            self.cache[path] = dataset
        return dataset


def _first_non_finite_row(matrix: np.ndarray) -> int:
    return int(np.flatnonzero(~np.all(np.isfinite(matrix), axis=1))[0])


def build_tokenizer(args, shards: list[str], load, stats, mode) -> Tokenizer:
    if args.tokenizer != "uniform":
        return make_tokenizer(args.tokenizer)
    bits = DEFAULT_UNIFORM_BITS if args.bits is None else args.bits
    if not 2 <= bits <= 16:
        raise UserError(f"--bits must be in 2..16, got {bits}")
    ranges = {}
    for shard in shards:
        dataset = load(shard)
        matrix = dataset.matrix if stats is None else stats.normalize(dataset.matrix, mode)
        if matrix.size and not np.all(np.isfinite(matrix)):
            raise UserError(f"{shard}: row {_first_non_finite_row(matrix)} has non-finite weights (a diverged fit?)")
        ranges = merge_ranges(ranges, section_ranges(matrix, dataset.param_map))
    return make_tokenizer("uniform", bits=bits, param_map=load(shards[0]).param_map, ranges=ranges)


def _summary(values: list[float], worst: str) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "worst": None, "best": None}
    pick_worst, pick_best = (min, max) if worst == "min" else (max, min)
    return {"mean": float(np.mean(values)), "worst": float(pick_worst(values)), "best": float(pick_best(values))}


def make_report(args, shards, load, tokenizer, stats, mode, out_paths, render_size) -> dict:
    """Decodes the written token shards and compares with the original fields."""
    from fields.field_datasets import read_token_dataset

    first = load(shards[0])
    report: dict = {
        "field_kind": first.field_kind,
        "tokenizer": tokenizer.name,
        "bits": getattr(tokenizer, "bits", None),
        "normalize": args.normalize,
        "vocab_size": tokenizer.vocab_size,
        "tokens_per_field": tokenizer.num_tokens(first.matrix.shape[1]),
        "num_fields": 0,
    }
    sections = section_slices(first.param_map)
    squared = {section: 0.0 for section in sections}
    counts = {section: 0 for section in sections}
    max_abs = {section: 0.0 for section in sections}
    render_psnrs: list[float] = []
    worst_field = None
    from fields.image_fitting import FIELD_CONFIGS

    renders_images = first.field_kind in FIELD_CONFIGS
    if renders_images:
        from fields import metrics
        from hypernets.rendering import RenderSettings, render_images

        if render_size is None:
            stored = (first.metadata.get("image_height"), first.metadata.get("image_width"))
            render_size = tuple(int(v) for v in stored) if all(isinstance(v, int) for v in stored) else None
        render_size = render_size or DEFAULT_RENDER_SIZE
        settings = RenderSettings(backend=args.backend)
        report["render_size"] = list(render_size)
    total = sum(len(load(shard)) for shard in shards)
    bar = tqdm(total=total, desc="report", unit="field", disable=args.quiet, dynamic_ncols=True)
    for shard, out_path in zip(shards, out_paths, strict=True):
        original = load(shard)
        decoded = read_token_dataset(out_path).decode_weights()
        error = decoded.astype(np.float64) - original.matrix
        for section, indices in sections.items():
            block = error[:, indices]
            squared[section] += float(np.sum(block**2))
            counts[section] += block.size
            if block.size:
                max_abs[section] = max(max_abs[section], float(np.max(np.abs(block))))
        if renders_images:  # every field of the shard at once (hypernets.rendering batches the renders)
            source_ids = original.columns.get("source_id", [""] * len(original))
            fields = (original.field_kind, original.field_config, original.param_map, render_size, settings, shard)
            reference, candidate = render_images(original.matrix, *fields), render_images(decoded, *fields)
            for row in range(len(original)):
                value = metrics.psnr(candidate[row], reference[row])
                render_psnrs.append(value)
                if worst_field is None or value < worst_field["render_psnr_db"]:
                    worst_field = {"shard": os.path.basename(shard), "row": row, "source_id": str(source_ids[row]),
                                   "render_psnr_db": value}
        bar.update(len(original))
        report["num_fields"] += len(original)
    bar.close()
    report["weight_rmse"] = {s: (squared[s] / counts[s]) ** 0.5 if counts[s] else None for s in sections}
    report["weight_max_abs_error"] = max_abs
    if renders_images:
        report["render_psnr_db"] = _summary(render_psnrs, worst="min")
        report["worst_field"] = worst_field
        report["render_psnr_note"] = (
            "PSNR (dB) of each token-decoded field's render against the original field's render; "
            "higher means less fidelity lost, 200 means identical"
        )
    return report


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.bits is not None and args.tokenizer != "uniform":
        raise UserError("--bits applies to --tokenizer uniform only")
    render_size = parse_render_size(args.render_size)
    shards = validate_shards(args.fields)
    out_paths = [os.path.join(args.out, os.path.basename(shard)) for shard in shards]
    for shard, out_path in zip(shards, out_paths, strict=True):
        if os.path.exists(out_path) and os.path.samefile(shard, out_path):
            raise UserError(f"--out {args.out} would overwrite the input shard {shard}; choose another folder")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create {args.out}: {error.strerror or error}") from None
    existing = sorted(name for name in os.listdir(args.out) if name.endswith(".parquet"))
    if existing and not args.overwrite:
        raise UserError(f"{args.out} already holds {len(existing)} shard(s); use --overwrite or another --out")
    stale = sorted(set(existing) - {os.path.basename(path) for path in out_paths})
    if stale:  # they would be read together with the new shards
        raise UserError(f"{args.out} holds shard(s) this run would not replace ({stale[0]}, ...); use another --out")

    load = _ShardCache(shards)
    mode = None if args.normalize == "none" else args.normalize
    stats = None
    if mode is not None:
        stored = load(shards[0]).normalization
        if stored is not None:
            stats = stored
        else:
            matrices = (load(shard).matrix for shard in shards)
            stats = NormalizationStats.from_matrices(matrices, load(shards[0]).param_map)
    tokenizer = build_tokenizer(args, shards, load, stats, mode)

    bar = tqdm(total=len(shards), desc="tokenize", unit="shard", disable=args.quiet, dynamic_ncols=True)
    num_fields = 0
    for shard, out_path in zip(shards, out_paths, strict=True):
        dataset = load(shard)
        weights = dataset.matrix if stats is None else stats.normalize(dataset.matrix, mode)
        try:
            tokens = tokenizer.encode(weights)
        except ValueError:
            raise UserError(
                f"{shard}: row {_first_non_finite_row(weights)} has non-finite weights (a diverged fit?)"
            ) from None
        source_dataset = {
            "path": os.path.abspath(shard),
            "hfn_format": FIELDS_FORMAT,
            "normalization": json.loads(dataset.normalization.to_json()) if dataset.normalization else None,
        }
        try:
            write_token_shard(
                out_path, tokens, dataset.columns, tokenizer, dataset.field_kind, dataset.field_config,
                dataset.param_map, normalization_mode=mode, normalization=stats, source_dataset=source_dataset,
                extra_schema_metadata=dataset.metadata,
            )
        except OSError as error:
            raise UserError(f"cannot write {out_path}: {error.strerror or error}") from None
        num_fields += len(dataset)
        bar.update(1)
    bar.close()
    print(
        f"wrote {len(shards)} token shard(s) to {args.out}: {num_fields} fields, "
        f"{tokenizer.num_tokens(load(shards[0]).matrix.shape[1])} tokens each, vocab {tokenizer.vocab_size}",
        file=sys.stderr,
    )
    if args.report:
        report = make_report(args, shards, load, tokenizer, stats, mode, out_paths, render_size)
        with open(os.path.join(args.out, REPORT_NAME), "w") as handle:
            json.dump(report, handle, indent=2)
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    run_main(main)
