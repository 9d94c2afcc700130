"""Benchmark: generate Fashion-MNIST NGP image fields with weight-space diffusion and an
autoregressive token model, each trained for a fixed CPU budget, and evaluate the samples.

    python -m scripts.bench_hypernets                                  # 30 min per model
    python -m scripts.bench_hypernets --minutes 5 --train-num 1024 --test-num 256

Stages (each resumes: outputs under --work are reused when present):
1. encode the first ``--train-num`` train and ``--test-num`` test images (Debian's
   ``dataset-fashion-mnist``; the procedural primitives when it is absent) into NGP ``small`` fields;
2. tokenize the train fields (fp8 after per-section normalisation);
3. for each model (class-conditional diffusion, autoregressive): time a few steps, set the step
   count that fills ``--minutes`` of training, train, sample ``--num-samples`` fields;
4. ``hypernets.evaluate`` the samples against the test fields, with the train fields for novelty;
   ``--extra-guidance-scales 1,1.5`` samples and evaluates the trained diffusion at those scales too;
   ``--eta 1 --sample-steps 100`` sets the diffusion's sampler for all of them.
Prints one JSON report (also written to WORK/report.json) with each model's metrics and budget.

``--parts shapes`` (or ``images,shapes``) runs the second part, HyperDiffusion's protocol: occupancy
fields (``fields.occupancy_fitting`` preset ``small``) of the 1,000 random watertight meshes that
``pybullet_data`` ships (``pip install pybullet``), the first ``--shapes-train`` for training and the
last ``--shapes-test`` as the reference, an unconditional diffusion for ``--minutes``, and MMD, COV
and 1-NNA with the squared Chamfer distance on 2,048 surface points.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

FASHION = "/usr/share/datasets/fashion-mnist"


def run(module: str, *arguments: str) -> float:
    """Runs ``python -m module arguments``; returns wall seconds. Fails loudly on a non-zero exit."""
    command = [sys.executable, "-m", module, *arguments]
    print("$ " + " ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - start


def image_source(split: str) -> str:
    prefix = "train" if split == "train" else "t10k"
    images = f"{FASHION}/{prefix}-images-idx3-ubyte.gz"
    if os.path.exists(images):
        return f"idx:{images},{FASHION}/{prefix}-labels-idx1-ubyte.gz"
    return "procedural:primitives"


def encode(work: str, split: str, num: int, seed: int) -> str:
    out = os.path.join(work, f"fields_{split}")
    run("fields.encode_dataset", "--source", image_source(split), "--num", str(num), "--size", "28x28",
        "--preset", "small", "--out", out, "--seed", str(seed), "--init-seed", "0", "--quiet")
    return out


def parse_steps(text: str) -> dict[str, int]:
    try:
        return {name: int(value) for name, value in (part.split("=") for part in text.split(",") if part)}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=STEPS[,NAME=STEPS], got {text!r}") from None


def steps_for_budget(module: str, arguments: list[str], probe_dir: str, minutes: float, probe_steps: int) -> int:
    """Trains ``probe_steps`` steps and scales the steady rate (from ``history.jsonl``'s cumulative
    seconds, first logged row to last, so compilation is left out) to ``minutes``."""
    run(module, *arguments, "--workdir", probe_dir, "--steps", str(probe_steps), "--num-samples", "2")
    with open(os.path.join(probe_dir, "history.jsonl")) as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    rows = [row for row in rows if "seconds" in row and "loss" in row]
    if len(rows) < 2:
        raise SystemExit(f"{probe_dir}: the probe logged fewer than 2 rows; raise --probe-steps")
    rate = (rows[-1]["step"] - rows[0]["step"]) / max(rows[-1]["seconds"] - rows[0]["seconds"], 1e-9)
    print(f"# {module}: {rate:.2f} steps/s", flush=True)
    return max(probe_steps, int(rate * minutes * 60.0))


def train_and_evaluate(name: str, module: str, arguments: list[str], args, reference: str, train_fields: str,
                       reference_count: int, evaluate_arguments: tuple[str, ...] = (), label: str = "") -> dict:
    workdir = os.path.join(args.work, name)
    steps_file = os.path.join(args.work, f"{name}_steps.json")
    if args.steps.get(label or name) is not None:
        steps = args.steps[label or name]
    elif os.path.exists(steps_file):
        with open(steps_file) as handle:
            steps = json.load(handle)["steps"]
    else:
        steps = steps_for_budget(module, arguments, os.path.join(args.work, "probe", name), args.minutes,
                                 args.probe_steps)
        with open(steps_file, "w") as handle:
            json.dump({"steps": steps, "minutes": args.minutes}, handle)
    seconds = run(module, *arguments, "--workdir", workdir, "--steps", str(steps),
                  "--num-samples", str(args.num_samples or reference_count))
    evaluation = evaluate_samples(os.path.join(workdir, "samples"), reference, train_fields,
                                  os.path.join(args.work, f"{name}_eval"), evaluate_arguments)
    return {"steps": steps, "train_and_sample_seconds": seconds, "workdir": workdir, "eval": evaluation}


def evaluate_samples(samples: str, reference: str, train_fields: str, out: str,
                     evaluate_arguments: tuple[str, ...] = ()) -> dict:
    """``hypernets.evaluate`` of ``samples`` into ``out``; returns its ``eval.json``."""
    run("hypernets.evaluate", "--samples", samples, "--reference", reference, "--train", train_fields,
        "--out", out, *evaluate_arguments, "--quiet")
    with open(os.path.join(out, "eval.json")) as handle:
        return json.load(handle)


def images_part(args) -> dict:
    train_fields = encode(args.work, "train", args.train_num, seed=0)
    test_fields = encode(args.work, "test", args.test_num, seed=10_000_000)
    report = {"source_train": image_source("train"), "source_test": image_source("test"),
              "train_fields": args.train_num, "test_fields": args.test_num, "models": {}}
    if "diffusion" in args.models:
        report["models"]["diffusion"] = train_and_evaluate(
            "diffusion", "hypernets.diffusion",
            ["--data", train_fields, "--preset", args.diffusion_preset, "--class-conditional",
             "--guidance-scale", str(args.guidance_scale), *diffusion_sampling(args), "--quiet"],
            args, test_fields, train_fields, args.test_num, ("--classifier-preset", args.classifier_preset))
        report["models"]["diffusion"]["guidance_sweep"] = guidance_sweep(args, train_fields, test_fields)
    if "autoregressive" in args.models:
        tokens = os.path.join(args.work, "tokens_train")
        if not os.path.exists(os.path.join(tokens, "_report.json")) and not os.path.isdir(tokens):
            run("scripts.tokenize", "--fields", train_fields, "--tokenizer", "fp8_e4m3", "--normalize", "section",
                "--out", tokens, "--quiet")
        report["models"]["autoregressive"] = train_and_evaluate(
            "autoregressive", "hypernets.autoregressive",
            ["--data", tokens, "--preset", args.autoregressive_preset, "--class-conditional", "--quiet"],
            args, test_fields, train_fields, args.test_num, ("--classifier-preset", args.classifier_preset))
    return report


def guidance_sweep(args, train_fields: str, test_fields: str) -> dict:
    """Samples the trained diffusion again at each ``--extra-guidance-scales`` value (``--sample-only
    --samples-out WORK/diffusion/samples_gX``) and evaluates each set into ``WORK/diffusion_gX_eval``,
    reusing the first evaluation's classifier (its cache is keyed by the reference renders and config)."""
    workdir = os.path.join(args.work, "diffusion")
    results = {}
    for scale in args.extra_guidance_scales:
        name = f"g{scale:g}"
        samples = os.path.join(workdir, f"samples_{name}")
        if not os.path.isdir(samples):
            run("hypernets.diffusion", "--data", train_fields, "--workdir", workdir, "--sample-only",
                "--guidance-scale", str(scale), "--num-samples", str(args.num_samples or args.test_num),
                *diffusion_sampling(args), "--samples-out", samples, "--quiet")
        out = os.path.join(args.work, f"diffusion_{name}_eval")
        classifier = os.path.join(args.work, "diffusion_eval", "classifier")
        if os.path.isdir(classifier) and not os.path.exists(os.path.join(out, "classifier")):
            shutil.copytree(classifier, os.path.join(out, "classifier"))
        results[f"{scale:g}"] = evaluate_samples(samples, test_fields, train_fields, out,
                                                 ("--classifier-preset", args.classifier_preset))["metrics"]
    return results


def diffusion_sampling(args) -> list[str]:
    """``hypernets.diffusion`` sampling options given to the benchmark (``--eta``, ``--sample-steps``)."""
    options = []
    if args.eta is not None:
        options += ["--eta", str(args.eta)]
    if args.sample_steps is not None:
        options += ["--sample-steps", str(args.sample_steps)]
    return options


def parse_scales(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 1,1.5,5, got {text!r}") from None


def pybullet_meshes() -> list[str]:
    """The 1,000 ``random_urdfs/NNN/NNN.obj`` meshes of ``pybullet_data``, sorted; [] without pybullet."""
    try:
        import pybullet_data
    except ImportError:
        return []
    root = os.path.join(pybullet_data.getDataPath(), "random_urdfs")
    return sorted(os.path.join(root, name, f"{name}.obj") for name in os.listdir(root)
                  if os.path.exists(os.path.join(root, name, f"{name}.obj")))


def link_meshes(folder: str, paths: list[str]) -> str:
    """A flat folder of symbolic links to ``paths`` (one folder per split, so no class labels)."""
    os.makedirs(folder, exist_ok=True)
    for path in paths:
        link = os.path.join(folder, os.path.basename(path))
        if not os.path.lexists(link):
            os.symlink(path, link)
    return folder


def shapes_part(args) -> dict:
    meshes = pybullet_meshes()
    if not meshes:
        return {"skipped": "pybullet is not installed (pip install pybullet ships pybullet_data's meshes)"}
    if args.shapes_train + args.shapes_test > len(meshes):
        raise SystemExit(f"--shapes-train + --shapes-test exceed the {len(meshes)} meshes")
    work = os.path.join(args.work, "shapes")
    splits = {"train": meshes[:args.shapes_train], "test": meshes[len(meshes) - args.shapes_test:]}
    fields = {}
    for split, paths in splits.items():
        folder = link_meshes(os.path.join(work, f"meshes_{split}"), paths)
        fields[split] = os.path.join(work, f"fields_{split}")
        run("fields.encode_dataset", "--source", f"meshes:{folder}", "--preset", args.occupancy_preset,
            "--out", fields[split], "--seed", "0" if split == "train" else "10000000", "--init-seed", "0",
            "--skip-unreadable", "--quiet")  # a few of pybullet_data's meshes have NaN vertices
    result = {"meshes": "pybullet_data/random_urdfs", "train_shapes": len(splits["train"]),
              "test_shapes": len(splits["test"]), "occupancy_preset": args.occupancy_preset}
    shape_args = argparse.Namespace(**{**vars(args), "work": work})
    result["diffusion"] = train_and_evaluate(
        "diffusion", "hypernets.diffusion", ["--data", fields["train"], "--preset", args.shapes_diffusion_preset,
                                             "--quiet"],
        shape_args, fields["test"], fields["train"], args.shapes_test, ("--num-points", "2048"), label="shapes")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="runs/bench_hypernets", help="output folder (reused when rerun)")
    parser.add_argument("--parts", default="images", help="images, shapes, or images,shapes")
    parser.add_argument("--minutes", type=float, default=30.0, help="training budget per model")
    parser.add_argument("--train-num", type=int, default=2048)
    parser.add_argument("--test-num", type=int, default=512)
    parser.add_argument("--num-samples", type=int,
                        help="fields sampled per model (default: as many as the reference split, so that 1-NNA "
                             "compares sets of equal size)")
    parser.add_argument("--steps", type=parse_steps, default={},
                        help="NAME=STEPS[,NAME=STEPS] (names: diffusion, autoregressive, shapes): train those models "
                             "that many steps instead of timing a probe against --minutes (for a machine shared "
                             "with other jobs; report the quiet-machine minutes beside it)")
    parser.add_argument("--guidance-scale", type=float, default=1.0,
                        help="classifier-free guidance of the class-conditional diffusion's samples")
    parser.add_argument("--extra-guidance-scales", type=parse_scales, default=[],
                        help="comma-separated guidance scales to sample and evaluate the trained diffusion at as "
                             "well (the class-accuracy / 1-NNA trade-off), e.g. 1,1.5,5")
    parser.add_argument("--eta", type=float,
                        help="the diffusion's DDIM noise when sampling (default: the preset's, 0; 1 samples "
                             "stochastically)")
    parser.add_argument("--sample-steps", type=int, help="the diffusion's sampling steps (default: the preset's)")
    parser.add_argument("--probe-steps", type=int, default=60)
    parser.add_argument("--models", default="diffusion,autoregressive")
    parser.add_argument("--classifier-preset", default="default", help="hypernets.evaluate's feature classifier")
    parser.add_argument("--diffusion-preset", default="cpu")
    parser.add_argument("--autoregressive-preset", default="cpu")
    parser.add_argument("--shapes-train", type=int, default=800)
    parser.add_argument("--shapes-test", type=int, default=200)
    parser.add_argument("--occupancy-preset", default="small")
    parser.add_argument("--shapes-diffusion-preset", default="cpu-shapes")
    args = parser.parse_args()
    os.makedirs(args.work, exist_ok=True)
    report = {"minutes_per_model": args.minutes, "fixed_steps": args.steps,
              "guidance_scale": args.guidance_scale, "eta": args.eta, "sample_steps": args.sample_steps}
    if "images" in args.parts:
        report["images"] = images_part(args)
    if "shapes" in args.parts:
        report["shapes"] = shapes_part(args)
    with open(os.path.join(args.work, "report.json"), "w") as handle:
        json.dump(report, handle, indent=2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
