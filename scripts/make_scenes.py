"""Generate multi-view NeRF datasets (Blender NeRF-synthetic layout) of procedural 3D scenes or a mesh.

    python -m scripts.make_scenes --out data/scenes --num-scenes 10
    python -m scripts.make_scenes --out data/rotated --num-scenes 1 --seed 3 --rotation 90
    python -m scripts.make_scenes --out data/bunny --mesh bunny.obj --train-views 50

Each scene_NNNN folder holds train/ val/ test/ RGBA PNGs, transforms_{train,val,test}.json and
scene.json (objects, colour names, caption). Same arguments -> byte-identical files; complete scenes
are skipped when rerun (resumable). See fields/data/procgen_3d.py for the details.
"""

from __future__ import annotations

from fields.cli import ArgumentParser, UserError, run_main
from fields.data.procgen_3d import BLENDER_CAMERA_ANGLE_X, PALETTE, ViewConfig, generate_scenes


def _count_range(text: str) -> tuple[int, int]:
    parts = text.split(",")
    try:
        low, high = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (None, None)
    except ValueError:
        low = high = None
    if low is None or not 1 <= low <= high <= len(PALETTE):
        raise UserError(f"--num-objects wants MIN,MAX (or N) with 1 <= MIN <= MAX <= {len(PALETTE)}, got {text!r}")
    return low, high


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m scripts.make_scenes", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/scenes", help="output folder (default: data/scenes)")
    parser.add_argument("--num-scenes", type=int, default=1, help="number of scenes (default: 1)")
    parser.add_argument("--start-index", type=int, default=0, help="index of the first scene (default: 0)")
    parser.add_argument("--train-views", type=int, default=100, help="training views per scene (default: 100)")
    parser.add_argument("--val-views", type=int, default=10, help="validation views per scene (default: 10)")
    parser.add_argument("--test-views", type=int, default=50, help="test views per scene (default: 50)")
    parser.add_argument("--resolution", type=int, default=128, help="square image side in pixels (default: 128)")
    parser.add_argument("--seed", type=int, default=0, help="random seed: objects and cameras (default: 0)")
    parser.add_argument("--num-objects", default="1,3", help="objects per scene, MIN,MAX or N (default: 1,3)")
    parser.add_argument("--rotation", type=float, default=0.0,
                        help="rotate the whole scene about the vertical y axis by DEG degrees (default: 0)")
    parser.add_argument("--mesh", help="render this mesh (.obj/.ply/.off/.glb/.gltf/.stl) instead of primitives")
    parser.add_argument("--mesh-colour", default="white",
                        help=f"colour of a mesh without colours of its own: {', '.join(PALETTE)} (default: white)")
    parser.add_argument("--camera-angle-x", type=float, default=BLENDER_CAMERA_ANGLE_X,
                        help=f"full horizontal field of view, radians (default: {BLENDER_CAMERA_ANGLE_X:.4f})")
    parser.add_argument("--samples", type=int, default=4, help="MSAA samples per pixel (default: 4)")
    parser.add_argument("--overwrite", action="store_true", help="re-render scenes that already exist")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("num_scenes", "train_views", "val_views", "test_views", "start_index", "seed"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.resolution < 1:
        raise UserError(f"--resolution must be >= 1, got {args.resolution}")
    if not 0.0 < args.camera_angle_x < 3.1:
        raise UserError(f"--camera-angle-x must be in (0, 3.1) radians, got {args.camera_angle_x}")
    config = ViewConfig(
        views={"train": args.train_views, "val": args.val_views, "test": args.test_views},
        resolution=args.resolution, camera_angle_x=args.camera_angle_x, samples=args.samples,
    )
    summary = generate_scenes(
        args.out, args.num_scenes, config, seed=args.seed, num_objects=_count_range(args.num_objects),
        rotation_deg=args.rotation, mesh_path=args.mesh, mesh_colour=args.mesh_colour, overwrite=args.overwrite,
        progress=not args.quiet, start_index=args.start_index,
    )
    views = summary["views_rendered"]
    speed = f", {1e3 * summary['seconds_rendering'] / views:.1f} ms/view" if views else ""
    print(f"wrote {len(summary['written'])} scene(s), skipped {len(summary['skipped'])} complete one(s) "
          f"in {args.out}{speed}")
    return 0


if __name__ == "__main__":
    run_main(main)
