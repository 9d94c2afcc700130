"""Labelled points for occupancy fields of meshes: surface sampling and generalised winding numbers.

Points live in the box ``[-BOX, BOX]^3`` (``BOX = 1``); meshes are normalised into it first
(:func:`mesh_from_spec` uses :func:`fields.data.meshes.normalize_mesh`, extent 0.9).

A training set mixes (a) area-weighted surface points displaced by Gaussian noise of two scales
(``near_sigma``, ``far_sigma``: fractions of the box edge length, 2) and (b) uniform points in the
box. Points are labelled inside (1) / outside (0) by the generalised winding number
(Jacobson et al. 2013): the sum over triangles of the solid angle each subtends at the point,
divided by 4 pi; > 0.5 is inside. For a closed, consistently oriented mesh this is exactly 1 inside
and 0 outside; small holes and flipped patches only perturb it locally, so it degrades gracefully
on meshes that are not watertight.

Cost: the winding number is ``O(points x faces)``: about 20 in-place element-wise passes (one
``arctan2``) over ``[chunk, faces]`` float32 arrays, chunks kept small enough to stay in the L2
cache (larger chunks were 6x slower). Measured on one core of the project's CPU machines: about
6.5 ns per point-face pair in float32 (12 ns in float64), so 100k points against the 4k-face
procedural sphere take about 2.6 s. Chunks are spread over threads (NumPy's ufuncs release the
GIL). For meshes of tens of thousands of faces, simplify first (or sample fewer points).
"""

from __future__ import annotations

import dataclasses
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from fields.cli import UserError
from fields.data import meshes
from fields.data.meshes import Mesh

BOX = 1.0
MESH_EXTENT = 0.9
PROCEDURAL = {
    "sphere": lambda: meshes.sphere(1.0, segments=64, rings=32),
    "box": lambda: meshes.box((1.0, 0.7, 0.5)),
    "cube": lambda: meshes.box((1.0, 1.0, 1.0)),
    "cylinder": lambda: meshes.cylinder(0.6, 1.0, segments=64),
    "cone": lambda: meshes.cone(0.8, 1.0, segments=64),
    "torus": lambda: meshes.torus(1.0, 0.35, segments=64, tube_segments=24),
}
PAIRS_PER_CHUNK = 1 << 15  # point-face pairs per chunk: ~10 arrays of 128 KB (float32) stay in the L2 cache
MIN_POINTS_PER_CHUNK = 64  # fewer points per chunk: per-call overhead dominates on small meshes


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """A mix of labelled points.

    Attributes:
        num_points: points in all.
        near_fraction: fraction of surface points displaced by ``N(0, near_sigma^2)`` per axis.
        far_fraction: fraction of surface points displaced by ``N(0, far_sigma^2)`` per axis.
            The rest (``1 - near_fraction - far_fraction``) is uniform in the box.
        near_sigma, far_sigma: noise scales as fractions of the box edge length (2 * BOX).
    """

    num_points: int = 100_000
    near_fraction: float = 0.4
    far_fraction: float = 0.4
    near_sigma: float = 0.01
    far_sigma: float = 0.05

    def __post_init__(self):
        if self.num_points <= 0:
            raise ValueError(f"num_points must be > 0, got {self.num_points}")
        if not (0.0 <= self.near_fraction and 0.0 <= self.far_fraction and self.near_fraction + self.far_fraction
                <= 1.0):
            raise ValueError("near_fraction and far_fraction must be >= 0 and sum to <= 1")
        if not (self.near_sigma > 0 and self.far_sigma > 0):
            raise ValueError("near_sigma and far_sigma must be > 0")

    def counts(self) -> tuple[int, int, int]:
        """``(near, far, uniform)`` point counts."""
        near = int(round(self.num_points * self.near_fraction))
        far = min(int(round(self.num_points * self.far_fraction)), self.num_points - near)
        return near, far, self.num_points - near - far


@dataclasses.dataclass(frozen=True)
class LabelledPoints:
    """Points ``[n, 3]`` float32, labels ``[n]`` float32 (1 inside), and which are uniform ``[n]`` bool."""

    points: np.ndarray
    labels: np.ndarray
    uniform: np.ndarray


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(stream)])


def surface_points(mesh: Mesh, n: int, seed: int | np.random.Generator = 0) -> np.ndarray:
    """``n`` points uniform over the surface area (float32 ``[n, 3]``), deterministic by ``seed``
    (an int, or a NumPy generator to draw from). For Chamfer distances, use the same ``n`` for both sides.
    """
    rng = _rng(seed, 7) if not isinstance(seed, np.random.Generator) else seed
    vertices = mesh.vertices.astype(np.float64)
    faces = mesh.faces
    cross = meshes.face_normals(vertices, faces)
    area = np.linalg.norm(cross, axis=-1)
    total = area.sum()
    if not total > 0:
        raise ValueError("the mesh has no surface area")
    cumulative = np.cumsum(area)
    chosen = np.minimum(np.searchsorted(cumulative, rng.uniform(0.0, total, n), side="right"), len(faces) - 1)
    u, v = rng.uniform(size=(2, n))
    root = np.sqrt(u)
    a, b, c = (vertices[faces[chosen, k]] for k in range(3))
    points = (1.0 - root)[:, None] * a + (root * (1.0 - v))[:, None] * b + (root * v)[:, None] * c
    return points.astype(np.float32)


def _face_terms(vertices: np.ndarray, faces: np.ndarray, dtype) -> tuple[np.ndarray, ...]:
    """Per-face constants of the solid-angle formula, so that each chunk is matmuls and gathers."""
    v = np.asarray(vertices, dtype=np.float64)
    a, b, c = v[faces[:, 0]], v[faces[:, 1]], v[faces[:, 2]]
    det = np.einsum("fk,fk->f", a, np.cross(b, c))  # det[a, b, c]
    # (a-p).((b-p)x(c-p)) = det[a,b,c] - p.N with N = a x b + b x c + c x a = (b - a) x (c - a).
    normal = np.cross(b - a, c - a)
    # (a-p).(b-p) = a.b - p.(a+b) + |p|^2, and likewise for (b, c) and (c, a).
    dots = np.stack([np.einsum("fk,fk->f", a, b), np.einsum("fk,fk->f", b, c), np.einsum("fk,fk->f", c, a)])
    linear = np.concatenate([normal, a + b, b + c, c + a]).T  # [3, 4F]
    terms = (det, dots, linear, v.T, np.einsum("vk,vk->v", v, v))
    return tuple(np.ascontiguousarray(term, dtype=dtype) for term in terms)


def _winding_chunk(points: np.ndarray, faces: np.ndarray, terms: tuple[np.ndarray, ...]) -> np.ndarray:
    """Van Oosterom & Strackee: tan(omega / 2) = det[a,b,c] / (|a||b||c| + (a.b)|c| + (b.c)|a| + (c.a)|b|)
    with ``a, b, c`` the corners relative to the point. In place where possible (cache-sized chunks)."""
    det, dots, linear, vertices_t, v2 = terms
    num_faces = len(faces)
    p = np.asarray(points, dtype=det.dtype)
    p2 = np.einsum("nk,nk->n", p, p)[:, None]
    distance = p @ vertices_t  # -> |v - p| = sqrt(|v|^2 - 2 p.v + |p|^2), [n, V]
    distance *= -2.0
    distance += v2
    distance += p2
    np.maximum(distance, 0.0, out=distance)
    np.sqrt(distance, out=distance)
    ra, rb, rc = (np.take(distance, faces[:, k], axis=1) for k in range(3))
    projected = p @ linear  # [n, 4F]: p.N, p.(a+b), p.(b+c), p.(c+a)
    numerator = projected[:, :num_faces]
    np.subtract(det, numerator, out=numerator)
    denominator = ra * rb
    denominator *= rc
    for index, length in enumerate((rc, ra, rb)):
        term = projected[:, (index + 1) * num_faces:(index + 2) * num_faces]
        np.subtract(dots[index], term, out=term)
        term += p2
        term *= length
        denominator += term
    half_angles = np.arctan2(numerator, denominator, out=numerator)
    return half_angles.sum(axis=1, dtype=np.float64) / (2.0 * math.pi)  # sum of (omega / 2) / (2 pi)


def winding_numbers(points: np.ndarray, mesh: Mesh, num_threads: int | None = None,
                    dtype=np.float32) -> np.ndarray:
    """Generalised winding numbers ``[n]`` (float64) of ``points [n, 3]`` with respect to ``mesh``.

    About 1 inside and 0 outside a closed mesh with outward (counter-clockwise) faces. Cost
    ``O(n x faces)`` in chunks of ``PAIRS_PER_CHUNK`` point-face pairs over ``num_threads`` threads
    (default: the CPU count, at most 4). ``float32`` (the default) is twice as fast as ``float64``
    and off by up to about 1e-3 in the winding number (mattering only within about 1e-4 of the surface).
    """
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    faces = np.asarray(mesh.faces, dtype=np.int64)
    if len(faces) == 0 or len(points) == 0:
        return np.zeros(len(points))
    terms = _face_terms(mesh.vertices, faces, dtype)
    chunk = max(MIN_POINTS_PER_CHUNK, PAIRS_PER_CHUNK // len(faces))
    starts = range(0, len(points), chunk)
    threads = num_threads or min(os.cpu_count() or 1, 4)
    if threads <= 1 or len(starts) <= 1:
        parts = [_winding_chunk(points[s:s + chunk], faces, terms) for s in starts]
    else:
        with ThreadPoolExecutor(threads) as pool:
            parts = list(pool.map(lambda s: _winding_chunk(points[s:s + chunk], faces, terms), starts))
    return np.concatenate(parts)


def inside(points: np.ndarray, mesh: Mesh, num_threads: int | None = None) -> np.ndarray:
    """``[n]`` bool: winding number > 0.5."""
    return winding_numbers(points, mesh, num_threads) > 0.5


def sample_labelled_points(mesh: Mesh, config: SamplingConfig, seed: int = 0, stream: int = 0) -> LabelledPoints:
    """Near-surface, far-surface and uniform points in the box with winding-number labels.

    Deterministic by ``(seed, stream)``; use different streams for training and held-out sets.
    Displaced points are clipped to the box.
    """
    rng = _rng(seed, stream)
    near, far, uniform = config.counts()
    edge = 2.0 * BOX
    surface = surface_points(mesh, near + far, seed=rng).astype(np.float64)
    sigma = np.concatenate([np.full(near, config.near_sigma * edge), np.full(far, config.far_sigma * edge)])
    displaced = surface + rng.normal(size=surface.shape) * sigma[:, None]
    box_points = rng.uniform(-BOX, BOX, size=(uniform, 3))
    points = np.clip(np.concatenate([displaced, box_points]), -BOX, BOX).astype(np.float32)
    labels = inside(points, mesh).astype(np.float32)
    is_uniform = np.concatenate([np.zeros(near + far, bool), np.ones(uniform, bool)])
    return LabelledPoints(points, labels, is_uniform)


def mesh_volume(vertices: np.ndarray, faces: np.ndarray) -> float:
    """Signed volume enclosed by a closed triangle mesh (positive for outward faces)."""
    v = np.asarray(vertices, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    if len(faces) == 0:
        return 0.0
    a, b, c = v[faces[:, 0]], v[faces[:, 1]], v[faces[:, 2]]
    return float(np.einsum("fk,fk->f", a, np.cross(b, c)).sum() / 6.0)


def boundary_edges(vertices: np.ndarray, faces: np.ndarray, tolerance: float = 1e-6) -> int:
    """Edges not shared by exactly two triangles, after welding vertices closer than ``tolerance``
    (relative to the bounding-box diagonal) and dropping collapsed triangles. 0 for a closed mesh."""
    v = np.asarray(vertices, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    if len(faces) == 0:
        return 0
    diagonal = float(np.linalg.norm(v.max(axis=0) - v.min(axis=0))) or 1.0
    _, weld = np.unique(np.round(v / (tolerance * diagonal)).astype(np.int64), axis=0, return_inverse=True)
    welded = weld.reshape(-1)[faces]
    welded = welded[(welded[:, 0] != welded[:, 1]) & (welded[:, 1] != welded[:, 2]) & (welded[:, 2] != welded[:, 0])]
    edges = np.sort(np.concatenate([welded[:, [0, 1]], welded[:, [1, 2]], welded[:, [2, 0]]]), axis=1)
    _, counts = np.unique(edges, axis=0, return_counts=True)
    return int(np.count_nonzero(counts != 2))


def is_watertight(mesh: Mesh) -> bool:
    """Every edge shared by exactly two triangles (after welding coincident vertices)."""
    return boundary_edges(mesh.vertices, mesh.faces) == 0


def mesh_from_spec(spec: str) -> Mesh:
    """``procedural:NAME`` (see ``PROCEDURAL``) or a mesh file, normalised into the box.

    Raises:
        UserError: unknown primitive, or a missing/unreadable mesh file.
    """
    if spec.startswith("procedural:"):
        name = spec.split(":", 1)[1]
        if name not in PROCEDURAL:
            raise UserError(f"unknown procedural mesh {name!r}; choose one of: {', '.join(PROCEDURAL)}")
        mesh = PROCEDURAL[name]()
    else:
        mesh = meshes.load_mesh(spec)
    return meshes.normalize_mesh(mesh, MESH_EXTENT)
