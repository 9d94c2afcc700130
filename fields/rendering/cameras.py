"""Pure-NumPy pinhole camera helpers in the OpenGL / Blender NeRF-synthetic convention.

Conventions (shared by the rasterizer, the scene generator and the NeRF loader):

* A pose is a ``[4, 4]`` **camera-to-world** matrix ``c2w``: its columns 0, 1, 2 are the camera's
  +x (right), +y (up) and +z axes in world coordinates, column 3 is the camera centre. The camera
  looks down its **-z** axis (OpenGL, as in ``transforms_*.json`` of the Blender NeRF data).
* Pixel ``(i, j)`` is column ``i`` (0 at the left), row ``j`` (0 at the top); it covers the square
  ``[i, i + 1] x [j, j + 1]`` in continuous pixel coordinates, so its centre is ``(i + 0.5, j + 0.5)``.
* Intrinsics ``fx, fy, cx, cy`` are in pixels; a camera-space point ``(x, y, z)`` (``z < 0`` in
  front of the camera) lands at ``u = cx + fx * x / -z`` (column), ``v = cy - fy * y / -z`` (row).
* ``fov_x`` (``camera_angle_x`` in the Blender format) is the FULL horizontal field of view.

The world is y-up in the procedural scenes (``look_at``'s default ``up``), but nothing here
depends on that.
"""

from __future__ import annotations

import math

import numpy as np


def _normalize(vector: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(vector, axis=-1, keepdims=True)
    return vector / np.maximum(norm, 1e-12)


def look_at(eye, target=(0.0, 0.0, 0.0), up=(0.0, 1.0, 0.0)) -> np.ndarray:
    """Camera-to-world matrix of a camera at ``eye`` looking at ``target`` (OpenGL convention).

    Args:
        eye: ``[3]`` camera centre.
        target: ``[3]`` point the camera looks at (it appears at the principal point).
        up: ``[3]`` world direction that appears upwards in the image; if it is (nearly) parallel to
            the viewing direction, another axis is used instead.

    Returns:
        ``[4, 4]`` float64 camera-to-world matrix: columns +x right, +y up, +z backwards
        (``-z`` points from ``eye`` to ``target``), translation ``eye``.
    """
    eye = np.asarray(eye, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    up = np.asarray(up, dtype=np.float64)
    backward = eye - target
    if np.linalg.norm(backward) < 1e-12:
        raise ValueError("look_at: eye and target coincide")
    backward = _normalize(backward)
    right = np.cross(up, backward)
    if np.linalg.norm(right) < 1e-6 * max(np.linalg.norm(up), 1e-12):
        # up is parallel to the viewing direction: pick the world axis least aligned with it.
        alternative = np.eye(3)[int(np.argmin(np.abs(backward)))]
        right = np.cross(alternative, backward)
    right = _normalize(right)
    true_up = np.cross(backward, right)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, true_up, backward, eye
    return c2w


def spherical_poses(azimuth, elevation, radius: float = 4.0, target=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Cameras on a sphere around ``target`` (y-up), looking at it.

    Args:
        azimuth: ``[N]`` radians about +y; 0 puts the camera on the +z axis, pi/2 on +x.
        elevation: ``[N]`` radians above the xz plane (keep within (-pi/2, pi/2)).
        radius: distance from ``target``.
        target: ``[3]`` look-at point.

    Returns:
        ``[N, 4, 4]`` float64 camera-to-world matrices.
    """
    azimuth = np.atleast_1d(np.asarray(azimuth, dtype=np.float64))
    elevation = np.atleast_1d(np.asarray(elevation, dtype=np.float64))
    target = np.asarray(target, dtype=np.float64)
    directions = np.stack(
        [np.cos(elevation) * np.sin(azimuth), np.sin(elevation), np.cos(elevation) * np.cos(azimuth)], axis=-1
    )
    return np.array([look_at(target + radius * d, target) for d in directions]).reshape(-1, 4, 4)


def orbit_poses(num_frames: int, radius: float = 4.0, height: float = 1.0, target=(0.0, 0.0, 0.0)) -> np.ndarray:
    """A circular camera path around the vertical (y) axis, e.g. for turntable videos.

    Args:
        num_frames: number of poses, evenly spaced in azimuth (the path does not repeat its start).
        radius: horizontal distance from ``target``.
        height: camera height above ``target`` (y offset).
        target: ``[3]`` look-at point.

    Returns:
        ``[num_frames, 4, 4]`` float64 camera-to-world matrices, frame ``k`` at azimuth
        ``2 pi k / num_frames`` (0 on the +z side of ``target``).
    """
    target = np.asarray(target, dtype=np.float64)
    angles = 2.0 * np.pi * np.arange(num_frames) / max(num_frames, 1)
    eyes = target + np.stack([radius * np.sin(angles), np.full_like(angles, height), radius * np.cos(angles)], -1)
    return np.array([look_at(eye, target) for eye in eyes]).reshape(-1, 4, 4)


def focal_from_fov(width: float, fov_x: float) -> float:
    """Focal length in pixels from the FULL horizontal field of view (``camera_angle_x``) in radians."""
    return 0.5 * float(width) / math.tan(0.5 * float(fov_x))


def fov_from_focal(width: float, focal: float) -> float:
    """Inverse of :func:`focal_from_fov`: the FULL field of view in radians."""
    return 2.0 * math.atan(0.5 * float(width) / float(focal))


def generate_rays(c2w, width: int, height: int, fx: float, fy: float, cx: float, cy: float,
                  dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """One ray through the centre of every pixel (OpenGL convention).

    Pixel ``(i, j)`` (column ``i``, row ``j`` from the top) gets the camera-space direction
    ``((i + 0.5 - cx) / fx, -(j + 0.5 - cy) / fy, -1)`` rotated into the world by ``c2w``.
    The directions are NOT normalised: their camera-space z component is -1, so ``origin + t * d``
    is the point at depth ``t`` along the optical axis (use this for depth; normalise yourself for
    unit directions).

    Args:
        c2w: ``[4, 4]`` (or ``[3, 4]``) camera-to-world matrix.
        width, height: image size in pixels.
        fx, fy, cx, cy: intrinsics in pixels.
        dtype: output dtype.

    Returns:
        ``(origins [height, width, 3], directions [height, width, 3])``.
    """
    c2w = np.asarray(c2w, dtype=np.float64)
    i, j = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64), indexing="xy")
    camera_dirs = np.stack([(i + 0.5 - cx) / fx, -(j + 0.5 - cy) / fy, -np.ones_like(i)], axis=-1)
    directions = camera_dirs @ c2w[:3, :3].T
    origins = np.broadcast_to(c2w[:3, 3], directions.shape)
    return origins.astype(dtype), directions.astype(dtype)


def project_points(points, c2w, fx: float, fy: float, cx: float, cy: float) -> tuple[np.ndarray, np.ndarray]:
    """World points -> continuous pixel coordinates (the inverse of :func:`generate_rays`).

    Args:
        points: ``[..., 3]`` world points.
        c2w: ``[4, 4]`` camera-to-world matrix.
        fx, fy, cx, cy: intrinsics in pixels.

    Returns:
        ``(pixels [..., 2], depth [...])``: ``pixels[..., 0]`` is the column coordinate ``u`` and
        ``pixels[..., 1]`` the row coordinate ``v`` (pixel ``(i, j)`` has its centre at
        ``(i + 0.5, j + 0.5)``); ``depth`` is the distance in front of the camera along its
        optical axis (positive for visible points).
    """
    c2w = np.asarray(c2w, dtype=np.float64)
    points = np.asarray(points, dtype=np.float64)
    camera = (points - c2w[:3, 3]) @ c2w[:3, :3]  # rotation is orthonormal: R^T (p - t)
    depth = -camera[..., 2]
    u = cx + fx * camera[..., 0] / depth
    v = cy - fy * camera[..., 1] / depth
    return np.stack([u, v], axis=-1), depth


def opengl_projection(fx: float, fy: float, cx: float, cy: float, width: int, height: int,
                      near: float = 0.05, far: float = 100.0) -> np.ndarray:
    """OpenGL clip-from-camera matrix that matches :func:`project_points` pixel for pixel.

    The window's y axis points up in OpenGL, so an image read back with ``glReadPixels`` must be
    flipped vertically (row 0 at the top) to match the pixel convention of this module.

    Returns:
        ``[4, 4]`` float64 projection matrix (column vectors: ``clip = P @ [x, y, z, 1]``).
    """
    projection = np.zeros((4, 4))
    projection[0, 0] = 2.0 * fx / width
    projection[0, 2] = 1.0 - 2.0 * cx / width
    projection[1, 1] = 2.0 * fy / height
    projection[1, 2] = 2.0 * cy / height - 1.0
    projection[2, 2] = -(far + near) / (far - near)
    projection[2, 3] = -2.0 * far * near / (far - near)
    projection[3, 2] = -1.0
    return projection


def world_to_camera(c2w) -> np.ndarray:
    """``[4, 4]`` world-to-camera (view) matrix: the inverse of a rigid camera-to-world matrix."""
    c2w = np.asarray(c2w, dtype=np.float64)
    view = np.eye(4)
    view[:3, :3] = c2w[:3, :3].T
    view[:3, 3] = -c2w[:3, :3].T @ c2w[:3, 3]
    return view


def rotation_y(degrees: float) -> np.ndarray:
    """``[3, 3]`` right-handed rotation by ``degrees`` about +y (90 degrees maps +x to -z)."""
    angle = math.radians(float(degrees))
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])
