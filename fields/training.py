"""What every field fitter shares: the optimisation settings, the optimizer and one update step."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax


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
                       check_every_chunk: bool = False) -> tuple[tuple, np.ndarray, float]:
    """Runs a batched (leading field axis) training chunk over ``[0, num_steps)`` in chunks.

    Args:
        run_chunk: ``run_chunk(*carry, first_step, count) -> (*carry, losses [N])``, e.g. a compiled
            ``jax.vmap`` of a fitter's ``train_chunk`` with its data bound.
        carry: the state that goes round (params, optimizer state, ...).
        check_every_chunk: read the losses after every chunk, so that a non-finite loss stops the
            fit at once (long fits); otherwise the last chunk's losses are read once, at the end.

    Returns:
        ``(carry, losses [N] of the last chunk as numpy, seconds)``.

    Raises:
        FloatingPointError: naming the fields of the batch whose loss is not finite.
    """
    start = time.perf_counter()
    losses = None
    for first in range(0, num_steps, chunk_steps):
        count = min(chunk_steps, num_steps - first)
        *carry, losses = run_chunk(*carry, jnp.int32(first), jnp.int32(count))
        if check_every_chunk or first + count == num_steps:
            losses = np.asarray(losses)  # host read (also the timing barrier)
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
