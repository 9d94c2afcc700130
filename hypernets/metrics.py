"""Pure metric functions for generated fields: distances, MMD / COV / 1-NNA, Fréchet distance, precision/recall.

Every function takes NumPy arrays and returns NumPy values; nothing here knows about fields or files.
Notation: ``S`` is the set of samples (generated), ``R`` the reference set (held-out data), ``d`` a
distance between two items (pixel RMS difference for images, squared Chamfer distance for shapes).
Distance matrices are ``[num_samples, num_reference]`` (rows: samples, columns: reference) unless
named otherwise.

Definitions (as in PointFlow / HyperDiffusion for MMD, COV, 1-NNA; Heusel et al. for the Fréchet
distance; Kynkäänniemi et al. 2019 for precision/recall):

- ``MMD(S, R) = mean over r in R of min over s in S of d(s, r)`` (lower is better);
- ``COV(S, R)`` = fraction of ``r in R`` that are the nearest reference of at least one ``s in S``
  (higher is better; ties go to the lowest reference index);
- ``1-NNA`` = leave-one-out 1-nearest-neighbour classification accuracy on ``S ∪ R`` with the set as
  the class (50% is ideal: the sets cannot be told apart; 100%: fully separable; well below 50%:
  samples sit on top of reference items, i.e. copies);
- ``FD = ||mu1 - mu2||^2 + Tr(C1 + C2 - 2 sqrtm(C1 C2))`` of the feature means and covariances;
- ``precision`` = fraction of samples inside the reference manifold (the union of balls around
  each reference feature with radius its distance to its ``k``-th nearest reference neighbour);
  ``recall`` = fraction of reference items inside the sample manifold (built the same way).
"""

from __future__ import annotations

import math
import warnings

import numpy as np

PRECISION_RECALL_K = 3
CHAMFER_BLOCK = 1024  # points per block in the brute-force Chamfer fallback


# ------------------------------------------------------------------------------------- distances


def squared_euclidean(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances between rows.

    Args:
        a: ``[n, D]``; b: ``[m, D]``.

    Returns:
        ``[n, m]`` float64, ``||a_i - b_j||^2`` (via ``|a|^2 + |b|^2 - 2 a.b`` in float64, clipped at 0).
    """
    a = np.asarray(a, np.float64).reshape(len(a), -1)
    b = np.asarray(b, np.float64).reshape(len(b), -1)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"rows of different sizes: {a.shape[1]} vs {b.shape[1]}")
    squared = np.sum(a * a, axis=1)[:, None] + np.sum(b * b, axis=1)[None, :] - 2.0 * (a @ b.T)
    return np.maximum(squared, 0.0)


def pixel_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pixel distance between images: the L2 norm of the difference scaled by ``1/sqrt(D)``.

    ``d(x, y) = ||x - y||_2 / sqrt(D)`` over all ``D = height * width * channels`` values, i.e. the
    root-mean-square pixel difference (in [0, 1] for images in [0, 1]). Nearest neighbours are the
    same as with the plain L2 distance; only the scale is made independent of the image size.

    Args:
        a: ``[n, height, width, channels]`` (or ``[n, D]``); b: ``[m, ...]`` of the same item shape.

    Returns:
        ``[n, m]`` float64.
    """
    a = np.asarray(a).reshape(len(a), -1)
    size = max(a.shape[1], 1)
    return np.sqrt(squared_euclidean(a, b) / size)


def _nearest_squared(points: np.ndarray, targets: np.ndarray, tree=None) -> np.ndarray:
    """``[p]`` squared distance from each of ``points [p, 3]`` to its nearest point of ``targets [q, 3]``."""
    if tree is not None:
        distances, _ = tree.query(points, k=1)
        return np.square(distances)
    nearest = np.empty(len(points), np.float64)
    for start in range(0, len(points), CHAMFER_BLOCK):
        nearest[start:start + CHAMFER_BLOCK] = squared_euclidean(points[start:start + CHAMFER_BLOCK], targets).min(1)
    return nearest


def _kd_tree(points: np.ndarray):
    try:
        from scipy.spatial import cKDTree
    except ImportError:  # pragma: no cover - scipy comes with scikit-image
        return None
    return cKDTree(points)


def chamfer_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Squared Chamfer distance between two point clouds (no square root), as in PointFlow / HyperDiffusion.

    ``CD(a, b) = mean_i min_j ||a_i - b_j||^2 + mean_j min_i ||a_i - b_j||^2``

    Args:
        a: ``[p, 3]`` points; b: ``[q, 3]`` points (both non-empty).
    """
    a = np.asarray(a, np.float64).reshape(-1, 3)
    b = np.asarray(b, np.float64).reshape(-1, 3)
    if not len(a) or not len(b):
        raise ValueError("the Chamfer distance needs two non-empty point clouds")
    return float(np.mean(_nearest_squared(a, b, _kd_tree(b))) + np.mean(_nearest_squared(b, a, _kd_tree(a))))


def pairwise_chamfer(clouds_a: np.ndarray, clouds_b: np.ndarray | None = None) -> np.ndarray:
    """Squared Chamfer distances between every cloud of ``clouds_a`` and every cloud of ``clouds_b``.

    Args:
        clouds_a: ``[n, p, 3]``; clouds_b: ``[m, q, 3]``, or None for ``clouds_a`` against itself
            (only the upper triangle is computed; the diagonal is 0).

    Returns:
        ``[n, m]`` float64.
    """
    symmetric = clouds_b is None
    clouds_a = np.asarray(clouds_a, np.float64)
    clouds_b = clouds_a if symmetric else np.asarray(clouds_b, np.float64)
    trees_a = [_kd_tree(cloud) for cloud in clouds_a]
    trees_b = trees_a if symmetric else [_kd_tree(cloud) for cloud in clouds_b]
    distances = np.zeros((len(clouds_a), len(clouds_b)), np.float64)
    for i, cloud_a in enumerate(clouds_a):
        for j in range(i + 1 if symmetric else 0, len(clouds_b)):
            forward = np.mean(_nearest_squared(cloud_a, clouds_b[j], trees_b[j]))
            backward = np.mean(_nearest_squared(clouds_b[j], cloud_a, trees_a[i]))
            distances[i, j] = forward + backward
    if symmetric:
        distances = distances + distances.T
    return distances


def nearest(distances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the smallest distance and its column (the lowest column index on ties).

    Args:
        distances: ``[n, m]`` with ``m >= 1``.

    Returns:
        ``(values [n] float64, indices [n] int64)``.
    """
    distances = np.asarray(distances, np.float64)
    indices = np.argmin(distances, axis=1)
    return distances[np.arange(len(distances)), indices], indices.astype(np.int64)


# ------------------------------------------------------------------------- MMD, COV and 1-NNA


def _check_matrix(distances: np.ndarray, name: str) -> np.ndarray:
    distances = np.asarray(distances, np.float64)
    if distances.ndim != 2 or 0 in distances.shape:
        raise ValueError(f"{name} must be a non-empty [num_samples, num_reference] matrix, got {distances.shape}")
    return distances


def minimum_matching_distance(distances: np.ndarray) -> float:
    """``MMD(S, R) = mean over r in R of min over s in S of d(s, r)``.

    Args:
        distances: ``[num_samples, num_reference]``, ``distances[s, r] = d(s, r)``.
    """
    distances = _check_matrix(distances, "distances")
    return float(np.mean(distances.min(axis=0)))


def coverage(distances: np.ndarray) -> float:
    """``COV(S, R)``: the fraction of reference items that are the nearest reference of at least one sample.

    Each sample's nearest reference is the column of its row minimum (the lowest index on ties).

    Args:
        distances: ``[num_samples, num_reference]``.
    """
    distances = _check_matrix(distances, "distances")
    _, matched = nearest(distances)
    return float(len(np.unique(matched)) / distances.shape[1])


def one_nearest_neighbour_accuracy(
    sample_distances: np.ndarray, reference_distances: np.ndarray, cross_distances: np.ndarray
) -> dict[str, float]:
    """Leave-one-out 1-NN accuracy on ``S ∪ R`` with the set as the class (1-NNA).

    Items are ordered samples first, then reference items; each item's nearest neighbour among the
    others is the one with the smallest distance, ties broken by the lowest index in that order. An
    item counts as correct when its nearest neighbour belongs to the same set.

    Args:
        sample_distances: ``[n, n]`` distances among samples.
        reference_distances: ``[m, m]`` distances among reference items.
        cross_distances: ``[n, m]``, ``cross[s, r] = d(s, r)``.

    Returns:
        ``{"accuracy": over all n + m items, "accuracy_samples": over S, "accuracy_reference": over R}``.
    """
    sample_distances = np.asarray(sample_distances, np.float64)
    reference_distances = np.asarray(reference_distances, np.float64)
    cross = _check_matrix(cross_distances, "cross_distances")
    num_samples, num_reference = cross.shape
    if sample_distances.shape != (num_samples, num_samples) or reference_distances.shape != (
        num_reference, num_reference
    ):
        raise ValueError("1-NNA: distance matrices of inconsistent shapes")
    full = np.block([[sample_distances, cross], [cross.T, reference_distances]])
    np.fill_diagonal(full, np.inf)
    neighbour = np.argmin(full, axis=1)
    is_sample = np.arange(num_samples + num_reference) < num_samples
    correct = is_sample[neighbour] == is_sample
    return {
        "accuracy": float(np.mean(correct)),
        "accuracy_samples": float(np.mean(correct[:num_samples])),
        "accuracy_reference": float(np.mean(correct[num_samples:])),
    }


# -------------------------------------------------------------------- Fréchet distance


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and covariance ``[D, D]`` (unbiased, ``N - 1``) of ``features [N, D]`` (N >= 2), float64."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"feature statistics need [N >= 2, D] features, got shape {features.shape}")
    return features.mean(axis=0), np.atleast_2d(np.cov(features, rowvar=False))


def _trace_sqrt_product(cov1: np.ndarray, cov2: np.ndarray) -> float:
    """``Tr sqrtm(cov1 @ cov2)`` (real part), with scipy's ``sqrtm`` when available."""
    try:
        from scipy.linalg import LinAlgWarning, sqrtm
    except ImportError:  # pragma: no cover - scipy comes with scikit-image
        sqrtm = None
    if sqrtm is not None:
        # Covariances of fewer items than dimensions are singular; the trace of the root stays accurate
        # (it is the sum of the roots of the eigenvalues), so scipy's warning about it is silenced.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", LinAlgWarning)
            root = sqrtm(cov1 @ cov2)
            if not np.all(np.isfinite(root)):  # regularise as in the reference FID code
                offset = np.eye(len(cov1)) * 1e-6
                root = sqrtm((cov1 + offset) @ (cov2 + offset))
        return float(np.real(np.trace(root)))
    # Without scipy: the eigenvalues of cov1 @ cov2 equal those of the PSD matrix A^1/2 cov2 A^1/2.
    values, vectors = np.linalg.eigh(cov1)
    half = (vectors * np.sqrt(np.maximum(values, 0.0))) @ vectors.T
    inner = np.linalg.eigvalsh(half @ cov2 @ half)
    return float(np.sum(np.sqrt(np.maximum(inner, 0.0))))


def frechet_distance(mean1: np.ndarray, cov1: np.ndarray, mean2: np.ndarray, cov2: np.ndarray) -> float:
    """``FD = ||mu1 - mu2||^2 + Tr(C1 + C2 - 2 sqrtm(C1 C2))`` (the real part of ``sqrtm``).

    Args:
        mean1, mean2: ``[D]``; cov1, cov2: ``[D, D]``.
    """
    mean1, mean2 = np.asarray(mean1, np.float64), np.asarray(mean2, np.float64)
    cov1, cov2 = np.atleast_2d(np.asarray(cov1, np.float64)), np.atleast_2d(np.asarray(cov2, np.float64))
    if mean1.shape != mean2.shape or cov1.shape != cov2.shape or cov1.shape != (len(mean1), len(mean1)):
        raise ValueError("Fréchet distance: means [D] and covariances [D, D] of one D needed")
    difference = mean1 - mean2
    value = float(difference @ difference + np.trace(cov1) + np.trace(cov2) - 2.0 * _trace_sqrt_product(cov1, cov2))
    return max(value, 0.0)  # FD >= 0; a tiny negative value is rounding


def frechet_distance_of_features(features1: np.ndarray, features2: np.ndarray) -> float:
    """The Fréchet distance between the Gaussians fitted to ``features1 [N1, D]`` and ``features2 [N2, D]``."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


# -------------------------------------------------------------------- precision / recall


def manifold_radii(features: np.ndarray, k: int = PRECISION_RECALL_K) -> np.ndarray:
    """``[N]``: each feature's Euclidean distance to its ``k``-th nearest other feature of the same set.

    Raises:
        ValueError: fewer than ``k + 1`` features.
    """
    features = np.asarray(features, np.float64)
    if len(features) < k + 1:
        raise ValueError(f"a k-NN manifold with k={k} needs at least {k + 1} items, got {len(features)}")
    distances = np.sqrt(squared_euclidean(features, features))
    np.fill_diagonal(distances, np.inf)
    return np.sort(distances, axis=1)[:, k - 1]


def fraction_inside(queries: np.ndarray, support: np.ndarray, radii: np.ndarray) -> float:
    """Fraction of ``queries [n, D]`` within ``radii[j]`` (inclusive) of some ``support[j]`` (``support [m, D]``)."""
    distances = np.sqrt(squared_euclidean(queries, support))
    return float(np.mean(np.any(distances <= np.asarray(radii, np.float64)[None, :], axis=1)))


def precision_recall(
    reference_features: np.ndarray, sample_features: np.ndarray, k: int = PRECISION_RECALL_K
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with ``k``-NN manifolds.

    precision = fraction of samples inside the reference manifold (the union of balls centred on
    the reference features, each with radius its distance to its ``k``-th nearest reference
    neighbour); recall = fraction of reference features inside the sample manifold.

    Args:
        reference_features: ``[m, D]``; sample_features: ``[n, D]`` (each with at least ``k + 1`` rows).

    Returns:
        ``(precision, recall)``.
    """
    reference_features = np.asarray(reference_features, np.float64)
    sample_features = np.asarray(sample_features, np.float64)
    precision = fraction_inside(sample_features, reference_features, manifold_radii(reference_features, k))
    recall = fraction_inside(reference_features, sample_features, manifold_radii(sample_features, k))
    return precision, recall


# ------------------------------------------------------------------------------- summaries


def summary(values: np.ndarray) -> dict[str, float]:
    """``{"count", "mean", "median", "min", "max"}`` of a 1-D array (NaN statistics when empty)."""
    values = np.asarray(values, np.float64).reshape(-1)
    if not len(values):
        return {"count": 0, "mean": math.nan, "median": math.nan, "min": math.nan, "max": math.nan}
    return {
        "count": int(len(values)),
        "mean": float(np.mean(values)),
        "median": float(np.median(values)),
        "min": float(np.min(values)),
        "max": float(np.max(values)),
    }


# ------------------------------------------------------------------------------------ reporting

# The generator metrics as reports show them: (key in eval.json's "metrics", name, percent, what it means).
METRIC_ROWS = (
    ("mmd", "MMD", False, "lower is better; mean over reference of the nearest sample's distance"),
    ("cov", "COV", True, "higher is better; reference items that are some sample's nearest"),
    ("1nna", "1-NNA", True, "50% is ideal; near 100%: samples and reference are told apart easily; well below "
                            "50%: copies of the reference"),
    ("fd", "FD", False, "Fréchet distance of classifier features; lower is better; compare within one report"),
    ("precision", "precision", True, "samples inside the reference feature manifold"),
    ("recall", "recall", True, "reference inside the sample feature manifold"),
    ("conditional_accuracy", "class accuracy", True, "labelled samples classified as their label"),
    ("train_class_accuracy", "class accuracy of train fields", True,
     "the same classifier on the labelled train fields (real data it never saw): the ceiling for the line above"),
)


def format_metric(value, percent: bool = False) -> str:
    """``"12.3%"`` / ``"0.1234"`` (4 significant digits); ``"n/a"`` for None, non-numbers and non-finite values."""
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        return "n/a"
    return f"{100.0 * value:.1f}%" if percent else f"{value:.4g}"
