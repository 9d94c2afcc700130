"""Procedural 3D scenes (meshes, rasterizer, cameras, generator CLI) and the NeRF dataset loader."""

import json
import math
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from fields.cli import UserError, run_main
from fields.data import meshes, procgen_3d
from fields.data.nerf_scenes import load_scene, load_split_indices
from fields.rendering import cameras
from scripts import make_scenes

SMALL_ARGS = ["--num-scenes", "2", "--train-views", "4", "--val-views", "2", "--test-views", "3",
              "--resolution", "32", "--seed", "5", "--num-objects", "2,3", "--quiet"]


@pytest.fixture(scope="module")
def egl():
    from fields.rendering import rasterize

    try:
        rasterize.get_context()
    except UserError as error:
        pytest.skip(str(error))
    return rasterize


def _make(out, *extra):
    assert make_scenes.main(["--out", str(out), *SMALL_ARGS, *extra]) == 0
    return out


def _files(root):
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as handle:
                found[os.path.relpath(path, root)] = handle.read()
    return found


@pytest.fixture(scope="module")
def generated(egl, tmp_path_factory):
    return _make(tmp_path_factory.mktemp("scenes") / "out")


def _png(path):
    with Image.open(path) as image:
        assert image.mode == "RGBA"
        return np.asarray(image)


# --------------------------------------------------------------------------- cameras


def test_focal_from_fov_uses_the_full_angle():
    # The NeRF-synthetic scenes: 800 px wide, camera_angle_x 0.6911112 -> focal 1111.111 px.
    assert cameras.focal_from_fov(800, 0.6911112070083618) == pytest.approx(1111.1110311937682, rel=1e-9)
    assert cameras.fov_from_focal(800, cameras.focal_from_fov(800, 0.5)) == pytest.approx(0.5)


def test_look_at_is_a_rigid_opengl_pose():
    eye, target = np.array([1.0, 2.0, 3.0]), np.array([0.2, -0.1, 0.3])
    c2w = cameras.look_at(eye, target)
    rotation = c2w[:3, :3]
    np.testing.assert_allclose(rotation.T @ rotation, np.eye(3), atol=1e-12)
    assert np.linalg.det(rotation) == pytest.approx(1.0)
    np.testing.assert_allclose(c2w[:3, 3], eye)
    forward = -c2w[:3, 2]  # the camera looks down -z
    np.testing.assert_allclose(forward, (target - eye) / np.linalg.norm(target - eye), atol=1e-12)
    assert c2w[1, 1] > 0 and abs(c2w[1, 0]) < 1e-12  # +y up, +x horizontal
    np.testing.assert_allclose(c2w[3], [0, 0, 0, 1])
    straight_down = cameras.look_at([0, 5, 0], [0, 0, 0])  # up parallel to the view: still valid
    np.testing.assert_allclose(-straight_down[:3, 2], [0, -1, 0], atol=1e-12)


def test_orbit_and_spherical_poses_look_at_the_target():
    target = np.array([0.1, 0.2, -0.3])
    poses = cameras.orbit_poses(8, radius=3.0, height=1.0, target=target)
    assert poses.shape == (8, 4, 4)
    np.testing.assert_allclose(np.linalg.norm(poses[:, :3, 3] - target, axis=-1), math.sqrt(10.0))
    np.testing.assert_allclose(poses[:, 1, 3], target[1] + 1.0)
    for pose in np.concatenate([poses, cameras.spherical_poses([0.3, 2.0], [0.5, -0.2], 4.0, target)]):
        pixels, depth = cameras.project_points(target, pose, 50.0, 50.0, 16.0, 12.0)
        np.testing.assert_allclose(pixels, [16.0, 12.0], atol=1e-9)
        assert depth > 0
    # azimuth 0 on +z, pi/2 on +x
    np.testing.assert_allclose(cameras.spherical_poses([0.0, math.pi / 2], [0.0, 0.0], 2.0)[:, :3, 3],
                               [[0, 0, 2], [2, 0, 0]], atol=1e-12)


def test_generate_rays_convention_and_inverse_projection():
    c2w = cameras.look_at([0.5, 1.0, 3.0], [0.0, 0.2, 0.0])
    width, height, fx, fy, cx, cy = 7, 5, 6.0, 5.0, 3.1, 2.4
    origins, directions = cameras.generate_rays(c2w, width, height, fx, fy, cx, cy, dtype=np.float64)
    assert origins.shape == directions.shape == (height, width, 3)
    camera_dirs = directions @ c2w[:3, :3]  # back to camera space
    np.testing.assert_allclose(camera_dirs[..., 2], -1.0)  # not normalised: z = -1
    np.testing.assert_allclose(camera_dirs[0, :, 0], (np.arange(width) + 0.5 - cx) / fx)  # +x to the right
    np.testing.assert_allclose(camera_dirs[:, 0, 1], -(np.arange(height) + 0.5 - cy) / fy)  # row 0 on top
    points = origins + 2.5 * directions
    pixels, depth = cameras.project_points(points, c2w, fx, fy, cx, cy)
    j, i = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    np.testing.assert_allclose(pixels, np.stack([i + 0.5, j + 0.5], -1), atol=1e-9)
    np.testing.assert_allclose(depth, 2.5)


# --------------------------------------------------------------------------- meshes


@pytest.mark.parametrize("name, mesh, volume", [
    ("sphere", meshes.sphere(0.7, 64, 32), 4 / 3 * math.pi * 0.7**3),
    ("box", meshes.box((0.2, 0.3, 0.4)), 8 * 0.2 * 0.3 * 0.4),
    ("cylinder", meshes.cylinder(0.3, 0.5, 96), math.pi * 0.3**2 * 1.0),
    ("cone", meshes.cone(0.4, 0.25, 96), math.pi * 0.4**2 * 0.5 / 3),
    ("torus", meshes.torus(0.5, 0.1, 96, 48), 2 * math.pi**2 * 0.5 * 0.1**2),
])
def test_primitives_are_closed_outward_and_have_unit_normals(name, mesh, volume):
    np.testing.assert_allclose(np.linalg.norm(mesh.normals, axis=-1), 1.0, atol=1e-5)
    v = mesh.vertices.astype(np.float64)[mesh.faces]
    signed_volume = np.einsum("fk,fk->f", v[:, 0], np.cross(v[:, 1], v[:, 2])).sum() / 6.0
    assert signed_volume == pytest.approx(volume, rel=0.02), name  # positive: counter-clockwise from outside
    np.testing.assert_allclose(meshes.face_normals(mesh.vertices, mesh.faces).sum(0), 0.0, atol=1e-4)  # closed
    face_n = meshes.face_normals(mesh.vertices, mesh.faces)
    vertex_n = mesh.normals[mesh.faces].sum(axis=1)
    assert np.all(np.einsum("fk,fk->f", face_n, vertex_n) > 0)


def test_transformed_mesh_and_normalisation():
    rotation = cameras.rotation_y(90)
    np.testing.assert_allclose(rotation @ [1, 0, 0], [0, 0, -1], atol=1e-12)
    mesh = meshes.box((1.0, 2.0, 0.5)).transformed(rotation, (3.0, 4.0, 5.0))
    np.testing.assert_allclose(mesh.bounds, [[2.5, 2.0, 4.0], [3.5, 6.0, 6.0]], atol=1e-6)
    normalized = meshes.normalize_mesh(mesh, 0.9)
    assert np.abs(normalized.vertices[:, 1]).max() == pytest.approx(0.9, abs=1e-6)
    assert np.linalg.norm(normalized.vertices[:, [0, 2]], axis=-1).max() <= 0.9 + 1e-6


# --------------------------------------------------------------------------- rasterizer


def test_rasterizer_matches_the_camera_projection(egl):
    """A small sphere rendered off-centre, in a non-square image with an off-centre principal point,
    appears where project_points says, and the ray generate_rays casts through that pixel hits it."""
    point, radius = np.array([0.3, -0.2, 0.25]), 0.15
    width, height, fx, fy, cx, cy = 48, 36, 40.0, 44.0, 20.3, 19.1
    c2w = cameras.spherical_poses([0.7], [0.3], 4.0)[0]
    mesh = meshes.sphere(radius, 48, 24).transformed(translation=point).with_color((1.0, 0.5, 0.2))
    with egl.Rasterizer(width, height) as rasterizer:
        image = rasterizer.render_float(mesh, c2w, fx, fy, cx, cy)
    assert image.shape == (height, width, 4) and image.dtype == np.float32
    alpha = image[..., 3]
    rows, cols = np.mgrid[0:height, 0:width] + 0.5
    centroid = np.array([(alpha * cols).sum(), (alpha * rows).sum()]) / alpha.sum()
    pixels, depth = cameras.project_points(point, c2w, fx, fy, cx, cy)
    np.testing.assert_allclose(centroid, pixels, atol=0.25)
    i, j = int(pixels[0]), int(pixels[1])
    assert alpha[j, i] == 1.0
    origins, directions = cameras.generate_rays(c2w, width, height, fx, fy, cx, cy, dtype=np.float64)
    o, d = origins[j, i], directions[j, i] / np.linalg.norm(directions[j, i])
    assert np.linalg.norm(np.cross(point - o, d)) < radius  # the ray passes through the sphere
    assert alpha[0, 0] == alpha[-1, -1] == 0.0


def test_rasterizer_writes_straight_alpha(egl):
    """Flat unit lighting: every covered pixel, anti-aliased edges included, has the albedo as colour."""
    rgb = (0.8, 0.4, 0.2)
    mesh = meshes.sphere(0.8).with_color(rgb)
    c2w = cameras.look_at([0, 0, 4.0])
    lights = (((0, 1, 0), 0.0), ((1, 0, 0), 0.0))
    with egl.Rasterizer(32, 32, lights=lights, ambient=1.0) as rasterizer:
        image = rasterizer.render(mesh, c2w, 40.0, 40.0, 16.0, 16.0)
    alpha = image[..., 3]
    edge = (alpha > 0) & (alpha < 255)
    assert edge.sum() > 10
    np.testing.assert_allclose(image[alpha > 0][:, :3], np.tile(np.round(np.array(rgb) * 255), ((alpha > 0).sum(), 1)),
                               atol=1)
    assert np.all(image[alpha == 0] == 0)


def test_missing_egl_is_a_one_line_user_error(monkeypatch):
    import moderngl

    from fields.rendering import rasterize

    def broken(*args, **kwargs):
        raise RuntimeError("eglGetDisplay failed\nsecond line")

    monkeypatch.setattr(rasterize, "_CONTEXT", None)
    monkeypatch.setattr(moderngl, "create_standalone_context", broken)
    with pytest.raises(UserError, match="EGL") as error:
        rasterize.Rasterizer(8, 8)
    assert "\n" not in str(error.value) and "eglGetDisplay failed second line" in str(error.value)


# --------------------------------------------------------------------------- generator


def test_generator_is_deterministic(generated, tmp_path):
    again = _make(tmp_path / "again")
    first, second = _files(generated), _files(again)
    assert sorted(first) == sorted(second)
    assert "scene_0001/train/r_3.png" in first and "scene_0000/transforms_test.json" in first
    assert all(first[name] == second[name] for name in first)
    other = _make(tmp_path / "other_seed", "--seed", "6")
    assert _files(other)["scene_0000/scene.json"] != first["scene_0000/scene.json"]


def test_views_have_transparent_backgrounds(generated):
    for split, count in (("train", 4), ("val", 2), ("test", 3)):
        for k in range(count):
            image = _png(generated / "scene_0000" / split / f"r_{k}.png")
            assert image.shape == (32, 32, 4)
            assert all(image[r, c, 3] == 0 for r in (0, -1) for c in (0, -1))
            assert image[..., 3].max() == 255
            assert np.all(image[image[..., 3] == 0] == 0)


def test_transforms_follow_the_blender_format(generated):
    for split, count in (("train", 4), ("val", 2), ("test", 3)):
        with open(generated / "scene_0001" / f"transforms_{split}.json") as handle:
            data = json.load(handle)
        assert set(data) == {"camera_angle_x", "frames"}
        assert data["camera_angle_x"] == pytest.approx(0.6911112070083618)
        assert [f["file_path"] for f in data["frames"]] == [f"./{split}/r_{k}" for k in range(count)]
        for frame in data["frames"]:
            c2w = np.array(frame["transform_matrix"])
            assert c2w.shape == (4, 4)
            np.testing.assert_allclose(c2w[:3, :3].T @ c2w[:3, :3], np.eye(3), atol=1e-9)
            assert np.linalg.norm(c2w[:3, 3]) == pytest.approx(4.0)
            elevation = math.degrees(math.asin(c2w[1, 3] / 4.0))
            assert -20.0 - 1e-6 <= elevation <= 80.0 + 1e-6
            # the camera looks at the origin along -z
            np.testing.assert_allclose(-c2w[:3, 2], -c2w[:3, 3] / 4.0, atol=1e-9)


def test_scene_json_describes_the_objects(generated):
    with open(generated / "scene_0000" / "scene.json") as handle:
        info = json.load(handle)
    assert info["seed"] == 5 and info["index"] == 0 and info["rotation_deg"] == 0.0 and info["mesh"] is None
    assert info["render"]["resolution"] == 32 and info["render"]["views"] == {"train": 4, "val": 2, "test": 3}
    objects = info["objects"]
    assert 2 <= len(objects) <= 3
    assert len({o["colour"] for o in objects}) == len(objects)
    for obj in objects:
        assert obj["shape"] in procgen_3d.SHAPES
        assert obj["rgb"] == pytest.approx(list(procgen_3d.PALETTE[obj["colour"]]))
        rotation = np.array(obj["rotation"])
        np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-9)
        vertices = procgen_3d.SceneObject(**{**obj, "rgb": tuple(obj["rgb"])}).mesh().vertices
        assert np.abs(vertices).max() <= 1.0
        assert np.linalg.norm(vertices[:, [0, 2]], axis=-1).max() <= procgen_3d.SCENE_EXTENT + 1e-5
    words = [f"{o['colour']} {o['shape']}" for o in objects]
    assert all(word in info["caption"] for word in words) and info["caption"].startswith("a")
    assert procgen_3d.make_caption([procgen_3d.SceneObject(s, c, (0, 0, 0), (0, 0, 0), (1, 1, 1), ())
                                    for s, c in (("sphere", "red"), ("box", "orange"), ("cone", "blue"))]) == (
        "a red sphere, an orange box and a blue cone")


def test_rotated_copies_hold_the_same_objects_rotated(egl):
    plain = procgen_3d.random_scene(11, 3, (3, 3))
    turned = procgen_3d.random_scene(11, 3, (3, 3), rotation_deg=90.0)
    spin = cameras.rotation_y(90.0)
    assert turned.caption == plain.caption
    for a, b in zip(plain.objects, turned.objects, strict=True):
        assert (a.shape, a.colour, a.size) == (b.shape, b.colour, b.size)
        np.testing.assert_allclose(b.position, spin @ np.array(a.position), atol=1e-12)
        np.testing.assert_allclose(b.rotation, spin @ np.array(a.rotation), atol=1e-12)
    # Seen from a camera turned with it, the rotated scene has the same silhouette (lights stay put,
    # so only alpha is compared).
    c2w = cameras.spherical_poses([0.4], [0.5], 4.0)[0]
    turned_camera = np.eye(4)
    turned_camera[:3, :3] = spin
    focal = cameras.focal_from_fov(48, 0.69)
    with egl.Rasterizer(48, 48) as rasterizer:
        alpha_turned = rasterizer.render_float(turned.mesh(), turned_camera @ c2w, focal, focal, 24, 24)[..., 3]
        alpha_plain = rasterizer.render_float(plain.mesh(), c2w, focal, focal, 24, 24)[..., 3]
    assert alpha_plain.sum() > 20
    assert np.abs(alpha_turned - alpha_plain).mean() < 2e-3


def test_rotation_flag_keeps_cameras_and_rotates_positions(generated, tmp_path):
    turned = _make(tmp_path / "turned", "--rotation", "90", "--num-scenes", "1")
    with open(generated / "scene_0000" / "scene.json") as a, open(turned / "scene_0000" / "scene.json") as b:
        plain_info, turned_info = json.load(a), json.load(b)
    assert turned_info["rotation_deg"] == 90.0
    for a, b in zip(plain_info["objects"], turned_info["objects"], strict=True):
        np.testing.assert_allclose(b["position"], cameras.rotation_y(90) @ np.array(a["position"]), atol=1e-12)
    for split in ("train", "test"):
        name = f"scene_0000/transforms_{split}.json"
        assert _files(turned)[name] == _files(generated)[name]


def test_rerun_skips_complete_scenes_and_redoes_broken_ones(generated, tmp_path, egl):
    out = tmp_path / "resume"
    shutil.copytree(generated, out)
    before = _files(out)
    os.remove(out / "scene_0001" / "scene.json")  # as if incomplete
    (out / "scene_0001" / "train" / "r_0.png").write_bytes(b"junk")
    stamp = os.stat(out / "scene_0000" / "train" / "r_0.png").st_mtime_ns
    _make(out)
    assert _files(out) == before
    assert os.stat(out / "scene_0000" / "train" / "r_0.png").st_mtime_ns == stamp
    with pytest.raises(UserError, match="other settings"):
        _make(out, "--resolution", "16")


def test_interrupted_scene_never_looks_complete(tmp_path, egl):
    scene = procgen_3d.random_scene(0, 0)
    config = procgen_3d.ViewConfig(views={"train": 3, "val": 0, "test": 0}, resolution=16)
    target = tmp_path / "scene_0000"
    calls = []

    def interrupt():
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with egl.Rasterizer(16, 16) as rasterizer, pytest.raises(KeyboardInterrupt):
        procgen_3d.write_scene(str(target), scene, config, rasterizer, on_view=interrupt)
    assert not target.exists() and not procgen_3d.scene_is_complete(str(target))
    summary = procgen_3d.generate_scenes(str(tmp_path), 1, config, seed=0, progress=False)
    assert summary["written"] == [str(target)] and procgen_3d.scene_is_complete(str(target))
    assert sorted(os.listdir(tmp_path)) == ["scene_0000"]  # the partial folder is gone


@pytest.mark.parametrize("argv, message", [
    (["--num-objects", "0,2"], "--num-objects"),
    (["--num-objects", "a"], "--num-objects"),
    (["--resolution", "0"], "--resolution"),
    (["--mesh", "/nonexistent/bunny.obj"], "mesh file not found"),
    (["--mesh", __file__], "unsupported mesh format"),
    (["--mesh-colour", "mauve", "--mesh", __file__], "unknown colour 'mauve'"),
    (["--train-views", "x"], "invalid int value"),
])
def test_cli_errors_are_one_line(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        run_main(make_scenes.main, ["--out", str(tmp_path / "o"), "--quiet", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize("extension", [".obj", ".off", ".ply", ".glb"])
def test_mesh_files_are_loaded_normalised_and_rendered(extension, tmp_path, egl):
    trimesh = pytest.importorskip("trimesh")
    source = meshes.box((2.0, 1.0, 3.0)).transformed(translation=(5.0, 1.0, -2.0))
    path = tmp_path / f"brick{extension}"
    if extension == ".obj":
        meshes.save_obj(str(path), source)
    else:
        trimesh.Trimesh(source.vertices, source.faces, process=False).export(str(path))
    loaded = meshes.load_mesh(str(path))
    np.testing.assert_allclose(loaded.bounds, source.bounds, atol=1e-5)
    out = tmp_path / "out"
    assert make_scenes.main(["--out", str(out), "--mesh", str(path), "--mesh-colour", "orange", "--resolution",
                             "24", "--train-views", "3", "--val-views", "1", "--test-views", "1", "--quiet"]) == 0
    with open(out / "scene_0000" / "scene.json") as handle:
        info = json.load(handle)
    assert info["caption"] == "an orange brick" and info["mesh"] == str(path)
    assert info["objects"][0]["shape"] == "mesh"
    for k in range(3):
        image = _png(out / "scene_0000" / "train" / f"r_{k}.png")
        assert image[12, 12, 3] == 255 and image[0, 0, 3] == 0 and image[-1, -1, 3] == 0


# --------------------------------------------------------------------------- loader


def test_loader_round_trip_on_generated_scenes(generated):
    root = generated / "scene_0000"
    data = load_scene(str(root), "train")
    assert data.images.shape == (4, 32, 32, 4) and data.images.dtype == np.float32
    assert (data.width, data.height, data.split, len(data)) == (32, 32, "train", 4)
    with open(root / "transforms_train.json") as handle:
        written = json.load(handle)
    np.testing.assert_array_equal(data.camera_to_world,
                                  np.array([f["transform_matrix"] for f in written["frames"]], dtype=np.float32))
    focal = 0.5 * 32 / math.tan(0.5 * written["camera_angle_x"])
    np.testing.assert_allclose(data.intrinsics, np.tile([focal, focal, 16.0, 16.0], (4, 1)), rtol=1e-6)
    assert [os.path.relpath(p, root) for p in data.file_paths] == [f"train/r_{k}.png" for k in range(4)]
    np.testing.assert_array_equal(data.images[2], _png(root / "train" / "r_2.png").astype(np.float32) / 255.0)
    assert len(load_scene(str(root), "val")) == 2 and len(load_scene(str(root), "test")) == 3
    white = load_scene(str(root), "val", white_background=True)
    assert white.images.shape[-1] == 3 and np.all(white.images[:, 0, 0] == 1.0)


def test_camera_centre_rays_pass_through_the_origin(generated):
    for split in ("train", "val", "test"):
        data = load_scene(str(generated / "scene_0001"), split)
        for c2w, (fx, fy, cx, cy) in zip(data.camera_to_world, data.intrinsics, strict=True):
            origins, directions = cameras.generate_rays(c2w, data.width, data.height, fx, fy, cx, cy, np.float64)
            h, w = data.height // 2, data.width // 2
            centre = directions[h - 1:h + 1, w - 1:w + 1].mean(axis=(0, 1))  # 4 rays around the principal point
            centre /= np.linalg.norm(centre)
            assert np.linalg.norm(np.cross(-origins[0, 0], centre)) < 1e-5  # distance of the origin to the ray


def test_downscale_is_an_area_resize_with_scaled_intrinsics(generated):
    root = str(generated / "scene_0000")
    full, half = load_scene(root, "test"), load_scene(root, "test", downscale=2)
    assert half.images.shape == (3, 16, 16, 4) and (half.width, half.height) == (16, 16)
    np.testing.assert_allclose(half.intrinsics, full.intrinsics / 2, rtol=1e-6)
    blocks = full.images.reshape(3, 16, 2, 16, 2, 4)
    alpha = blocks[..., 3].mean(axis=(2, 4))
    premultiplied = (blocks[..., :3] * blocks[..., 3:]).mean(axis=(2, 4))
    np.testing.assert_allclose(half.images[..., 3], alpha, atol=1e-5)
    covered = alpha > 0.1
    straight = premultiplied[covered] / alpha[covered][:, None]
    np.testing.assert_allclose(half.images[..., :3][covered], straight, atol=1e-4)


def _nerfstudio_folder(generated, target):
    """A nerfstudio-style transforms.json over the generated training views (images with extension)."""
    source = generated / "scene_0000"
    os.makedirs(target / "images")
    with open(source / "transforms_train.json") as handle:
        blender = json.load(handle)
    frames = []
    for k, frame in enumerate(blender["frames"]):
        shutil.copy(source / "train" / f"r_{k}.png", target / "images" / f"frame_{k:05d}.png")
        frames.append({"file_path": f"images/frame_{k:05d}.png", "transform_matrix": frame["transform_matrix"]})
    frames[1]["fl_x"], frames[1]["cx"] = 50.0, 15.0  # per-frame values override the top level
    data = {"camera_model": "OPENCV", "fl_x": 44.0, "fl_y": 45.0, "cx": 16.5, "cy": 15.5, "w": 32, "h": 32,
            "k1": 0.0, "frames": frames}
    with open(target / "transforms.json", "w") as handle:
        json.dump(data, handle)
    return target, blender


def test_nerfstudio_format_and_split_indices(generated, tmp_path):
    folder, blender = _nerfstudio_folder(generated, tmp_path / "ns")
    everything = load_scene(str(folder))
    assert len(everything) == 4
    np.testing.assert_allclose(everything.intrinsics[0], [44.0, 45.0, 16.5, 15.5])
    np.testing.assert_allclose(everything.intrinsics[1], [50.0, 45.0, 15.0, 15.5])
    indices_file = tmp_path / "split.json"
    indices_file.write_text(json.dumps({"train": [0, 2, 3], "test": [1]}))
    for indices in (str(indices_file), {"train": [0, 2, 3], "test": [1]}):
        train = load_scene(str(folder), "train", split_indices=indices)
        test = load_scene(str(folder), "test", split_indices=indices)
        assert (len(train), len(test)) == (3, 1)
        np.testing.assert_array_equal(test.camera_to_world[0], np.float32(blender["frames"][1]["transform_matrix"]))
        np.testing.assert_array_equal(train.images[1], everything.images[2])
        np.testing.assert_allclose(test.intrinsics[0], [50.0, 45.0, 15.0, 15.5])
    # split indices on a Blender folder pick from that split's frames
    picked = load_scene(str(generated / "scene_0000"), "train", split_indices={"train": [3, 1]})
    full = load_scene(str(generated / "scene_0000"), "train")
    np.testing.assert_array_equal(picked.camera_to_world, full.camera_to_world[[3, 1]])
    assert load_split_indices({"val": []}) == {"val": []}


def _tiny_blender(folder, num_frames=4, size=8):
    os.makedirs(folder / "train", exist_ok=True)
    frames = []
    for k in range(num_frames):
        Image.new("RGBA", (size, size), (10 * k, 20, 30, 255)).save(folder / "train" / f"r_{k}.png")
        pose = cameras.look_at([0.0, 0.0, 4.0 + k]).tolist()
        frames.append({"file_path": f"./train/r_{k}", "transform_matrix": pose})
    return {"camera_angle_x": 0.7, "frames": frames}


def _bad_matrix(data):
    data["frames"][3]["transform_matrix"] = data["frames"][3]["transform_matrix"][:3]


def _bad_value(data):
    data["frames"][2]["transform_matrix"][1][2] = "x"


def _bad_size(folder):
    Image.new("RGB", (9, 8)).save(folder / "train" / "r_2.png")


MALFORMED = {
    "missing file": (None, None, "transforms_val.json", "val"),
    "invalid json": ("{not json", None, "invalid JSON", "train"),
    "missing camera_angle_x": (lambda d: d.pop("camera_angle_x"), None, "'camera_angle_x'", "train"),
    "missing frames": (lambda d: d.pop("frames"), None, "'frames'", "train"),
    "missing transform_matrix": (lambda d: d["frames"][2].pop("transform_matrix"), None,
                                 "frame 2: missing 'transform_matrix'", "train"),
    "transform_matrix rows": (_bad_matrix, None, "frame 3: 'transform_matrix' must be 4x4, got 3 rows", "train"),
    "transform_matrix value": (_bad_value, None, "frame 2: 'transform_matrix' must hold finite numbers", "train"),
    "missing image": (None, lambda f: os.remove(f / "train" / "r_1.png"), "frame 1: image './train/r_1' not found",
                      "train"),
    "inconsistent size": (None, _bad_size, "frame 2: image './train/r_2' is 9x8", "train"),
    "bad camera_angle_x": (lambda d: d.update(camera_angle_x="wide"), None, "'camera_angle_x' must be a finite number",
                           "train"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_blender_files_give_one_line_errors(case, tmp_path):
    edit, damage, message, split = MALFORMED[case]
    folder = tmp_path / "scene"
    data = _tiny_blender(folder)
    path = folder / "transforms_train.json"
    if isinstance(edit, str):
        path.write_text(edit)
    else:
        if edit is not None:
            edit(data)
        path.write_text(json.dumps(data))
    if damage is not None:
        damage(folder)
    with pytest.raises(UserError) as error:
        load_scene(str(folder), split)
    text = str(error.value)
    assert "\n" not in text
    assert message in text, text
    assert f"transforms_{split}.json" in text


@pytest.mark.parametrize("change, message", [
    (lambda d: [d.pop(k) for k in ("fl_x", "fl_y")], "missing 'camera_angle_x' (or 'fl_x')"),
    (lambda d: d.update(w=64), "frame 0: 'w' is 64 but the image is 8x8"),
    (lambda d: d["frames"][1].update(fl_x=-3), "frame 1: 'fl_x' must be positive"),
    (lambda d: d["frames"][1].pop("file_path"), "frame 1: missing 'file_path'"),
])
def test_malformed_nerfstudio_files_give_one_line_errors(change, message, tmp_path):
    folder = tmp_path / "ns"
    data = _tiny_blender(folder)
    data.pop("camera_angle_x")
    data.update(fl_x=10.0, fl_y=10.0, w=8, h=8)
    for frame in data["frames"]:
        frame["file_path"] = frame["file_path"] + ".png"
    change(data)
    (folder / "transforms.json").write_text(json.dumps(data))
    with pytest.raises(UserError) as error:
        load_scene(str(folder))
    assert "\n" not in str(error.value) and "transforms.json" in str(error.value)
    assert message in str(error.value), str(error.value)


def test_bad_split_indices_and_paths(tmp_path):
    folder = tmp_path / "scene"
    (folder).mkdir()
    (folder / "transforms_train.json").write_text(json.dumps(_tiny_blender(folder)))
    with pytest.raises(UserError, match="index 7 is out of range"):
        load_scene(str(folder), split_indices={"train": [0, 7]})
    with pytest.raises(UserError, match="no 'train' list"):
        load_scene(str(folder), "train", split_indices={"test": [0]})
    bad = tmp_path / "split.json"
    bad.write_text(json.dumps({"train": [0, -1]}))
    with pytest.raises(UserError, match="non-negative integers"):
        load_scene(str(folder), split_indices=str(bad))
    with pytest.raises(UserError, match="no such scene folder"):
        load_scene(str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="downscale"):
        load_scene(str(folder), downscale=0)
