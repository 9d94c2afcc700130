"""hypernets.pipeline: the tiny preset end to end (killed during training, then resumed), reruns that
skip finished stages, a stage that fails, bad configs, and the Pillow plots of the report."""

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

from hypernets import pipeline
from hypernets.pipeline import main
from tests.helpers import assert_one_line_error, run_entry_point

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("encode_train", "encode_test", "tokenize", "diffusion", "evaluate_diffusion", "autoregressive",
          "evaluate_autoregressive", "report")


def _environment() -> dict:
    """The stages run with the tests' strict dtype promotion too."""
    return dict(os.environ, JAX_NUMPY_DTYPE_PROMOTION="strict", PYTHONUNBUFFERED="1")


def _pipeline_process(workdir: str, output: str) -> subprocess.Popen:
    with open(output, "w") as handle:
        return subprocess.Popen([sys.executable, "-m", "hypernets.pipeline", "--preset", "tiny", "--workdir", workdir],
                                stdout=handle, stderr=subprocess.STDOUT, cwd=REPOSITORY, env=_environment())


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _read(path: str) -> str:
    try:
        with open(path) as handle:
            return handle.read()
    except FileNotFoundError:
        return ""


def _lock_is_free(workdir: str) -> bool:
    descriptor = os.open(os.path.join(workdir, pipeline.LOCK_NAME), os.O_RDWR)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(descriptor)


def _state(workdir: str) -> dict:
    with open(os.path.join(workdir, pipeline.STATE_NAME)) as handle:
        return json.load(handle)["stages"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The tiny preset, SIGKILLed while the diffusion stage trains, then rerun with the same command.

    Returns ``(workdir, output of the killed run, output of the resumed run)``.
    """
    workdir = str(tmp_path_factory.mktemp("pipeline") / "tiny")
    killed_output = workdir + "-killed.txt"
    process = _pipeline_process(workdir, killed_output)
    diffusion_log = os.path.join(workdir, "logs", "diffusion.log")
    try:  # hypernets.loop prints "training N parameters ..." just before its first step
        _wait_for(lambda: "training " in _read(diffusion_log) or process.poll() is not None, 600,
                  "the diffusion stage to start training")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL, _read(killed_output)
    assert _state(workdir)["diffusion"]["status"] == "running"
    # The stage dies with the pipeline (PR_SET_PDEATHSIG) and so lets go of the work directory's lock.
    _wait_for(lambda: _lock_is_free(workdir), 30, "the killed pipeline's stage to exit")
    resumed = subprocess.run([sys.executable, "-m", "hypernets.pipeline", "--preset", "tiny", "--workdir", workdir],
                             capture_output=True, text=True, cwd=REPOSITORY, env=_environment(), timeout=900)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    return workdir, _read(killed_output), resumed.stdout


def test_tiny_pipeline_killed_during_training_resumes_and_writes_the_report(tiny_run):
    workdir, killed, resumed = tiny_run
    assert "[1/8] encode_train" in killed and "[4/8] diffusion" in killed
    for stage in ("encode_train", "encode_test", "tokenize"):
        assert f"] {stage}: done earlier" in resumed
    assert "diffusion: train diffusion (tiny preset), sample 8 fields (resuming)" in resumed
    assert "$ python -m hypernets.diffusion --data" in resumed  # the stage's command on its own
    assert "8 stage(s) ran" not in resumed and "5 stage(s) ran" in resumed

    state = _state(workdir)
    assert [state[stage]["status"] for stage in STAGES] == ["done"] * len(STAGES)
    assert state["diffusion"]["attempts"] == 2
    for model in ("diffusion", "autoregressive"):
        evaluation = json.load(open(os.path.join(workdir, f"{model}_eval", "eval.json")))
        assert evaluation["counts"]["samples"] == 8

    report = _read(os.path.join(workdir, pipeline.REPORT_NAME))
    assert "| metric | diffusion | autoregressive | meaning |" in report
    assert "| 1-NNA |" in report and "50% is ideal" in report
    for stage in STAGES[:-1]:
        assert f"| {stage} | done |" in report
    images = [line.split("](")[1].rstrip(")") for line in report.splitlines() if line.startswith("![")]
    for name in ("diffusion_samples.png", "diffusion_training.png", "autoregressive_samples.png",
                 "autoregressive_nearest_train.png", "autoregressive_training.png"):
        assert f"figures/{name}" in images
    for relative in images:
        with Image.open(os.path.join(workdir, relative)) as image:
            assert image.format == "PNG" and image.width > 8


def test_a_rerun_of_a_finished_pipeline_skips_every_stage(tiny_run, capsys):
    workdir = tiny_run[0]
    report = os.path.join(workdir, pipeline.REPORT_NAME)
    before = os.path.getmtime(report)
    status, out, err = run_entry_point(main, ["--preset", "tiny", "--workdir", workdir], capsys)
    assert status == 0, err
    assert out.count("skipped") == len(STAGES) and "all stages were already done" in out
    assert os.path.getmtime(report) == before


def test_a_stage_whose_output_is_gone_runs_again_with_those_after_it(tiny_run, capsys):
    workdir = tiny_run[0]
    shutil.rmtree(os.path.join(workdir, "autoregressive_eval"))
    status, out, err = run_entry_point(main, ["--workdir", workdir], capsys)
    assert status == 0, err
    assert "evaluate_autoregressive: done earlier" not in out and "[7/8] evaluate_autoregressive: evaluate" in out
    assert "report: done earlier" not in out  # it needs every stage before it
    assert out.count("skipped") == 6
    assert os.path.exists(os.path.join(workdir, "autoregressive_eval", "eval.json"))


def test_a_failing_stage_ends_with_one_line_naming_it_and_its_log_and_a_rerun_resumes_it(tiny_run, capsys):
    workdir = tiny_run[0]
    attempts = _state(workdir)["evaluate_diffusion"]["attempts"]
    evaluation = os.path.join(workdir, "diffusion_eval")
    os.remove(os.path.join(evaluation, "eval.json"))
    with open(os.path.join(evaluation, "config.json"), "w") as handle:  # another evaluation's settings
        json.dump({"samples": "elsewhere"}, handle)
    status, out, err = run_entry_point(main, ["--workdir", workdir], capsys)
    log = os.path.join(workdir, "logs", "evaluate_diffusion.log")
    assert_one_line_error(status, err, "stage evaluate_diffusion failed (exit status 2)")
    assert "holds an evaluation with other settings" in err and f"log: {log}" in err
    assert _state(workdir)["evaluate_diffusion"]["status"] == "failed"
    assert "[5/8] evaluate_diffusion" in out and "[6/8]" not in out

    os.remove(os.path.join(evaluation, "config.json"))
    status, out, err = run_entry_point(main, ["--workdir", workdir], capsys)
    assert status == 0, err
    assert "evaluate_diffusion: evaluate the diffusion samples against the test fields (resuming)" in out
    assert "autoregressive: done earlier" in out and "evaluate_autoregressive: done earlier" in out
    assert _state(workdir)["evaluate_diffusion"]["attempts"] == attempts + 2


def test_another_config_in_the_same_workdir_is_refused(tiny_run, tmp_path, capsys):
    overrides = tmp_path / "more.json"
    overrides.write_text(json.dumps({"data": {"train_num": 32}}))
    status, _, err = run_entry_point(main, ["--preset", "tiny", "--workdir", tiny_run[0], "--config",
                                            str(overrides)], capsys)
    assert_one_line_error(status, err, "holds a pipeline run with a different config (config.data.train_num: 16 "
                                       "there, 32 now)")


@pytest.mark.parametrize("contents, expected", [
    ('{"data": {"trian_num": 4}}', "--config CONFIG: config.data: unknown field(s) trian_num"),
    ('{"diffusion": {"steps": "many"}}', "--config CONFIG: config.diffusion.steps: expected int, got 'many'"),
    ('{"evaluate": {"grid_size": 0}}', "grid_size must be >= 1, got 0"),
    ('{"diffusion": {"enabled": false}, "autoregressive": {"enabled": false}}', "enable at least one"),
    ('{"data": [1, 2]}', "--config CONFIG: config.data: expected an object"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"data": {', "not valid JSON"),
    (None, "no such file"),
])
def test_a_bad_config_file_is_a_one_line_error(tmp_path, capsys, contents, expected):
    path = tmp_path / "config.json"
    if contents is not None:
        path.write_text(contents)
    workdir = tmp_path / "run"
    status, _, err = run_entry_point(main, ["--preset", "tiny", "--config", str(path), "--workdir", str(workdir)],
                                     capsys)
    assert_one_line_error(status, err, expected.replace("CONFIG", str(path)))
    assert not workdir.exists()


def test_bad_presets_and_stages_are_one_line_errors(tmp_path, capsys):
    status, _, err = run_entry_point(main, ["--preset", "huge", "--workdir", str(tmp_path / "a")], capsys)
    assert_one_line_error(status, err, "unknown pipeline preset 'huge'")
    status, _, err = run_entry_point(main, ["--preset", "tiny", "--workdir", str(tmp_path / "b"), "--stage",
                                            "train"], capsys)
    assert_one_line_error(status, err, "unknown stage 'train'")
    assert not (tmp_path / "b").exists()


def test_dry_run_prints_every_stage_command_and_runs_nothing(tmp_path, capsys):
    overrides = tmp_path / "overrides.json"
    overrides.write_text(json.dumps({"autoregressive": {"enabled": False}, "data": {"field_steps": 0}}))
    workdir = tmp_path / "demo"
    status, out, err = run_entry_point(main, ["--preset", "demo", "--workdir", str(workdir), "--config",
                                              str(overrides), "--dry-run"], capsys)
    assert status == 0, err
    commands = [line for line in out.splitlines() if not line.startswith("#")]
    assert [command.split()[2] for command in commands] == [
        "fields.encode_dataset", "fields.encode_dataset", "scripts.tokenize", "hypernets.diffusion",
        "hypernets.evaluate", "hypernets.pipeline"]
    assert "--num 1024 --size 28x28 --preset small" in commands[0] and "--steps" not in commands[0]
    assert "--seed 10000000 --init-seed 0" in commands[1]
    assert "--preset cpu --num-samples 64 --class-conditional --guidance-scale 3.0 --steps 800" in commands[3]
    assert not workdir.exists()


def test_plot_curves_draws_a_png_of_the_given_size(tmp_path):
    path = str(tmp_path / "curve.png")
    steps = [float(step) for step in range(25, 1001, 25)]
    pipeline.plot_curves(path, "loss", {"train loss": (steps, [1.0 / step for step in steps]),
                                        "validation loss": ([500.0, 1000.0], [0.004, 0.002])}, size=(400, 300))
    with Image.open(path) as image:
        assert image.size == (400, 300)
        pixels = image.convert("RGB").getcolors(400 * 300)
    colours = {colour for _, colour in pixels}
    assert pipeline.CURVE_COLOURS[0] in colours and pipeline.CURVE_COLOURS[1] in colours
    ticks = pipeline._nice_ticks(0.37, 5.61)
    assert ticks[0] <= 0.37 and ticks[-1] >= 5.61 and len(ticks) <= 8
    assert pipeline._nice_ticks(2, 4, integer=True) == [2, 3, 4]


def test_training_curves_read_loss_and_validation_loss_from_history(tmp_path):
    history = tmp_path / "history.jsonl"
    history.write_text('{"step": 2, "loss": 1.5}\n{"step": 4, "loss": 1.0, "val_loss": 1.2}\n{"step": 6, "lo')
    series = pipeline.training_curves(pipeline.read_history(str(history)))
    assert series == {"train loss": ([2.0, 4.0], [1.5, 1.0]), "validation loss": ([4.0], [1.2])}


def test_a_failing_report_is_one_line_with_the_traceback_in_its_log(tiny_run, capsys, monkeypatch):
    workdir = tiny_run[0]

    def broken(*args, **kwargs):
        raise RuntimeError("no figures today")

    monkeypatch.setattr(pipeline, "write_report", broken)
    status, _, err = run_entry_point(main, ["--workdir", workdir, "--stage", "report"], capsys)
    log = os.path.join(workdir, "logs", "report.log")
    assert_one_line_error(status, err, "stage report failed (exit status 1): error: RuntimeError: no figures today; "
                                       f"log: {log}")
    assert "Traceback" in _read(log)
    monkeypatch.undo()
    status, out, err = run_entry_point(main, ["--workdir", workdir, "--stage", "report"], capsys)
    assert status == 0, err
    assert "[8/8] report: write report.md with figures (resuming)" in out
