"""Render any stored dataset of fields into what the metrics compare, plus small previews for grids.

- Image fields (``ngp_image``, ``siren_image``, ``fourier_image``): images at the size stored in the
  dataset's schema metadata (``image_height``, ``image_width``), via
  :func:`fields.image_fitting.render_batch`, in chunks of fields with a leading axis.
- Occupancy fields (``occupancy``): marching cubes of ``logit = 0``
  (:func:`fields.occupancy_fitting.extract_mesh`), then ``num_points`` (2,048) points uniform over
  the surface (:func:`fields.data.mesh_sampling.surface_points`, the same seed for every shape, so
  identical meshes give identical clouds). A field with an empty surface gets a cloud of
  ``num_points`` copies of the origin and is counted in ``Renders.invalid``.
- NeRF fields (``ngp_nerf``) are not supported yet (their renders need an occupancy grid that the
  datasets do not store): a one-line ``UserError``.

Fields with non-finite weights (a diverged generator) are not rendered: they get a black image or a
cloud at the origin and are counted in ``Renders.invalid`` too.

Previews are ``[N, h, w, 3]`` RGB images in [0, 1]: the images themselves (grey or RGBA made RGB),
or an orthographic view of each point cloud (depth-shaded dots on white).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from fields.cli import UserError
from fields.weights import ParamEntry, matrix_to_params, vector_to_params

IMAGE_KINDS = ("ngp_image", "siren_image", "fourier_image")
SHAPE_KINDS = ("occupancy",)
NERF_KINDS = ("ngp_nerf",)
PIXELS_PER_CHUNK = 1 << 20  # fields x pixels rendered in one call
MAX_FIELDS_PER_CHUNK = 128
PREVIEW_SIZE = 64


@dataclasses.dataclass(frozen=True)
class RenderSettings:
    """How fields are rendered.

    Attributes:
        backend: hash-grid backend of image fields (``auto``, ``kernel`` or ``jax``).
        num_points: surface points per shape (HyperDiffusion: 2,048).
        mesh_resolution: marching-cubes lattice resolution per axis for occupancy fields.
        point_seed: the surface sampling seed (the same for every shape).
    """

    backend: str = "auto"
    num_points: int = 2048
    mesh_resolution: int = 128
    point_seed: int = 0


@dataclasses.dataclass
class Renders:
    """Renders of ``N`` fields.

    Attributes:
        kind: ``"image"`` or ``"points"``.
        values: ``[N, height, width, channels]`` float32 in [0, 1] (images) or ``[N, num_points, 3]``
            float32 (surface points).
        previews: ``[N, h, w, 3]`` float32 RGB in [0, 1], for the PNG grids.
        invalid: ``[N]`` bool, fields with non-finite weights, or shapes whose surface was empty.
        description: what ``values`` hold, in words.
    """

    kind: str
    values: np.ndarray
    previews: np.ndarray
    invalid: np.ndarray
    description: str

    def __len__(self) -> int:
        return int(self.values.shape[0])


def render_kind(field_kind: str, where: str = "dataset") -> str:
    """``"image"`` or ``"points"`` for a field kind.

    Raises:
        UserError: NeRF fields (not supported yet) or an unknown kind.
    """
    if field_kind in IMAGE_KINDS:
        return "image"
    if field_kind in SHAPE_KINDS:
        return "points"
    if field_kind in NERF_KINDS:
        raise UserError(f"{where}: rendering {field_kind} fields is not supported yet by hypernets.evaluate "
                        f"(supported: {', '.join(IMAGE_KINDS + SHAPE_KINDS)})")
    raise UserError(f"{where}: unknown field kind {field_kind!r} (supported: {', '.join(IMAGE_KINDS + SHAPE_KINDS)})")


def image_size(metadata: dict, where: str) -> tuple[int, int]:
    """``(height, width)`` from a dataset's schema metadata (``image_height``, ``image_width``).

    Raises:
        UserError: missing or non-positive entries.
    """
    try:
        height, width = int(metadata["image_height"]), int(metadata["image_width"])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{where}: schema metadata lacks image_height/image_width, so the render size is "
                        "unknown") from None
    if height < 1 or width < 1:
        raise UserError(f"{where}: image_height/image_width must be positive, got {height}x{width}")
    return height, width


def render_fields(matrix: np.ndarray, field_kind: str, field_config: dict, pmap: Sequence[ParamEntry],
                  metadata: dict, settings: RenderSettings, where: str = "dataset", progress: bool = False) -> Renders:
    """Renders the fields of ``matrix [N, P]`` (laid out by ``pmap``) as images or surface points.

    Args:
        matrix: ``[N, P]`` raw (not normalised) weights.
        field_kind, field_config, pmap: the dataset's field description.
        metadata: its schema metadata (image fields need ``image_height`` and ``image_width``).
        settings: backend, point count, mesh resolution.
        where: names the dataset in error messages.
        progress: show a progress bar (occupancy fields).
    """
    kind = render_kind(field_kind, where)
    matrix = np.asarray(matrix, np.float32)
    finite = np.all(np.isfinite(matrix), axis=1)
    matrix = np.where(finite[:, None], matrix, np.float32(0.0))
    if kind == "image":
        images = render_images(matrix, field_kind, field_config, pmap, image_size(metadata, where), settings, where)
        images[~finite] = 0.0
        height, width, channels = images.shape[1:]
        return Renders("image", images, image_previews(images), ~finite, f"{height}x{width}x{channels} images")
    points, empty = surface_point_clouds(matrix, field_config, pmap, settings, where, progress, skip=~finite)
    return Renders("points", points, point_cloud_previews(points, empty), empty,
                   f"{settings.num_points} surface points per shape (marching cubes at {settings.mesh_resolution}^3)")


def render_images(matrix: np.ndarray, field_kind: str, field_config: dict, pmap: Sequence[ParamEntry],
                  size: tuple[int, int], settings: RenderSettings, where: str = "dataset") -> np.ndarray:
    """Image fields ``[N, P]`` -> ``[N, height, width, channels]`` float32 in [0, 1]."""
    from fields.image_fitting import field_config_from_dict, render_batch

    config = field_config_from_dict(field_kind, field_config, f"{where}: field_config")
    height, width = size
    channels = int(config.output_dim)
    output = np.zeros((len(matrix), height, width, channels), np.float32)
    if not len(matrix):
        return output
    per_chunk = max(1, min(MAX_FIELDS_PER_CHUNK, PIXELS_PER_CHUNK // (height * width)))
    per_chunk = min(per_chunk, 1 << int(np.ceil(np.log2(len(matrix)))))  # few compiled shapes, little padding
    for start in range(0, len(matrix), per_chunk):
        block = matrix[start:start + per_chunk]
        padded = np.concatenate([block, np.zeros((per_chunk - len(block), block.shape[1]), np.float32)])
        renders = render_batch(matrix_to_params(padded, pmap), config, height, width, settings.backend)
        output[start:start + len(block)] = renders[: len(block)]
    return output


def surface_point_clouds(matrix: np.ndarray, field_config: dict, pmap: Sequence[ParamEntry],
                         settings: RenderSettings, where: str = "dataset", progress: bool = False,
                         skip: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Occupancy fields ``[N, P]`` -> ``(points [N, num_points, 3] float32, empty [N] bool)``.

    Rows flagged in ``skip [N]`` are not extracted and count as empty (points at the origin).
    """
    from tqdm.auto import tqdm

    from fields.config import ConfigError, config_from_dict
    from fields.data.mesh_sampling import surface_points
    from fields.data.meshes import Mesh, vertex_normals
    from fields.models.occupancy_mlp import OccupancyFieldConfig
    from fields.occupancy_fitting import extract_mesh

    try:
        config = config_from_dict(OccupancyFieldConfig, field_config, f"{where}: field_config")
    except ConfigError as error:
        raise UserError(str(error)) from None
    points = np.zeros((len(matrix), settings.num_points, 3), np.float32)
    empty = np.zeros(len(matrix), bool)
    for row in tqdm(range(len(matrix)), desc="meshes", unit="shape", disable=not progress, leave=False):
        if skip is not None and skip[row]:
            empty[row] = True
            continue
        params = vector_to_params(matrix[row], pmap)
        vertices, faces = extract_mesh(params, config, settings.mesh_resolution)
        if not len(faces):
            empty[row] = True
            continue
        mesh = Mesh(vertices, vertex_normals(vertices, faces), faces, np.asarray((0.8, 0.8, 0.8), np.float32))
        try:
            points[row] = surface_points(mesh, settings.num_points, seed=settings.point_seed)
        except ValueError:  # a degenerate surface without area
            empty[row] = True
    return points, empty


# ------------------------------------------------------------------------------------ previews


def image_previews(images: np.ndarray) -> np.ndarray:
    """``[N, h, w, c]`` -> ``[N, h, w, 3]`` RGB: grey repeated, RGBA composited over white."""
    images = np.clip(np.asarray(images, np.float32), 0.0, 1.0)
    channels = images.shape[-1]
    if channels == 1:
        return np.repeat(images, 3, axis=-1)
    if channels == 4:
        alpha = images[..., 3:4]
        return images[..., :3] * alpha + (1.0 - alpha)
    return images[..., :3]


def view_rotation(azimuth_degrees: float = 35.0, elevation_degrees: float = 25.0) -> np.ndarray:
    """``[3, 3]``: world -> view rotation of a camera orbiting the y axis, looking at the origin."""
    azimuth, elevation = np.radians(azimuth_degrees), np.radians(elevation_degrees)
    about_y = np.array([[np.cos(azimuth), 0.0, -np.sin(azimuth)], [0.0, 1.0, 0.0],
                        [np.sin(azimuth), 0.0, np.cos(azimuth)]])
    about_x = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(elevation), -np.sin(elevation)],
                        [0.0, np.sin(elevation), np.cos(elevation)]])
    return about_x @ about_y


def point_cloud_previews(points: np.ndarray, empty: np.ndarray | None = None,
                         size: int = PREVIEW_SIZE) -> np.ndarray:
    """Orthographic views of point clouds in the box ``[-1, 1]^3``: ``[N, p, 3]`` -> ``[N, size, size, 3]``.

    Each point is a dot shaded by depth (near: dark blue, far: light); the nearest point wins a
    pixel. Empty shapes are drawn as a plain light-red square.
    """
    points = np.asarray(points, np.float64)
    rotation = view_rotation()
    previews = np.ones((len(points), size, size, 3), np.float32)
    near, far = np.array([0.1, 0.2, 0.6]), np.array([0.75, 0.8, 0.9])
    for index, cloud in enumerate(points):
        if empty is not None and empty[index]:
            previews[index] = np.array([1.0, 0.85, 0.85], np.float32)
            continue
        view = cloud @ rotation.T
        columns = np.clip(((view[:, 0] + 1.0) * 0.5 * (size - 1)).round().astype(np.int64), 0, size - 1)
        rows = np.clip(((1.0 - view[:, 1]) * 0.5 * (size - 1)).round().astype(np.int64), 0, size - 1)
        depth = np.clip((view[:, 2] + 1.0) * 0.5, 0.0, 1.0)  # 0: nearest to the camera (it looks along +z)
        order = np.argsort(-depth)  # far first, so nearer points overwrite them
        colours = near[None, :] * (1.0 - depth[order, None]) + far[None, :] * depth[order, None]
        previews[index, rows[order], columns[order]] = colours.astype(np.float32)
    return previews


def image_grid(images: np.ndarray, columns: int, padding: int = 2, min_cell: int = PREVIEW_SIZE,
               background: float = 1.0, group: int = 0) -> np.ndarray:
    """Tiles ``[N, h, w, 3]`` previews into one ``[H, W, 3]`` image, row-major, ``columns`` per row.

    Small previews are enlarged by an integer factor (nearest neighbour) to at least ``min_cell`` pixels.
    ``group > 0`` leaves a wider gap (``4 * padding``) after every ``group`` columns (e.g. 2: pairs).
    """
    images = np.asarray(images, np.float32)
    if not len(images):
        return np.full((min_cell, min_cell, 3), background, np.float32)
    scale = max(1, int(np.ceil(min_cell / max(images.shape[1], 1))))
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    count, height, width = images.shape[:3]
    columns = max(1, min(columns, count))
    rows = int(np.ceil(count / columns))
    gap = 4 * padding if group > 0 else 0

    def extra(column: int) -> int:  # the wider gaps left of a column
        return gap * (column // group) if group > 0 else 0

    grid = np.full((rows * (height + padding) + padding, columns * (width + padding) + padding + extra(columns - 1),
                    3), background, np.float32)
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        top, left = padding + row * (height + padding), padding + column * (width + padding) + extra(column)
        grid[top:top + height, left:left + width] = image
    return grid


def save_grid(path: str, previews: np.ndarray, columns: int, group: int = 0) -> None:
    """Writes ``image_grid(previews, columns, group=group)`` as an 8-bit PNG."""
    from fields.data.images import save_image

    save_image(path, image_grid(previews, columns, group=group))
