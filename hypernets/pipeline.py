"""The whole pipeline on one command: data -> fields -> tokens -> hypernets -> samples -> evaluation -> report.

    python -m hypernets.pipeline --preset demo                      # runs/demo; ~8 min on 2 idle cores
    python -m hypernets.pipeline --preset research --workdir runs/research --config overrides.json
    python -m hypernets.pipeline --workdir runs/demo --dry-run      # print every stage's command
    python -m hypernets.pipeline --workdir runs/demo --stage report # (re)run one stage on its own

Stages, each an ordinary entry point run as a subprocess (``python -m ...``; its output goes to
``W/logs/STAGE.log``) except the report, which runs here:

1. ``encode_train`` / ``encode_test``: ``fields.encode_dataset`` fits the train and test images
   (built-in procedural primitives by default) into fields that share one initialisation
   (``--init-seed``), so the two splits live in one weight space;
2. ``tokenize``: ``scripts.tokenize`` turns the train fields into tokens (and reports what that loses);
3. ``diffusion`` / ``autoregressive``: ``hypernets.diffusion`` (on the fields) and
   ``hypernets.autoregressive`` (on the tokens) train, then sample fields into ``W/MODEL/samples``;
4. ``evaluate_diffusion`` / ``evaluate_autoregressive``: ``hypernets.evaluate`` scores the samples
   against the test fields, with the train fields for novelty (``W/MODEL_eval/eval.json``, grids);
5. ``report``: ``W/report.md`` with the config, per-stage wall time, the metric table, the sample
   grids and training curves (``W/figures/*.png``).

A run is a config and a work directory. ``W/pipeline_config.json`` holds the resolved config (a
different one in the same directory is refused); ``W/pipeline_state.json`` records each stage's
status and wall time. Rerunning the same command skips the finished stages and reruns the
interrupted or failed one, which itself resumes from its outputs (encoded shards, training
checkpoints). A failed stage ends the run with one line naming the stage and its log.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import fcntl
import glob
import json
import math
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

from fields.cli import ArgumentParser, UserError, prepare_workdir, run_main
from fields.config import (
    ConfigError,
    check_run_config,
    config_from_dict,
    config_to_dict,
    config_to_json,
    read_config_record,
)
from fields.files import write_atomic, write_json
from hypernets.metrics import METRIC_ROWS
from hypernets.metrics import format_metric as _format
from hypernets.runs import SAMPLES_DIRECTORY, SAMPLES_SHARD

CONFIG_NAME = "pipeline_config.json"
STATE_NAME = "pipeline_state.json"
LOCK_NAME = ".pipeline.lock"
REPORT_NAME = "report.md"
LOG_DIRECTORY = "logs"
FIGURE_DIRECTORY = "figures"
MODELS = ("diffusion", "autoregressive")


# ------------------------------------------------------------------------------------------ config


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The datasets: images -> fields (train and test splits) -> tokens.

    Attributes:
        source: ``fields.encode_dataset --source`` of the train split (``procedural:primitives``, ``idx:...``).
        test_source: the test split's source; empty: ``source`` (procedural data: drawn with ``test_seed``).
        train_num, test_num: images encoded per split (a cap for finite sources).
        image_size: images are resized to ``image_size`` x ``image_size``.
        field_preset: ``ngp_image`` preset of the fields (``small`` suits 28x28).
        field_steps: fitting steps per field; 0: the preset's.
        fields_per_batch: fields fitted at once; 0: ``encode_dataset``'s default.
        seed, test_seed: ``--seed`` of each split (procedural images and per-field sampling).
        init_seed: the shared initial weights of both splits (``--init-seed``).
        tokenizer, normalize: ``scripts.tokenize --tokenizer/--normalize``.
    """

    source: str = "procedural:primitives"
    test_source: str = ""
    train_num: int = 1024
    test_num: int = 256
    image_size: int = 28
    field_preset: str = "small"
    field_steps: int = 0
    fields_per_batch: int = 0
    seed: int = 0
    test_seed: int = 10_000_000
    init_seed: int = 0
    tokenizer: str = "fp8_e4m3"
    normalize: str = "section"

    def __post_init__(self):
        for name in ("train_num", "test_num", "image_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("field_steps", "fields_per_batch"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0: the default), got {getattr(self, name)}")
        if not self.source:
            raise ValueError("source must not be empty")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """One hypernetwork stage (train, then sample).

    Attributes:
        enabled: run this model (and its evaluation).
        preset: the model's preset (``hypernets.diffusion`` / ``hypernets.autoregressive``).
        steps, batch_size: training overrides; 0: the preset's.
        num_samples: fields sampled and evaluated.
        class_conditional: condition on the labels (the primitives' shape).
        guidance_scale: classifier-free guidance of a class-conditional diffusion's samples (1: none;
            the autoregressive model ignores it).
        num_devices: data-parallel devices; 0: all local devices.
    """

    enabled: bool = True
    preset: str = "cpu"
    steps: int = 0
    batch_size: int = 0
    num_samples: int = 64
    class_conditional: bool = True
    guidance_scale: float = 1.0
    num_devices: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "num_devices"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0: the default), got {getattr(self, name)}")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")


@dataclasses.dataclass(frozen=True)
class EvaluationConfig:
    """``hypernets.evaluate`` settings shared by both models' evaluations (``*_steps`` 0: the preset's)."""

    classifier_preset: str = "small"
    classifier_steps: int = 0
    grid_size: int = 16
    baseline_count: int = 64

    def __post_init__(self):
        if self.classifier_steps < 0:
            raise ValueError(f"classifier_steps must be >= 0, got {self.classifier_steps}")
        for name in ("grid_size", "baseline_count"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Every stage's settings (saved as ``W/pipeline_config.json``)."""

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    diffusion: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    autoregressive: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    evaluate: EvaluationConfig = dataclasses.field(default_factory=EvaluationConfig)

    def __post_init__(self):
        if not (self.diffusion.enabled or self.autoregressive.enabled):
            raise ValueError("enable at least one of diffusion and autoregressive")


FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def _idx(prefix: str) -> str:
    return f"idx:{FASHION_MNIST}/{prefix}-images-idx3-ubyte.gz,{FASHION_MNIST}/{prefix}-labels-idx1-ubyte.gz"


PRESETS: dict[str, PipelineConfig] = {
    # Test-sized: 16 + 8 fields of 8x8 primitives, a few steps of each model; about a minute on 2 CPU cores.
    #   python -m hypernets.pipeline --preset tiny --workdir runs/pipeline-tiny
    "tiny": PipelineConfig(
        data=DataConfig(train_num=16, test_num=8, image_size=8, field_steps=30),
        diffusion=ModelConfig(preset="tiny", num_samples=8, num_devices=1),
        autoregressive=ModelConfig(preset="tiny", num_samples=8, num_devices=1),
        evaluate=EvaluationConfig(classifier_preset="tiny", classifier_steps=40, grid_size=8, baseline_count=8)),
    # `make demo`: 1,024 + 256 fields of 28x28 primitives (ngp_image "small", ~1.6k weights each), a
    # class-conditional DiT ("cpu", 800 steps) and a small token transformer ("cpu", 100 steps),
    # 64 samples each (diffusion at guidance 3), evaluated with the "small" classifier. Measured on 2 idle
    # cores: 7.7 minutes of stages (8 min 47 s for make demo on a fresh clone, install included); samples
    # are coloured blobs, 1-NNA 77% (diffusion) / 82% (autoregressive) on 64 vs 64, 50% being ideal, none
    # memorised.
    #   python -m hypernets.pipeline --preset demo --workdir runs/demo
    "demo": PipelineConfig(
        data=DataConfig(train_num=1024, test_num=256),
        diffusion=ModelConfig(preset="cpu", steps=800, guidance_scale=3.0),
        autoregressive=ModelConfig(preset="cpu", steps=100),
        evaluate=EvaluationConfig(classifier_preset="small")),
    # Fashion-MNIST-sized budgets on the procedural primitives (60,000 + 10,000 fields; hours on a
    # CPU, meant for a GPU): the models' "default" presets, 1,024 samples each, the default classifier.
    # Expected (not measured: it needs a GPU and none has been lent): at least the "demo" preset's figures
    # (1-NNA 77% diffusion / 82% autoregressive), from the same stages at 60x the data and the models' default presets.
    #   python -m hypernets.pipeline --preset research --workdir runs/research
    "research": PipelineConfig(
        data=DataConfig(train_num=60_000, test_num=10_000),
        diffusion=ModelConfig(preset="default", num_samples=1024),
        autoregressive=ModelConfig(preset="default", num_samples=1024),
        evaluate=EvaluationConfig(classifier_preset="default", baseline_count=256)),
    # The same on Fashion-MNIST itself (Debian package dataset-fashion-mnist, read from
    # /usr/share/datasets/fashion-mnist; 60,000 train and 10,000 test images).
    #   python -m hypernets.pipeline --preset research-fmnist --workdir runs/research-fmnist
    "research-fmnist": PipelineConfig(
        data=DataConfig(source=_idx("train"), test_source=_idx("t10k"), train_num=60_000, test_num=10_000),
        diffusion=ModelConfig(preset="default", num_samples=1024),
        autoregressive=ModelConfig(preset="default", num_samples=1024),
        evaluate=EvaluationConfig(classifier_preset="default", baseline_count=256)),
}


def _merge(base: dict, overrides: dict) -> dict:
    """``base`` updated recursively with ``overrides`` (unknown keys are kept, for the config check to name)."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_overrides(path: str) -> dict:
    """The JSON object in ``--config FILE`` (one-line ``UserError`` when missing or malformed)."""
    try:
        with open(path) as handle:
            values = json.load(handle)
    except FileNotFoundError:
        raise UserError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"--config {path}: cannot read it ({error})") from None
    except json.JSONDecodeError as error:
        raise UserError(f"--config {path}: not valid JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(values, dict):
        raise UserError(f"--config {path}: expected a JSON object, got {type(values).__name__}")
    return values


def resolve_config(preset: str, overrides: dict, where: str = "config", base: dict | None = None) -> PipelineConfig:
    """``PRESETS[preset]`` (or the saved config dict ``base``) with ``overrides`` (nested dicts) applied;
    one-line ``UserError`` naming a bad field (unknown key, wrong type, invalid value)."""
    if base is None:
        if preset not in PRESETS:
            raise UserError(f"unknown pipeline preset {preset!r}; choose one of: {', '.join(PRESETS)}")
        base = config_to_dict(PRESETS[preset])
    try:
        return config_from_dict(PipelineConfig, _merge(base, overrides), where)
    except ConfigError as error:
        raise UserError(str(error)) from None


# ------------------------------------------------------------------------------------------ stages


@dataclasses.dataclass(frozen=True)
class Stage:
    """One step of the pipeline.

    Attributes:
        name: the stage's name (``--stage NAME``, state entries, ``W/logs/NAME.log``).
        module: the entry point run as ``python -m module arguments`` (the report stage runs in this
            process; its command is the one that reruns it on its own).
        arguments: its command-line arguments (paths under the work directory).
        output: a path the finished stage leaves behind; a stage recorded as done whose output is
            gone runs again.
        description: one line for the progress output.
        needs: the stages whose outputs this one reads; when one of them finished after this one
            (it was rerun), this one runs again.
    """

    name: str
    module: str
    arguments: tuple[str, ...]
    output: str
    description: str
    needs: tuple[str, ...] = ()

    def command(self) -> list[str]:
        return ["python", "-m", self.module, *self.arguments]


def _paths(workdir: str) -> dict[str, str]:
    join = os.path.join
    return {"fields_train": join(workdir, "fields_train"), "fields_test": join(workdir, "fields_test"),
            "tokens_train": join(workdir, "tokens_train"),
            **{model: join(workdir, model) for model in MODELS},
            **{f"{model}_eval": join(workdir, f"{model}_eval") for model in MODELS}}


def _encode_arguments(data: DataConfig, source: str, num: int, seed: int, out: str) -> tuple[str, ...]:
    arguments = ["--source", source, "--num", str(num), "--size", f"{data.image_size}x{data.image_size}",
                 "--preset", data.field_preset, "--out", out, "--seed", str(seed), "--init-seed", str(data.init_seed)]
    if data.field_steps:
        arguments += ["--steps", str(data.field_steps)]
    if data.fields_per_batch:
        arguments += ["--fields-per-batch", str(data.fields_per_batch)]
    return (*arguments, "--quiet")


def _model_arguments(model: ModelConfig, data_path: str, workdir: str, guided: bool) -> tuple[str, ...]:
    arguments = ["--data", data_path, "--workdir", workdir, "--preset", model.preset,
                 "--num-samples", str(model.num_samples)]
    if model.class_conditional:
        arguments.append("--class-conditional")
        if guided and model.guidance_scale != 1.0:
            arguments += ["--guidance-scale", str(model.guidance_scale)]
    for flag, value in (("--steps", model.steps), ("--batch-size", model.batch_size),
                        ("--num-devices", model.num_devices)):
        if value:
            arguments += [flag, str(value)]
    return (*arguments, "--quiet")


def build_stages(config: PipelineConfig, workdir: str) -> list[Stage]:
    """The stages of ``config`` in order, with their commands (paths under ``workdir``)."""
    paths, data = _paths(workdir), config.data
    size = f"{data.image_size}x{data.image_size}"
    stages = [
        Stage("encode_train", "fields.encode_dataset",
              _encode_arguments(data, data.source, data.train_num, data.seed, paths["fields_train"]),
              os.path.join(paths["fields_train"], "field_config.json"),
              f"encode {data.train_num} train images ({size}) into {data.field_preset} fields"),
        Stage("encode_test", "fields.encode_dataset",
              _encode_arguments(data, data.test_source or data.source, data.test_num, data.test_seed,
                                paths["fields_test"]),
              os.path.join(paths["fields_test"], "field_config.json"),
              f"encode {data.test_num} test images ({size}), same initial weights"),
        Stage("tokenize", "scripts.tokenize",
              ("--fields", paths["fields_train"], "--tokenizer", data.tokenizer, "--normalize", data.normalize,
               "--out", paths["tokens_train"], "--overwrite", "--report", "--quiet"),
              os.path.join(paths["tokens_train"], "_report.json"),
              f"tokenize the train fields ({data.tokenizer}, {data.normalize} normalisation)", ("encode_train",)),
    ]
    evaluation = config.evaluate
    for model in MODELS:
        settings: ModelConfig = getattr(config, model)
        if not settings.enabled:
            continue
        data_path, source = ((paths["fields_train"], "encode_train") if model == "diffusion"
                             else (paths["tokens_train"], "tokenize"))
        arguments = _model_arguments(settings, data_path, paths[model], guided=model == "diffusion")
        stages.append(Stage(model, f"hypernets.{model}", arguments,
                            os.path.join(paths[model], SAMPLES_DIRECTORY, SAMPLES_SHARD),
                            f"train {model} ({settings.preset} preset"
                            + (f", {settings.steps} steps" if settings.steps else "")
                            + f"), sample {settings.num_samples} fields", (source,)))
        arguments = ["--samples", os.path.join(paths[model], SAMPLES_DIRECTORY), "--reference", paths["fields_test"],
                     "--train", paths["fields_train"], "--out", paths[f"{model}_eval"],
                     "--classifier-preset", evaluation.classifier_preset, "--grid-size", str(evaluation.grid_size),
                     "--baseline-count", str(evaluation.baseline_count)]
        if evaluation.classifier_steps:
            arguments += ["--classifier-steps", str(evaluation.classifier_steps)]
        stages.append(Stage(f"evaluate_{model}", "hypernets.evaluate", (*arguments, "--quiet"),
                            os.path.join(paths[f"{model}_eval"], "eval.json"),
                            f"evaluate the {model} samples against the test fields",
                            (model, "encode_train", "encode_test")))
    stages.append(Stage("report", "hypernets.pipeline", ("--workdir", workdir, "--stage", "report"),
                        os.path.join(workdir, REPORT_NAME), "write report.md with figures",
                        tuple(stage.name for stage in stages)))
    return stages


def check_stage_name(stages: list[Stage], name: str | None) -> None:
    """One-line ``UserError`` when ``name`` (``--stage``; None: every stage) is not one of ``stages``."""
    if name is not None and name not in {stage.name for stage in stages}:
        raise UserError(f"unknown stage {name!r}; this config's stages: {', '.join(stage.name for stage in stages)}")


# ------------------------------------------------------------------------------------------- state


def read_state(workdir: str) -> dict:
    """``W/pipeline_state.json`` (``{"stages": {name: {...}}}``), empty when absent."""
    path = os.path.join(workdir, STATE_NAME)
    if not os.path.exists(path):
        return {"stages": {}}
    try:
        with open(path) as handle:
            state = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"cannot read {path}: {error}; delete it to rerun every stage") from None
    if not isinstance(state, dict) or not isinstance(state.get("stages"), dict):
        raise UserError(f"{path} is not a pipeline state file; delete it to rerun every stage")
    return state


def write_state(workdir: str, state: dict) -> None:
    write_json(os.path.join(workdir, STATE_NAME), state)


def is_done(stage: Stage, state: dict) -> bool:
    """Finished, its output present, and finished after every stage it needs (``sequence``: the
    order in which stages finished in this work directory)."""
    entries = state["stages"]
    entry = entries.get(stage.name, {})
    if entry.get("status") != "done" or not os.path.exists(stage.output):
        return False
    return all(entries.get(need, {}).get("sequence", 0) <= entry.get("sequence", 0) for need in stage.needs)


def _wall_seconds(entry: dict) -> float:
    """A stage's wall time over all its attempts (``seconds_before``: the earlier, unfinished ones)."""
    return entry.get("seconds", 0.0) + entry.get("seconds_before", 0.0)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[int]:
    """An exclusive lock on ``W/.pipeline.lock`` for this run (its descriptor is handed to the stage
    subprocesses, so a stage left running by a killed pipeline still holds it)."""
    descriptor = os.open(os.path.join(workdir, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another pipeline (or one of its stages) is running in {workdir}; wait for it "
                            "or stop it first") from None
        yield descriptor
    finally:
        os.close(descriptor)


# Runs a stage as ``python -m MODULE ARGS`` would, after asking Linux to SIGKILL it when the pipeline
# dies (PR_SET_PDEATHSIG), so a killed pipeline leaves no stage running. Done in the child's own
# interpreter rather than in a preexec_fn: Python code between fork and exec is unsafe in a
# multithreaded parent (JAX's threads, in tests).
STAGE_RUNNER = """
import ctypes, os, runpy, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
except (OSError, AttributeError):
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit("the pipeline exited before this stage started")
sys.argv = sys.argv[2:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def run_subprocess_stage(stage: Stage, log_path: str, lock_descriptor: int) -> int:
    """Runs the stage's command with its output in ``log_path``; returns the exit status."""
    environment = dict(os.environ, PYTHONUNBUFFERED="1")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "a") as log:
        log.write(f"\n# {_now()} $ {shlex.join(stage.command())}\n")
        log.flush()
        command = [sys.executable, "-c", STAGE_RUNNER, str(os.getpid()), stage.module, *stage.arguments]
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=environment, pass_fds=(lock_descriptor,))
        try:
            return process.wait()
        except KeyboardInterrupt:  # let the stage stop (Ctrl-C reaches it too; `kill -INT` does not), then report
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            raise


def run_report_stage(workdir: str, config: PipelineConfig, state: dict, stages: list[Stage], log_path: str) -> int:
    """Writes the report in this process; an error goes to the stage's log (with its traceback), status 1."""
    import traceback

    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "a") as log:
        log.write(f"\n# {_now()} $ {shlex.join(stages[-1].command())}\n")
        try:
            path = write_report(workdir, config, state, stages)
        except Exception as error:  # the stage fails with one line; the traceback goes to its log
            traceback.print_exc(file=log)
            log.write(f"error: {type(error).__name__}: {error}\n")
            return 1
        log.write(f"wrote {path}\n")
    return 0


def _last_line(log_path: str) -> str:
    """The log's last non-empty line (the stage's one-line error, usually), shortened."""
    try:
        with open(log_path, errors="replace") as handle:
            handle.seek(max(0, os.path.getsize(log_path) - 4096))
            lines = [line.strip() for line in handle.read().replace("\r", "\n").splitlines() if line.strip()]
    except OSError:
        return ""
    line = lines[-1] if lines else ""
    return line if len(line) <= 300 else line[:297] + "..."


# ------------------------------------------------------------------------------------------ the run


def run_pipeline(config: PipelineConfig, workdir: str, only: str | None = None,
                 out: Callable[[str], None] = print) -> int:
    """Runs the unfinished stages of ``config`` in ``workdir`` (with ``only``: that stage, done or not).

    Raises:
        UserError: a stage failed (naming the stage and its log) or another run holds the work directory.
    """
    stages = build_stages(config, workdir)
    check_stage_name(stages, only)
    with workdir_lock(workdir) as lock:
        state = read_state(workdir)
        total = time.perf_counter()
        ran = 0
        for number, stage in enumerate(stages, start=1):
            if only is not None and stage.name != only:
                continue
            header = f"[{number}/{len(stages)}] {stage.name}"
            if only is None and is_done(stage, state):
                seconds = state["stages"][stage.name].get("seconds", 0.0)
                out(f"{header}: done earlier ({seconds:.0f} s), skipped")
                continue
            log_path = os.path.join(workdir, LOG_DIRECTORY, f"{stage.name}.log")
            previous = state["stages"].get(stage.name, {})
            resumed = previous.get("status") in ("running", "failed", "interrupted")
            out(f"{header}: {stage.description}" + (" (resuming)" if resumed else ""))
            out(f"  $ {shlex.join(stage.command())}")
            entry = {"status": "running", "started": _now(), "log": log_path,
                     "command": shlex.join(stage.command()), "attempts": int(previous.get("attempts", 0)) + 1,
                     "seconds_before": 0.0 if previous.get("status") in (None, "done") else _wall_seconds(previous)}
            state["stages"][stage.name] = entry
            write_state(workdir, state)
            start = time.perf_counter()
            children = resource.getrusage(resource.RUSAGE_CHILDREN)
            try:
                if stage.name == "report":
                    status = run_report_stage(workdir, config, state, stages, log_path)
                else:
                    status = run_subprocess_stage(stage, log_path, lock)
            except KeyboardInterrupt:
                entry.update(status="interrupted", seconds=time.perf_counter() - start)
                write_state(workdir, state)
                raise UserError(f"interrupted during stage {stage.name}; rerun the same command to resume "
                                f"(log: {log_path})") from None
            except Exception:
                entry.update(status="failed", seconds=time.perf_counter() - start)
                write_state(workdir, state)
                raise
            entry["seconds"] = time.perf_counter() - start
            used = resource.getrusage(resource.RUSAGE_CHILDREN)
            entry["cpu_seconds"] = (used.ru_utime - children.ru_utime) + (used.ru_stime - children.ru_stime)
            entry["load_average"] = round(os.getloadavg()[0], 2)
            if status != 0:
                entry["status"] = "failed"
                entry["exit_status"] = status
                write_state(workdir, state)
                reason = _last_line(log_path)
                raise UserError(f"stage {stage.name} failed (exit status {status})"
                                + (f": {reason}" if reason else "") + f"; log: {log_path}")
            state["sequence"] = int(state.get("sequence", 0)) + 1
            entry.update(status="done", finished=_now(), sequence=state["sequence"])
            write_state(workdir, state)
            ran += 1
            out(f"  done in {entry['seconds']:.1f} s")
        if only is None:
            out(f"{'all stages were already done' if ran == 0 else f'{ran} stage(s) ran'} "
                f"({time.perf_counter() - total:.1f} s); report: {os.path.join(workdir, REPORT_NAME)}")
    return 0


# ------------------------------------------------------------------------------------------ figures


def _nice_ticks(low: float, high: float, count: int = 5, integer: bool = False) -> list[float]:
    """Round tick values covering ``[low, high]`` (``integer``: whole-number steps)."""
    if not high > low:
        high = low + 1.0
    raw = (high - low) / max(count - 1, 1)
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    if integer:
        step = max(1.0, float(round(step)))
    first = math.floor(low / step) * step
    ticks, value = [], first
    while value <= high + 1e-9 * step:
        ticks.append(round(value, 10))
        value += step
    if ticks[-1] < high:
        ticks.append(round(value, 10))
    return ticks


def _tick_label(value: float) -> str:
    return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.2g}"


CURVE_COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189))


def plot_curves(path: str, title: str, series: dict[str, tuple[list[float], list[float]]],
                size: tuple[int, int] = (720, 440)) -> None:
    """A line plot PNG drawn with Pillow: ``series`` maps a legend name to ``(x values, y values)``
    (a series with one point is drawn as a dot)."""
    from PIL import Image, ImageDraw, ImageFont

    width, height = size
    left, right, top, bottom = 78, 24, 44, 58
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=13)
    title_font = ImageFont.load_default(size=16)
    points = [(x, y) for xs, ys in series.values() for x, y in zip(xs, ys, strict=True)
              if math.isfinite(x) and math.isfinite(y)]
    draw.text((left, 12), title, fill=(0, 0, 0), font=title_font)
    if not points:
        draw.text((left, height // 2), "no data", fill=(0, 0, 0), font=font)
        image.save(path)
        return
    x_ticks = _nice_ticks(min(p[0] for p in points), max(p[0] for p in points), integer=True)
    y_ticks = _nice_ticks(min(p[1] for p in points), max(p[1] for p in points))
    x_low, x_high, y_low, y_high = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]

    def to_pixel(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x_low) / (x_high - x_low) * (width - left - right),
                height - bottom - (y - y_low) / (y_high - y_low) * (height - top - bottom))

    for value in y_ticks:
        _, y = to_pixel(x_low, value)
        draw.line([(left, y), (width - right, y)], fill=(225, 225, 225))
        label = _tick_label(value)
        draw.text((left - 6 - draw.textlength(label, font=font), y - 7), label, fill=(60, 60, 60), font=font)
    for value in x_ticks:
        x, _ = to_pixel(value, y_low)
        draw.line([(x, top), (x, height - bottom)], fill=(235, 235, 235))
        label = _tick_label(value)
        draw.text((x - draw.textlength(label, font=font) / 2, height - bottom + 6), label, fill=(60, 60, 60),
                  font=font)
    draw.rectangle([left, top, width - right, height - bottom], outline=(0, 0, 0))
    draw.text(((left + width - right) / 2 - draw.textlength("step", font=font) / 2, height - 24), "step",
              fill=(0, 0, 0), font=font)
    draw.text((8, top - 18), "loss", fill=(0, 0, 0), font=font)
    legend_y = top + 8
    for index, (name, (xs, ys)) in enumerate(series.items()):
        colour = CURVE_COLOURS[index % len(CURVE_COLOURS)]
        pixels = [to_pixel(x, y) for x, y in zip(xs, ys, strict=True) if math.isfinite(x) and math.isfinite(y)]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2)
        for x, y in pixels if len(pixels) <= 40 else []:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        draw.line([(width - right - 150, legend_y + 7), (width - right - 126, legend_y + 7)], fill=colour, width=3)
        draw.text((width - right - 120, legend_y), name, fill=(0, 0, 0), font=font)
        legend_y += 18
    image.save(path)


def read_history(path: str) -> list[dict]:
    """The rows of a run's ``history.jsonl`` (torn or blank lines skipped)."""
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path) as handle:
        for line in handle:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int | float):
                rows.append(row)
    return rows


def training_curves(rows: list[dict]) -> dict[str, tuple[list[float], list[float]]]:
    """``{"train loss": (steps, losses), "validation loss": (...)}`` from history rows."""
    series = {}
    for key, name in (("loss", "train loss"), ("val_loss", "validation loss")):
        picked = [(float(row["step"]), float(row[key])) for row in rows if isinstance(row.get(key), int | float)]
        if picked:
            series[name] = ([x for x, _ in picked], [y for _, y in picked])
    return series


# ------------------------------------------------------------------------------------------ report


def _read_json(path: str):
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, json.JSONDecodeError):
        return None


def _mean_quality(fields_dir: str) -> tuple[int, float | None]:
    """``(fields, mean PSNR)`` of an encoded split, from its shards' ``psnr`` column."""
    import pyarrow.parquet as pq

    total, count = 0.0, 0
    for shard in sorted(glob.glob(os.path.join(fields_dir, "*.parquet"))):
        column = pq.read_table(shard, columns=["psnr"]).column("psnr").to_pylist()
        total += sum(float(value) for value in column)
        count += len(column)
    return count, (total / count if count else None)


def _copy_figure(source: str, workdir: str, name: str) -> str | None:
    """Copies ``source`` to ``W/figures/name`` (the folder exists); returns the path relative to ``W``
    (None when absent)."""
    if not os.path.exists(source):
        return None
    target = os.path.join(workdir, FIGURE_DIRECTORY, name)
    shutil.copyfile(source, target)
    return os.path.relpath(target, workdir)


def write_report(workdir: str, config: PipelineConfig, state: dict, stages: list[Stage]) -> str:
    """Writes ``W/report.md`` (and ``W/figures/``) from the stages' outputs; returns its path."""
    paths = _paths(workdir)
    models = [model for model in MODELS if getattr(config, model).enabled]
    evaluations = {model: _read_json(os.path.join(paths[f"{model}_eval"], "eval.json")) or {} for model in models}
    figures_dir = os.path.join(workdir, FIGURE_DIRECTORY)
    os.makedirs(figures_dir, exist_ok=True)

    lines = ["# Hyper Field Networks pipeline report", "",
             f"Work directory `{workdir}`, written {_now()}. Every stage's command is listed below; "
             "each also runs on its own.", ""]

    # Data.
    data = config.data
    train_count, train_psnr = _mean_quality(paths["fields_train"])
    test_count, test_psnr = _mean_quality(paths["fields_test"])
    tokens = _read_json(os.path.join(paths["tokens_train"], "_report.json")) or {}
    lines += ["## Data", "",
              f"- train: {train_count} `{data.field_preset}` NGP image fields of {data.image_size}x{data.image_size} "
              f"images from `{data.source}`, mean fit PSNR {_format(train_psnr)} dB",
              f"- test (reference for the metrics): {test_count} fields from `{data.test_source or data.source}`"
              f" (seed {data.test_seed}), mean fit PSNR {_format(test_psnr)} dB; both splits start from the same "
              f"initial weights (init seed {data.init_seed})"]
    if tokens:
        render = tokens.get("render_psnr_db") or {}
        lines.append(f"- tokens: {tokens.get('tokenizer')} after {tokens.get('normalize')} normalisation, "
                     f"{tokens.get('tokens_per_field')} tokens per field, vocabulary {tokens.get('vocab_size')}; "
                     f"token-decoded renders vs original renders: mean {_format(render.get('mean'))} dB, worst "
                     f"{_format(render.get('worst'))} dB")
    lines.append("")

    # Metrics.
    if models:
        header = "| metric | " + " | ".join(models) + " | meaning |"
        lines += ["## Metrics (samples vs the test fields)", "", header,
                  "|---|" + "---|" * len(models) + "---|"]
        for key, name, percent, note in METRIC_ROWS:
            cells = [_format((evaluations[model].get("metrics") or {}).get(key), percent) for model in models]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {note} |")
        novelty_rows = [
            ("samples: median distance to nearest train field", lambda n: n["samples_to_train"]["median"], False),
            ("train + 0.02 std noise: same (baseline)", lambda n: n["baselines"]["0.02"]["median"], False),
            ("train + 0.04 std noise: same (baseline)", lambda n: n["baselines"]["0.04"]["median"], False),
            ("samples: median distance to nearest test field", lambda n: n["samples_to_reference"]["median"], False),
            ("memorised samples", lambda n: n["memorised_fraction"], True),
        ]
        for name, pick, percent in novelty_rows:
            cells = []
            for model in models:
                try:
                    cells.append(_format(pick(evaluations[model]["novelty"]), percent))
                except (KeyError, TypeError):
                    cells.append("n/a")
            lines.append(f"| {name} | " + " | ".join(cells) + " | novelty (pixel RMS) |")
        model_counts = {model: evaluations[model].get("counts") or {} for model in models}
        counts = [f"{model}: {count.get('samples', 'n/a')} samples vs {count.get('reference', 'n/a')} test fields"
                  for model, count in model_counts.items()]
        lines += ["", "Counts: " + "; ".join(counts) + ". Each model's full report: "
                  + ", ".join(f"`{model}_eval/eval.md`" for model in models) + ".", "",
                  "What the numbers mean: 1-NNA is the leave-one-out 1-nearest-neighbour accuracy of telling "
                  "samples from test fields: 50% is ideal (indistinguishable), 100% means every sample is told "
                  "apart. Samples much closer to their nearest training field than the noise baselines are "
                  "copies (memorised). These runs are short CPU budgets on small data, so they show that the "
                  "pipeline works end to end and how the models compare within this run, not what the models "
                  "reach with a full budget.", ""]

    # Figures.
    lines += ["## Figures", ""]
    for model in models:
        evaluation_dir = paths[f"{model}_eval"]
        figures = []
        for grid, caption in (("samples", "samples"), ("nearest_train", "each sample beside its nearest training "
                                                                        "field"), ("reference", "test fields")):
            relative = _copy_figure(os.path.join(evaluation_dir, f"{grid}.png"), workdir, f"{model}_{grid}.png")
            if relative:
                figures.append(f"![{model}: {caption}]({relative})")
        rows = read_history(os.path.join(paths[model], "history.jsonl"))
        curve = os.path.join(figures_dir, f"{model}_training.png")
        series = training_curves(rows)
        if series:
            unit = " (nats per token)" if model == "autoregressive" else ""
            plot_curves(curve, f"{model}: loss vs step{unit}", series)
            figures.append(f"![{model}: training curve]({os.path.relpath(curve, workdir)})")
        lines += [f"### {model}", "", *figures, ""]
        if rows:
            last = rows[-1]
            lines += [f"Last logged step {int(last['step'])}: loss {_format(last.get('loss'))}"
                      + (f", validation loss {_format(last.get('val_loss'))}" if "val_loss" in last else "")
                      + f", {_format(last.get('seconds'))} s of training.", ""]

    # Stages.
    lines += ["## Stages", "", "Wall time; CPU time (user + system, all threads) of the stage's process; the "
              "1-minute load average when it ended (other jobs on the machine slow the stages down).", "",
              "| stage | status | wall time | CPU time | load | command |", "|---|---|---|---|---|---|"]
    for stage in stages:  # the report's own entry is still running: no times yet
        entry = state["stages"].get(stage.name, {})
        status = "this report" if stage.name == "report" else entry.get("status", "not run")
        wall = f"{_wall_seconds(entry):.1f} s" if "seconds" in entry else "-"
        cpu = f"{entry['cpu_seconds']:.1f} s" if "cpu_seconds" in entry else "-"
        load = _format(entry["load_average"]) if "load_average" in entry else "-"
        lines.append(f"| {stage.name} | {status} | {wall} | {cpu} | {load} | `{shlex.join(stage.command())}` |")
    done = [entry for entry in state["stages"].values() if entry.get("status") == "done"]
    wall_total = sum(_wall_seconds(entry) for entry in done)
    cpu_total = sum(entry.get("cpu_seconds", 0.0) for entry in done)
    lines += ["", f"Total wall time of the finished stages: {wall_total:.1f} s ({wall_total / 60:.1f} min), "
              f"CPU time {cpu_total:.0f} s, on {os.cpu_count()} CPU cores (load average at report time: "
              f"{', '.join(f'{value:.2f}' for value in os.getloadavg())}).", ""]

    lines += ["## Config", "", "```json", config_to_json(config), "```", ""]
    path = os.path.join(workdir, REPORT_NAME)
    write_atomic(path, "\n".join(lines))
    return path


# ------------------------------------------------------------------------------------------ entry point


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m hypernets.pipeline", description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            epilog="Presets: " + ", ".join(PRESETS))
    parser.add_argument("--preset", help=f"one of {', '.join(PRESETS)} (default: the work directory's saved "
                                         "config, else demo)")
    parser.add_argument("--config", metavar="FILE.json",
                        help='overrides of the preset as nested JSON, e.g. {"data": {"train_num": 2048}, '
                             '"autoregressive": {"enabled": false}}')
    parser.add_argument("--workdir", help="work directory (default: runs/PRESET)")
    parser.add_argument("--stage", help="run only this stage (again, if it is done); see --dry-run for the names")
    parser.add_argument("--dry-run", action="store_true", help="print the stages and their commands, run nothing")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    workdir = args.workdir or os.path.join("runs", args.preset or "demo")
    saved_path = os.path.join(workdir, CONFIG_NAME)
    saved = read_config_record(saved_path)
    if saved is not None and not (isinstance(saved, dict) and isinstance(saved.get("config"), dict)):
        raise UserError(f"{saved_path} is not a pipeline config; use another --workdir")
    overrides = read_overrides(args.config) if args.config else {}
    if args.preset is None and saved is not None:
        preset = saved.get("preset", "demo")
        config = resolve_config(preset, overrides, CONFIG_NAME, base=saved["config"])
    else:
        preset = args.preset or "demo"
        config = resolve_config(preset, overrides, f"--config {args.config}: config" if args.config else "config")
    record = {"preset": preset, "config": config_to_dict(config)}
    check_run_config(workdir, saved, record, ["preset"], holds="a pipeline run with a different config")
    stages = build_stages(config, workdir)
    check_stage_name(stages, args.stage)
    if args.dry_run:
        print(f"# preset {preset}, work directory {workdir}")
        for number, stage in enumerate(stages, start=1):
            print(f"# [{number}/{len(stages)}] {stage.name}: {stage.description}")
            print(shlex.join(stage.command()))
        return 0
    prepare_workdir(workdir)
    if saved is None:
        write_json(saved_path, record)
    print(f"pipeline preset {preset} in {workdir}")
    print(config_to_json(config))
    return run_pipeline(config, workdir, only=args.stage)


if __name__ == "__main__":
    run_main(main)
