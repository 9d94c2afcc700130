"""Fit an Instant-NGP NeRF to a multi-view scene, evaluate it, render camera paths, export a mesh.

    python -m scripts.make_scenes --out data/scenes --num-scenes 1
    python -m fields.ngp_nerf --data data/scenes/scene_0000 --workdir runs/nerf --render-path orbit --mesh

Writes to the work directory: ``field.safetensors`` (weights, field config and occupancy grid),
``metrics.json`` / ``metrics.csv`` (test-view PSNR and SSIM per view and mean, rays/s, frames/s),
``renders/test_XXX.png`` and ``renders/depth_XXX.png``, ``orbit/frame_XXXX.png`` + ``orbit.mp4``
(with ``--render-path orbit``), ``mesh.ply`` (with ``--mesh``), ``config.json`` and training
checkpoints in ``checkpoints/``. Rerunning the same command resumes from the newest checkpoint.
"""

from __future__ import annotations

import csv
import json
import os

import numpy as np
from tqdm.auto import tqdm

from fields import metrics
from fields.cli import ArgumentParser, UserError, run_main
from fields.config import (
    ConfigError,
    check_run_config,
    config_from_dict,
    config_to_dict,
    config_to_json,
    read_config_record,
    resolve_preset,
)
from fields.files import write_json
from fields.nerf_fitting import FIELD_KIND, PRESETS, NeRFFitConfig, Trainer
from fields.weights import load_field, save_field


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m fields.ngp_nerf", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="scene folder with transforms_{train,test}.json (Blender) or transforms.json")
    parser.add_argument("--workdir", default="runs/ngp_nerf", help="output directory (default: runs/ngp_nerf)")
    parser.add_argument("--preset", default="default", help=f"one of: {', '.join(PRESETS)} (default: default)")
    parser.add_argument("--steps", type=int, help="training steps (default: the preset's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", choices=("auto", "kernel", "jax"), default="auto",
                        help="hash-grid backend (auto: compiled kernels when installed)")
    parser.add_argument("--scene-bound", type=float, help="half-size of the scene box [-b, b]^3 (default 1.5)")
    parser.add_argument("--downscale", type=int, default=1, help="integer image downscale factor")
    parser.add_argument("--split-indices", help="JSON file {\"train\": [...], \"test\": [...]} choosing frames")
    parser.add_argument("--max-test-views", type=int, help="evaluate at most this many test views")
    parser.add_argument("--render-path", choices=("none", "orbit"), default="none",
                        help="orbit: render a circle of frames (and a closer second circle) to PNGs and an MP4")
    parser.add_argument("--orbit-frames", type=int, default=60)
    parser.add_argument("--orbit-radius", type=float, default=4.0)
    parser.add_argument("--orbit-height", type=float, default=1.5)
    parser.add_argument("--orbit-target", type=float, nargs=3, default=(0.0, 0.0, 0.0), metavar=("X", "Y", "Z"))
    parser.add_argument("--mesh", action="store_true", help="export the density field as mesh.ply (marching cubes)")
    parser.add_argument("--mesh-resolution", type=int, default=128)
    parser.add_argument("--mesh-threshold", type=float, default=10.0)
    parser.add_argument("--checkpoint-every", type=int, default=256, help="steps between checkpoints (default 256)")
    parser.add_argument("--overwrite", action="store_true", help="start over, discarding checkpoints")
    parser.add_argument("--quiet", action="store_true")
    return parser


def resolve_config(args) -> NeRFFitConfig:
    return resolve_preset(PRESETS, args.preset, {"seed": args.seed, "backend": args.backend, "steps": args.steps,
                                                 "scene_bound": args.scene_bound})


def prepare_workdir(workdir: str, run_config: dict, overwrite: bool) -> None:
    """Creates the work directory; refuses one that holds a run with another configuration."""
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot write to workdir {workdir}: {error.strerror or error}") from None
    path = os.path.join(workdir, "config.json")
    if not overwrite:
        check_run_config(workdir, read_config_record(path), run_config,
                         holds="a run with a different configuration", option="--workdir or --overwrite")
    if overwrite:
        import shutil

        shutil.rmtree(os.path.join(workdir, "checkpoints"), ignore_errors=True)
    write_json(path, run_config)


def train(trainer: Trainer, workdir: str, quiet: bool, checkpoint_every: int = 256) -> None:
    """Trains to ``config.steps``, resuming from and writing checkpoints in ``workdir/checkpoints``."""
    from fields.checkpoint import Checkpointer

    checkpoints = Checkpointer(os.path.join(workdir, "checkpoints"))
    latest = checkpoints.latest_step()
    if latest is not None:
        trainer.state = checkpoints.restore(trainer.state, latest)
        trainer.step = latest
        print(f"resuming from the checkpoint at step {latest}")
    config = trainer.config
    if trainer.step >= config.steps:
        checkpoints.close()
        return
    compile_seconds = trainer.compile()
    print(f"compiled the training step in {compile_seconds:.1f} s")
    bar = tqdm(total=config.steps, initial=trainer.step, desc="fit", unit="step", disable=quiet,
               dynamic_ncols=True)
    try:
        while trainer.step < config.steps:
            stats = trainer.run(min(config.log_every, config.steps - trainer.step))
            bar.update(config.log_every if trainer.step < config.steps else config.steps - bar.n)
            bar.set_postfix(loss=f"{stats['loss']:.2e}", psnr=f"{metrics.mse_to_psnr(stats['loss']):.2f}",
                            rays=f"{stats['complete_fraction']:.0%}")
            if trainer.step % checkpoint_every < config.log_every or trainer.step >= config.steps:
                checkpoints.save(trainer.step, trainer.state)
    except FloatingPointError as error:
        kept = checkpoints.latest_step()
        where = f"the checkpoint at step {kept} is kept" if kept is not None else "no checkpoint was written yet"
        raise UserError(f"{error}; {where} in {workdir}/checkpoints (check the data, or change --seed, "
                        "then rerun)") from None
    finally:
        bar.close()
        checkpoints.close()


def save_nerf(path: str, trainer: Trainer) -> None:
    tensors = dict(trainer.state["params"])
    tensors["occupancy_grid"] = {name: np.asarray(value) for name, value in trainer.state["grid"].items()}
    config = trainer.config
    save_field(path, tensors, FIELD_KIND, config_to_dict(config.field), scene_bound=config.scene_bound,
               occupancy=config_to_dict(config.occupancy), steps_per_diagonal=config.steps_per_diagonal,
               steps=trainer.step)


def load_nerf(path: str) -> tuple[dict, dict, NeRFFitConfig]:
    """Reads ``field.safetensors``: ``(params, occupancy_grid, config)`` (training fields at defaults)."""
    from fields.models.nerf import NeRFFieldConfig
    from fields.rendering.occupancy_grid import OccupancyGridConfig

    tensors, field_dict, extra = load_field(path, kind=FIELD_KIND)
    try:
        field = config_from_dict(NeRFFieldConfig, field_dict, f"{path}: field_config")
        occupancy = config_from_dict(OccupancyGridConfig, extra["occupancy"], f"{path}: occupancy")
        config = NeRFFitConfig(field=field, occupancy=occupancy, scene_bound=float(extra["scene_bound"]),
                               steps_per_diagonal=int(extra["steps_per_diagonal"]))
    except (ConfigError, KeyError, TypeError, ValueError) as error:
        raise UserError(f"{path}: malformed NeRF metadata ({error})") from None
    grid = tensors.pop("occupancy_grid", None)
    if grid is None:
        raise UserError(f"{path}: no occupancy grid stored")
    return tensors, grid, config


def write_metrics(workdir: str, results: dict, trainer: Trainer) -> None:
    summary = {key: value for key, value in results.items() if key != "views"}
    summary.update(steps=trainer.step, train_seconds=trainer.train_seconds, views=results["views"])
    with open(os.path.join(workdir, "metrics.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    with open(os.path.join(workdir, "metrics.csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["view", "psnr", "ssim"])
        for view in results["views"]:
            writer.writerow([view["index"], f"{view['psnr']:.4f}", f"{view['ssim']:.5f}"])
        writer.writerow(["mean", f"{results['psnr']:.4f}", f"{results['ssim']:.5f}"])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.data:
        raise UserError("give --data SCENE_DIR (see python -m scripts.make_scenes)")
    for name in ("downscale", "checkpoint_every", "orbit_frames", "mesh_resolution"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    config = resolve_config(args)

    from fields.data.nerf_scenes import load_scene
    from fields.nerf_fitting import evaluate_views, export_mesh, make_view_renderer, orbit_frames, write_video

    train_scene = load_scene(args.data, "train", args.downscale, args.split_indices)
    run_config = json.loads(json.dumps({"data": os.path.abspath(args.data), "downscale": args.downscale,
                                        "split_indices": args.split_indices, "fit": config_to_dict(config)}))
    prepare_workdir(args.workdir, run_config, args.overwrite)
    print(f"fitting {args.data}: {len(train_scene)} training views of {train_scene.width}x{train_scene.height}, "
          f"preset {args.preset}")
    if not args.quiet:
        print(config_to_json(config))

    trainer = Trainer(config, train_scene)
    train(trainer, args.workdir, args.quiet, args.checkpoint_every)
    save_nerf(os.path.join(args.workdir, "field.safetensors"), trainer)
    render = make_view_renderer(trainer.model, config)
    params, bitfield = trainer.state["params"], trainer.state["grid"]["bitfield"]

    try:
        test_scene = load_scene(args.data, "test", args.downscale, args.split_indices)
    except UserError as error:
        test_scene = None
        print(f"no test views evaluated: {error}")
    if test_scene is not None:
        results = evaluate_views(render, params, bitfield, test_scene, os.path.join(args.workdir, "renders"),
                                 args.max_test_views)
        write_metrics(args.workdir, results, trainer)
        print(f"test PSNR {results['psnr']:.2f} dB, SSIM {results['ssim']:.4f} over {len(results['views'])} views; "
              f"{results['rays_per_second']:.0f} rays/s, {results['frames_per_second']:.2f} frames/s")

    if args.render_path == "orbit":
        from fields.data.images import save_image

        intrinsics = train_scene.intrinsics[0]
        frames, depths = orbit_frames(render, params, bitfield, intrinsics, train_scene.width, train_scene.height,
                                      args.orbit_frames, args.orbit_radius, args.orbit_height, args.orbit_target,
                                      closer_radius=0.6 * args.orbit_radius)
        orbit_dir = os.path.join(args.workdir, "orbit")
        os.makedirs(orbit_dir, exist_ok=True)
        for index, (frame, depth) in enumerate(zip(frames, depths, strict=True)):
            save_image(os.path.join(orbit_dir, f"frame_{index:04d}.png"), frame)
            save_image(os.path.join(orbit_dir, f"depth_{index:04d}.png"), depth)
        write_video(os.path.join(args.workdir, "orbit.mp4"), frames)
        print(f"wrote {len(frames)} orbit frames to {orbit_dir} and {args.workdir}/orbit.mp4")

    if args.mesh:
        try:
            vertices, faces = export_mesh(os.path.join(args.workdir, "mesh.ply"), trainer.model, params, config,
                                          args.mesh_resolution, args.mesh_threshold)
        except ValueError as error:
            raise UserError(f"mesh export: {error}") from None
        print(f"wrote {args.workdir}/mesh.ply ({vertices} vertices, {faces} faces)")
    return 0


if __name__ == "__main__":
    run_main(main)
