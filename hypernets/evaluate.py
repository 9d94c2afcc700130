"""Evaluate generated fields against reference fields: quality, coverage and novelty, with render grids.

    python -m hypernets.evaluate --samples runs/diffusion/samples --reference data/fields/prim_val \\
        --train data/fields/prim_train [--out runs/diffusion/samples_eval]

All three inputs are datasets of fields (``fields.field_datasets``: one ``.parquet`` shard or a folder
of them) of one field kind and architecture. Every field is rendered (:mod:`hypernets.rendering`:
images for image fields, 2,048 surface points for occupancy fields), and the report holds:

- MMD, COV and 1-NNA between samples and reference (definitions in :mod:`hypernets.metrics`) with
  the pixel RMS distance (images) or the squared Chamfer distance on surface points (shapes); 1-NNA
  is computed on sets of equal size (a seeded random subset of the larger set), since with unequal
  sets its 50% ideal no longer holds;
- images only: the Fréchet distance and precision/recall (k = 3) in the feature space of a small
  CNN (:mod:`hypernets.classifier`) trained on the reference renders and their labels (cached in
  ``OUT/classifier``); without reference labels, a fixed random projection of the pixels (or the
  pixels) instead; and the class-conditional accuracy: the fraction of labelled samples the
  classifier assigns to their stored label;
- novelty (with ``--train``): each sample's distance to its nearest training field's render, beside
  the same for a baseline of training fields plus Gaussian noise of 0.02 and 0.04 times each
  section's standard deviation (``fields.weights.section_slices``), so memorisation is visible;
- PNG grids: ``samples.png``, ``reference.png`` and ``nearest_train.png`` (sample, nearest training field).

Outputs go to ``--out``, by default next to the samples: ``S_eval`` for a dataset path ``S`` (a
trailing ``.parquet`` is dropped: ``samples.parquet`` -> ``samples_eval``), so several sample sets of
one run do not overwrite each other. ``eval.json`` holds every number, ``eval.md`` a short report,
``config.json`` the resolved settings (a different evaluation into the same folder is refused; the
same one reruns and reuses the cached classifier).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np

from fields.cli import ArgumentParser, UserError, prepare_workdir, run_main
from fields.config import check_run_config, config_to_dict, resolve_preset
from fields.field_datasets import FieldDataset, read_dataset
from fields.files import write_atomic
from fields.weights import param_count, section_slices
from hypernets import metrics
from hypernets.classifier import PRESETS as CLASSIFIER_PRESETS
from hypernets.classifier import ClassifierConfig, fallback_features, load_or_train
from hypernets.datasets import label_column
from hypernets.metrics import METRIC_ROWS
from hypernets.metrics import format_metric as _format
from hypernets.rendering import Renders, RenderSettings, render_fields, render_kind, save_grid
from hypernets.runs import read_saved_run, write_run

NOISE_SIGMAS = (0.02, 0.04)
PIXEL_DISTANCE = "pixel_rms"
CHAMFER_DISTANCE = "chamfer_squared"
DISTANCE_DEFINITIONS = {
    PIXEL_DISTANCE: "pixel RMS difference: ||x - y||_2 / sqrt(height * width * channels), images in [0, 1]",
    CHAMFER_DISTANCE: "squared Chamfer distance on surface points: mean_i min_j |a_i - b_j|^2 + "
                      "mean_j min_i |a_i - b_j|^2 (no square root)",
}
PAIRS_PER_GRID_ROW = 4


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """One evaluation (saved as ``OUT/config.json``).

    Attributes:
        samples, reference, train: dataset paths (absolute; ``train`` may be empty: no novelty).
        render: how fields are rendered.
        classifier: the feature network (images with labelled reference).
        grid_size: fields shown in each PNG grid.
        baseline_count: training fields perturbed for each noise baseline.
        noise_sigmas: the baselines' noise scales, in units of each section's standard deviation.
        precision_recall_k: ``k`` of the k-NN manifolds.
        seed: choice of the baseline's training fields and its noise.
    """

    samples: str
    reference: str
    train: str = ""
    render: RenderSettings = dataclasses.field(default_factory=RenderSettings)
    classifier: ClassifierConfig = dataclasses.field(default_factory=ClassifierConfig)
    grid_size: int = 16
    baseline_count: int = 64
    noise_sigmas: tuple[float, ...] = NOISE_SIGMAS
    precision_recall_k: int = metrics.PRECISION_RECALL_K
    seed: int = 0


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m hypernets.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", required=True, help="dataset of generated fields (parquet file or folder)")
    parser.add_argument("--reference", required=True, help="dataset of held-out reference fields")
    parser.add_argument("--train", help="dataset of the training fields (enables the novelty report)")
    parser.add_argument("--out", help="output folder (default: SAMPLES_eval beside the samples)")
    parser.add_argument("--classifier-preset", default="default", help=f"one of {', '.join(CLASSIFIER_PRESETS)}")
    parser.add_argument("--classifier-steps", type=int, help="override the classifier preset's training steps")
    parser.add_argument("--backend", choices=("auto", "kernel", "jax"), default="auto",
                        help="hash-grid backend for rendering image fields")
    parser.add_argument("--num-points", type=int, default=2048, help="surface points per shape (default 2048)")
    parser.add_argument("--mesh-resolution", type=int, default=128, help="marching-cubes resolution (default 128)")
    parser.add_argument("--grid-size", type=int, default=16, help="fields per PNG grid (default 16)")
    parser.add_argument("--baseline-count", type=int, default=64,
                        help="training fields perturbed for each noise baseline (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="baseline rows and noise seed")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def default_out(samples: str) -> str:
    """``S_eval`` beside the samples dataset ``S`` (``.parquet`` and trailing slashes dropped)."""
    base = os.path.normpath(samples)
    if base.endswith(".parquet"):
        base = base[: -len(".parquet")]
    return base + "_eval"


def config_from_args(args) -> EvaluateConfig:
    for flag, value, minimum in (("--num-points", args.num_points, 1), ("--mesh-resolution", args.mesh_resolution, 8),
                                 ("--grid-size", args.grid_size, 1), ("--baseline-count", args.baseline_count, 1)):
        if value < minimum:
            raise UserError(f"{flag} must be >= {minimum}, got {value}")
    classifier = resolve_preset(CLASSIFIER_PRESETS, args.classifier_preset, {"steps": args.classifier_steps},
                                "classifier preset")
    render = RenderSettings(backend=args.backend, num_points=args.num_points, mesh_resolution=args.mesh_resolution)
    return EvaluateConfig(
        samples=os.path.abspath(args.samples),
        reference=os.path.abspath(args.reference),
        train=os.path.abspath(args.train) if args.train else "",
        render=render,
        classifier=classifier,
        grid_size=args.grid_size,
        baseline_count=args.baseline_count,
        seed=args.seed,
    )


def check_or_write_config(out: str, config: EvaluateConfig) -> None:
    """Saves ``config.json`` in ``out``; refuses an existing one that differs (one-line ``UserError``)."""
    values = config_to_dict(config)
    check_run_config(out, read_saved_run(out, None, "hypernets.evaluate"), values,
              holds="an evaluation with other settings", option="--out")
    write_run(out, values)


# ---------------------------------------------------------------------------------- inputs


def load_nonempty(path: str, role: str) -> FieldDataset:
    """Reads a dataset of fields; ``UserError`` when it is missing, unreadable or has no rows."""
    dataset = read_dataset(path)
    if not len(dataset):
        raise UserError(f"{role} dataset {path} is empty (no fields)")
    return dataset


def check_compatible(dataset: FieldDataset, role: str, reference: FieldDataset, reference_path: str) -> None:
    """Same field kind, param map and field config as the reference, else a one-line ``UserError``."""
    where = f"{role} dataset {dataset.paths[0]}"
    if dataset.field_kind != reference.field_kind:
        raise UserError(f"{where} holds {dataset.field_kind} fields but the reference {reference_path} holds "
                        f"{reference.field_kind} fields")
    if list(dataset.param_map) != list(reference.param_map):
        raise UserError(f"{where} has another param map than the reference {reference_path} "
                        f"({param_count(dataset.param_map)} vs {param_count(reference.param_map)} parameters in "
                        f"{len(dataset.param_map)} vs {len(reference.param_map)} tensors)")
    if dataset.field_config != reference.field_config:
        changed = sorted(key for key in set(dataset.field_config) | set(reference.field_config)
                         if dataset.field_config.get(key) != reference.field_config.get(key))
        raise UserError(f"{where} has another field config than the reference {reference_path} "
                        f"({', '.join(changed)} differ)")
    for key in ("image_height", "image_width"):
        if key in dataset.metadata and key in reference.metadata and dataset.metadata[key] != reference.metadata[key]:
            raise UserError(f"{where} has {key} {dataset.metadata[key]} but the reference has "
                            f"{reference.metadata[key]}")


def render_metadata(reference: FieldDataset, others: list[FieldDataset]) -> dict:
    """Schema metadata that sets the render size: the reference's, completed by the other datasets'."""
    metadata = dict(reference.metadata)
    for dataset in others:
        for key in ("image_height", "image_width"):
            if key not in metadata and key in dataset.metadata:
                metadata[key] = dataset.metadata[key]
    return metadata


# ------------------------------------------------------------------------------- distances


def distance_matrix(a: Renders, b: Renders | None = None) -> np.ndarray:
    """``[len(a), len(b)]`` distances between renders (``b`` None: ``a`` against itself)."""
    if a.kind == "image":
        flat_a = a.values.reshape(len(a), -1)
        return metrics.pixel_distances(flat_a, flat_a if b is None else b.values.reshape(len(b), -1))
    return metrics.pairwise_chamfer(a.values, None if b is None else b.values)


def section_std(matrix: np.ndarray, pmap) -> np.ndarray:
    """``[P]`` float64: each column's section standard deviation over ``matrix [N, P]``."""
    std = np.zeros(matrix.shape[1], np.float64)
    for indices in section_slices(pmap).values():
        std[indices] = float(np.std(matrix[:, indices], dtype=np.float64))
    return std


def noisy_copies(matrix: np.ndarray, column_std: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """``matrix [n, P]`` plus Gaussian noise of ``sigma * column_std [P]`` (float32 result)."""
    noise = rng.standard_normal(matrix.shape) * (sigma * column_std)[None, :]
    return (matrix.astype(np.float64) + noise).astype(np.float32)


# ------------------------------------------------------------------------------- the evaluation


def feature_report(config: EvaluateConfig, out: str, reference: Renders, reference_labels: np.ndarray,
                   samples: Renders, sample_labels: np.ndarray, train: Renders | None = None,
                   train_labels: np.ndarray | None = None) -> tuple[dict, dict]:
    """Image features (classifier or fallback), FD, precision/recall and the class-conditional accuracy.

    With labelled ``train`` renders (fields the classifier never saw), also the classifier's accuracy on
    them: real data's class accuracy, the ceiling that the samples' class accuracy is read against.
    ``train_labels`` (``[N]`` int, -1 unknown) is given exactly when ``train`` is.

    Returns:
        ``(features description, metric values)``.
    """
    labelled = reference_labels >= 0
    classes = np.unique(reference_labels[labelled])
    values: dict = {"fd": None, "precision": None, "recall": None, "conditional_accuracy": None,
                    "train_class_accuracy": None}
    if len(classes) >= 2:
        num_classes = int(reference_labels.max()) + 1
        classifier = load_or_train(os.path.join(out, "classifier"), reference.values[labelled],
                                   reference_labels[labelled], num_classes, config.classifier)
        reference_features = classifier.features(reference.values)
        sample_logits, sample_features = classifier.apply(samples.values)
        features = {
            "kind": "classifier",
            "dim": int(config.classifier.feature_dim),
            "description": (f"{config.classifier.feature_dim}-d penultimate layer (ReLU) of a CNN trained on "
                            f"{int(labelled.sum())} labelled reference renders, {num_classes} classes, "
                            f"{config.classifier.steps} steps (seed {config.classifier.seed}); accuracy on those "
                            f"renders {classifier.train_accuracy:.3f}"),
            "classifier_train_accuracy": classifier.train_accuracy,
            "classifier_cached": classifier.cached,
            "classifier_dir": "classifier",
        }
        sample_labelled = sample_labels >= 0
        if sample_labelled.any():
            predicted = np.argmax(sample_logits, axis=1)[sample_labelled]
            values["conditional_accuracy"] = float(np.mean(predicted == sample_labels[sample_labelled]))
        if train is not None and (train_labels >= 0).any():
            train_labelled = train_labels >= 0
            values["train_class_accuracy"] = float(np.mean(classifier.predict(train.values[train_labelled])
                                                           == train_labels[train_labelled]))
    else:
        reference_features, description = fallback_features(reference.values, seed=config.seed)
        sample_features, _ = fallback_features(samples.values, seed=config.seed)
        kind = "pixels" if description.startswith("raw") else "random_projection"
        features = {"kind": kind, "dim": int(reference_features.shape[1]),
                    "description": f"{description}: the reference has no labels of two or more classes, so no "
                                   "classifier was trained"}
    if len(reference_features) >= 2 and len(sample_features) >= 2:
        values["fd"] = metrics.frechet_distance_of_features(sample_features, reference_features)
    k = config.precision_recall_k
    if len(reference_features) > k and len(sample_features) > k:
        values["precision"], values["recall"] = metrics.precision_recall(reference_features, sample_features, k)
    return features, values


def balanced_one_nna(sample_distances: np.ndarray, reference_distances: np.ndarray, cross: np.ndarray,
                     seed: int) -> dict:
    """1-NNA on equal-size sets: the larger set is cut to the smaller's size by a seeded random subset.

    Args: the ``[S, S]``, ``[R, R]`` and ``[S, R]`` distance matrices. Returns
    ``metrics.one_nearest_neighbour_accuracy``'s dict plus ``set_size``.
    """
    count = min(len(sample_distances), len(reference_distances))
    rng = np.random.default_rng(seed)

    def subset(size: int) -> np.ndarray:
        return np.arange(size) if size == count else np.sort(rng.choice(size, count, replace=False))

    rows, columns = subset(len(sample_distances)), subset(len(reference_distances))
    result = metrics.one_nearest_neighbour_accuracy(sample_distances[np.ix_(rows, rows)],
                                                    reference_distances[np.ix_(columns, columns)],
                                                    cross[np.ix_(rows, columns)])
    return {**result, "set_size": count}


def novelty_report(config: EvaluateConfig, train: FieldDataset, train_renders: Renders, samples: Renders,
                   metadata: dict, progress: bool) -> tuple[dict, np.ndarray]:
    """Nearest-training-field distances of the samples and of the noise baselines.

    Returns:
        ``(report, nearest training index of each sample [N])``.
    """
    sample_distances, nearest_train = metrics.nearest(distance_matrix(samples, train_renders))
    rng = np.random.default_rng(config.seed)
    count = min(config.baseline_count, len(train))
    rows = np.sort(rng.choice(len(train), size=count, replace=False))
    column_std = section_std(train.matrix, train.param_map)
    baselines = {}
    for sigma in config.noise_sigmas:
        noisy = noisy_copies(train.matrix[rows], column_std, sigma, rng)
        renders = render_fields(noisy, train.field_kind, train.field_config, train.param_map, metadata,
                                config.render, f"noise baseline {sigma}", progress)
        baseline_distances, _ = metrics.nearest(distance_matrix(renders, train_renders))
        baselines[f"{sigma:g}"] = metrics.summary(baseline_distances)
    smallest = f"{min(config.noise_sigmas):g}"
    threshold = baselines[smallest]["median"]
    report = {
        "samples_to_train": metrics.summary(sample_distances),
        "baselines": baselines,
        "baseline_rows": int(count),
        "memorised_fraction": float(np.mean(sample_distances <= threshold)),
        "memorised_definition": (f"fraction of samples at most as far from their nearest training field as the "
                                 f"median training field plus {smallest} x section std noise"),
    }
    return report, nearest_train


@dataclasses.dataclass
class Inputs:
    """The datasets of one evaluation, checked to be non-empty and of one field kind and architecture."""

    samples: FieldDataset
    reference: FieldDataset
    train: FieldDataset | None
    kind: str  # "image" or "points"


def load_inputs(config: EvaluateConfig) -> Inputs:
    """Reads and checks the datasets (one-line ``UserError`` for missing, empty or mismatched ones)."""
    samples = load_nonempty(config.samples, "samples")
    reference = load_nonempty(config.reference, "reference")
    train = load_nonempty(config.train, "train") if config.train else None
    check_compatible(samples, "samples", reference, config.reference)
    if train is not None:
        check_compatible(train, "train", reference, config.reference)
    kind = render_kind(reference.field_kind, f"reference dataset {config.reference}")
    return Inputs(samples, reference, train, kind)


def evaluate(config: EvaluateConfig, out: str, inputs: Inputs | None = None, progress: bool = True) -> dict:
    """Runs the whole evaluation; writes the grids and the classifier cache into ``out``; returns the report."""
    inputs = inputs or load_inputs(config)
    samples, reference, train, kind = inputs.samples, inputs.reference, inputs.train, inputs.kind
    metadata = render_metadata(reference, [samples] + ([train] if train is not None else []))

    def render(dataset: FieldDataset, role: str) -> Renders:
        return render_fields(dataset.matrix, dataset.field_kind, dataset.field_config, dataset.param_map, metadata,
                             config.render, f"{role} dataset {dataset.paths[0]}", progress)

    sample_renders, reference_renders = render(samples, "samples"), render(reference, "reference")
    same_data = train is not None and os.path.realpath(config.train) == os.path.realpath(config.reference)
    train_renders = reference_renders if same_data else render(train, "train") if train is not None else None
    distance_name = PIXEL_DISTANCE if kind == "image" else CHAMFER_DISTANCE

    cross = distance_matrix(sample_renders, reference_renders)
    one_nna = balanced_one_nna(distance_matrix(sample_renders), distance_matrix(reference_renders), cross,
                               config.seed)
    sample_to_reference, _ = metrics.nearest(cross)
    values = {
        "mmd": metrics.minimum_matching_distance(cross),
        "cov": metrics.coverage(cross),
        "1nna": one_nna["accuracy"],
        "1nna_samples": one_nna["accuracy_samples"],
        "1nna_reference": one_nna["accuracy_reference"],
        "1nna_set_size": one_nna["set_size"],
        "fd": None, "precision": None, "recall": None, "conditional_accuracy": None, "train_class_accuracy": None,
    }
    sample_labels = label_column(samples.columns, len(samples))
    reference_labels = label_column(reference.columns, len(reference))
    if kind == "image":
        unseen_train = train_renders if train is not None and not same_data else None
        train_labels = label_column(train.columns, len(train)) if unseen_train is not None else None
        features, feature_values = feature_report(config, out, reference_renders, reference_labels, sample_renders,
                                                  sample_labels, unseen_train, train_labels)
        values.update(feature_values)
    else:
        features = {"kind": None, "dim": 0,
                    "description": "none: FD, precision/recall and class accuracy are computed for image fields only"}

    novelty, nearest_train = None, None
    if train is not None:
        novelty, nearest_train = novelty_report(config, train, train_renders, sample_renders, metadata, progress)
        novelty["samples_to_reference"] = metrics.summary(sample_to_reference)

    grids = write_grids(config, out, sample_renders, reference_renders, train_renders, nearest_train)
    return {
        "samples": config.samples,
        "reference": config.reference,
        "train": config.train or None,
        "field_kind": reference.field_kind,
        "render": reference_renders.description,
        "counts": {
            "samples": len(samples), "reference": len(reference), "train": len(train) if train is not None else 0,
            "labelled_samples": int(np.sum(sample_labels >= 0)),
            "labelled_reference": int(np.sum(reference_labels >= 0)),
            "invalid_samples": int(sample_renders.invalid.sum()),
            "invalid_reference": int(reference_renders.invalid.sum()),
            "invalid_train": int(train_renders.invalid.sum()) if train_renders is not None else 0,
        },
        "distance": {"name": distance_name, "definition": DISTANCE_DEFINITIONS[distance_name]},
        "features": features,
        "metrics": values,
        "precision_recall_k": config.precision_recall_k,
        "novelty": novelty,
        "grids": grids,
    }


def write_grids(config: EvaluateConfig, out: str, samples: Renders, reference: Renders, train: Renders | None,
                nearest_train: np.ndarray | None) -> dict[str, str]:
    """``samples.png``, ``reference.png`` and (with training fields) ``nearest_train.png``: each of the
    first samples followed by its nearest training field, ``PAIRS_PER_GRID_ROW`` pairs per row."""
    count = config.grid_size
    columns = max(1, int(math.ceil(math.sqrt(count))))
    grids = {"samples": "samples.png", "reference": "reference.png"}
    save_grid(os.path.join(out, grids["samples"]), samples.previews[:count], columns)
    save_grid(os.path.join(out, grids["reference"]), reference.previews[:count], columns)
    if train is not None and nearest_train is not None:
        shown = min(count, len(samples))
        pairs = np.stack([samples.previews[:shown], train.previews[nearest_train[:shown]]], axis=1)
        grids["nearest_train"] = "nearest_train.png"
        save_grid(os.path.join(out, grids["nearest_train"]), pairs.reshape((-1,) + pairs.shape[2:]),
                  2 * PAIRS_PER_GRID_ROW, group=2)
    return grids


# ---------------------------------------------------------------------------------- reports


def _json_ready(value):
    """NaN/inf -> None (strict JSON), NumPy scalars -> Python numbers, recursively."""
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value




def markdown_report(report: dict) -> str:
    """The short ``eval.md``: counts, distance, features, a metric table, novelty and the grids."""
    counts, values = report["counts"], report["metrics"]
    lines = [
        "# Evaluation of generated fields",
        "",
        f"- samples: `{report['samples']}` ({counts['samples']} fields, {counts['labelled_samples']} labelled)",
        f"- reference: `{report['reference']}` ({counts['reference']} fields, {counts['labelled_reference']} labelled)",
        (f"- train: `{report['train']}` ({counts['train']} fields)" if report["train"]
         else "- train: not given (no novelty report)"),
        f"- field kind: {report['field_kind']}; renders: {report['render']}",
        f"- distance for MMD/COV/1-NNA and novelty: {report['distance']['definition']}",
        f"- features for FD and precision/recall (k={report['precision_recall_k']}): "
        f"{report['features']['description']}",
    ]
    if counts["invalid_samples"] or counts["invalid_reference"] or counts["invalid_train"]:
        lines.append(f"- invalid fields (non-finite weights or an empty surface; scored as a black image or a cloud "
                     f"at the origin): samples {counts['invalid_samples']}, reference {counts['invalid_reference']}, "
                     f"train {counts['invalid_train']}")
    lines += ["", "| metric | value | notes |", "|---|---|---|"]
    for key, name, percent, note in METRIC_ROWS:
        lines.append(f"| {name} | {_format(values.get(key), percent)} | {note} |")
    lines.append(f"| 1-NNA (samples / reference) | {_format(values['1nna_samples'], True)} / "
                 f"{_format(values['1nna_reference'], True)} | accuracy on each set "
                 f"({values['1nna_set_size']} of each) |")
    novelty = report["novelty"]
    if novelty is not None:
        lines += ["", "## Novelty: distance to the nearest training field", "",
                  "| fields | count | mean | median | min |", "|---|---|---|---|---|"]
        rows = [("samples", novelty["samples_to_train"])]
        rows += [(f"train + noise {sigma} x section std", stats) for sigma, stats in novelty["baselines"].items()]
        for name, stats in rows:
            lines.append(f"| {name} | {stats['count']} | {_format(stats['mean'])} | {_format(stats['median'])} | "
                         f"{_format(stats['min'])} |")
        held_out = novelty["samples_to_reference"]
        lines += ["", f"Samples' distance to the nearest reference (held-out) field: mean {_format(held_out['mean'])},"
                      f" median {_format(held_out['median'])}.",
                  f"Memorised: {_format(novelty['memorised_fraction'], True)} ({novelty['memorised_definition']})."]
    lines += ["", "## Grids", ""] + [f"- {name}: `{path}`" for name, path in report["grids"].items()]
    return "\n".join(lines) + "\n"


def write_report(out: str, report: dict) -> None:
    """Writes ``eval.json`` (every number; NaN as null) and ``eval.md``."""
    write_atomic(os.path.join(out, "eval.json"), json.dumps(_json_ready(report), indent=2))
    write_atomic(os.path.join(out, "eval.md"), markdown_report(report))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    inputs = load_inputs(config)
    out = args.out or default_out(args.samples)
    prepare_workdir(out)
    check_or_write_config(out, config)
    report = evaluate(config, out, inputs, progress=not args.quiet)
    write_report(out, report)
    values = report["metrics"]
    print(f"{report['counts']['samples']} samples vs {report['counts']['reference']} reference "
          f"({report['distance']['name']}): MMD {_format(values['mmd'])}, COV {_format(values['cov'], True)}, "
          f"1-NNA {_format(values['1nna'], True)}, FD {_format(values['fd'])}, precision "
          f"{_format(values['precision'], True)}, recall {_format(values['recall'], True)}")
    novelty = report["novelty"]
    if novelty is not None:
        baselines = ", ".join(f"{sigma}: {_format(stats['median'])}" for sigma, stats in novelty["baselines"].items())
        print(f"novelty: median distance to the nearest training field {_format(novelty['samples_to_train']['median'])}"
              f" (noise baselines {baselines}); memorised {_format(novelty['memorised_fraction'], True)}")
    print(f"report in {os.path.join(out, 'eval.md')}")
    return 0


if __name__ == "__main__":
    run_main(main)
