"""What every field fitter shares: the optimisation settings, the optimizer, one update step, and the
batched-fit machinery (chunked runs, per-field keys, the field axis split over the local devices).

Batched fits (``fit_image_batch``, ``fit_occupancy_batch``, ``fit_nerf_batch``) run ``jax.vmap`` of a
single-field chunk over a leading field axis. With more than one local device (GPUs, or CPU devices
made with ``--xla_force_host_platform_device_count``) that axis is split over a one-axis
``jax.sharding.Mesh`` of the local devices (``NamedSharding(mesh, P("fields"))``) and the vmapped chunk
runs under ``jax.shard_map``: each device fits its own fields, with no communication (so custom
calls such as the hash-grid kernels need no partitioning rule). A batch whose size does not divide
by the device count is padded with copies of its last field, whose results are dropped.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

FIELD_AXIS = "fields"


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """Optimisation settings shared by the field fitters (subclasses add their own fields).

    Attributes:
        steps: optimisation steps (also the length of the cosine learning-rate schedule).
        learning_rate: Adam peak learning rate.
        final_learning_rate_fraction: the cosine schedule decays to this fraction of the peak.
        adam_beta1, adam_beta2, adam_eps: Adam hyper-parameters (Instant-NGP: 0.9, 0.99, 1e-15).
        seed: initialisation and sampling seed.
        log_every: steps per on-device chunk (one host read of the loss per chunk).
    """

    steps: int = 2000
    learning_rate: float = 1e-2
    final_learning_rate_fraction: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    adam_eps: float = 1e-15
    seed: int = 0
    log_every: int = 50

    def __post_init__(self):
        if self.steps <= 0:
            raise ValueError(f"steps must be > 0, got {self.steps}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.log_every <= 0:
            raise ValueError(f"log_every must be > 0, got {self.log_every}")


def make_optimizer(config: TrainingConfig) -> optax.GradientTransformation:
    """Adam with a cosine decay from ``learning_rate`` to ``final_learning_rate_fraction`` of it over ``steps``."""
    schedule = optax.cosine_decay_schedule(config.learning_rate, config.steps,
                                           alpha=config.final_learning_rate_fraction)
    return optax.adam(schedule, b1=config.adam_beta1, b2=config.adam_beta2, eps=config.adam_eps)


def optimizer_step(optimizer: optax.GradientTransformation, grads, opt_state, params):
    """One optax update. optax mixes Python floats with int32 step counts, so its update runs
    under standard dtype promotion even where the project's own code is checked strictly."""
    with jax.numpy_dtype_promotion("standard"):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state


def run_batched_chunks(run_chunk: Callable, carry: tuple, num_steps: int, chunk_steps: int,
                       check_every_chunk: bool = False,
                       num_fields: int | None = None) -> tuple[tuple, np.ndarray, float]:
    """Runs a batched (leading field axis) training chunk over ``[0, num_steps)`` in chunks.

    Args:
        run_chunk: ``run_chunk(*carry, first_step, count) -> (*carry, losses [N])``, e.g. a compiled
            ``jax.vmap`` of a fitter's ``train_chunk`` with its data bound.
        carry: the state that goes round (params, optimizer state, ...).
        check_every_chunk: read the losses after every chunk, so that a non-finite loss stops the
            fit at once (long fits); otherwise the last chunk's losses are read once, at the end.
        num_fields: the real fields among the first ``N`` (the rest pad a sharded batch; see
            ``FieldSharding``): only their losses are checked and returned. None: all.

    Returns:
        ``(carry, losses [N] of the last chunk as numpy, seconds)``.

    Raises:
        FloatingPointError: naming the fields of the batch whose loss is not finite.
    """
    start = time.perf_counter()
    losses = None
    for first in range(0, num_steps, chunk_steps):
        count = min(chunk_steps, num_steps - first)
        # Host scalars: a compiled chunk takes them whatever its devices (replicated over a mesh).
        *carry, losses = run_chunk(*carry, np.int32(first), np.int32(count))
        if check_every_chunk or first + count == num_steps:
            losses = np.asarray(losses)[:num_fields]  # host read (also the timing barrier)
            bad = np.flatnonzero(~np.isfinite(losses))
            if len(bad):
                raise FloatingPointError(f"loss became non-finite for field(s) {bad.tolist()} of the batch "
                                         f"by step {first + count}")
    return tuple(carry), losses, time.perf_counter() - start


def split_seed_keys(seeds, init_seeds, count: int, item: str) -> tuple[jax.Array, jax.Array]:
    """Per-field ``(init keys [N, 2], sample keys [N, 2])``: both halves of ``split(PRNGKey(seed))``,
    as a single fit with that seed uses them, except that the init half comes from ``init_seeds[i]``
    when given (``split(PRNGKey(init_seed))[0]``)."""
    if len(seeds) != count:
        raise ValueError(f"need one seed per {item}: {count} {item}s, {len(seeds)} seeds")
    if init_seeds is not None and len(init_seeds) != count:
        raise ValueError(f"need one init seed per {item}: {count} {item}s, {len(init_seeds)} init seeds")
    split = jax.vmap(lambda seed: jnp.stack(jax.random.split(jax.random.PRNGKey(seed))))
    keys = split(jnp.asarray(np.asarray(seeds, np.int64) % (1 << 32), jnp.uint32))
    init_keys = keys[:, 0] if init_seeds is None else split(
        jnp.asarray(np.asarray(init_seeds, np.int64) % (1 << 32), jnp.uint32))[:, 0]
    return init_keys, keys[:, 1]


# ------------------------------------------------------------------------- the field axis over devices


def field_devices(num_devices: int = 0) -> list:
    """The first ``num_devices`` local devices (0: all) that a batched fit splits its fields over.

    Local ones only: in a multi-process run (``fields.distributed``) each process fits its own share
    of a dataset on its own devices.

    Raises:
        ValueError: a negative count, or more devices than visible.
    """
    local = list(jax.local_devices())
    if num_devices < 0 or num_devices > len(local):
        raise ValueError(f"num_devices must lie in [0, {len(local)}] (0: all local devices), got {num_devices}")
    return local[:num_devices] if num_devices else local


@dataclasses.dataclass(frozen=True)
class FieldSharding:
    """How a batched fit spreads its fields: over ``mesh`` (axis ``"fields"``), or on one device (None).

    Use: ``sharding = FieldSharding.over(num_devices)``; pad every per-field array to
    ``sharding.padded(N)`` fields (``pad``), ``place`` it, compile the vmapped chunk with
    ``compile``, and keep the first ``N`` fields of the results.
    """

    mesh: Mesh | None = None

    @classmethod
    def over(cls, num_devices: int = 0) -> FieldSharding:
        """The field axis over ``field_devices(num_devices)`` (no mesh when that is one device)."""
        devices = field_devices(num_devices)
        return cls(Mesh(np.asarray(devices), (FIELD_AXIS,)) if len(devices) > 1 else None)

    @property
    def num_devices(self) -> int:
        return 1 if self.mesh is None else int(self.mesh.devices.size)

    def padded(self, num_fields: int) -> int:
        """``num_fields`` rounded up to a multiple of the device count."""
        return -(-num_fields // self.num_devices) * self.num_devices

    def pad(self, tree, num_fields: int):
        """Pads every leaf's leading axis from ``num_fields`` to ``padded(num_fields)`` with copies of
        the last field (real data, so the padding fields train like the others and stay finite)."""
        extra = self.padded(num_fields) - num_fields
        if extra == 0:
            return tree

        def pad_leaf(leaf):
            if isinstance(leaf, np.ndarray):
                return np.concatenate([leaf, np.repeat(leaf[-1:], extra, axis=0)])
            return jnp.concatenate([leaf, jnp.repeat(leaf[-1:], extra, axis=0)])

        return jax.tree_util.tree_map(pad_leaf, tree)

    def place(self, tree):
        """Every leaf split over the mesh along its leading (field) axis; without a mesh, on the default
        device (host arrays are copied once here, not at every chunk)."""
        if self.mesh is None:
            return jax.device_put(tree)
        return jax.device_put(tree, NamedSharding(self.mesh, PartitionSpec(FIELD_AXIS)))

    def compile(self, vmapped: Callable, abstract_args: tuple, num_batched: int, donate_argnums: tuple = ()):
        """Compiles ``vmapped(*args)``, whose first ``num_batched`` arguments (pytrees) carry the leading
        field axis and whose other arguments are shared (step numbers), for ``abstract_args``
        (``jax.ShapeDtypeStruct`` pytrees). Every output must carry the field axis.

        Without a mesh: ``jax.jit(vmapped)``. With one: ``vmapped`` runs under ``jax.shard_map`` on each
        device's slice of the fields (no collectives); inputs and outputs split over the mesh, the
        shared arguments replicated.
        """
        if self.mesh is None:
            return jax.jit(vmapped, donate_argnums=donate_argnums).lower(*abstract_args).compile()
        num_shared = len(abstract_args) - num_batched
        split, whole = PartitionSpec(FIELD_AXIS), PartitionSpec()
        mapped = jax.shard_map(vmapped, mesh=self.mesh, in_specs=(split,) * num_batched + (whole,) * num_shared,
                               out_specs=split, check_vma=False)
        shardings = ((NamedSharding(self.mesh, split),) * num_batched
                     + (NamedSharding(self.mesh, whole),) * num_shared)
        jitted = jax.jit(mapped, in_shardings=shardings, out_shardings=NamedSharding(self.mesh, split),
                         donate_argnums=donate_argnums)
        return jitted.lower(*abstract_args).compile()


ONE_DEVICE = FieldSharding()  # the default device, no mesh (callers that place their own arrays)
