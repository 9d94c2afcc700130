"""Procedural multi-view 3D scenes: random coloured primitives (or a user mesh) rendered as NeRF datasets.

A scene is a few primitives (sphere, box, cylinder, cone, torus) with colours from a palette of
NAMED colours (so a scene has a caption such as "a red sphere and a blue box"), random sizes,
rotations and positions, all inside the cylinder ``x^2 + z^2 <= 0.9^2, |y| <= 0.9`` (so inside
``[-1, 1]^3`` under any rotation about the vertical y axis). ``rotation_deg`` rotates the whole
scene about +y: the same seed with another rotation gives the same objects, rotated.

A scene directory holds the Blender NeRF-synthetic layout::

    scene_0000/
        train/r_0.png ...  val/r_0.png ...  test/r_0.png ...   (RGBA, transparent background)
        transforms_train.json  transforms_val.json  transforms_test.json
        scene.json                                           (objects, caption, settings; written last)

``transforms_*.json`` hold ``camera_angle_x`` (the FULL horizontal field of view, radians) and
``frames[]`` with ``file_path`` (``"./train/r_0"``, no extension) and ``transform_matrix``
(4x4 camera-to-world, OpenGL: the camera looks down -z, +y up). Cameras lie on a sphere around
the origin (radius 4, elevation -20..80 degrees) at random azimuths/elevations drawn from
``(seed, scene index, split)`` only, so rotated copies of a scene share their cameras.
A scene is built in a hidden temporary folder and renamed into place when complete.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from fields.cli import UserError
from fields.data import meshes
from fields.rendering.cameras import focal_from_fov, rotation_y, spherical_poses

# Named colours (linear RGB albedo) usable as caption words.
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.10, 0.10),
    "orange": (1.00, 0.50, 0.05),
    "yellow": (0.95, 0.85, 0.10),
    "green": (0.15, 0.70, 0.20),
    "cyan": (0.10, 0.80, 0.85),
    "blue": (0.12, 0.28, 0.92),
    "purple": (0.50, 0.18, 0.78),
    "pink": (1.00, 0.48, 0.72),
    "brown": (0.50, 0.30, 0.10),
    "white": (0.92, 0.92, 0.92),
    "grey": (0.50, 0.50, 0.50),
}
SHAPES = ("sphere", "box", "cylinder", "cone", "torus")
SPLITS = ("train", "val", "test")
SCENE_EXTENT = 0.9  # objects stay within x^2 + z^2 <= 0.9^2 and |y| <= 0.9
BLENDER_CAMERA_ANGLE_X = 0.6911112070083618  # the NeRF-synthetic scenes' field of view
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class SceneObject:
    """One object of a scene, in world coordinates (after the scene rotation).

    Attributes:
        shape: one of ``SHAPES``, or ``"mesh"``.
        colour: palette name (or ``"mesh"`` colours for a coloured mesh file).
        rgb: albedo in [0, 1].
        position: ``[3]`` centre in the world.
        size: ``[3]`` half extents along the object's local x, y, z axes (sphere: radius x3; box:
            half sides; cylinder/cone: radius, half height, radius; torus: ring radius + tube
            radius, tube radius, ring radius + tube radius).
        rotation: ``[3, 3]`` object-to-world rotation (row-major nested lists).
    """

    shape: str
    colour: str
    rgb: tuple[float, float, float]
    position: tuple[float, float, float]
    size: tuple[float, float, float]
    rotation: tuple[tuple[float, float, float], ...]

    def local_mesh(self) -> meshes.Mesh:
        """The object's mesh in its own frame (centred at the origin, not rotated)."""
        sx, sy, _ = self.size
        if self.shape == "sphere":
            mesh = meshes.sphere(sx)
        elif self.shape == "box":
            mesh = meshes.box(self.size)
        elif self.shape == "cylinder":
            mesh = meshes.cylinder(sx, sy)
        elif self.shape == "cone":
            mesh = meshes.cone(sx, sy)
        elif self.shape == "torus":
            mesh = meshes.torus(sx - sy, sy)
        else:
            raise ValueError(f"no procedural mesh for shape {self.shape!r}")
        return mesh.with_color(self.rgb)

    def mesh(self) -> meshes.Mesh:
        """The object's mesh in the world."""
        return self.local_mesh().transformed(np.asarray(self.rotation), np.asarray(self.position))

    def to_json(self) -> dict:
        return {
            "shape": self.shape,
            "colour": self.colour,
            "rgb": [round(float(c), 6) for c in self.rgb],
            "position": [float(x) for x in self.position],
            "size": [float(x) for x in self.size],
            "rotation": [[float(x) for x in row] for row in self.rotation],
        }


@dataclasses.dataclass(frozen=True)
class Scene:
    """A procedural scene (or a user mesh) and how it was made.

    Attributes:
        objects: the objects, in world coordinates.
        caption: e.g. ``"a red sphere and a blue box"``.
        seed, index: the generator seed and scene index (objects and cameras derive from both).
        rotation_deg: rotation of the whole scene about +y, degrees (already applied to ``objects``).
        mesh_path: the user mesh file, if any (then ``objects`` has one entry of shape ``"mesh"``).
    """

    objects: tuple[SceneObject, ...]
    caption: str
    seed: int
    index: int
    rotation_deg: float = 0.0
    mesh_path: str | None = None
    _user_mesh: meshes.Mesh | None = dataclasses.field(default=None, repr=False, compare=False)

    def mesh(self) -> meshes.Mesh:
        """All objects as one world-space mesh."""
        if self._user_mesh is not None:
            return self._user_mesh.transformed(rotation_y(self.rotation_deg))
        return meshes.concatenate([obj.mesh() for obj in self.objects])

    def to_json(self) -> dict:
        return {
            "caption": self.caption,
            "seed": self.seed,
            "index": self.index,
            "rotation_deg": float(self.rotation_deg),
            "rotation_axis": [0.0, 1.0, 0.0],
            "mesh": self.mesh_path,
            "objects": [obj.to_json() for obj in self.objects],
        }


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def make_caption(objects: Sequence[SceneObject]) -> str:
    """``"a red sphere"``, ``"a red sphere and a blue box"``, ``"a red sphere, a blue box and an orange cone"``."""
    phrases = [f"{_article(o.colour)} {o.colour} {o.shape}" for o in objects]
    if len(phrases) <= 1:
        return phrases[0] if phrases else "nothing"
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random rotation matrix (from a random unit quaternion)."""
    w, x, y, z = (q := rng.normal(size=4)) / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def _random_size(shape: str, rng: np.random.Generator) -> tuple[float, float, float]:
    if shape == "sphere":
        r = rng.uniform(0.25, 0.5)
        return (r, r, r)
    if shape == "box":
        return tuple(float(x) for x in rng.uniform(0.18, 0.42, size=3))
    if shape in ("cylinder", "cone"):
        r, h = rng.uniform(0.18, 0.42), rng.uniform(0.2, 0.48)
        return (r, h, r)
    if shape == "torus":
        ring = rng.uniform(0.25, 0.45)
        tube = rng.uniform(0.08, min(0.18, 0.5 * ring))
        return (ring + tube, tube, ring + tube)
    raise ValueError(f"unknown shape {shape!r}")


def _place(offsets: np.ndarray, placed: list[tuple[np.ndarray, float]], rng: np.random.Generator,
           tries: int = 32) -> np.ndarray:
    """A centre that keeps all ``offsets`` (rotated mesh vertices) within the scene cylinder, preferring
    positions whose bounding sphere clears the already placed ones (best of ``tries``)."""
    horizontal = float(np.linalg.norm(offsets[:, [0, 2]], axis=-1).max())
    radius_xz = max(SCENE_EXTENT - horizontal, 0.0)
    y_low, y_high = -SCENE_EXTENT - float(offsets[:, 1].min()), SCENE_EXTENT - float(offsets[:, 1].max())
    bound = float(np.linalg.norm(offsets, axis=-1).max())
    best, best_clearance = None, -np.inf
    for _ in range(tries):
        r, angle = radius_xz * math.sqrt(rng.uniform()), rng.uniform(0.0, 2.0 * math.pi)
        centre = np.array([r * math.sin(angle), rng.uniform(y_low, y_high) if y_high > y_low else 0.0,
                           r * math.cos(angle)])
        clearance = min((np.linalg.norm(centre - c) - (bound + b) for c, b in placed), default=np.inf)
        if clearance > best_clearance:
            best, best_clearance = centre, clearance
        if clearance >= 0.0:
            break
    return best


def random_scene(seed: int, index: int = 0, num_objects: tuple[int, int] = (1, 3), rotation_deg: float = 0.0,
                 shapes: Sequence[str] = SHAPES) -> Scene:
    """A random scene, a function of ``(seed, index, num_objects, shapes)`` only, then rotated.

    Colours within a scene are distinct palette entries. ``rotation_deg`` rotates every position
    and orientation about +y, so scenes differing only in rotation hold the same objects.
    """
    low, high = num_objects
    if not 1 <= low <= high <= len(PALETTE):
        raise ValueError(f"num_objects must satisfy 1 <= min <= max <= {len(PALETTE)}, got {low},{high}")
    rng = np.random.default_rng([seed, index, 0])
    count = int(rng.integers(low, high + 1))
    colour_names = list(PALETTE)
    colours = [colour_names[k] for k in rng.choice(len(colour_names), size=count, replace=False)]
    spin = rotation_y(rotation_deg)
    placed: list[tuple[np.ndarray, float]] = []
    objects = []
    for colour in colours:
        shape = shapes[int(rng.integers(len(shapes)))]
        size = _random_size(shape, rng)
        rotation = _random_rotation(rng)
        draft = SceneObject(shape, colour, PALETTE[colour], (0.0, 0.0, 0.0), size, tuple(map(tuple, rotation)))
        offsets = draft.local_mesh().vertices.astype(np.float64) @ rotation.T
        position = _place(offsets, placed, rng)
        placed.append((position, float(np.linalg.norm(offsets, axis=-1).max())))
        objects.append(dataclasses.replace(
            draft, position=tuple(float(x) for x in spin @ position),
            rotation=tuple(tuple(float(x) for x in row) for row in spin @ rotation),
        ))
    return Scene(tuple(objects), make_caption(objects), int(seed), int(index), float(rotation_deg))


def mesh_scene(mesh: meshes.Mesh, mesh_path: str, seed: int, index: int = 0, rotation_deg: float = 0.0,
               colour: str = "white") -> Scene:
    """A scene of one user mesh, already normalised (see :func:`meshes.normalize_mesh`), rotated about +y."""
    name = os.path.splitext(os.path.basename(mesh_path))[0]
    low, high = mesh.bounds.astype(np.float64)
    spin = rotation_y(rotation_deg)
    obj = SceneObject("mesh", colour, PALETTE.get(colour, (0.8, 0.8, 0.8)), (0.0, 0.0, 0.0),
                      tuple(float(x) for x in 0.5 * (high - low)), tuple(tuple(float(x) for x in r) for r in spin))
    return Scene((obj,), f"{_article(colour)} {colour} {name}", int(seed), int(index), float(rotation_deg),
                 mesh_path, _user_mesh=mesh)


def load_user_mesh(path: str, colour: str = "white") -> meshes.Mesh:
    """Loads and normalises a mesh file for :func:`mesh_scene` (painted ``colour`` unless it has colours)."""
    if colour not in PALETTE:
        raise UserError(f"unknown colour {colour!r}; use one of: {', '.join(PALETTE)}")
    return meshes.normalize_mesh(meshes.load_mesh(path, PALETTE[colour]), SCENE_EXTENT)


@dataclasses.dataclass(frozen=True)
class ViewConfig:
    """How the views of a scene are rendered.

    Attributes:
        views: number of views per split, ``{"train": 100, "val": 10, "test": 50}``.
        resolution: square image side in pixels.
        camera_angle_x: FULL horizontal field of view, radians.
        radius: camera distance from the origin.
        elevation_deg: (min, max) camera elevation above the xz plane, degrees.
        samples: MSAA samples per pixel.
    """

    views: dict = dataclasses.field(default_factory=lambda: {"train": 100, "val": 10, "test": 50})
    resolution: int = 128
    camera_angle_x: float = BLENDER_CAMERA_ANGLE_X
    radius: float = 4.0
    elevation_deg: tuple[float, float] = (-20.0, 80.0)
    samples: int = 4

    def to_json(self) -> dict:
        return {"views": {s: int(self.views.get(s, 0)) for s in SPLITS}, "resolution": self.resolution,
                "camera_angle_x": self.camera_angle_x, "radius": self.radius,
                "elevation_deg": list(self.elevation_deg), "samples": self.samples}


def sample_cameras(seed: int, index: int, split: str, count: int, config: ViewConfig) -> np.ndarray:
    """``[count, 4, 4]`` camera-to-world matrices looking at the origin: azimuth uniform, elevation uniform
    in area (``sin(elevation)`` uniform) within ``config.elevation_deg``; a function of
    ``(seed, index, split)`` and the camera settings only."""
    rng = np.random.default_rng([seed, index, 1 + SPLITS.index(split)])
    azimuth = rng.uniform(0.0, 2.0 * math.pi, size=count)
    low, high = (math.sin(math.radians(e)) for e in config.elevation_deg)
    elevation = np.arcsin(rng.uniform(low, high, size=count))
    return spherical_poses(azimuth, elevation, config.radius)


def scene_is_complete(scene_dir: str) -> bool:
    """Whether ``scene_dir`` holds a finished scene (``scene.json`` is written last)."""
    return os.path.isfile(os.path.join(scene_dir, "scene.json"))


def _write_json(path: str, data) -> None:
    with open(path, "w") as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")


def write_scene(scene_dir: str, scene: Scene, config: ViewConfig, rasterizer,
                on_view: Callable[[], None] | None = None) -> None:
    """Renders every split of ``scene`` into ``scene_dir`` (which must not exist yet).

    Everything goes into a hidden sibling folder first, ``scene.json`` last, and the folder is
    renamed to ``scene_dir`` at the end, so an interrupted run never leaves a scene that looks complete.
    ``rasterizer`` must be a :class:`fields.rendering.rasterize.Rasterizer` of the config's resolution.
    """
    parent, name = os.path.split(os.path.abspath(scene_dir))
    partial = os.path.join(parent, f".{name}.partial")
    if os.path.isdir(partial):
        shutil.rmtree(partial)  # left by an interrupted run
    os.makedirs(partial)
    size = config.resolution
    focal = focal_from_fov(size, config.camera_angle_x)
    mesh = scene.mesh()
    for split in SPLITS:
        count = int(config.views.get(split, 0))
        os.makedirs(os.path.join(partial, split))
        frames = []
        for k, c2w in enumerate(sample_cameras(scene.seed, scene.index, split, count, config)):
            image = rasterizer.render(mesh, c2w, focal, focal, 0.5 * size, 0.5 * size)
            Image.fromarray(image).save(os.path.join(partial, split, f"r_{k}.png"))
            frames.append({"file_path": f"./{split}/r_{k}",
                           "transform_matrix": [[float(x) for x in row] for row in c2w]})
            if on_view is not None:
                on_view()
        _write_json(os.path.join(partial, f"transforms_{split}.json"),
                    {"camera_angle_x": float(config.camera_angle_x), "frames": frames})
    _write_json(os.path.join(partial, "scene.json"),
                {"format_version": FORMAT_VERSION, **scene.to_json(), "render": config.to_json()})
    os.rename(partial, scene_dir)


def _settings_match(scene_dir: str, scene: Scene, config: ViewConfig) -> str | None:
    """None if the existing scene was made with these settings, else what differs."""
    try:
        with open(os.path.join(scene_dir, "scene.json")) as handle:
            old = json.load(handle)
    except (OSError, ValueError) as error:
        return f"unreadable scene.json ({error})"
    new = {**scene.to_json(), "render": config.to_json()}
    for key in ("seed", "index", "rotation_deg", "mesh", "render"):
        if old.get(key) != json.loads(json.dumps(new[key])):
            return f"{key} {old.get(key)!r} != {new[key]!r}"
    return None


def generate_scenes(out: str, num_scenes: int, config: ViewConfig, seed: int = 0,
                    num_objects: tuple[int, int] = (1, 3), rotation_deg: float = 0.0,
                    mesh_path: str | None = None, mesh_colour: str = "white", overwrite: bool = False,
                    progress: bool = True, start_index: int = 0) -> dict:
    """Writes ``out/scene_0000 ...``; complete scenes made with the same settings are skipped, incomplete
    ones (no ``scene.json``) are rendered again.

    Returns:
        ``{"written": [...dirs], "skipped": [...dirs], "seconds_rendering": float, "views_rendered": int}``.

    Raises:
        UserError: bad settings, an existing scene made with other settings (without ``overwrite``),
            or an unwritable output folder.
    """
    import time

    from tqdm.auto import tqdm

    from fields.rendering.rasterize import Rasterizer

    if num_scenes < 0 or config.resolution < 1 or any(int(v) < 0 for v in config.views.values()):
        raise UserError("num_scenes, views and resolution must be positive")
    user_mesh = load_user_mesh(mesh_path, mesh_colour) if mesh_path else None
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create output folder {out}: {error.strerror}") from None

    def make(index: int) -> Scene:
        if user_mesh is not None:
            return mesh_scene(user_mesh, mesh_path, seed, index, rotation_deg, mesh_colour)
        return random_scene(seed, index, num_objects, rotation_deg)

    views_per_scene = sum(int(config.views.get(s, 0)) for s in SPLITS)
    todo, skipped = [], []
    for index in range(start_index, start_index + num_scenes):
        scene_dir = os.path.join(out, f"scene_{index:04d}")
        scene = make(index)
        if scene_is_complete(scene_dir) and not overwrite:
            mismatch = _settings_match(scene_dir, scene, config)
            if mismatch is not None:
                raise UserError(f"{scene_dir} exists but was made with other settings ({mismatch}); "
                                "use another --out or --overwrite")
            skipped.append(scene_dir)
            continue
        todo.append((scene_dir, scene))
    rasterizer = Rasterizer(config.resolution, config.resolution, samples=config.samples) if todo else None
    written, seconds = [], 0.0
    bar = tqdm(total=len(todo) * views_per_scene, unit="view", desc="render", disable=not progress or not todo,
               dynamic_ncols=True)
    try:
        for scene_dir, scene in todo:
            start = time.perf_counter()
            try:
                if os.path.isdir(scene_dir):
                    shutil.rmtree(scene_dir)  # --overwrite, or a folder without scene.json (incomplete)
                elif os.path.lexists(scene_dir):
                    os.remove(scene_dir)
                write_scene(scene_dir, scene, config, rasterizer, on_view=lambda: bar.update(1))
            except OSError as error:
                raise UserError(f"cannot write {scene_dir}: {error.strerror or error}") from None
            seconds += time.perf_counter() - start
            written.append(scene_dir)
    finally:
        bar.close()
        if rasterizer is not None:
            rasterizer.release()
    return {"written": written, "skipped": skipped, "seconds_rendering": seconds,
            "views_rendered": len(written) * views_per_scene}
