"""A small image classifier whose penultimate layer is the feature space of the image metrics.

``hypernets.evaluate`` trains it on the renders of the reference fields and their labels (a fixed
number of seeded steps, so the same reference gives the same network), then uses its features for
the Fréchet distance and precision/recall, and its predictions for the class-conditional accuracy
of labelled samples. Its parameters are cached (``params.msgpack`` + ``classifier.json``) and reused
while the reference renders, labels and config are the same.

Architecture: convolutions ``3x3`` (the first with stride 1, the others stride 2, ReLU), global
average pooling, a ``feature_dim`` dense layer with ReLU (the features), and a linear class layer.
Pixels are mapped from [0, 1] to [-1, 1]. Training: AdamW, batches drawn uniformly with
replacement on device (``fold_in(seed key, step)``), softmax cross-entropy.

When the reference has no labels (or one class only), ``fallback_features`` gives a fixed Gaussian
random projection of the raw pixels (or the raw pixels themselves when they are few).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fields.cli import UserError
from fields.config import ConfigError, config_from_dict, config_to_dict
from fields.files import write_atomic
from fields.training import optimizer_step

PARAMS_FILE = "params.msgpack"
INFO_FILE = "classifier.json"
APPLY_CHUNK = 256
RANDOM_PROJECTION_DIM = 64


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """The feature network and how it is trained.

    Attributes:
        channels: output channels of the ``3x3`` convolutions (the first has stride 1, the others 2).
        feature_dim: width of the feature layer (the features used by the metrics).
        steps: training steps (fixed, so training is reproducible).
        batch_size: images per step, drawn uniformly with replacement.
        learning_rate, weight_decay: AdamW settings (constant learning rate).
        seed: parameter initialisation and batch sampling seed.
    """

    channels: tuple[int, ...] = (32, 64, 128)
    feature_dim: int = 128
    steps: int = 1500
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0

    def __post_init__(self):
        if not self.channels or any(channel <= 0 for channel in self.channels):
            raise ValueError(f"channels must be a non-empty list of positive counts, got {self.channels}")
        if self.feature_dim <= 0:
            raise ValueError(f"feature_dim must be > 0, got {self.feature_dim}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")


PRESETS: dict[str, ClassifierConfig] = {
    # Tests: a few seconds on 2 CPU cores; on 16x16 procedural primitives (384 images) it reaches
    # about 40% held-out accuracy (8 classes, chance 12.5%; tests/test_evaluate.py).
    "tiny": ClassifierConfig(channels=(16, 32, 32), feature_dim=32, steps=120, batch_size=32, learning_rate=5e-3),
    # Quick looks: about half a minute on CPU for 28x28 renders.
    #   python -m hypernets.evaluate --samples S --reference R --classifier-preset small
    "small": ClassifierConfig(channels=(16, 32, 64), feature_dim=64, steps=500),
    # Reported numbers: 1,500 steps, a minute or two on CPU for 28x28 renders; expected above 90%
    # accuracy on the renders of procedural primitives and Fashion-MNIST fields.
    #   python -m hypernets.evaluate --samples S --reference R --train T
    "default": ClassifierConfig(),
}


class ImageClassifier(nn.Module):
    """Images ``[batch, height, width, channels]`` in [0, 1] -> ``(logits [batch, num_classes],
    features [batch, feature_dim])``."""

    config: ClassifierConfig
    num_classes: int

    @nn.compact
    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        hidden = images.astype(jnp.float32) * jnp.float32(2.0) - jnp.float32(1.0)
        for layer, channels in enumerate(self.config.channels):
            stride = 1 if layer == 0 else 2
            hidden = nn.relu(nn.Conv(channels, (3, 3), strides=(stride, stride), padding="SAME",
                                     name=f"conv_{layer}")(hidden))
        pooled = jnp.mean(hidden, axis=(1, 2))
        features = nn.relu(nn.Dense(self.config.feature_dim, name="features")(pooled))
        logits = nn.Dense(self.num_classes, name="classes")(features)
        return logits, features


@dataclasses.dataclass
class TrainedClassifier:
    """A trained classifier: ``params``, its config, the class count and the image shape ``[h, w, c]``.

    ``train_accuracy`` is the accuracy on the images it was trained on; ``cached`` tells whether the
    params were read from the cache instead of trained.
    """

    params: dict
    config: ClassifierConfig
    num_classes: int
    image_shape: tuple[int, int, int]
    train_accuracy: float
    cached: bool = False

    def apply(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``images [N, h, w, c]`` -> ``(logits [N, num_classes], features [N, feature_dim])`` float32 numpy."""
        images = np.asarray(images, np.float32)
        if tuple(images.shape[1:]) != tuple(self.image_shape):
            raise ValueError(f"the classifier takes images of shape {self.image_shape}, got {images.shape[1:]}")
        function = _apply_function(self.config, self.num_classes)
        chunk = min(APPLY_CHUNK, max(len(images), 1))
        logits, features = [], []
        for start in range(0, len(images), chunk):
            block = images[start:start + chunk]
            padded = np.concatenate([block, np.zeros((chunk - len(block),) + block.shape[1:], np.float32)])
            block_logits, block_features = function(self.params, jnp.asarray(padded))
            logits.append(np.asarray(block_logits)[: len(block)])
            features.append(np.asarray(block_features)[: len(block)])
        if not logits:
            return (np.zeros((0, self.num_classes), np.float32), np.zeros((0, self.config.feature_dim), np.float32))
        return np.concatenate(logits), np.concatenate(features)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """``[N]`` int32 predicted classes."""
        logits, _ = self.apply(images)
        return np.argmax(logits, axis=1).astype(np.int32)

    def features(self, images: np.ndarray) -> np.ndarray:
        """``[N, feature_dim]`` float32 penultimate-layer features."""
        return self.apply(images)[1]


_APPLY_CACHE: dict = {}


def _apply_function(config: ClassifierConfig, num_classes: int):
    key = (config, num_classes)
    if key not in _APPLY_CACHE:
        model = ImageClassifier(config, num_classes)
        _APPLY_CACHE[key] = jax.jit(lambda params, images: model.apply({"params": params}, images))
    return _APPLY_CACHE[key]


def _init_params(config: ClassifierConfig, num_classes: int, image_shape: tuple[int, ...]) -> dict:
    model = ImageClassifier(config, num_classes)
    key = jax.random.PRNGKey(config.seed)
    return model.init(key, jnp.zeros((1,) + tuple(image_shape), jnp.float32))["params"]


def _check_training_data(images: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels, np.int32)
    if images.ndim != 4 or len(images) != len(labels) or not len(images):
        raise ValueError(f"need images [N, h, w, c] and labels [N] with N >= 1, got {images.shape} and {labels.shape}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    return images, labels


def train_classifier(images: np.ndarray, labels: np.ndarray, num_classes: int,
                     config: ClassifierConfig) -> TrainedClassifier:
    """Trains the classifier for ``config.steps`` steps (deterministic given ``config.seed``).

    Args:
        images: ``[N, h, w, c]`` floats in [0, 1].
        labels: ``[N]`` ints in ``[0, num_classes)``.
        num_classes: size of the output layer.
        config: architecture and training settings.
    """
    images, labels = _check_training_data(images, labels, num_classes)
    model = ImageClassifier(config, num_classes)
    params = _init_params(config, num_classes, images.shape[1:])
    optimizer = optax.adamw(config.learning_rate, weight_decay=config.weight_decay)
    opt_state = optimizer.init(params)
    device_images, device_labels = jnp.asarray(images), jnp.asarray(labels)
    sample_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1)

    def loss_fn(params, batch_images, batch_labels):
        logits, _ = model.apply({"params": params}, batch_images)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch_labels))

    # One jitted step driven from Python: XLA's CPU convolutions inside a fori_loop body ran ~28x
    # slower (1.3 s vs 47 ms per step for the default preset on 2 cores).
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(params, opt_state, step):
        indices = jax.random.randint(jax.random.fold_in(sample_key, step), (config.batch_size,), 0,
                                     device_images.shape[0])
        grads = jax.grad(loss_fn)(params, device_images[indices], device_labels[indices])
        return optimizer_step(optimizer, grads, opt_state, params)

    for step in range(config.steps):
        params, opt_state = train_step(params, opt_state, jnp.int32(step))
    params = jax.tree_util.tree_map(np.asarray, params)
    trained = TrainedClassifier(params, config, num_classes, tuple(int(d) for d in images.shape[1:]), 0.0)
    trained.train_accuracy = float(np.mean(trained.predict(images) == labels))
    return trained


def fingerprint(images: np.ndarray, labels: np.ndarray) -> str:
    """A hash of the training data (images quantised to 8 bits, labels), to validate a cached classifier."""
    digest = hashlib.sha256()
    images = np.asarray(images, np.float32)
    digest.update(repr(images.shape).encode())
    digest.update(np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8).tobytes())
    digest.update(np.asarray(labels, np.int32).tobytes())
    return digest.hexdigest()


def load_or_train(directory: str, images: np.ndarray, labels: np.ndarray, num_classes: int,
                  config: ClassifierConfig) -> TrainedClassifier:
    """The classifier cached in ``directory`` if it was trained on the same data with the same config;
    otherwise trains one and caches it there (``params.msgpack``, ``classifier.json``)."""
    from flax import serialization

    images, labels = _check_training_data(images, labels, num_classes)
    info = {"config": config_to_dict(config), "num_classes": int(num_classes),
            "image_shape": [int(d) for d in images.shape[1:]], "fingerprint": fingerprint(images, labels)}
    params_path, info_path = os.path.join(directory, PARAMS_FILE), os.path.join(directory, INFO_FILE)
    cached = _read_info(info_path)
    if cached is not None and {key: cached.get(key) for key in info} == info and os.path.exists(params_path):
        template = _init_params(config, num_classes, images.shape[1:])
        try:
            with open(params_path, "rb") as handle:
                params = serialization.from_bytes(template, handle.read())
        except Exception as error:  # noqa: BLE001 - a truncated or foreign file: train again
            raise UserError(f"{params_path}: unreadable cached classifier ({error}); delete it to retrain") from None
        params = jax.tree_util.tree_map(np.asarray, params)
        return TrainedClassifier(params, config, num_classes, tuple(info["image_shape"]),
                                 float(cached.get("train_accuracy", float("nan"))), cached=True)
    trained = train_classifier(images, labels, num_classes, config)
    os.makedirs(directory, exist_ok=True)
    write_atomic(params_path, serialization.to_bytes(trained.params))
    write_atomic(info_path, json.dumps({**info, "train_accuracy": trained.train_accuracy}, indent=2))
    return trained


def _read_info(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    try:
        with open(path) as handle:
            info = json.load(handle)
        config_from_dict(ClassifierConfig, info.get("config"), path)
    except (OSError, json.JSONDecodeError, ConfigError, AttributeError):
        return None
    return info if isinstance(info, dict) else None


def fallback_features(images: np.ndarray, dim: int = RANDOM_PROJECTION_DIM, seed: int = 0) -> tuple[np.ndarray, str]:
    """Features without a classifier: raw pixels if there are at most ``dim`` values per image,
    else a fixed Gaussian random projection to ``dim`` values (``N(0, 1/dim)`` entries, seeded).

    Args:
        images: ``[N, h, w, c]`` in [0, 1].

    Returns:
        ``(features [N, min(dim, D)] float32, description)``.
    """
    flat = np.asarray(images, np.float32).reshape(len(images), -1)
    if flat.shape[1] <= dim:
        return flat, f"raw pixels ({flat.shape[1]} values)"
    projection = np.random.default_rng(seed).normal(0.0, 1.0 / np.sqrt(dim), (flat.shape[1], dim)).astype(np.float32)
    return flat @ projection, f"fixed Gaussian random projection of the pixels to {dim} dimensions (seed {seed})"
