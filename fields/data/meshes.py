"""Triangle meshes in NumPy: procedural primitives with normals, and loading user meshes.

Primitives are built centred at the origin, y-up, with outward normals and counter-clockwise
triangles seen from outside. Loading ``.obj/.ply/.off/.glb/.gltf/.stl`` files uses ``trimesh``
(imported only when a file is loaded).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from fields.cli import UserError

MESH_EXTENSIONS = (".obj", ".ply", ".off", ".glb", ".gltf", ".stl")


@dataclasses.dataclass(frozen=True)
class Mesh:
    """An indexed triangle mesh with per-vertex normals and colours.

    Attributes:
        vertices: ``[V, 3]`` float32 positions.
        normals: ``[V, 3]`` float32 unit normals.
        faces: ``[F, 3]`` int32 vertex indices, counter-clockwise seen from the side the normals face.
        colors: ``[V, 3]`` float32 RGB in [0, 1].
    """

    vertices: np.ndarray
    normals: np.ndarray
    faces: np.ndarray
    colors: np.ndarray

    def __post_init__(self):
        object.__setattr__(self, "vertices", np.ascontiguousarray(self.vertices, dtype=np.float32).reshape(-1, 3))
        object.__setattr__(self, "normals", np.ascontiguousarray(self.normals, dtype=np.float32).reshape(-1, 3))
        object.__setattr__(self, "faces", np.ascontiguousarray(self.faces, dtype=np.int32).reshape(-1, 3))
        colors = np.asarray(self.colors, dtype=np.float32)
        if colors.ndim == 1:
            colors = np.broadcast_to(colors[:3], self.vertices.shape)
        object.__setattr__(self, "colors", np.ascontiguousarray(colors, dtype=np.float32).reshape(-1, 3))
        if not (len(self.vertices) == len(self.normals) == len(self.colors)):
            raise ValueError("Mesh: vertices, normals and colors must have the same length")

    @property
    def bounds(self) -> np.ndarray:
        """``[2, 3]``: the axis-aligned bounding box (min row, max row)."""
        return np.stack([self.vertices.min(axis=0), self.vertices.max(axis=0)])

    def transformed(self, rotation=None, translation=None, scale: float = 1.0) -> Mesh:
        """``x -> rotation @ (scale * x) + translation`` (normals rotated)."""
        rotation = np.eye(3) if rotation is None else np.asarray(rotation, dtype=np.float64)
        translation = np.zeros(3) if translation is None else np.asarray(translation, dtype=np.float64)
        vertices = (self.vertices.astype(np.float64) * scale) @ rotation.T + translation
        normals = self.normals.astype(np.float64) @ rotation.T
        return Mesh(vertices, normals, self.faces, self.colors)

    def with_color(self, rgb) -> Mesh:
        """The same mesh painted in one RGB colour."""
        return Mesh(self.vertices, self.normals, self.faces, np.asarray(rgb, dtype=np.float32))


def concatenate(meshes) -> Mesh:
    """One mesh holding all of ``meshes``."""
    meshes = list(meshes)
    if not meshes:
        raise ValueError("concatenate: no meshes")
    offsets = np.cumsum([0] + [len(m.vertices) for m in meshes[:-1]])
    return Mesh(
        np.concatenate([m.vertices for m in meshes]),
        np.concatenate([m.normals for m in meshes]),
        np.concatenate([m.faces + offset for m, offset in zip(meshes, offsets, strict=True)]),
        np.concatenate([m.colors for m in meshes]),
    )


def face_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """``[F, 3]`` (unnormalised, length = 2 x area) normals of counter-clockwise triangles."""
    v = np.asarray(vertices, dtype=np.float64)[np.asarray(faces)]
    return np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0])


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """``[V, 3]`` area-weighted average of the adjacent faces' normals (unit length; +y if isolated)."""
    normals = np.zeros((len(vertices), 3))
    per_face = face_normals(vertices, faces)
    for corner in range(3):
        np.add.at(normals, np.asarray(faces)[:, corner], per_face)
    norm = np.linalg.norm(normals, axis=-1, keepdims=True)
    return np.where(norm > 1e-20, normals / np.maximum(norm, 1e-20), np.array([0.0, 1.0, 0.0]))


def _finish(vertices, normals, faces, color=(0.8, 0.8, 0.8)) -> Mesh:
    """Drops degenerate triangles and orients each one to agree with its vertex normals."""
    vertices = np.asarray(vertices, dtype=np.float64)
    normals = np.asarray(normals, dtype=np.float64)
    normals = normals / np.linalg.norm(normals, axis=-1, keepdims=True)
    faces = np.asarray(faces, dtype=np.int64)
    cross = face_normals(vertices, faces)
    area2 = np.linalg.norm(cross, axis=-1)
    keep = area2 > 1e-12 * max(float(np.abs(vertices).max()) ** 2, 1e-12)
    faces, cross = faces[keep], cross[keep]
    flip = np.einsum("fk,fk->f", cross, normals[faces].sum(axis=1)) < 0
    faces[flip] = faces[flip][:, ::-1]
    return Mesh(vertices, normals, faces, np.asarray(color, dtype=np.float32))


def _grid_faces(rows: int, cols: int, offset: int = 0) -> np.ndarray:
    """Two triangles per cell of a ``(rows + 1) x (cols + 1)`` vertex grid (row-major)."""
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    a = (r * (cols + 1) + c).ravel() + offset
    b, below = a + 1, a + cols + 1
    return np.concatenate([np.stack([a, below, b], -1), np.stack([b, below, below + 1], -1)])


def _disc(radius: float, y: float, normal_y: float, segments: int, offset: int):
    angles = np.linspace(0.0, 2.0 * np.pi, segments, endpoint=False)
    ring = np.stack([radius * np.sin(angles), np.full(segments, y), radius * np.cos(angles)], -1)
    vertices = np.concatenate([[[0.0, y, 0.0]], ring])
    normals = np.tile([0.0, normal_y, 0.0], (segments + 1, 1))
    k = np.arange(segments)
    faces = np.stack([np.zeros(segments, dtype=np.int64), 1 + k, 1 + (k + 1) % segments], -1) + offset
    return vertices, normals, faces


def sphere(radius: float = 1.0, segments: int = 32, rings: int = 16) -> Mesh:
    """UV sphere of ``radius`` (smooth normals)."""
    theta, phi = np.meshgrid(np.linspace(0, np.pi, rings + 1), np.linspace(0, 2 * np.pi, segments + 1), indexing="ij")
    normals = np.stack([np.sin(theta) * np.sin(phi), np.cos(theta), np.sin(theta) * np.cos(phi)], -1).reshape(-1, 3)
    return _finish(radius * normals, normals, _grid_faces(rings, segments))


def box(half_extents=(1.0, 1.0, 1.0)) -> Mesh:
    """Axis-aligned box ``[-h, h]`` per axis (flat normals: 4 vertices per side)."""
    h = np.asarray(half_extents, dtype=np.float64)
    vertices, normals, faces = [], [], []
    for axis in range(3):
        for sign in (-1.0, 1.0):
            u, v = (axis + 1) % 3, (axis + 2) % 3
            corners = []
            for du, dv in ((-1, -1), (1, -1), (1, 1), (-1, 1)):
                p = np.zeros(3)
                p[axis], p[u], p[v] = sign * h[axis], du * h[u], dv * h[v]
                corners.append(p)
            n = np.zeros(3)
            n[axis] = sign
            base = len(vertices)
            vertices += corners
            normals += [n] * 4
            faces += [[base, base + 1, base + 2], [base, base + 2, base + 3]]
    return _finish(vertices, normals, faces)


def cylinder(radius: float = 1.0, half_height: float = 1.0, segments: int = 32) -> Mesh:
    """Capped cylinder around the y axis, ``|y| <= half_height`` (smooth side, flat caps)."""
    phi = np.linspace(0, 2 * np.pi, segments + 1)
    side_normals = np.stack([np.sin(phi), np.zeros_like(phi), np.cos(phi)], -1)
    rows = [np.stack([radius * np.sin(phi), np.full_like(phi, y), radius * np.cos(phi)], -1)
            for y in (half_height, -half_height)]
    vertices = [np.concatenate(rows)]
    normals = [np.concatenate([side_normals, side_normals])]
    faces = [_grid_faces(1, segments)]
    offset = 2 * (segments + 1)
    for y, ny in ((half_height, 1.0), (-half_height, -1.0)):
        v, n, f = _disc(radius, y, ny, segments, offset)
        vertices.append(v)
        normals.append(n)
        faces.append(f)
        offset += len(v)
    return _finish(np.concatenate(vertices), np.concatenate(normals), np.concatenate(faces))


def cone(radius: float = 1.0, half_height: float = 1.0, segments: int = 32) -> Mesh:
    """Cone around the y axis: base disc at ``y = -half_height``, apex at ``y = +half_height``."""
    phi = np.linspace(0, 2 * np.pi, segments + 1)
    mid = phi - np.pi / segments  # apex vertex k closes the triangle over [phi_k-1, phi_k]: its middle
    height = 2.0 * half_height

    def slant(angle):
        n = np.stack([height * np.sin(angle), np.full_like(angle, radius), height * np.cos(angle)], -1)
        return n / np.linalg.norm(n, axis=-1, keepdims=True)

    apex = np.tile([0.0, half_height, 0.0], (segments + 1, 1))
    base = np.stack([radius * np.sin(phi), np.full_like(phi, -half_height), radius * np.cos(phi)], -1)
    vertices = [apex, base]
    normals = [slant(mid), slant(phi)]
    faces = [_grid_faces(1, segments)]
    v, n, f = _disc(radius, -half_height, -1.0, segments, 2 * (segments + 1))
    return _finish(np.concatenate(vertices + [v]), np.concatenate(normals + [n]), np.concatenate(faces + [f]))


def torus(major_radius: float = 1.0, minor_radius: float = 0.25, segments: int = 48, tube_segments: int = 16) -> Mesh:
    """Torus around the y axis (ring in the xz plane), tube radius ``minor_radius``."""
    u, v = np.meshgrid(np.linspace(0, 2 * np.pi, segments + 1), np.linspace(0, 2 * np.pi, tube_segments + 1),
                       indexing="ij")
    normals = np.stack([np.cos(v) * np.sin(u), np.sin(v), np.cos(v) * np.cos(u)], -1).reshape(-1, 3)
    centres = np.stack([major_radius * np.sin(u), np.zeros_like(u), major_radius * np.cos(u)], -1).reshape(-1, 3)
    return _finish(centres + minor_radius * normals, normals, _grid_faces(segments, tube_segments))


def save_obj(path: str, mesh: Mesh) -> None:
    """Writes positions, normals and faces as a Wavefront OBJ (colours are dropped)."""
    lines = [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in mesh.vertices]
    lines += [f"vn {x:.6f} {y:.6f} {z:.6f}" for x, y, z in mesh.normals]
    lines += [f"f {a}//{a} {b}//{b} {c}//{c}" for a, b, c in (mesh.faces + 1)]
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")


def load_mesh(path: str, color=(0.8, 0.8, 0.8)) -> Mesh:
    """Loads a triangle mesh file (all parts of a glTF/GLB scene are merged, node transforms applied).

    Vertex colours are kept when the file has them (vertex or face colours); otherwise the mesh is
    painted ``color``. Normals are recomputed (area-weighted, smooth).

    Raises:
        UserError: missing file, unsupported extension, trimesh not installed, unreadable or empty mesh.
    """
    if not os.path.isfile(path):
        raise UserError(f"mesh file not found: {path}")
    extension = os.path.splitext(path)[1].lower()
    if extension not in MESH_EXTENSIONS:
        raise UserError(f"{path}: unsupported mesh format {extension or '(none)'}; use one of "
                        f"{', '.join(MESH_EXTENSIONS)}")
    try:
        import trimesh
    except ImportError:
        raise UserError("loading meshes needs trimesh: pip install 'trimesh>=4'") from None
    try:
        loaded = trimesh.load(path, force="mesh", process=False)
        if len(loaded.vertices) and not np.all(np.isfinite(np.asarray(loaded.vertices, dtype=np.float64))):
            raise UserError(f"{path}: the mesh has non-finite vertex positions")
        loaded.process()  # merge duplicate vertices, drop degenerate faces
        vertices = np.asarray(loaded.vertices, dtype=np.float64)
        faces = np.asarray(loaded.faces, dtype=np.int64)
    except UserError:
        raise
    except Exception as error:  # noqa: BLE001 - any parser failure becomes one line
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"cannot read mesh {path}: {message}") from None
    if len(vertices) == 0 or len(faces) == 0:
        raise UserError(f"{path}: the mesh has no triangles")
    colors = np.broadcast_to(np.asarray(color, dtype=np.float32), vertices.shape)
    visual = getattr(loaded, "visual", None)
    if getattr(visual, "kind", None) in ("vertex", "face"):
        try:
            vertex_colors = np.asarray(visual.vertex_colors, dtype=np.float32)[:, :3] / 255.0
            if vertex_colors.shape == vertices.shape:
                colors = vertex_colors
        except Exception:  # noqa: BLE001 - colours are optional
            pass
    return Mesh(vertices, vertex_normals(vertices, faces), faces, colors)


def normalize_mesh(mesh: Mesh, extent: float = 0.9) -> Mesh:
    """Centres the bounding box at the origin and scales uniformly so that ``|y| <= extent`` and
    ``sqrt(x^2 + z^2) <= extent``: the mesh then fits in ``[-1, 1]^3`` under any rotation about y."""
    low, high = mesh.bounds.astype(np.float64)
    centred = mesh.vertices.astype(np.float64) - 0.5 * (low + high)
    reach = max(float(np.abs(centred[:, 1]).max()), float(np.linalg.norm(centred[:, [0, 2]], axis=-1).max()), 1e-12)
    return Mesh(centred * (extent / reach), mesh.normals, mesh.faces, mesh.colors)
