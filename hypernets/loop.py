"""The one training loop of the hypernetworks: data parallel, checkpointed, resumable, logged.

A model plugs in as a ``Task`` (``init`` and a pure ``loss``); ``train`` runs it on the batches of a
``BatchStream``:

- AdamW with a linear warm-up and a cosine decay to 10% of the peak learning rate, global-norm
  gradient clipping, and an exponential moving average (EMA) of the parameters;
- data parallel: a ``jax.sharding.Mesh`` with one ``"data"`` axis over the devices; each batch is
  split over it (``NamedSharding(mesh, P("data"))``), parameters and optimizer state are replicated
  (``NamedSharding(mesh, P())``), and XLA inserts the gradient all-reduce;
- orbax checkpoints in ``workdir/checkpoints`` (parameters, EMA, optimizer state, step and the data
  stream's position), so rerunning the same command resumes exactly where a killed run stopped:
  same batches, same random keys (the key of step ``s`` is ``fold_in(train_key, s)``);
- a non-finite loss stops the run with ``NonFiniteLoss`` (one line naming the step and the batch's
  rows) and leaves the last good checkpoint in place;
- ``workdir/history.jsonl``: one JSON object per logged step (mean loss and metrics since the last
  log, learning rate, gradient norm, seconds, and the ``evaluate`` results); a tqdm progress bar; an
  optional Weights & Biases run (``wandb``: disabled | offline | online).

Steps count completed updates: "step 3" is the state after the third update, and the loss logged at
step 3 is the loss of the batch that update used.

Multi-host: every hypernet CLI joins the run (``fields.distributed``) in ``loop_overrides``; each process
then feeds its slice of every global batch and the mesh spans all processes' devices.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import secrets
import time
from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from fields.checkpoint import Checkpointer
from fields.cli import UserError, prepare_workdir
from fields.config import config_to_dict
from fields.distributed import add_distributed_arguments, initialize_distributed_from_args
from fields.files import write_atomic
from hypernets.datasets import BatchStream

WANDB_MODES = ("disabled", "offline", "online")
FINAL_LEARNING_RATE_FRACTION = 0.1  # the cosine schedule decays to this fraction of the peak
HISTORY_NAME = "history.jsonl"
CHECKPOINT_DIR = "checkpoints"
WANDB_ID_NAME = "wandb_run_id"
DATA_AXIS = "data"
# Stream state entries kept in checkpoints (int32 arrays inside the checkpoint, so they are saved atomically with it).
STREAM_STATE_KEYS = ("epoch", "position", "num_rows", "batch_size")


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """Optimisation and bookkeeping settings shared by every hypernetwork.

    Attributes:
        steps: optimizer updates (also the length of the learning-rate schedule).
        batch_size: global batch size (split over the devices; must divide by their number).
        learning_rate: AdamW peak learning rate.
        warmup_steps: linear warm-up from 0 to the peak (capped at ``steps - 1``).
        weight_decay: AdamW decoupled weight decay.
        grad_clip: clip gradients to this global norm; 0 disables.
        ema_decay: decay of the parameter EMA, warmed up as ``min(ema_decay, (1 + s) / (10 + s))`` at
            step ``s``; 0 disables (then ``ema_params == params``).
        log_every: steps between history rows (and wandb logs).
        checkpoint_every: steps between checkpoints (one is also written at the end).
        eval_every: steps between ``evaluate`` calls; 0: only at the end.
        seed: initialisation and per-step random keys.
        num_devices: devices of the data-parallel mesh; 0: all local devices.
        wandb: Weights & Biases mode: disabled | offline | online.
    """

    steps: int = 2000
    batch_size: int = 32
    learning_rate: float = 3e-4
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    log_every: int = 25
    checkpoint_every: int = 250
    eval_every: int = 0
    seed: int = 0
    num_devices: int = 0
    wandb: str = "disabled"

    def __post_init__(self):
        positive = ("steps", "batch_size", "log_every", "checkpoint_every")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"loop.{name} must be > 0, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "num_devices"):
            if getattr(self, name) < 0:
                raise ValueError(f"loop.{name} must be >= 0, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ValueError(f"loop.learning_rate must be > 0, got {self.learning_rate}")
        if not (self.weight_decay >= 0 and self.grad_clip >= 0):
            raise ValueError("loop.weight_decay and loop.grad_clip must be >= 0")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"loop.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.wandb not in WANDB_MODES:
            raise ValueError(f"loop.wandb must be one of {', '.join(WANDB_MODES)}, got {self.wandb!r}")


class Task(Protocol):
    """A model and its objective, as the loop sees them."""

    def init(self, key: jax.Array, batch: dict[str, jax.Array]) -> Any:
        """Initial params pytree (``batch`` is a real batch of the stream, for shapes)."""
        ...

    def loss(self, params: Any, batch: dict[str, jax.Array], key: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """``(loss, metrics)``: a scalar float32 loss (computed in float32) and scalar metrics; pure, jittable."""
        ...


@dataclasses.dataclass
class TrainResult:
    """What ``train`` returns.

    Attributes:
        params, ema_params: final parameters (replicated ``jax.Array`` pytrees).
        step: updates done.
        history: the rows of ``history.jsonl`` up to ``step`` (``{"step", "loss", ...metrics, "seconds"}``).
        evaluation: the last ``evaluate`` result (empty when not called).
    """

    params: Any
    ema_params: Any
    step: int
    history: list[dict]
    evaluation: dict = dataclasses.field(default_factory=dict)


class NonFiniteLoss(UserError):
    """The loss became NaN or infinite; the message names the step and the batch's rows."""


# ------------------------------------------------------------------------------------- optimizer


def learning_rate_schedule(config: LoopConfig) -> optax.Schedule:
    """Linear warm-up from 0 over ``warmup_steps``, then cosine decay to 10% of the peak at ``steps``."""
    warmup = min(config.warmup_steps, config.steps - 1)
    end_value = config.learning_rate * FINAL_LEARNING_RATE_FRACTION
    if warmup == 0:
        return optax.cosine_decay_schedule(config.learning_rate, config.steps, alpha=FINAL_LEARNING_RATE_FRACTION)
    return optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, warmup, config.steps, end_value=end_value)


def make_optimizer(config: LoopConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``(optimizer, schedule)``: global-norm clipping (if ``grad_clip > 0``) then AdamW on the schedule."""
    schedule = learning_rate_schedule(config)
    parts = [optax.clip_by_global_norm(config.grad_clip)] if config.grad_clip > 0 else []
    parts.append(optax.adamw(schedule, weight_decay=config.weight_decay))
    return optax.chain(*parts), schedule


def ema_decay_at(config: LoopConfig, step: jax.Array) -> jax.Array:
    """float32 EMA decay at (1-based) ``step``: ``min(ema_decay, (1 + step) / (10 + step))``."""
    step = step.astype(jnp.float32)
    warm = (jnp.float32(1.0) + step) / (jnp.float32(10.0) + step)
    return jnp.minimum(jnp.float32(config.ema_decay), warm)


def _ema_update(ema: Any, params: Any, decay: jax.Array) -> Any:
    def update(average, value):
        if not jnp.issubdtype(value.dtype, jnp.floating):
            return value
        keep = decay.astype(value.dtype)
        return average * keep + value * (jnp.asarray(1, value.dtype) - keep)

    return jax.tree_util.tree_map(update, ema, params)


def make_train_step(task: Task, config: LoopConfig, optimizer, schedule, train_key: jax.Array) -> Callable:
    """The (unjitted) update: ``(state, batch, step) -> (state, loss, metrics)``.

    ``state`` is ``{"params", "ema_params", "opt_state"}``, ``step`` the int32 number of the update
    (1-based); the random key is ``fold_in(train_key, step)``; ``metrics`` gain ``grad_norm`` and
    ``learning_rate``.
    """

    def train_step(state, batch, step):
        key = jax.random.fold_in(train_key, step)
        (loss, metrics), grads = jax.value_and_grad(task.loss, has_aux=True)(state["params"], batch, key)
        # optax mixes Python floats with int32 step counts: run it under standard promotion.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
            params = optax.apply_updates(state["params"], updates)
            grad_norm = optax.tree.norm(grads).astype(jnp.float32)
            learning_rate = jnp.asarray(schedule(step - jnp.int32(1)), jnp.float32)
        if config.ema_decay > 0:
            ema = _ema_update(state["ema_params"], params, ema_decay_at(config, step))
        else:
            ema = params
        metrics = dict(metrics)
        metrics.setdefault("grad_norm", grad_norm)
        metrics.setdefault("learning_rate", learning_rate)
        return {"params": params, "ema_params": ema, "opt_state": opt_state}, loss, metrics

    return train_step


# ------------------------------------------------------------------------------------- devices


def data_devices(num_devices: int) -> list:
    """The devices of the data-parallel mesh: the first ``num_devices`` local ones (0: all).

    With several processes (after ``initialize_distributed``) the mesh spans every process's devices.

    Raises:
        UserError: more devices asked for than visible.
    """
    if jax.process_count() > 1:
        if num_devices not in (0, jax.device_count()):
            raise UserError(f"--num-devices must be 0 (all) in a multi-process run, got {num_devices}")
        return list(jax.devices())
    local = list(jax.local_devices())
    if num_devices > len(local):
        raise UserError(f"asked for {num_devices} devices but only {len(local)} are visible")
    return local[:num_devices] if num_devices else local


def _host_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """64-bit arrays as 32-bit (JAX runs without x64), e.g. the int64 ``index``."""
    converted = {}
    for name, array in batch.items():
        array = np.asarray(array)
        if array.dtype == np.int64:
            array = array.astype(np.int32)
        elif array.dtype == np.float64:
            array = array.astype(np.float32)
        converted[name] = array
    return converted


def _place_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Global host batch -> arrays split over the mesh's ``data`` axis.

    With several processes every process holds the same global batch and places the rows of its own
    devices' shards.
    """
    batch = _host_batch(batch)
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    return {
        name: jax.make_array_from_callback(array.shape, sharding, lambda index, array=array: array[index])
        for name, array in batch.items()
    }


# ---------------------------------------------------------------------------------- bookkeeping


def _read_history(path: str, max_step: int) -> list[dict]:
    """The history rows with ``step <= max_step``; rewrites the file without the others (and torn lines)."""
    if not os.path.exists(path):
        return []
    rows, dropped = [], False
    with open(path) as handle:
        for line in handle:
            try:
                row = json.loads(line)
                step = int(row["step"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                dropped = dropped or bool(line.strip())
                continue
            if step <= max_step:
                rows.append(row)
            else:
                dropped = True
    if dropped:
        write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))
    return rows


def _json_value(value: Any) -> Any:
    array = np.asarray(value)
    if array.ndim == 0 and np.issubdtype(array.dtype, np.number):
        return float(array) if np.issubdtype(array.dtype, np.floating) else int(array)
    if isinstance(value, np.ndarray | jax.Array):
        return array.tolist()
    return value


def _import_wandb(config: LoopConfig):
    """The wandb module when ``config.wandb`` asks for it (None when disabled or not the primary process)."""
    if config.wandb == "disabled" or jax.process_index() != 0:
        return None
    try:
        import wandb
    except ImportError:
        raise UserError(f"--wandb {config.wandb} needs the wandb package: pip install 'wandb>=0.17'") from None
    return wandb


def _start_wandb(wandb, config: LoopConfig, workdir: str, run_config: dict | None):
    """A wandb run, resumed when the work directory has one (its id is kept in ``workdir/wandb_run_id``)."""
    id_path = os.path.join(workdir, WANDB_ID_NAME)
    if os.path.exists(id_path):
        with open(id_path) as handle:
            run_id = handle.read().strip()
    else:
        run_id = secrets.token_hex(4)
        write_atomic(id_path, run_id + "\n")
    try:
        return wandb.init(
            mode=config.wandb,
            dir=workdir,
            config=run_config if run_config is not None else config_to_dict(config),
            project=os.environ.get("WANDB_PROJECT", "hyper-field-networks"),
            name=os.path.basename(os.path.abspath(workdir)),
            id=run_id,
            resume="allow",
        )
    except Exception as error:  # noqa: BLE001 - wandb raises many kinds (network, auth, settings)
        message = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserError(f"wandb could not start a run ({message}); try --wandb offline or disabled") from None


class _History:
    """``workdir/history.jsonl`` (written by the primary process) and the rows of this run."""

    def __init__(self, workdir: str, start: int, primary: bool):
        self.path = os.path.join(workdir, HISTORY_NAME)
        self.primary = primary
        self.rows = _read_history(self.path, start) if primary else []
        self.seconds_before = float(self.rows[-1].get("seconds", 0.0)) if self.rows else 0.0
        self.started = time.perf_counter()

    def append(self, step: int, values: dict[str, Any]) -> dict[str, Any]:
        row = {"step": step, **values, "seconds": self.seconds_before + time.perf_counter() - self.started}
        self.rows.append(row)
        if self.primary:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(row) + "\n")
        return row


class _MeanMeter:
    """Running sums of the loss and metrics between two history rows."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value)
        self.count += 1

    def pop(self) -> dict[str, float]:
        means = {name: total / max(self.count, 1) for name, total in self.sums.items()}
        self.sums, self.count = {}, 0
        return means


# ------------------------------------------------------------------------------------------ train


def _checkpoint_tree(state: dict, step: int, stream_state: dict[str, int]) -> dict:
    """What a checkpoint holds; the optimizer state as its list of leaves (orbax-friendly)."""
    return {
        "params": state["params"],
        "ema_params": state["ema_params"],
        "opt_state": jax.tree_util.tree_leaves(state["opt_state"]),
        "step": np.asarray(step, np.int32),
        "stream": {name: np.asarray(stream_state[name], np.int32) for name in STREAM_STATE_KEYS},
    }


def _restore(checkpoints, state: dict, stream: BatchStream, replicated: NamedSharding) -> tuple[dict, int]:
    """Loads the newest checkpoint into ``state``'s structure and positions ``stream``; returns ``(state, step)``."""
    like = _checkpoint_tree(state, 0, stream.state())
    restored = checkpoints.restore(like, sharding=replicated)  # a checkpoint of 8 devices restores on 1
    opt_structure = jax.tree_util.tree_structure(state["opt_state"])
    new_state = {
        "params": restored["params"],
        "ema_params": restored["ema_params"],
        "opt_state": jax.tree_util.tree_unflatten(opt_structure, restored["opt_state"]),
    }
    stream.restore({name: int(value) for name, value in restored["stream"].items()})
    return new_state, int(restored["step"])


def _check_loss_shape(task: Task, params: Any, batch: dict[str, np.ndarray], key: jax.Array) -> None:
    shapes = {name: jax.ShapeDtypeStruct(array.shape, array.dtype) for name, array in batch.items()}
    loss, _ = jax.eval_shape(task.loss, params, shapes, key)
    if loss.shape != () or loss.dtype != jnp.float32:
        raise TypeError(f"Task.loss must return a scalar float32 loss, got {loss.dtype}{list(loss.shape)}")


def _initial_state(task: Task, stream: BatchStream, optimizer, replicated: NamedSharding, seed: int):
    """``(state, train_key)``: fresh params (from a peek at the stream's next batch), EMA copy, optimizer state."""
    init_key, train_key = jax.random.split(jax.random.PRNGKey(seed))
    position = stream.state()
    example = _host_batch(stream.next())
    stream.restore(position)
    params = jax.jit(task.init, out_shardings=replicated)(init_key, example)
    _check_loss_shape(task, params, example, train_key)
    state = {
        "params": params,
        "ema_params": jax.device_put(jax.device_get(params), replicated),  # separate buffers
        "opt_state": jax.jit(optimizer.init, out_shardings=replicated)(params),
    }
    return state, train_key


def _evaluation_row(evaluate, ema_params, step: int, training_names: set[str]) -> tuple[dict, dict]:
    """``(results, row entries)``: ``evaluate``'s results, renamed ``eval_*`` where they clash with training names."""
    results = {name: _json_value(value) for name, value in evaluate(ema_params, step).items()}
    return results, {(f"eval_{name}" if name in training_names else name): value for name, value in results.items()}


def train(
    task: Task,
    stream: BatchStream,
    config: LoopConfig,
    workdir: str,
    evaluate: Callable[[Any, int], dict[str, float]] | None = None,
    progress: bool = True,
    *,
    run_config: dict | None = None,
    stop_at_step: int | None = None,
) -> TrainResult:
    """Trains ``task`` on ``stream`` to ``config.steps``, resuming from ``workdir/checkpoints`` if possible.

    Args:
        task: the model and objective.
        stream: batches of ``config.batch_size`` rows; its position is checkpointed and restored.
        config: the loop settings.
        workdir: run directory (``checkpoints/``, ``history.jsonl``, wandb files).
        evaluate: ``evaluate(ema_params, step) -> {name: float}``, called every ``eval_every`` steps and
            at the end; its results go into that step's history row (a name that clashes with
            ``loss``, ``step``, ``seconds`` or a training metric gets an ``eval_`` prefix there).
        progress: show a progress bar.
        run_config: the whole run's config for wandb (default: ``config``).
        stop_at_step: stop after this step (checkpointing it) as if interrupted; the schedule still
            runs to ``config.steps``, so a rerun continues exactly. For tests and time-sliced jobs.

    Returns:
        ``TrainResult``. On a finished run nothing is trained: the final state is restored and
        ``evaluate`` is called once more (its results are returned, not logged again).

    Raises:
        UserError: more devices than visible, a batch size that does not divide over the devices,
            wandb requested but missing, a checkpoint whose data stream does not fit ``stream``.
        NonFiniteLoss: the loss became NaN or infinite (the last good checkpoint is kept).
    """
    prepare_workdir(workdir)
    devices = data_devices(config.num_devices)
    if config.batch_size % len(devices):
        raise UserError(
            f"batch size {config.batch_size} is not divisible by the {len(devices)} devices of the data-parallel "
            "mesh; change --batch-size or --num-devices"
        )
    if stream.batch_size != config.batch_size:
        raise ValueError(f"the stream makes batches of {stream.batch_size} but loop.batch_size is {config.batch_size}")
    wandb = _import_wandb(config)
    primary = jax.process_index() == 0
    mesh = Mesh(np.asarray(devices), (DATA_AXIS,))
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sharding = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
    optimizer, schedule = make_optimizer(config)
    state, train_key = _initial_state(task, stream, optimizer, replicated, config.seed)
    step_function = jax.jit(
        make_train_step(task, config, optimizer, schedule, train_key),
        in_shardings=(replicated, batch_sharding, replicated),
        out_shardings=(replicated, replicated, replicated),
    )
    block_each_step = devices[0].platform == "cpu" and len(devices) > 1  # DESIGN.md: collectives can deadlock
    target = config.steps if stop_at_step is None else min(stop_at_step, config.steps)

    checkpoints = Checkpointer(os.path.join(workdir, CHECKPOINT_DIR))
    run, bar = None, None
    evaluation: dict = {}
    try:
        start = 0
        if checkpoints.latest_step() is not None:
            state, start = _restore(checkpoints, state, stream, replicated)
            if primary:
                print(f"resuming from step {start}")
        history = _History(workdir, start, primary)
        if start >= target:
            if evaluate is not None and start >= config.steps:
                evaluation, _ = _evaluation_row(evaluate, state["ema_params"], start, set())
            return TrainResult(state["params"], state["ema_params"], start, history.rows, evaluation)
        if wandb is not None:
            run = _start_wandb(wandb, config, workdir, run_config)
        if primary:
            count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(state["params"]))
            print(f"training {count:,} parameters on {len(devices)} {devices[0].platform} device(s), "
                  f"batch {config.batch_size}, steps {start}->{target}")
        bar = tqdm(total=target, initial=start, desc="train", unit="step", disable=not (progress and primary),
                   dynamic_ncols=True)
        meter = _MeanMeter()
        host_batch = stream.next()
        device_batch = _place_batch(host_batch, batch_sharding)
        for step in range(start + 1, target + 1):
            new_state, loss, metrics = step_function(state, device_batch, np.int32(step))
            stream_state = stream.state()  # after this step's batch, before the next one is drawn
            indices = host_batch["index"]
            if step < target:  # prepare the next batch while the device works
                host_batch = stream.next()
                device_batch = _place_batch(host_batch, batch_sharding)
            loss_value, metric_values = jax.device_get((loss, metrics))
            if block_each_step:
                jax.block_until_ready(new_state)
            loss_value = float(loss_value)
            if not math.isfinite(loss_value):
                kept = checkpoints.latest_step()
                where = f"the checkpoint at step {kept} is kept" if kept is not None else "no checkpoint was written"
                raise NonFiniteLoss(
                    f"loss became {loss_value} at step {step} (batch rows {indices[:8].tolist()}...); {where} in "
                    f"{os.path.join(workdir, CHECKPOINT_DIR)} (lower the learning rate or check the data, then rerun)"
                )
            state = new_state
            meter.add({"loss": loss_value, **metric_values})
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4g}", refresh=False)

            row: dict[str, Any] = {}
            if step % config.log_every == 0 or step == target:
                row.update(meter.pop())
            if evaluate is not None and (step == config.steps or (config.eval_every and step % config.eval_every == 0)):
                training_names = {"step", "seconds", "loss", *metric_values}
                evaluation, entries = _evaluation_row(evaluate, state["ema_params"], step, training_names)
                row.update(entries)
            if row:
                row = history.append(step, row)
                if run is not None:
                    run.log({name: value for name, value in row.items() if name != "step"}, step=step)
            if step % config.checkpoint_every == 0 or step == target:
                checkpoints.save(step, _checkpoint_tree(state, step, stream_state))
        return TrainResult(state["params"], state["ema_params"], target, history.rows, evaluation)
    finally:
        if bar is not None:
            bar.close()
        checkpoints.close()
        if run is not None:
            run.finish()


# -------------------------------------------------------------------------------------------- CLI


LOOP_ARGUMENTS = ("steps", "batch_size", "learning_rate", "seed", "wandb", "num_devices")


def add_loop_arguments(parser) -> None:
    """Adds ``--steps --batch-size --learning-rate --seed --wandb --num-devices`` (defaults: the preset's),
    ``--extend`` (``hypernets.runs.rerun_free_fields``) and
    the multi-host options ``--coordinator --num-processes --process-id`` (``fields.distributed``)."""
    group = parser.add_argument_group("training loop (defaults: the preset's)")
    group.add_argument("--steps", type=int, help="optimizer steps")
    group.add_argument("--batch-size", type=int, help="global batch size (divisible by the device count)")
    group.add_argument("--learning-rate", type=float, help="peak AdamW learning rate")
    group.add_argument("--seed", type=int, help="initialisation, data order and sampling seed")
    group.add_argument("--wandb", choices=WANDB_MODES, help="Weights & Biases logging (default: disabled)")
    group.add_argument("--num-devices", type=int, help="data-parallel devices (0: all local devices)")
    group.add_argument("--extend", action="store_true",
                       help="train the work directory's run on to a larger --steps (its learning-rate schedule "
                            "is stretched to the new length, so the rate rises again where it resumes)")
    add_distributed_arguments(parser)


def loop_overrides(args) -> dict:
    """The non-None loop arguments, for ``dataclasses.replace(loop_config, **loop_overrides(args))``.

    Also joins the multi-process run when ``--coordinator`` was given (``initialize_distributed``;
    a second call is a no-op): every hypernet CLI resolves its config through this function before
    its first JAX computation, which is where ``jax.distributed.initialize`` must come.
    """
    initialize_distributed_from_args(args)
    values = {name: getattr(args, name, None) for name in LOOP_ARGUMENTS}
    return {name: value for name, value in values.items() if value is not None}
