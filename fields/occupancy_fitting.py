"""Fit an occupancy MLP field (HyperDiffusion style) to one mesh; extract meshes; the presets.

Labelled points are sampled once on the host (:mod:`fields.data.mesh_sampling`: near- and
far-surface points plus uniform ones, labelled by winding number) and moved to the device. Each
call of the compiled ``train_chunk`` runs a ``fori_loop`` of steps that draw a minibatch
uniformly (with replacement) from those points on device, and take an Adam step on the binary
cross-entropy of the logits. The key of step ``s`` is ``fold_in(seed_key, s)``, so results do not
depend on how steps are split into chunks.

Metrics are measured on a held-out labelled set (another sampling stream, half near-surface, half
uniform): IoU and accuracy of ``logit > 0`` over all of it, and over its uniform part alone
(``iou_uniform``: the volumetric IoU estimate used by occupancy-network papers).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from fields.cli import UserError
from fields.config import ConfigError, config_from_dict, config_to_dict
from fields.data.mesh_sampling import (
    BOX,
    LabelledPoints,
    SamplingConfig,
    boundary_edges,
    mesh_volume,
    sample_labelled_points,
)
from fields.data.meshes import Mesh
from fields.models.occupancy_mlp import OccupancyFieldConfig, OccupancyMLP, init_params, param_shapes
from fields.training import (
    FieldSharding,
    TrainingConfig,
    make_optimizer,
    optimizer_step,
    run_batched_chunks,
    split_seed_keys,
)
from fields.weights import load_field, save_field

FIELD_KIND = "occupancy"
EVAL_CHUNK = 1 << 15
MESH_COLOUR = (0.7, 0.7, 0.7)


@dataclasses.dataclass(frozen=True)
class OccupancyFitConfig(TrainingConfig):
    """How to fit an occupancy field to a mesh (besides ``TrainingConfig``'s optimisation settings).

    Attributes:
        field: the MLP's architecture.
        sampling: the labelled training points (sampled once).
        eval_sampling: the held-out labelled points for the metrics.
        batch_size: points per step, drawn uniformly with replacement from the training points.
        mesh_resolution: marching-cubes grid resolution for the saved mesh.
    """

    field: OccupancyFieldConfig = dataclasses.field(default_factory=OccupancyFieldConfig)
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)
    eval_sampling: SamplingConfig = dataclasses.field(
        default_factory=lambda: SamplingConfig(num_points=20_000, near_fraction=0.25, far_fraction=0.25)
    )
    batch_size: int = 1 << 12
    learning_rate: float = 2e-3
    final_learning_rate_fraction: float = 0.05
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    log_every: int = 100
    mesh_resolution: int = 128

    def __post_init__(self):
        super().__post_init__()
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {self.batch_size}")
        if self.mesh_resolution < 8:
            raise ValueError(f"mesh_resolution must be >= 8, got {self.mesh_resolution}")


PRESETS: dict[str, OccupancyFitConfig] = {
    # Test-sized: a small MLP (about 1.4k params) on 20k points, a few seconds on 2 CPU cores.
    "tiny": OccupancyFitConfig(
        field=OccupancyFieldConfig(num_frequencies=2, hidden_width=32, num_hidden_layers=2),
        sampling=SamplingConfig(num_points=20_000),
        eval_sampling=SamplingConfig(num_points=10_000, near_fraction=0.25, far_fraction=0.25),
        steps=500,
        batch_size=1024,
        learning_rate=1e-2,
        log_every=50,
        mesh_resolution=48,
    ),
    # CPU-sized datasets of shapes (scripts/bench_hypernets.py's pybullet_data part): 3 x 64 hidden
    # (about 10k params) on 50k points, 800 steps; IoU 0.95-0.96 on pybullet_data's random meshes.
    #   python -m fields.encode_dataset --source meshes:DIR --preset small --out data/fields/shapes
    "small": OccupancyFitConfig(
        field=OccupancyFieldConfig(num_frequencies=4, hidden_width=64, num_hidden_layers=3),
        sampling=SamplingConfig(num_points=50_000),
        eval_sampling=SamplingConfig(num_points=10_000, near_fraction=0.25, far_fraction=0.25),
        steps=800,
        batch_size=2048,
        learning_rate=5e-3,
    ),
    # HyperDiffusion's architecture (4 frequencies, 3 x 128, 36,737 params) on 100k points.
    #   python -m fields.occupancy --mesh procedural:torus --workdir runs/occupancy_torus
    "default": OccupancyFitConfig(),
}


@dataclasses.dataclass
class OccupancyFitResult:
    """What ``fit_occupancy`` returns: final params (numpy), the field config, metrics and the
    mean training loss of each chunk (keyed by the step that ends it)."""

    params: dict
    field_config: OccupancyFieldConfig
    metrics: dict
    loss_history: dict[int, float]


def bce_with_logits(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean binary cross-entropy of ``sigmoid(logits)`` against labels in {0, 1}."""
    return jnp.mean(jax.nn.softplus(logits) - labels * logits)


def make_train_chunk(model: OccupancyMLP, optimizer: optax.GradientTransformation, batch_size: int):
    """Returns ``train_chunk(params, opt_state, points, labels, key, first_step, num_steps)`` ->
    ``(params, opt_state, mean_loss)``: ``num_steps`` steps on device, minibatches drawn from
    ``points [N, 3]`` / ``labels [N]`` with ``fold_in(key, step)``."""

    def loss_fn(params, points, labels):
        return bce_with_logits(model.apply({"params": params}, points), labels)

    def train_chunk(params, opt_state, points, labels, key, first_step, num_steps):
        def body(offset, state):
            params, opt_state, loss_sum = state
            step_key = jax.random.fold_in(key, first_step + offset)
            indices = jax.random.randint(step_key, (batch_size,), 0, points.shape[0])
            loss, grads = jax.value_and_grad(loss_fn)(
                params, jnp.take(points, indices, axis=0), jnp.take(labels, indices, axis=0)
            )
            params, opt_state = optimizer_step(optimizer, grads, opt_state, params)
            return params, opt_state, loss_sum + loss

        params, opt_state, loss_sum = jax.lax.fori_loop(0, num_steps, body, (params, opt_state, jnp.float32(0.0)))
        return params, opt_state, loss_sum / num_steps.astype(jnp.float32)

    return jax.jit(train_chunk, donate_argnums=(0, 1))


@functools.lru_cache(maxsize=8)
def make_logits_fn(field_config: OccupancyFieldConfig) -> Callable[[dict, np.ndarray], np.ndarray]:
    """Returns ``logits(params, points [n, 3]) -> [n]`` numpy, evaluated in fixed-size jitted chunks
    (cached per config, so evaluating many fields of one architecture compiles once)."""
    model = OccupancyMLP(field_config)

    @jax.jit
    def apply_chunk(params, points):
        return model.apply({"params": params}, points)

    def logits(params, points: np.ndarray) -> np.ndarray:
        points = np.asarray(points, dtype=np.float32).reshape(-1, 3)
        total = len(points)
        outputs = []
        for start in range(0, total, EVAL_CHUNK):
            chunk = points[start:start + EVAL_CHUNK]
            if len(chunk) < EVAL_CHUNK:  # pad the last chunk to keep one compiled shape
                chunk = np.concatenate([chunk, np.zeros((EVAL_CHUNK - len(chunk), 3), np.float32)])
            outputs.append(apply_chunk(params, jnp.asarray(chunk)))
        if not outputs:
            return np.zeros(0, np.float32)
        return np.concatenate([np.asarray(chunk) for chunk in outputs])[:total]

    return logits


def classification_metrics(predicted: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """IoU of the inside sets and accuracy, for boolean predictions and labels."""
    predicted, labels = np.asarray(predicted, bool), np.asarray(labels) > 0.5
    union = np.count_nonzero(predicted | labels)
    intersection = np.count_nonzero(predicted & labels)
    return {
        "iou": float(intersection / union) if union else 1.0,
        "accuracy": float(np.mean(predicted == labels)) if len(labels) else 1.0,
    }


def evaluate(params, field_config: OccupancyFieldConfig, held_out: LabelledPoints) -> dict[str, float]:
    """IoU and accuracy on a held-out labelled set, overall and on its uniform part."""
    predicted = make_logits_fn(field_config)(params, held_out.points) > 0.0
    overall = classification_metrics(predicted, held_out.labels)
    uniform = classification_metrics(predicted[held_out.uniform], held_out.labels[held_out.uniform])
    return {**overall, "iou_uniform": uniform["iou"], "accuracy_uniform": uniform["accuracy"]}


def _check_in_box(mesh: Mesh) -> None:
    reach = float(np.abs(mesh.vertices).max()) if len(mesh.vertices) else 0.0
    if reach > BOX:
        raise ValueError(f"the mesh reaches {reach:.3g} > {BOX}; normalise it into the box first "
                         "(fields.data.meshes.normalize_mesh)")


def fit_occupancy(mesh: Mesh, config: OccupancyFitConfig, progress: bool = True) -> OccupancyFitResult:
    """Fits an occupancy MLP to ``mesh`` (inside ``[-1, 1]^3``, e.g. via ``mesh_sampling.mesh_from_spec``)."""
    _check_in_box(mesh)
    sample_start = time.perf_counter()
    train = sample_labelled_points(mesh, config.sampling, seed=config.seed, stream=0)
    held_out = sample_labelled_points(mesh, config.eval_sampling, seed=config.seed, stream=1)
    sample_seconds = time.perf_counter() - sample_start

    model = OccupancyMLP(config.field)
    optimizer = make_optimizer(config)
    init_key, sample_key = jax.random.split(jax.random.PRNGKey(config.seed))
    params = init_params(config.field, init_key)
    opt_state = optimizer.init(params)
    points = jnp.asarray(train.points)
    labels = jnp.asarray(train.labels)

    train_chunk = make_train_chunk(model, optimizer, config.batch_size)
    compile_start = time.perf_counter()
    compiled = train_chunk.lower(params, opt_state, points, labels, sample_key, jnp.int32(0), jnp.int32(1)).compile()
    compile_seconds = time.perf_counter() - compile_start

    loss_history: dict[int, float] = {}
    train_seconds = 0.0
    step = 0
    bar = tqdm(total=config.steps, desc="fit", unit="step", disable=not progress, dynamic_ncols=True)
    while step < config.steps:
        num_steps = min(config.log_every, config.steps - step)
        start = time.perf_counter()
        params, opt_state, loss = compiled(params, opt_state, points, labels, sample_key, jnp.int32(step),
                                           jnp.int32(num_steps))
        loss = float(loss)  # the one host read per chunk (also a barrier for timing)
        train_seconds += time.perf_counter() - start
        if not math.isfinite(loss):
            bar.close()
            raise FloatingPointError(f"loss became {loss} at step {step + num_steps}")
        step += num_steps
        loss_history[step] = loss
        bar.update(num_steps)
        bar.set_postfix(loss=f"{loss:.3e}")
    bar.close()

    params = jax.tree_util.tree_map(np.asarray, params)
    result_metrics = {
        **evaluate(params, config.field, held_out),
        "final_loss": loss_history[config.steps],
        "steps": config.steps,
        "train_seconds": train_seconds,
        "compile_seconds": compile_seconds,
        "sample_seconds": sample_seconds,
        "ms_per_step": 1000.0 * train_seconds / config.steps,
        "num_params": int(sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(params))),
        "num_train_points": len(train.points),
        "inside_fraction_train": float(train.labels.mean()),
        "mesh_faces": len(mesh.faces),
        "mesh_boundary_edges": boundary_edges(mesh.vertices, mesh.faces),
        "mesh_volume": mesh_volume(mesh.vertices, mesh.faces),
    }
    return OccupancyFitResult(params, config.field, result_metrics, loss_history)


@dataclasses.dataclass
class OccupancyBatchResult:
    """What ``fit_occupancy_batch`` returns: params with a leading field axis (numpy), metric arrays
    ``{"iou", "accuracy", "iou_uniform", "accuracy_uniform", "final_loss"}`` of shape ``[N]``."""

    params: dict
    field_config: OccupancyFieldConfig
    metrics: dict[str, np.ndarray]
    train_seconds: float
    compile_seconds: float


@functools.lru_cache(maxsize=8)
def _compiled_batch_functions(config: OccupancyFitConfig, num_fields: int, num_points: int, sharding: FieldSharding):
    """``(init(keys [N, 2]) -> (params, opt_state), compiled train chunk)`` for ``num_fields`` fields
    (a multiple of ``sharding``'s device count), cached so that successive batches of one shape
    (``fields.encode_dataset``) compile once."""
    optimizer = make_optimizer(config)

    @jax.jit
    def init(init_keys):
        params = jax.vmap(lambda key: init_params(config.field, key))(init_keys)
        return params, jax.vmap(optimizer.init)(params)

    params, opt_state = jax.eval_shape(init, jax.ShapeDtypeStruct((num_fields, 2), jnp.uint32))
    points = jax.ShapeDtypeStruct((num_fields, num_points, 3), jnp.float32)
    labels = jax.ShapeDtypeStruct((num_fields, num_points), jnp.float32)
    keys = jax.ShapeDtypeStruct((num_fields, 2), jnp.uint32)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    single = make_train_chunk(OccupancyMLP(config.field), optimizer, config.batch_size)
    batched = jax.vmap(single, in_axes=(0, 0, 0, 0, 0, None, None))
    return init, sharding.compile(batched, (params, opt_state, points, labels, keys, scalar, scalar), num_batched=5,
                                  donate_argnums=(0, 1))


def fit_occupancy_batch(meshes, config: OccupancyFitConfig, seeds, init_seeds=None,
                        num_devices: int = 0) -> OccupancyBatchResult:
    """Fits one occupancy field per mesh, all at once: the single-field chunk under ``jax.vmap``.

    Field ``i`` samples its points and initialises exactly as ``fit_occupancy(meshes[i],
    replace(config, seed=seeds[i]))`` would, so batched and one-at-a-time fits agree up to float
    rounding. ``init_seeds`` (``[N]``, optional) seed the initial weights instead (see
    ``fields.training.split_seed_keys``). The fields are split over ``num_devices`` local devices
    (0: all; see ``fields.training.FieldSharding``).

    Raises:
        ValueError: a mesh outside the box, or a seed count that does not match.
        FloatingPointError: a field's loss became non-finite (its index is named).
    """
    init_keys, sample_keys = split_seed_keys(seeds, init_seeds, len(meshes), "mesh")
    for mesh in meshes:
        _check_in_box(mesh)
    pairs = list(zip(meshes, seeds, strict=True))
    train = [sample_labelled_points(mesh, config.sampling, seed=int(seed), stream=0) for mesh, seed in pairs]
    held_out = [sample_labelled_points(mesh, config.eval_sampling, seed=int(seed), stream=1) for mesh, seed in pairs]
    num_fields = len(meshes)
    sharding = FieldSharding.over(num_devices)
    points = np.stack([item.points for item in train])
    labels = np.stack([item.labels for item in train])
    points, labels, init_keys, sample_keys = sharding.place(
        sharding.pad((points, labels, init_keys, sample_keys), num_fields))

    compile_start = time.perf_counter()
    init, compiled = _compiled_batch_functions(config, sharding.padded(num_fields), int(points.shape[1]), sharding)
    params, opt_state = sharding.place(init(init_keys))
    compile_seconds = time.perf_counter() - compile_start

    (params, opt_state), losses, train_seconds = run_batched_chunks(
        lambda params, opt_state, first, count: compiled(params, opt_state, points, labels, sample_keys, first, count),
        (params, opt_state), config.steps, config.log_every, num_fields=num_fields)
    params = jax.tree_util.tree_map(lambda leaf: np.asarray(leaf)[:num_fields], params)
    per_field = [evaluate(jax.tree_util.tree_map(lambda leaf, i=i: leaf[i], params), config.field, held_out[i])
                 for i in range(len(meshes))]
    metrics = {name: np.asarray([m[name] for m in per_field], np.float32) for name in per_field[0]}
    metrics["final_loss"] = losses
    return OccupancyBatchResult(params, config.field, metrics, train_seconds, compile_seconds)


def occupancy_grid(params, field_config: OccupancyFieldConfig, resolution: int) -> np.ndarray:
    """Logits ``[r, r, r]`` on the lattice ``linspace(-BOX, BOX, r)`` per axis, indexed ``[x, y, z]``."""
    axis = np.linspace(-BOX, BOX, resolution, dtype=np.float32)
    grid = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1).reshape(-1, 3)
    return make_logits_fn(field_config)(params, grid).reshape(resolution, resolution, resolution)


def extract_mesh(params, config: OccupancyFieldConfig | OccupancyFitConfig, resolution: int = 128,
                 level: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Marching cubes of the ``logit = level`` surface on a ``resolution^3`` lattice over the box.

    The grid is padded with an outside border, so the mesh is closed even where the field is
    inside at the box's faces. Triangles face outward.

    Returns:
        ``(vertices [V, 3] float32, faces [F, 3] int32)``; both empty when nothing is inside.
    """
    from skimage.measure import marching_cubes

    field_config = config.field if isinstance(config, OccupancyFitConfig) else config
    logits = occupancy_grid(params, field_config, resolution)
    outside = min(float(logits.min()), level) - 1.0
    padded = np.pad(logits, 1, constant_values=outside)
    if not padded.max() > level:
        return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int32)
    spacing = 2.0 * BOX / (resolution - 1)
    vertices, faces, _, _ = marching_cubes(padded, level=level, spacing=(spacing, spacing, spacing))
    vertices = vertices - (BOX + spacing)  # padded index 0 lies one cell outside -BOX
    faces = faces.astype(np.int32)
    if mesh_volume(vertices, faces) < 0:
        faces = faces[:, ::-1]
    return vertices.astype(np.float32), np.ascontiguousarray(faces, dtype=np.int32)


def run_config_dict(config: OccupancyFitConfig, source: str) -> dict:
    """The resolved run configuration saved as ``config.json``."""
    return {"mesh": source, "fit": config_to_dict(config)}


def save_occupancy_fit(workdir: str, result: OccupancyFitResult, config: OccupancyFitConfig, source: str,
                       resolution: int | None = None) -> dict[str, str]:
    """Writes ``field.safetensors``, ``mesh.ply`` (marching cubes), ``metrics.json`` and ``config.json``.

    The extracted mesh's volume, size and boundary edges are added to ``result.metrics``.
    """
    from fields.nerf_fitting import write_ply

    names = ("field.safetensors", "mesh.ply", "metrics.json", "config.json")
    paths = {name: os.path.join(workdir, name) for name in names}
    save_field(paths["field.safetensors"], result.params, FIELD_KIND, config_to_dict(result.field_config),
               source=source, box=BOX)
    resolution = resolution or config.mesh_resolution
    vertices, faces = extract_mesh(result.params, result.field_config, resolution)
    write_ply(paths["mesh.ply"], vertices, faces, np.broadcast_to(np.asarray(MESH_COLOUR, np.float32),
                                                                   vertices.shape))
    result.metrics.update({
        "extracted_volume": mesh_volume(vertices, faces),
        "extracted_vertices": len(vertices),
        "extracted_faces": len(faces),
        "extracted_boundary_edges": boundary_edges(vertices, faces),
        "mesh_resolution": resolution,
    })
    with open(paths["metrics.json"], "w") as handle:
        json.dump(result.metrics, handle, indent=2)
    with open(paths["config.json"], "w") as handle:
        json.dump(run_config_dict(config, source), handle, indent=2, sort_keys=True)
    return paths


def load_occupancy_field(path: str) -> tuple[dict, OccupancyFieldConfig]:
    """Reads a ``field.safetensors`` written by ``save_occupancy_fit``: ``(params, field_config)``.

    Raises:
        UserError: not an occupancy field file, or weights that do not fit the stored config.
    """
    params, field_dict, _ = load_field(path, kind=FIELD_KIND)
    try:
        field_config = config_from_dict(OccupancyFieldConfig, field_dict, f"{path}: field_config")
    except ConfigError as error:
        raise UserError(str(error)) from None
    found = jax.tree_util.tree_map(np.shape, params)
    expected = param_shapes(field_config)
    if found != expected:
        raise UserError(f"{path}: weights do not fit the stored field config ({found} vs {expected})")
    return params, field_config
