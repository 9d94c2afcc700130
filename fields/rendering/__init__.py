"""Rendering: pure-NumPy camera helpers (``cameras``) and a headless OpenGL rasterizer (``rasterize``).

``cameras`` needs only NumPy; ``rasterize`` imports moderngl when a rasterizer is created.
"""

from fields.rendering.cameras import (
    focal_from_fov,
    fov_from_focal,
    generate_rays,
    look_at,
    opengl_projection,
    orbit_poses,
    project_points,
    rotation_y,
    spherical_poses,
    world_to_camera,
)

__all__ = [
    "focal_from_fov",
    "fov_from_focal",
    "generate_rays",
    "look_at",
    "opengl_projection",
    "orbit_poses",
    "project_points",
    "rotation_y",
    "spherical_poses",
    "world_to_camera",
]
