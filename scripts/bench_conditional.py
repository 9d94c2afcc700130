"""Benchmark of the conditional hypernetwork (issue #7): zero-shot PSNR on held-out colour-shape pairs and the
finetuning speed-up over fitting from scratch, for image fields and for NeRF fields.

    python -m scripts.bench_conditional                      # everything under runs/bench-conditional
    python -m scripts.bench_conditional --parts image        # one part

Image part: ``hypernets.conditional --make-teachers`` fits procedural 2D primitives (one shared initial
weight vector), trains the hypernetwork with the ``bench-image`` preset and runs its zero-shot test.
NeRF part: ``scripts.make_scenes`` renders single-object procedural scenes, ``fields.encode_dataset
--source scenes:DIR --preset tiny`` fits their NeRFs (shared init), and ``hypernets.conditional`` trains
the ``bench-nerf`` preset on them. Held out: colour-shape pairs with ``(3 * shape + colour) % m == 0``.

Every stage resumes or is skipped when its outputs exist (a finished part's ``zero_shot.json`` is reused),
so a rerun of the same command prints the same JSON at once. The JSON (one object: per part the mean
zero-shot PSNR of the generated fields against the true images / test views, the teachers' PSNR, the
condition-free baselines, the mean finetuning steps to the teacher's PSNR from the generated weights and
from scratch, and their ratio) is printed and written to ``W/bench_conditional.json``.
"""

from __future__ import annotations

import json
import os
import platform
import time

from fields.cli import ArgumentParser, run_main
from fields.config import read_config_record
from fields.files import write_json

PARTS = ("image", "nerf")
# Image part: teachers and the hypernetwork preset.
IMAGE_TEACHERS = 2048
IMAGE_SIZE = 16
IMAGE_PRESET = "bench-image"
# NeRF part: scenes, their fields and the hypernetwork preset.
NERF_SCENES = 48
NERF_RESOLUTION = 32
NERF_TRAIN_VIEWS = 12
NERF_TEST_VIEWS = 2
NERF_FIELD_PRESET = "tiny"
NERF_FIELD_STEPS = 300
NERF_PRESET = "bench-nerf"
SUMMARY_KEYS = ("num_training", "num_held_out", "num_evaluated", "reference", "mean_generated_psnr",
                "mean_teacher_psnr", "mean_generated_vs_teacher_psnr", "mean_train_generated_psnr",
                "baseline_mean_image_psnr", "baseline_nearest_training_psnr", "mean_finetune_steps_from_generated",
                "mean_finetune_steps_from_fresh", "num_reached_from_generated", "num_reached_from_fresh",
                "finetune_steps_ratio", "finetune_speedup", "check_every", "rule")


def _finished_report(workdir: str) -> dict | None:
    """``W/zero_shot.json`` of a finished run (its step is the run's configured step count), else None."""
    report = read_config_record(os.path.join(workdir, "zero_shot.json"))
    config = read_config_record(os.path.join(workdir, "config.json"))
    if report is None or config is None:
        return None
    steps = config["conditional"]["loop"]["steps"]
    return report if report.get("step") == steps and report.get("num_evaluated") else None


def _command(module: str, argv: list[str]) -> str:
    return f"python -m {module} " + " ".join(argv)


def _conditional(argv: list[str]) -> tuple[dict, float]:
    """Runs ``hypernets.conditional argv`` (unless the zero-shot report of its ``--workdir``, the last two
    arguments, is finished); ``(report, seconds)``."""
    from hypernets import conditional

    start = time.perf_counter()
    workdir = argv[-1]
    report = _finished_report(workdir)
    if report is None:
        print(_command("hypernets.conditional", argv), flush=True)
        conditional.main(argv + ["--quiet"])
        report = _finished_report(workdir)
    return report, time.perf_counter() - start


def _summary(report: dict, command: str, seconds: float) -> dict:
    summary = {key: report.get(key) for key in SUMMARY_KEYS}
    summary["target_speedup_met"] = bool(report.get("finetune_speedup") and report["finetune_speedup"] >= 5.0)
    summary["items"] = [{key: item.get(key) for key in ("caption", "generated_psnr", "teacher_psnr",
                                                        "finetune_steps_from_generated", "finetune_steps_from_fresh")}
                        for item in report.get("items", [])]
    summary["command"] = command
    summary["seconds"] = round(seconds, 1)
    return summary


def image_part(root: str) -> dict:
    argv = ["--make-teachers", str(IMAGE_TEACHERS), "--size", str(IMAGE_SIZE), "--preset", IMAGE_PRESET,
            "--workdir", os.path.join(root, "image")]
    report, seconds = _conditional(argv)
    return _summary(report, _command("hypernets.conditional", argv), seconds)


def nerf_part(root: str) -> dict:
    from fields import encode_dataset
    from scripts import make_scenes

    start = time.perf_counter()
    scenes = os.path.join(root, "scenes")
    fields_dir = os.path.join(root, "nerf-fields")
    scene_argv = ["--out", scenes, "--num-scenes", str(NERF_SCENES), "--num-objects", "1", "--resolution",
                  str(NERF_RESOLUTION), "--train-views", str(NERF_TRAIN_VIEWS), "--val-views", "0", "--test-views",
                  str(NERF_TEST_VIEWS), "--quiet"]
    encode_argv = ["--source", f"scenes:{scenes}", "--out", fields_dir, "--preset", NERF_FIELD_PRESET, "--steps",
                   str(NERF_FIELD_STEPS), "--fields-per-batch", "16", "--eval-views", str(NERF_TEST_VIEWS), "--quiet"]
    workdir = os.path.join(root, "nerf")
    argv = ["--data", fields_dir, "--preset", NERF_PRESET, "--workdir", workdir]
    commands = [_command("scripts.make_scenes", scene_argv), _command("fields.encode_dataset", encode_argv)]
    if _finished_report(workdir) is None:
        print(commands[0], flush=True)
        make_scenes.main(scene_argv)
        print(commands[1], flush=True)
        encode_dataset.main(encode_argv)
    report, _ = _conditional(argv)
    command = " && ".join(commands + [_command("hypernets.conditional", argv)])
    return _summary(report, command, time.perf_counter() - start)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m scripts.bench_conditional", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/bench-conditional", help="work directory (default: %(default)s)")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated parts: image,nerf (default: both)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from fields.cli import UserError

    args = build_parser().parse_args(argv)
    parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        raise UserError(f"--parts takes {', '.join(PARTS)}, got {args.parts!r}")
    os.makedirs(args.workdir, exist_ok=True)
    path = os.path.join(args.workdir, "bench_conditional.json")

    def read_results() -> dict:  # re-read before each write: the parts may run as separate processes
        return read_config_record(path) or {}

    for part in parts:
        summary = image_part(args.workdir) if part == "image" else nerf_part(args.workdir)
        results = read_results()
        results.update({"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores", part: summary})
        write_json(path, results)
    results = read_results()
    print(json.dumps({name: results[name] for name in ["machine", *parts]}, indent=2))
    return 0


if __name__ == "__main__":
    run_main(main)
