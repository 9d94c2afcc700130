"""Folders of meshes and of multi-view scenes, as sources for ``fields.encode_dataset``.

- ``meshes:DIR`` (or a ``DIR`` holding mesh files): every ``.obj/.ply/.off/.glb/.gltf/.stl`` below
  ``DIR``, sorted by path, normalised into the occupancy box; a subfolder per class gives labels.
- ``scenes:DIR`` (or a ``DIR`` whose subfolders hold ``transforms_train.json``): every scene folder
  made by ``scripts.make_scenes`` (or any Blender-format scene), sorted by name; the caption from
  ``scene.json`` when there is one.

Both give ``num_items``, ``labels [num_items]`` (-1 where unknown) and a stable ``source_id(i)``;
``load(indices)`` reads the items of one batch only.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np

from fields.cli import UserError

MESH_SUFFIXES = (".obj", ".ply", ".off", ".glb", ".gltf", ".stl")
SCENE_MARKER = "transforms_train.json"


def _class_labels(relative_paths: Sequence[str]) -> np.ndarray:
    """Labels from the first folder level when items sit in more than one folder, else -1."""
    folders = [os.path.normpath(path).split(os.sep)[0] if os.sep in os.path.normpath(path) else ""
               for path in relative_paths]
    classes = sorted(set(folders))
    if len(classes) <= 1:
        return np.full(len(relative_paths), -1, np.int32)
    return np.asarray([classes.index(folder) for folder in folders], np.int32)


@dataclasses.dataclass
class FolderSource:
    """Items (files or folders, relative to ``root``, sorted) of a collection folder."""

    name: str
    root: str
    items: list[str]  # relative to root
    labels: np.ndarray

    @property
    def num_items(self) -> int:
        return len(self.items)

    def source_id(self, index: int) -> str:
        return self.items[int(index)]

    def path(self, index: int) -> str:
        return os.path.join(self.root, self.items[int(index)])


class MeshSource(FolderSource):
    """Mesh files under ``root``; ``load`` returns meshes normalised into ``[-1, 1]^3``."""

    def load(self, indices: Sequence[int]) -> list:
        from fields.data.mesh_sampling import mesh_from_spec

        return [mesh_from_spec(self.path(index)) for index in indices]


class SceneSource(FolderSource):
    """Scene folders under ``root``; ``load`` returns ``(train, test)`` ``SceneData`` pairs."""

    def caption(self, index: int) -> str:
        """The caption saved by ``scripts.make_scenes`` in ``scene.json`` ("" if none)."""
        path = os.path.join(self.path(index), "scene.json")
        if not os.path.exists(path):
            return ""
        try:
            with open(path) as handle:
                return str(json.load(handle).get("caption", ""))
        except (OSError, json.JSONDecodeError, AttributeError) as error:
            raise UserError(f"{path}: unreadable scene attributes ({error})") from None

    def load(self, indices: Sequence[int]) -> list:
        from fields.data.nerf_scenes import load_scene

        pairs = []
        for index in indices:
            folder = self.path(index)
            test_split = "test" if os.path.exists(os.path.join(folder, "transforms_test.json")) else "train"
            pairs.append((load_scene(folder, "train"), load_scene(folder, test_split)))
        return pairs


def find_mesh_files(root: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(folder, name), root) for folder, _, names in os.walk(root)
                  for name in names if name.lower().endswith(MESH_SUFFIXES))


def find_scene_folders(root: str) -> list[str]:
    """Folders (relative to ``root``; ``"."`` for ``root`` itself) that hold ``transforms_train.json``."""
    return sorted(os.path.relpath(folder, root) for folder, _, names in os.walk(root) if SCENE_MARKER in names)


def _folder_items(root: str, what: str, found: list[str], missing: str, limit: int | None) -> list[str]:
    if not os.path.isdir(root):
        raise UserError(f"{what} folder not found: {root}")
    if not found:
        raise UserError(f"no {missing} found in {root}")
    return found[:limit] if limit is not None else found


def mesh_folder_source(root: str, limit: int | None = None) -> MeshSource:
    files = _folder_items(root, "mesh", find_mesh_files(root), f"meshes ({', '.join(MESH_SUFFIXES)})", limit)
    return MeshSource(f"meshes:{root}", root, files, _class_labels(files))


def scene_folder_source(root: str, limit: int | None = None) -> SceneSource:
    scenes = _folder_items(root, "scene", find_scene_folders(root), f"scenes (folders with {SCENE_MARKER})", limit)
    return SceneSource(f"scenes:{root}", root, scenes, np.full(len(scenes), -1, np.int32))


def source_family(spec: str) -> str:
    """``"meshes"``, ``"scenes"`` or ``"images"`` for a source spec (a plain folder is sniffed)."""
    if spec.startswith("meshes:"):
        return "meshes"
    if spec.startswith("scenes:"):
        return "scenes"
    if os.path.isdir(spec):
        if find_scene_folders(spec):
            return "scenes"
        from fields.data.image_sources import IMAGE_SUFFIXES

        has_images = any(name.lower().endswith(IMAGE_SUFFIXES) for _, _, names in os.walk(spec) for name in names)
        if not has_images and find_mesh_files(spec):
            return "meshes"
    return "images"


def strip_family(spec: str) -> str:
    """The folder of a ``meshes:DIR`` / ``scenes:DIR`` spec (a plain folder unchanged)."""
    for prefix in ("meshes:", "scenes:"):
        if spec.startswith(prefix):
            return spec[len(prefix):]
    return spec
