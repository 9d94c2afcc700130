"""Scale-out: batched field fits over the fake CPU devices, and two-process runs through jax.distributed
(a localhost coordinator, one machine): dataset encoding and a few steps of hypernet training."""

import dataclasses
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from fields import encode_dataset
from fields.cli import ArgumentParser, UserError
from fields.distributed import add_distributed_arguments, initialize_distributed
from fields.field_datasets import read_dataset
from fields.image_fitting import PRESETS, fit_image_batch
from fields.training import FieldSharding
from hypernets.loop import add_loop_arguments
from tests.helpers import procedural_image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Seconds a two-process run may take before it counts as hung (a deadlocked collective): far above the
# 15-40 s these runs take on 2 busy cores.
PROCESS_TIMEOUT = 240


# ------------------------------------------------------------------------------- local devices


def leaves(tree):
    return [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(tree)]


def test_batched_image_fit_over_two_devices_matches_one_device():
    assert jax.local_device_count() >= 2, "tests/conftest.py should provide 2 fake CPU devices"
    assert FieldSharding.over(0).num_devices == jax.local_device_count()
    assert FieldSharding.over(1).mesh is None
    images = np.stack([procedural_image(10, 12, 3, seed=seed) for seed in range(3)])  # 3 fields: padded to 4
    config = dataclasses.replace(PRESETS["tiny"], steps=20, log_every=7, batch_size=48, backend="jax")
    one = fit_image_batch(images, config, seeds=[4, 5, 6], num_devices=1)
    two = fit_image_batch(images, config, seeds=[4, 5, 6], num_devices=2)
    for a, b in zip(leaves(one.params), leaves(two.params), strict=True):
        assert a.shape == b.shape and a.shape[0] == 3
        np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(one.final_loss, two.final_loss, rtol=1e-5)
    np.testing.assert_allclose(one.psnr, two.psnr, atol=1e-4)
    assert one.final_loss.shape == (3,) and one.psnr.shape == (3,)


def test_field_sharding_pads_with_copies_of_the_last_field():
    sharding = FieldSharding.over(2)
    assert sharding.num_devices == 2 and [sharding.padded(n) for n in (1, 2, 3, 4)] == [2, 2, 4, 4]
    padded = sharding.pad({"x": np.arange(3, dtype=np.float32)}, 3)
    np.testing.assert_array_equal(padded["x"], [0, 1, 2, 2])
    placed = sharding.place(padded)
    assert len(placed["x"].sharding.device_set) == 2
    with pytest.raises(ValueError, match="num_devices"):
        FieldSharding.over(jax.local_device_count() + 1)


def test_distributed_arguments_are_checked_and_shared():
    with pytest.raises(UserError, match="need --coordinator"):
        initialize_distributed(None, 2, 1)
    with pytest.raises(UserError, match="process-id"):
        initialize_distributed("localhost:1", 2, 2)
    initialize_distributed(None, None, None)  # one process: nothing happens
    parser = ArgumentParser(prog="test")
    add_loop_arguments(parser)
    add_distributed_arguments(parser)  # already added by add_loop_arguments: a no-op
    args = parser.parse_args(["--coordinator", "host:1", "--num-processes", "2", "--process-id", "1"])
    assert (args.coordinator, args.num_processes, args.process_id) == ("host:1", 2, 1)


# ------------------------------------------------------------------------------- two processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def run_two_processes(argv_of, devices_per_process: int = 1, timeout: float = PROCESS_TIMEOUT):
    """Runs ``python argv_of(i) --coordinator ... --process-id i`` for i = 0, 1 on CPU; returns their
    ``(returncode, output)``. A run that outlives ``timeout`` is killed and fails the test."""
    coordinator = f"localhost:{free_port()}"
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUMPY_DTYPE_PROMOTION="strict", WANDB_MODE="disabled",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    processes = [
        subprocess.Popen([sys.executable, *argv_of(index), "--coordinator", coordinator, "--num-processes", "2",
                          "--process-id", str(index)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
        for index in range(2)
    ]
    deadline = time.monotonic() + timeout
    results = []
    try:
        for process in processes:
            output, _ = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((process.returncode, output))
    except subprocess.TimeoutExpired:
        for process in processes:
            process.kill()
        outputs = [process.communicate()[0] for process in processes]
        pytest.fail(f"the two-process run did not finish in {timeout} s; outputs:\n" + "\n---\n".join(outputs))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return results


def encode_argv(out: str, num: int = 6):
    return ["-m", "fields.encode_dataset", "--source", "procedural:primitives", "--num", str(num), "--size", "8x8",
            "--steps", "10", "--fields-per-batch", "2", "--backend", "jax", "--quiet", "--out", out]


@pytest.fixture(scope="module")
def two_process_fields(tmp_path_factory):
    """6 tiny image fields encoded by two processes: ``(out, [(returncode, output)] per process)``."""
    out = str(tmp_path_factory.mktemp("distributed") / "fields")
    return out, run_two_processes(lambda index: encode_argv(out), devices_per_process=2)


def test_two_processes_encode_disjoint_shards_covering_every_item(two_process_fields, tmp_path):
    out, results = two_process_fields
    for index, (status, output) in enumerate(results):
        assert status == 0, output
        assert f"shard {index}/2" in output, output
    shards = sorted(name for name in os.listdir(out) if name.endswith(".parquet"))
    # Batches of 2 over 6 items: process 0 takes batches 0 and 2, process 1 batch 1.
    assert shards == ["fields-0000000-0000001.parquet", "fields-0000002-0000003.parquet",
                      "fields-0000004-0000005.parquet"]
    dataset = read_dataset(out)
    ids = dataset.columns["source_id"]
    assert len(ids) == 6 and len(set(ids)) == 6
    assert np.all(np.isfinite(dataset.matrix))
    # One process (here: pytest's, over its 2 fake devices) encodes the same fields.
    single = str(tmp_path / "single")
    assert encode_dataset.main(encode_argv(single)[2:]) == 0
    reference = read_dataset(single)
    assert reference.columns["source_id"] == ids
    np.testing.assert_allclose(reference.matrix, dataset.matrix, atol=1e-5)


# Runs the diffusion CLI and saves the sampled weights of this process, so the test can compare processes.
DIFFUSION_DRIVER = """
import sys
import numpy as np
import jax
from fields.cli import run_main
from hypernets import diffusion

original = diffusion.write_samples

def write_samples(workdir, raw, *args, **kwargs):
    np.save(f"{workdir}-process{jax.process_index()}-of{jax.process_count()}.npy", raw)
    return original(workdir, raw, *args, **kwargs)

diffusion.write_samples = write_samples
run_main(diffusion.main, sys.argv[1:])
"""


def test_two_processes_train_a_hypernet_and_agree(two_process_fields, tmp_path):
    data, encoded = two_process_fields
    assert all(status == 0 for status, _ in encoded)
    workdir = str(tmp_path / "run")
    results = run_two_processes(lambda index: ["-c", DIFFUSION_DRIVER, "--data", data, "--workdir", workdir,
                                               "--preset", "tiny", "--steps", "2", "--num-samples", "2",
                                               "--quiet"])
    for status, output in results:
        assert status == 0, output
    # The data-parallel mesh spans both processes' devices; process 0 alone reports and logs.
    assert "on 2 cpu device(s)" in results[0][1], results[0][1]
    assert "parameters on" not in results[1][1], results[1][1]
    samples = [np.load(f"{workdir}-process{index}-of2.npy") for index in range(2)]
    assert samples[0].shape[0] == 2 and np.all(np.isfinite(samples[0]))
    np.testing.assert_array_equal(samples[0], samples[1])
    assert os.path.exists(os.path.join(workdir, "history.jsonl"))
