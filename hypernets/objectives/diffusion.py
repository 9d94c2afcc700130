"""Gaussian diffusion as pure functions: noise schedules, training targets, DDPM and DDIM samplers.

Everything here works with any denoiser given as a callable

    denoise(x_t: [batch, ...] float32, timesteps: [batch] int32, labels: [batch] int32 | None) -> [batch, ...]

whose output is the quantity named by the objective:

- ``"epsilon"``: the noise ``eps`` that was added;
- ``"x0"``: the clean sample;
- ``"v"``: the velocity ``sqrt(abar) * eps - sqrt(1 - abar) * x0`` (Salimans & Ho, 2022).

The forward process is ``x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps`` for integer timesteps
``t`` in ``[0, num_timesteps)``, where ``abar`` is the schedule's ``alphas_cumprod``.

Classifier-free guidance (Ho & Salimans, 2022): class ids are ``[0, num_classes)`` and
``num_classes`` is the "null" class. Training replaces each label by the null class with
probability ``label_dropout`` (labels ``< 0``, unknown, are always null); sampling combines
``uncond + scale * (cond - uncond)`` of the model outputs (``scale = 1``: plain conditional
sampling, ``0``: unconditional).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

SCHEDULES = ("cosine", "linear")
OBJECTIVES = ("epsilon", "x0", "v")
SAMPLERS = ("ddpm", "ddim")

Denoiser = Callable[[jax.Array, jax.Array, jax.Array | None], jax.Array]


# ------------------------------------------------------------------------------------------- schedules


def alphas_cumprod(schedule: str, num_timesteps: int) -> np.ndarray:
    """``abar_t`` for ``t = 0 .. num_timesteps - 1``: ``[num_timesteps]`` float32, decreasing from ~1.

    ``"cosine"`` is Nichol & Dhariwal's ``cos((t/T + s) / (1 + s) * pi/2)^2`` (s = 0.008) with betas
    clipped at 0.999; ``"linear"`` has betas from ``1e-4`` to ``0.02`` scaled by ``1000 / T`` (so
    short schedules still end near pure noise).

    Raises:
        ValueError: unknown schedule or ``num_timesteps < 1``.
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if schedule == "cosine":
        offset = 0.008
        steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
        f = np.cos((steps + offset) / (1.0 + offset) * math.pi / 2.0) ** 2
        betas = np.clip(1.0 - f[1:] / f[:-1], 0.0, 0.999)
    elif schedule == "linear":
        scale = 1000.0 / num_timesteps
        betas = np.linspace(scale * 1e-4, min(scale * 0.02, 0.999), num_timesteps, dtype=np.float64)
    else:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    return np.cumprod(1.0 - betas).astype(np.float32)


def _gather(values: jax.Array, timesteps: jax.Array, like: jax.Array) -> jax.Array:
    """``values[timesteps]`` shaped ``[batch, 1, ..., 1]`` to broadcast against ``like [batch, ...]``."""
    picked = jnp.asarray(values, jnp.float32)[timesteps]
    return picked.reshape(picked.shape + (1,) * (like.ndim - 1))


def add_noise(abar: jax.Array, x0: jax.Array, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
    """Forward process: ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``; ``x0, noise: [batch, ...]``."""
    a = _gather(abar, timesteps, x0)
    return jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * noise


def training_target(objective: str, abar: jax.Array, x0: jax.Array, noise: jax.Array, timesteps: jax.Array):
    """What the model should output at ``x_t`` for ``objective``: ``[batch, ...]``."""
    if objective == "epsilon":
        return noise
    if objective == "x0":
        return x0
    if objective == "v":
        a = _gather(abar, timesteps, x0)
        return jnp.sqrt(a) * noise - jnp.sqrt(1.0 - a) * x0
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")


def predict_x0_and_noise(
    objective: str, abar: jax.Array, output: jax.Array, x_t: jax.Array, timesteps: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Converts a model output for ``objective`` into ``(x0, eps)`` estimates, both ``[batch, ...]``."""
    a = _gather(abar, timesteps, x_t)
    sqrt_a, sqrt_one_minus_a = jnp.sqrt(a), jnp.sqrt(1.0 - a)
    if objective == "epsilon":
        eps = output
        x0 = (x_t - sqrt_one_minus_a * eps) / sqrt_a
    elif objective == "x0":
        x0 = output
        eps = (x_t - sqrt_a * x0) / jnp.maximum(sqrt_one_minus_a, 1e-8)
    elif objective == "v":
        x0 = sqrt_a * x_t - sqrt_one_minus_a * output
        eps = sqrt_one_minus_a * x_t + sqrt_a * output
    else:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    return x0, eps


# ------------------------------------------------------------------------------------------- training


def drop_labels(labels: jax.Array, key: jax.Array, num_classes: int, probability: float) -> jax.Array:
    """Labels ``[batch]`` with each replaced by the null class ``num_classes`` with ``probability``;
    unknown labels (``< 0``) always become the null class."""
    labels = jnp.asarray(labels, jnp.int32)
    null = jnp.full_like(labels, num_classes)
    dropped = jax.random.uniform(key, labels.shape) < probability
    return jnp.where(dropped | (labels < 0), null, labels)


def diffusion_loss(
    denoise: Denoiser,
    x0: jax.Array,
    key: jax.Array,
    abar: jax.Array,
    objective: str,
    labels: jax.Array | None = None,
    num_classes: int = 0,
    label_dropout: float = 0.0,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean squared error of the model output against the objective's target, in float32.

    Args:
        denoise: the model, see the module docstring.
        x0: ``[batch, ...]`` clean samples.
        key: randomness for timesteps, noise and label dropout.
        abar: ``[num_timesteps]`` alphas_cumprod.
        objective: ``"epsilon"``, ``"x0"`` or ``"v"``.
        labels: ``[batch]`` int class ids, or None for an unconditional model.
        num_classes: the null class id used for dropped / unknown labels.
        label_dropout: probability of training a sample unconditionally.
        mask: optional 0/1 weights broadcastable to ``x0``'s trailing shape (e.g. padding = 0);
            the loss is averaged over the masked entries only.

    Returns:
        ``(loss, metrics)``: scalar float32 loss and ``{"x0_mse": ...}`` (MSE of the implied x0).
    """
    x0 = jnp.asarray(x0, jnp.float32)
    batch = x0.shape[0]
    time_key, noise_key, label_key = jax.random.split(key, 3)
    timesteps = jax.random.randint(time_key, (batch,), 0, abar.shape[0], dtype=jnp.int32)
    noise = jax.random.normal(noise_key, x0.shape, jnp.float32)
    x_t = add_noise(abar, x0, noise, timesteps)
    if labels is not None:
        labels = drop_labels(labels, label_key, num_classes, label_dropout)
    output = jnp.asarray(denoise(x_t, timesteps, labels), jnp.float32)
    target = training_target(objective, abar, x0, noise, timesteps)
    x0_estimate, _ = predict_x0_and_noise(objective, abar, output, x_t, timesteps)
    weights = jnp.ones(x0.shape[1:], jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
    weights = jnp.broadcast_to(weights, x0.shape)
    total = jnp.maximum(jnp.sum(weights), 1.0)
    loss = jnp.sum(weights * jnp.square(output - target)) / total
    x0_mse = jnp.sum(weights * jnp.square(jax.lax.stop_gradient(x0_estimate) - x0)) / total
    return loss, {"x0_mse": x0_mse}


# ------------------------------------------------------------------------------------------- sampling


def sampling_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
    """The model timesteps a sampler visits, descending: ``[k]`` int32, ``k <= num_steps``, from
    ``num_timesteps - 1`` to 0 evenly spaced (``num_steps >= num_timesteps`` visits every one)."""
    if num_steps < 1:
        raise ValueError(f"number of sampling steps must be >= 1, got {num_steps}")
    steps = np.round(np.linspace(0, num_timesteps - 1, min(num_steps, num_timesteps))).astype(np.int64)
    return np.unique(steps)[::-1].astype(np.int32)


def guided(denoise: Denoiser, guidance_scale: float, null_class: int) -> Denoiser:
    """A denoiser applying classifier-free guidance: ``uncond + scale * (cond - uncond)``.

    With ``labels=None`` or ``guidance_scale == 1`` it is ``denoise`` itself (one model call);
    otherwise the conditional and null-class inputs go through the model as one batch.
    """
    if guidance_scale == 1.0:
        return denoise

    def guided_denoise(x_t, timesteps, labels):
        if labels is None:
            return denoise(x_t, timesteps, None)
        batch = x_t.shape[0]
        both = denoise(
            jnp.concatenate([x_t, x_t]),
            jnp.concatenate([timesteps, timesteps]),
            jnp.concatenate([jnp.asarray(labels, jnp.int32), jnp.full((batch,), null_class, jnp.int32)]),
        )
        conditional, unconditional = both[:batch], both[batch:]
        return unconditional + jnp.float32(guidance_scale) * (conditional - unconditional)

    return guided_denoise


def sample(
    denoise: Denoiser,
    key: jax.Array,
    shape: tuple[int, ...],
    abar: jax.Array,
    objective: str,
    sampler: str = "ddim",
    num_steps: int | None = None,
    eta: float = 0.0,
    labels: jax.Array | None = None,
    guidance_scale: float = 1.0,
    null_class: int = 0,
    clip_x0: float | None = None,
) -> jax.Array:
    """Draws samples ``[*shape]`` (``shape[0]`` = batch) from pure noise.

    Args:
        denoise: the model.
        key: randomness for the initial noise and the per-step noise.
        shape: ``(batch, ...)`` of the samples.
        abar: ``[num_timesteps]`` alphas_cumprod the model was trained with.
        objective: what the model predicts.
        sampler: ``"ddpm"``: ancestral sampling from the posterior ``q(x_s | x_t, x0)`` (with
            ``num_steps < num_timesteps`` the respaced chain of Nichol & Dhariwal); ``"ddim"``:
            Song et al.'s update with noise ``eta`` (0: deterministic, 1: the DDPM posterior noise).
        num_steps: timesteps visited (default: all ``num_timesteps``).
        eta: DDIM stochasticity (ignored by ``"ddpm"``).
        labels: ``[batch]`` class ids for a conditional model, or None.
        guidance_scale: classifier-free guidance scale (1: none).
        null_class: the null class id (``num_classes``).
        clip_x0: clip the x0 estimate to ``[-clip_x0, clip_x0]`` at every step (None: no clipping), and
            recompute eps from it. Useful with ``"epsilon"``: where ``abar`` is near zero (the first steps;
            the cosine schedule's last beta is clipped to 0.999, so ``abar[-1]`` is ~1e-3 of ``abar[-2]``)
            the x0 estimate amplifies model error by ``1 / sqrt(abar)``, which deterministic DDIM keeps.
            ``"v"`` and ``"x0"`` do not have this problem.

    Returns:
        ``[*shape]`` float32 samples (the final x0 estimate).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    num_timesteps = int(abar.shape[0])
    steps = sampling_timesteps(num_timesteps, num_steps or num_timesteps)
    previous = np.concatenate([steps[1:], np.array([-1], np.int32)])
    abar = jnp.asarray(abar, jnp.float32)
    model = guided(denoise, guidance_scale, null_class)
    batch = shape[0]
    labels = None if labels is None else jnp.asarray(labels, jnp.int32)
    start_key, step_key = jax.random.split(key)
    x_start = jax.random.normal(start_key, shape, jnp.float32)

    def step(x_t, inputs):
        timestep, previous_step, noise_key = inputs
        timesteps = jnp.full((batch,), timestep, jnp.int32)
        output = jnp.asarray(model(x_t, timesteps, labels), jnp.float32)
        x0, eps = predict_x0_and_noise(objective, abar, output, x_t, timesteps)
        a_t = abar[timestep]
        if clip_x0 is not None:
            x0 = jnp.clip(x0, -clip_x0, clip_x0)
            eps = (x_t - jnp.sqrt(a_t) * x0) / jnp.sqrt(1.0 - a_t)
        a_s = jnp.where(previous_step >= 0, abar[jnp.maximum(previous_step, 0)], jnp.float32(1.0))
        # Posterior variance of the (respaced) chain: beta_tilde = (1 - a_s) / (1 - a_t) * (1 - a_t / a_s).
        posterior_variance = (1.0 - a_s) / (1.0 - a_t) * (1.0 - a_t / a_s)
        noise = jax.random.normal(noise_key, x_t.shape, jnp.float32)
        if sampler == "ddpm":
            beta = 1.0 - a_t / a_s
            mean = (jnp.sqrt(a_s) * beta / (1.0 - a_t)) * x0 + (jnp.sqrt(1.0 - beta) * (1.0 - a_s) / (1.0 - a_t)) * x_t
            x_s = mean + jnp.sqrt(jnp.maximum(posterior_variance, 0.0)) * noise
        else:
            sigma = jnp.float32(eta) * jnp.sqrt(jnp.maximum(posterior_variance, 0.0))
            direction = jnp.sqrt(jnp.maximum(1.0 - a_s - jnp.square(sigma), 0.0)) * eps
            x_s = jnp.sqrt(a_s) * x0 + direction + sigma * noise
        return x_s, None

    noise_keys = jax.random.split(step_key, len(steps))
    x_final, _ = jax.lax.scan(step, x_start, (jnp.asarray(steps), jnp.asarray(previous), noise_keys))
    return x_final
