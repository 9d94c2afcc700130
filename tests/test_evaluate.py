"""hypernets.evaluate: metric definitions on hand-computed cases, the feature classifier, and the entry point."""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest

from fields.field_datasets import read_dataset, write_shard
from fields.weights import param_map, params_to_vector
from hypernets import metrics
from hypernets.classifier import PRESETS as CLASSIFIER_PRESETS
from hypernets.classifier import fallback_features, train_classifier
from hypernets.evaluate import default_out, main
from tests.helpers import assert_one_line_error, run_entry_point

# ------------------------------------------------------------------------------ metric definitions

# Samples s0..s2 against reference r0..r3 (rows: samples, columns: reference).
CROSS = np.array([[1.0, 4.0, 6.0, 2.0],
                  [3.0, 1.0, 5.0, 7.0],
                  [2.0, 2.0, 8.0, 9.0]])
AMONG_SAMPLES = np.array([[0.0, 1.5, 2.0],
                          [1.5, 0.0, 4.0],
                          [2.0, 4.0, 0.0]])
AMONG_REFERENCE = np.array([[0.0, 2.0, 5.0, 0.5],
                            [2.0, 0.0, 3.0, 6.0],
                            [5.0, 3.0, 0.0, 4.0],
                            [0.5, 6.0, 4.0, 0.0]])


def test_mmd_and_coverage_by_hand():
    # Column minima 1, 1, 5, 2 -> MMD 9/4.
    assert metrics.minimum_matching_distance(CROSS) == pytest.approx(2.25)
    # Nearest reference: s0 -> r0, s1 -> r1, s2 -> r0 (tie r0/r1 goes to the lowest index): {r0, r1} of 4.
    assert metrics.coverage(CROSS) == pytest.approx(0.5)
    values, indices = metrics.nearest(CROSS)
    np.testing.assert_array_equal(indices, [0, 1, 0])
    np.testing.assert_allclose(values, [1.0, 1.0, 2.0])


def test_one_nearest_neighbour_accuracy_by_hand():
    # Order s0 s1 s2 r0 r1 r2 r3. Nearest others: s0 -> r0 (1, wrong); s1 -> r1 (1, wrong);
    # s2 -> tie s0/r0/r1 at 2, s0 has the lowest index (right); r0 -> r3 (0.5, right);
    # r1 -> s1 (1, wrong); r2 -> r1 (3, right); r3 -> r0 (0.5, right).
    result = metrics.one_nearest_neighbour_accuracy(AMONG_SAMPLES, AMONG_REFERENCE, CROSS)
    assert result["accuracy"] == pytest.approx(4 / 7)
    assert result["accuracy_samples"] == pytest.approx(1 / 3)
    assert result["accuracy_reference"] == pytest.approx(3 / 4)


def test_balanced_one_nna_cuts_the_larger_set_to_the_smaller():
    from hypernets.evaluate import balanced_one_nna

    # 40 samples and 400 reference items from one distribution: plain 1-NNA is pulled towards the
    # larger set's accuracy (about 90%); on equal sets it is near the ideal 50%.
    rng = np.random.default_rng(0)
    samples, reference = rng.normal(size=(40, 4)), rng.normal(size=(400, 4))

    def distances(a, b):
        return np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))

    among_samples, among_reference, cross = distances(samples, samples), distances(reference, reference), \
        distances(samples, reference)
    plain = metrics.one_nearest_neighbour_accuracy(among_samples, among_reference, cross)["accuracy"]
    balanced = balanced_one_nna(among_samples, among_reference, cross, seed=0)
    assert plain > 0.8 and abs(balanced["accuracy"] - 0.5) < 0.15 and balanced["set_size"] == 40
    # Equal sets are used whole.
    whole = balanced_one_nna(among_samples, among_samples, among_samples, seed=0)
    assert whole == {**metrics.one_nearest_neighbour_accuracy(among_samples, among_samples, among_samples),
                     "set_size": 40}


def test_one_nearest_neighbour_accuracy_of_copies_is_zero_and_of_separated_sets_is_one():
    points = np.array([[0.0], [1.0], [3.0]])
    same = np.sqrt(metrics.squared_euclidean(points, points))
    assert metrics.one_nearest_neighbour_accuracy(same, same, same)["accuracy"] == 0.0
    far = np.sqrt(metrics.squared_euclidean(points, points + 100.0))
    assert metrics.one_nearest_neighbour_accuracy(same, same, far)["accuracy"] == 1.0


def test_frechet_distance_matches_the_closed_form():
    # Diagonal covariances: ||mu1 - mu2||^2 + sum (sqrt(a_i) - sqrt(b_i))^2 = 5 + 1 + 1.
    assert metrics.frechet_distance(np.zeros(2), np.diag([1.0, 4.0]), np.array([1.0, 2.0]),
                                    np.diag([4.0, 9.0])) == pytest.approx(7.0)
    # Commuting, non-diagonal: the same rotation of diag(1, 4) and diag(9, 1): (1 - 3)^2 + (2 - 1)^2.
    angle = 0.3
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    cov1, cov2 = rotation @ np.diag([1.0, 4.0]) @ rotation.T, rotation @ np.diag([9.0, 1.0]) @ rotation.T
    assert metrics.frechet_distance(np.ones(2), cov1, np.ones(2), cov2) == pytest.approx(5.0)
    # General case: Tr sqrtm(C1 C2) = Tr (C1^1/2 C2 C1^1/2)^1/2 computed independently with eigh.
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 3)), rng.normal(size=(3, 3))
    cov1, cov2 = a @ a.T + 0.1 * np.eye(3), b @ b.T + 0.1 * np.eye(3)
    values, vectors = np.linalg.eigh(cov1)
    half = vectors @ np.diag(np.sqrt(values)) @ vectors.T
    cross = np.sum(np.sqrt(np.linalg.eigvalsh(half @ cov2 @ half)))
    mean1, mean2 = rng.normal(size=3), rng.normal(size=3)
    expected = np.sum((mean1 - mean2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2.0 * cross
    assert metrics.frechet_distance(mean1, cov1, mean2, cov2) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_of_a_set_with_itself_is_zero():
    features = np.random.default_rng(1).normal(size=(200, 8))
    assert metrics.frechet_distance_of_features(features, features) == pytest.approx(0.0, abs=1e-6)
    shifted = metrics.frechet_distance_of_features(features, features + 1.0)
    assert shifted == pytest.approx(8.0, rel=1e-6)  # only the means differ: ||1||^2 over 8 dimensions


def test_precision_recall_by_hand():
    # k = 3. Reference radii: 3 2 2 2 3 | 3 2 2 3 -> manifold [-3, 7] and [17, 26].
    # Sample radii: 3 2 2 3 | 3 2 2 3 -> manifold [-2.5, 6.5] and [37, 46].
    reference = np.array([0, 1, 2, 3, 4, 20, 21, 22, 23], np.float64)[:, None]
    samples = np.array([0.5, 1.5, 2.5, 3.5, 40, 41, 42, 43], np.float64)[:, None]
    np.testing.assert_allclose(metrics.manifold_radii(reference, 3), [3, 2, 2, 2, 3, 3, 2, 2, 3])
    precision, recall = metrics.precision_recall(reference, samples, k=3)
    assert precision == pytest.approx(4 / 8)  # 0.5 .. 3.5 inside, 40 .. 43 outside
    assert recall == pytest.approx(5 / 9)  # 0 .. 4 inside, 20 .. 23 outside
    with pytest.raises(ValueError, match="at least 4"):
        metrics.precision_recall(reference[:3], samples, k=3)


def test_chamfer_distance_is_squared_and_summed_over_both_directions():
    a = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    b = np.array([[0.0, 2.0, 0.0]])
    # a -> b: 4 and 5 (mean 4.5); b -> a: min(4, 5) = 4.
    assert metrics.chamfer_distance(a, b) == pytest.approx(8.5)
    assert metrics.chamfer_distance(a, a) == 0.0
    c = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 0.5]])
    # a -> c: 0 and 1 (mean 0.5); c -> a: 0 and 0.25 (mean 0.125).
    assert metrics.chamfer_distance(a, c) == pytest.approx(0.625)
    np.testing.assert_allclose(metrics._nearest_squared(a, c), [0.0, 1.0])  # brute-force path, no KD-tree
    clouds = np.stack([a, c, a + 1.0])
    matrix = metrics.pairwise_chamfer(clouds)
    np.testing.assert_allclose(matrix, matrix.T)
    np.testing.assert_allclose(np.diag(matrix), 0.0)
    assert matrix[0, 1] == pytest.approx(0.625)
    np.testing.assert_allclose(metrics.pairwise_chamfer(clouds[:1], clouds), matrix[:1])


def test_pixel_distance_is_root_mean_square():
    x = np.zeros((1, 2, 2, 1))
    y = x.copy()
    y[0, 0, 1, 0] = 1.0
    assert metrics.pixel_distances(x, y)[0, 0] == pytest.approx(0.5)  # ||x - y|| = 1 over sqrt(4) values


# ------------------------------------------------------------------------------------ classifier


def test_classifier_beats_chance_on_procedural_primitives():
    from fields.data.procgen_2d import SHAPES_2D, primitive_image

    def make(indices):
        items = [primitive_image(i, seed=0, size=16) for i in indices]
        return np.stack([item[0] for item in items]), np.asarray([item[1] for item in items], np.int32)

    train_images, train_labels = make(range(384))
    test_images, test_labels = make(range(1000, 1128))
    classifier = train_classifier(train_images, train_labels, len(SHAPES_2D), CLASSIFIER_PRESETS["tiny"])
    accuracy = float(np.mean(classifier.predict(test_images) == test_labels))
    assert accuracy > 2.0 / len(SHAPES_2D), accuracy  # chance is 1/8
    assert classifier.features(test_images[:5]).shape == (5, CLASSIFIER_PRESETS["tiny"].feature_dim)
    # Seeded: the same data and config give the same network.
    short = dataclasses.replace(CLASSIFIER_PRESETS["tiny"], steps=3)
    first, second = (train_classifier(train_images[:16], train_labels[:16], len(SHAPES_2D), short) for _ in range(2))
    jax.tree_util.tree_map(np.testing.assert_array_equal, first.params, second.params)


def test_fallback_features():
    images = np.random.default_rng(0).uniform(size=(5, 8, 8, 3)).astype(np.float32)
    features, description = fallback_features(images)
    assert features.shape == (5, 64) and "random projection" in description
    np.testing.assert_array_equal(fallback_features(images)[0], features)  # fixed projection
    small, description = fallback_features(images[:, :2, :2])
    assert small.shape == (5, 12) and "raw pixels" in description


# ------------------------------------------------------------------------------ entry point: images


@pytest.fixture(scope="module")
def image_fields(tmp_path_factory):
    from fields.encode_dataset import main as encode_main

    out = str(tmp_path_factory.mktemp("fields") / "primitives")
    assert encode_main(["--source", "procedural:primitives", "--num", "12", "--size", "8x8", "--steps", "20",
                        "--backend", "jax", "--quiet", "--out", out]) == 0
    return out


def _variant(dataset, path, **changes):
    """Writes ``dataset`` (a FieldDataset) again with some of its description changed."""
    values = {"matrix": dataset.matrix, "columns": {"label": dataset.columns["label"],
                                                    "source_id": dataset.columns["source_id"]},
              "kind": dataset.field_kind, "pmap": dataset.param_map,
              "extra": {"image_height": 8, "image_width": 8}, **changes}
    write_shard(path, values["matrix"], values["columns"], values["kind"], dataset.field_config, values["pmap"],
                extra_schema_metadata=values["extra"])
    return path


EVAL_FLAGS = ["--classifier-preset", "tiny", "--backend", "jax", "--quiet", "--baseline-count", "12"]


def test_evaluate_fields_against_themselves(image_fields, tmp_path, capsys):
    out = str(tmp_path / "eval")
    argv = ["--samples", image_fields, "--reference", image_fields, "--train", image_fields, "--out", out,
            *EVAL_FLAGS]
    status, stdout, stderr = run_entry_point(main, argv, capsys)
    assert status == 0, stderr
    with open(os.path.join(out, "eval.json")) as handle:
        report = json.load(handle)
    values, novelty = report["metrics"], report["novelty"]
    assert report["counts"]["samples"] == report["counts"]["reference"] == report["counts"]["train"] == 12
    assert report["distance"]["name"] == "pixel_rms"
    # Copies: each sample has a zero-distance reference twin.
    assert values["mmd"] == pytest.approx(0.0, abs=1e-6)
    assert values["cov"] == 1.0
    assert values["1nna"] == 0.0
    assert values["fd"] == pytest.approx(0.0, abs=1e-4)
    assert values["precision"] == 1.0 and values["recall"] == 1.0
    assert 0.0 <= values["conditional_accuracy"] <= 1.0
    assert values["train_class_accuracy"] is None  # the train fields are the classifier's own data here
    assert report["features"]["kind"] == "classifier" and not report["features"]["classifier_cached"]
    # Novelty: samples are the training fields; the noisy copies are measurably farther away.
    assert novelty["samples_to_train"]["max"] == pytest.approx(0.0, abs=1e-6)
    small, large = novelty["baselines"]["0.02"], novelty["baselines"]["0.04"]
    assert small["mean"] > 1e-4 and large["mean"] > small["mean"]
    assert novelty["memorised_fraction"] == 1.0
    for name in ("samples.png", "reference.png", "nearest_train.png", "eval.md", "config.json",
                 "classifier/params.msgpack"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    with open(os.path.join(out, "eval.md")) as handle:
        text = handle.read()
    assert "| 1-NNA |" in text and "penultimate layer" in text and "noise 0.04" in text
    assert "1-NNA" in stdout and "memorised" in stdout
    # The same command again reuses the cached classifier; other settings in the same folder are refused.
    params_time = os.stat(os.path.join(out, "classifier", "params.msgpack")).st_mtime_ns
    status, _, stderr = run_entry_point(main, argv, capsys)
    assert status == 0, stderr
    with open(os.path.join(out, "eval.json")) as handle:
        assert json.load(handle)["features"]["classifier_cached"] is True
    assert os.stat(os.path.join(out, "classifier", "params.msgpack")).st_mtime_ns == params_time
    status, _, stderr = run_entry_point(main, argv + ["--grid-size", "4"], capsys)
    assert_one_line_error(status, stderr, "other settings (grid_size: 16 there, 4 now); use another --out")


def test_class_accuracy_of_train_fields_the_classifier_never_saw(image_fields, tmp_path, capsys):
    # A copy of the reference under another path stands in for unseen train fields: the classifier's
    # accuracy on them must equal its accuracy on the reference renders it was trained on.
    train = str(tmp_path / "train")
    shutil.copytree(image_fields, train)
    out = str(tmp_path / "eval")
    argv = ["--samples", image_fields, "--reference", image_fields, "--train", train, "--out", out, *EVAL_FLAGS]
    status, stdout, stderr = run_entry_point(main, argv, capsys)
    assert status == 0, stderr
    with open(os.path.join(out, "eval.json")) as handle:
        report = json.load(handle)
    assert report["metrics"]["train_class_accuracy"] == pytest.approx(report["features"]["classifier_train_accuracy"])
    with open(os.path.join(out, "eval.md")) as handle:
        assert "| class accuracy of train fields |" in handle.read()


def test_evaluate_without_labels_or_train_uses_a_random_projection(image_fields, tmp_path, capsys):
    dataset = read_dataset(image_fields)
    unlabelled = _variant(dataset, str(tmp_path / "unlabelled.parquet"), columns={"label": [-1] * 12})
    diverged = dataset.matrix.copy()
    diverged[0, 5] = np.nan
    samples = _variant(dataset, str(tmp_path / "diverged.parquet"), matrix=diverged, columns={"label": [-1] * 12})
    status, _, stderr = run_entry_point(main, ["--samples", samples, "--reference", unlabelled, *EVAL_FLAGS], capsys)
    assert status == 0, stderr
    out = str(tmp_path / "diverged_eval")  # the default: beside the samples
    with open(os.path.join(out, "eval.json")) as handle:
        report = json.load(handle)
    assert report["features"]["kind"] == "random_projection"
    assert report["novelty"] is None and report["metrics"]["conditional_accuracy"] is None
    assert report["counts"]["invalid_samples"] == 1 and report["counts"]["invalid_reference"] == 0
    assert 0.0 < report["metrics"]["mmd"] < 1.0 and report["metrics"]["fd"] > 0.0  # finite despite the NaN row
    assert not os.path.exists(os.path.join(out, "nearest_train.png"))
    with open(os.path.join(out, "eval.md")) as handle:
        text = handle.read()
    assert "random projection" in text and "invalid fields" in text


def test_image_grid_layout():
    from hypernets.rendering import image_grid

    images = np.stack([np.full((2, 2, 3), value, np.float32) for value in (0.0, 0.25, 0.5)])
    grid = image_grid(images, columns=2, padding=1, min_cell=2)
    assert grid.shape == (7, 7, 3)  # 2 rows and 2 columns of 2-pixel cells with 1-pixel padding
    assert grid[1, 4, 0] == 0.25 and grid[4, 1, 0] == 0.5 and grid[4, 4, 0] == 1.0  # row-major, white background
    assert image_grid(images[:1], columns=1, padding=0, min_cell=4).shape == (4, 4, 3)  # enlarged 2x
    paired = image_grid(np.concatenate([images, images[:1]]), columns=4, padding=1, min_cell=2, group=2)
    # Columns start at x = 1, 4, 11, 14: a 4-pixel wider gap between the pairs.
    assert paired.shape == (4, 13 + 4, 3)
    assert paired[1, 11, 0] == 0.5 and paired[1, 14, 0] == 0.0 and np.all(paired[1, 6:11, 0] == 1.0)


def test_default_out():
    assert default_out("runs/x/samples.parquet") == os.path.normpath("runs/x/samples_eval")
    assert default_out("runs/x/samples/") == os.path.normpath("runs/x/samples_eval")


def test_bad_inputs_are_one_line_errors(image_fields, tmp_path, capsys):
    dataset = read_dataset(image_fields)
    pmap = dataset.param_map
    last = pmap[-1]
    truncated = _variant(dataset, str(tmp_path / "truncated.parquet"), pmap=pmap[:-1],
                         matrix=dataset.matrix[:, : last.offset])
    other_kind = _variant(dataset, str(tmp_path / "siren.parquet"), kind="siren_image")
    nerf = _variant(dataset, str(tmp_path / "nerf.parquet"), kind="ngp_nerf")
    empty = _variant(dataset, str(tmp_path / "empty.parquet"), matrix=dataset.matrix[:0],
                     columns={"label": [], "source_id": []})
    cases = [
        (["--samples", truncated, "--reference", image_fields], "param map"),
        (["--samples", image_fields, "--reference", image_fields, "--train", other_kind], "holds siren_image fields"),
        (["--samples", nerf, "--reference", nerf], "not supported yet"),
        (["--samples", empty, "--reference", image_fields], "empty"),
        (["--samples", str(tmp_path / "missing"), "--reference", image_fields], "not found"),
    ]
    for index, (paths, expected) in enumerate(cases):
        argv = [*paths, "--out", str(tmp_path / f"out{index}"), *EVAL_FLAGS]
        status, _, stderr = run_entry_point(main, argv, capsys)
        assert_one_line_error(status, stderr, expected)


# ------------------------------------------------------------------------------- entry point: shapes


def _sphere_fields(radii):
    """Occupancy MLPs without hidden layers whose logit is ``cos x + cos y + cos z - t``: near-spheres of
    radius about ``sqrt(2 (3 - t))``. Returns ``(matrix [n, P], field_config dict, param map)``."""
    from fields.models.occupancy_mlp import OccupancyFieldConfig, init_params

    config = OccupancyFieldConfig(num_frequencies=1, hidden_width=8, num_hidden_layers=0)
    params = jax.tree_util.tree_map(np.asarray, init_params(config, jax.random.PRNGKey(0)))
    pmap = param_map(params)
    rows = []
    for radius in radii:
        kernel = np.zeros((9, 1), np.float32)
        kernel[6:9] = 1.0  # encoding [x, y, z, sin x, sin y, sin z, cos x, cos y, cos z]
        field = {"dense_0": {"kernel": kernel, "bias": np.asarray([radius**2 / 2.0 - 3.0], np.float32)}}
        rows.append(params_to_vector(field, pmap))
    return np.stack(rows), {"num_frequencies": 1, "base_frequency": 1.0, "hidden_width": 8,
                            "num_hidden_layers": 0}, pmap


def test_evaluate_occupancy_fields_with_chamfer(tmp_path, capsys):
    samples_matrix, field_config, pmap = _sphere_fields([0.5, 0.7])
    reference_matrix, _, _ = _sphere_fields([0.3, 0.5, 0.7])
    samples, reference = str(tmp_path / "samples.parquet"), str(tmp_path / "reference.parquet")
    write_shard(samples, samples_matrix, {"label": [-1, -1]}, "occupancy", field_config, pmap)
    write_shard(reference, reference_matrix, None, "occupancy", field_config, pmap)
    out = str(tmp_path / "eval")
    argv = ["--samples", samples, "--reference", reference, "--train", reference, "--out", out,
            "--num-points", "512", "--mesh-resolution", "24", "--baseline-count", "3", "--quiet"]
    status, _, stderr = run_entry_point(main, argv, capsys)
    assert status == 0, stderr
    with open(os.path.join(out, "eval.json")) as handle:
        report = json.load(handle)
    values = report["metrics"]
    assert report["distance"]["name"] == "chamfer_squared" and report["counts"]["invalid_samples"] == 0
    # Identical fields give identical clouds (distance 0); radius 0.3 is matched by the 0.5 sample at
    # a squared Chamfer distance of about 2 x 0.2^2, so MMD is about 0.08 / 3.
    assert values["cov"] == pytest.approx(2 / 3)
    assert 0.015 < values["mmd"] < 0.04, values["mmd"]
    assert values["1nna"] == 0.0  # every item's nearest other is its zero-distance twin (or a tie won by s0)
    assert values["fd"] is None and report["features"]["kind"] is None
    novelty = report["novelty"]
    assert novelty["samples_to_train"]["max"] == 0.0
    assert novelty["baselines"]["0.04"]["mean"] > 0.0
    for name in ("samples.png", "reference.png", "nearest_train.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
