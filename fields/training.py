"""What every field fitter shares: the optimisation settings, the optimizer and one update step."""

from __future__ import annotations

import dataclasses

import jax
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
