"""Fit an Instant-NGP NeRF to a multi-view scene; render views; the presets.

One training step (all on device, ``fori_loop`` over a chunk of steps):
  1. draw ``num_rays`` pixels uniformly (with replacement) over all training images;
  2. march the rays through the occupancy grid and pack the occupied samples into the fixed sample
     budget (rays that do not fit completely are left out of the loss);
  3. evaluate the field on the packed samples, composite front to back over a random background
     colour per ray (RGBA data), mean squared error against the target composited on the same
     colour; Adam;
  4. every ``occupancy.update_every`` steps, update the occupancy grid's EMA and bitfield.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fields.models.hash_grid import BACKENDS, HashGridConfig
from fields.models.nerf import NeRFField, NeRFFieldConfig
from fields.rendering import occupancy_grid, volume
from fields.rendering.occupancy_grid import OccupancyGridConfig
from fields.training import FieldSharding, TrainingConfig, make_optimizer, optimizer_step, run_batched_chunks


@dataclasses.dataclass(frozen=True)
class NeRFFitConfig(TrainingConfig):
    """How to fit a NeRF (besides ``TrainingConfig``'s optimisation settings).

    Attributes:
        field: the field architecture.
        occupancy: the occupancy grid.
        scene_bound: half-size of the scene box ``[-b, b]^3`` (Blender scenes fit in 1.5).
        steps_per_diagonal: marching step = box diagonal / this (Instant-NGP: 1024).
        num_rays: rays per step.
        max_samples: sample budget per step.
        random_background: composite RGBA targets over random colours while training.
        pixel_jitter: cast each training ray through a random point of its pixel (else the centre).
            Off by default: with centre-ray evaluation against anti-aliased images it measured
            1-2 dB worse (BENCHMARKS.md, NeRF run C).
        backend: ``auto`` (compiled kernels when installed), ``kernel`` or ``jax``.
    """

    field: NeRFFieldConfig = dataclasses.field(default_factory=NeRFFieldConfig)
    occupancy: OccupancyGridConfig = dataclasses.field(default_factory=OccupancyGridConfig)
    scene_bound: float = 1.5
    steps_per_diagonal: int = 1024
    num_rays: int = 4096
    max_samples: int = 1 << 18
    random_background: bool = True
    pixel_jitter: bool = False
    backend: str = "auto"
    log_every: int = 16

    def __post_init__(self):
        super().__post_init__()
        for name in ("num_rays", "max_samples", "steps_per_diagonal"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not self.scene_bound > 0:
            raise ValueError(f"scene_bound must be > 0, got {self.scene_bound}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")

    @property
    def aabb(self) -> np.ndarray:
        return np.asarray([[-self.scene_bound] * 3, [self.scene_bound] * 3], np.float32)

    @property
    def step_size(self) -> float:
        return 2.0 * self.scene_bound * math.sqrt(3.0) / self.steps_per_diagonal


def _nerf_preset(levels, log2_table, max_res, width, grid_res, steps_per_diag, steps, rays, samples_log2):
    grid = HashGridConfig(num_dims=3, num_levels=levels, features_per_level=2, log2_table_size=log2_table,
                          min_resolution=16, max_resolution=max_res)
    field = NeRFFieldConfig(grid=grid, density_hidden_width=width, color_hidden_width=width)
    # The cosine schedule ends at 1% of the peak: +0.08 dB at 10 minutes over 10% (BENCHMARKS.md, runs B/D).
    return NeRFFitConfig(field=field, occupancy=OccupancyGridConfig(resolution=grid_res),
                         steps_per_diagonal=steps_per_diag, steps=steps, num_rays=rays,
                         max_samples=1 << samples_log2, final_learning_rate_fraction=0.01)


PRESETS: dict[str, NeRFFitConfig] = {
    # Test-sized: 16^3 occupancy grid, a few hundred rays.
    "tiny": _nerf_preset(levels=4, log2_table=12, max_res=64, width=16, grid_res=16, steps_per_diag=128,
                         steps=50, rays=256, samples_log2=13),
    # CPU-sized Instant-NGP for 128^2 procedural scenes, with Instant-NGP's 2^19-entry table (+0.17 dB
    # over 2^17 at equal steps, 20.8 vs 25.5 steps/s). On the benchmark scene, 2 CPU cores:
    #   python -m scripts.bench_ngp_nerf   -> see BENCHMARKS.md (NeRF run E)
    "default": _nerf_preset(levels=16, log2_table=19, max_res=1024, width=32, grid_res=64, steps_per_diag=512,
                            steps=3000, rays=2048, samples_log2=16),
    # Instant-NGP's published configuration (GPU-sized).
    "large": _nerf_preset(levels=16, log2_table=19, max_res=2048, width=64, grid_res=128, steps_per_diag=1024,
                          steps=30000, rays=4096, samples_log2=18),
}


def pixel_rays(camera_to_world: jax.Array, intrinsics: jax.Array, image_index: jax.Array, cols: jax.Array,
               rows: jax.Array, offsets: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Rays through pixels (OpenGL cameras: look down -z, +y up).

    Args:
        camera_to_world: ``[num_images, 4, 4]``; intrinsics: ``[num_images, 4]`` (fx, fy, cx, cy).
        image_index, cols, rows: ``[R]`` int32.
        offsets: ``[R, 2]`` position inside the pixel in [0, 1)^2 (x, y); default the centre.

    Returns:
        origins ``[R, 3]`` and unit directions ``[R, 3]``.
    """
    pose = camera_to_world[image_index]  # [R, 4, 4]
    fx, fy, cx, cy = (intrinsics[image_index, k] for k in range(4))
    offset_x, offset_y = (0.5, 0.5) if offsets is None else (offsets[:, 0], offsets[:, 1])
    camera_dirs = jnp.stack(
        [(cols.astype(jnp.float32) + offset_x - cx) / fx, -(rows.astype(jnp.float32) + offset_y - cy) / fy,
         -jnp.ones_like(fx)], axis=-1)
    directions = jnp.einsum("rij,rj->ri", pose[:, :3, :3], camera_dirs)
    directions = directions / jnp.linalg.norm(directions, axis=-1, keepdims=True)
    return pose[:, :3, 3], directions


def march(origins, directions, bitfield, config: NeRFFitConfig, max_samples: int) -> volume.PackedSamples:
    """Packs the occupied samples of rays ``[R, 3]`` into a budget of ``max_samples``."""
    return volume.march_rays(origins, directions, bitfield, jnp.asarray(config.aabb), config.occupancy.resolution,
                             config.step_size, config.steps_per_diagonal, max_samples, backend=config.backend)


def shade(model: NeRFField, params, samples: volume.PackedSamples, num_rays: int, config: NeRFFitConfig,
          background: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Evaluates the field on packed samples and composites over ``background [R, 3]``.

    Returns ``colour [R, 3]``, ``opacity [R]``, ``depth [R]``.
    """
    unit = jnp.clip(volume.to_unit_cube(samples.positions, jnp.asarray(config.aabb)), 0.0, 1.0)
    sigmas, rgbs = model.apply({"params": params}, unit, samples.directions)
    colour, opacity, depth = volume.composite(sigmas, rgbs, samples, num_rays, backend=config.backend)
    return colour + (1.0 - opacity)[:, None] * background, opacity, depth


def make_train_chunk(model: NeRFField, optimizer: optax.GradientTransformation, config: NeRFFitConfig):
    """Returns a jitted ``train_chunk(state, data, key, first_step, num_steps) -> (state, stats)``.

    ``state`` holds ``params``, ``opt_state`` and ``grid`` (the occupancy state); ``data`` holds
    ``images [N, H, W, C]``, ``camera_to_world [N, 4, 4]`` and ``intrinsics [N, 4]``.
    ``stats`` are the chunk means of the loss and of the fraction of complete rays, and the
    mean number of occupied samples per step.
    """
    grid_config = config.occupancy

    def density_fn(params, unit_positions):
        return model.apply({"params": params}, unit_positions, method=NeRFField.density)

    def loss_fn(params, grid, origins, directions, targets, background):
        samples = march(origins, directions, grid["bitfield"], config, config.max_samples)
        colour, _, _ = shade(model, params, samples, origins.shape[0], config, background)
        complete = samples.complete_rays()
        weights = complete.astype(jnp.float32)
        errors = jnp.sum(jnp.square(colour - targets), axis=-1) / 3.0
        loss = jnp.sum(errors * weights) / jnp.maximum(jnp.sum(weights), 1.0)
        return loss, jnp.mean(weights)

    def train_chunk(state, data, key, first_step, num_steps):
        images = data["images"]
        num_images, height, width, channels = images.shape

        def body(offset, carry):
            state, loss_sum, complete_sum = carry
            step = first_step + offset
            step_key = jax.random.fold_in(key, step)
            key_pixels, key_background, key_grid, key_jitter = jax.random.split(step_key, 4)
            flat = jax.random.randint(key_pixels, (config.num_rays,), 0, num_images * height * width)
            image_index = flat // (height * width)
            pixel = flat - image_index * height * width
            rows, cols = pixel // width, pixel % width
            # Optionally a random point inside the pixel (as Instant-NGP): pixel values are area
            # averages; the field then learns the sharp scene, which centre-ray renders alias.
            jitter = jax.random.uniform(key_jitter, (config.num_rays, 2)) if config.pixel_jitter else None
            origins, directions = pixel_rays(data["camera_to_world"], data["intrinsics"], image_index, cols, rows,
                                             jitter)
            target = images[image_index, rows, cols]
            if config.random_background:
                background = jax.random.uniform(key_background, (config.num_rays, 3))
            else:
                background = jnp.ones((config.num_rays, 3), jnp.float32)
            if channels == 4:
                alpha = target[:, 3:4]
                target = target[:, :3] * alpha + background * (1.0 - alpha)
            (loss, complete), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                state["params"], state["grid"], origins, directions, target, background)
            params, opt_state = optimizer_step(optimizer, grads, state["opt_state"], state["params"])
            grid = jax.lax.cond(
                step % grid_config.update_every == grid_config.update_every - 1,
                lambda g: occupancy_grid.update(g, lambda p: density_fn(params, p), key_grid, step, grid_config,
                                               config.step_size),
                lambda g: g,
                state["grid"],
            )
            return {"params": params, "opt_state": opt_state, "grid": grid}, loss_sum + loss, complete_sum + complete

        zero = jnp.float32(0.0)
        state, loss_sum, complete_sum = jax.lax.fori_loop(0, num_steps, body, (state, zero, zero))
        count = num_steps.astype(jnp.float32)
        return state, {"loss": loss_sum / count, "complete_fraction": complete_sum / count}

    return jax.jit(train_chunk, donate_argnums=(0,))


def make_view_renderer(model: NeRFField, config: NeRFFitConfig, chunk_rays: int = 2048):
    """Returns ``render(params, bitfield, camera_to_world [4,4], intrinsics [4], height, width, background [3])``
    -> ``(rgb [H, W, 3], depth [H, W], opacity [H, W])`` numpy arrays.

    Each chunk of rays is marched with a budget no ray can overflow; the host reads the number of
    occupied samples and shades only that prefix, rounded up to a power of two (few compiled shapes).
    """
    budget = chunk_rays * config.steps_per_diagonal

    @jax.jit
    def march_chunk(bitfield, camera_to_world, intrinsics, cols, rows):
        zeros = jnp.zeros(cols.shape, jnp.int32)
        origins, directions = pixel_rays(camera_to_world[None], intrinsics[None], zeros, cols, rows)
        return march(origins, directions, bitfield, config, budget)

    @functools.partial(jax.jit, static_argnames="size")
    def shade_prefix(params, samples, background, size):
        prefix = jax.tree_util.tree_map(lambda x: x[:size] if x.ndim and x.shape[0] == budget else x, samples)
        return shade(model, params, prefix, chunk_rays, config, jnp.broadcast_to(background, (chunk_rays, 3)))

    def render(params, bitfield, camera_to_world, intrinsics, height, width, background):
        total = height * width
        pixels = np.arange(total)
        rows, cols = pixels // width, pixels % width
        camera_to_world = jnp.asarray(camera_to_world, jnp.float32)
        intrinsics = jnp.asarray(intrinsics, jnp.float32)
        background = jnp.asarray(background, jnp.float32)
        colours, depths, opacities = [], [], []
        for start in range(0, total, chunk_rays):
            index = np.minimum(np.arange(start, start + chunk_rays), total - 1)
            samples = march_chunk(bitfield, camera_to_world, intrinsics, jnp.asarray(cols[index], jnp.int32),
                                  jnp.asarray(rows[index], jnp.int32))
            size = max(1024, 1 << int(np.ceil(np.log2(max(int(samples.num_samples), 1)))))
            colour, opacity, depth = shade_prefix(params, samples, background, size=min(size, budget))
            colours.append(np.asarray(colour))
            opacities.append(np.asarray(opacity))
            depths.append(np.asarray(depth))
        colour = np.concatenate(colours)[:total].reshape(height, width, 3)
        opacity = np.concatenate(opacities)[:total].reshape(height, width)
        depth = np.concatenate(depths)[:total].reshape(height, width)
        return np.clip(colour, 0.0, 1.0), depth, opacity

    return render


FIELD_KIND = "ngp_nerf"


def initial_state(config: NeRFFitConfig, model: NeRFField, optimizer: optax.GradientTransformation) -> dict:
    """``{"params", "opt_state", "grid"}`` at step 0 (params from ``config.seed``)."""
    key = jax.random.PRNGKey(config.seed)
    params = model.init(key, jnp.zeros((1, 3), jnp.float32), jnp.ones((1, 3), jnp.float32) / math.sqrt(3.0))
    params = params["params"]
    return {"params": params, "opt_state": optimizer.init(params),
            "grid": occupancy_grid.initial_state(config.occupancy)}


def scene_arrays(scene) -> dict[str, jax.Array]:
    """A loaded ``SceneData`` as the device arrays a training chunk reads."""
    return {"images": jnp.asarray(scene.images), "camera_to_world": jnp.asarray(scene.camera_to_world),
            "intrinsics": jnp.asarray(scene.intrinsics)}


class Trainer:
    """Runs training chunks on device and keeps the step count; the state lives in ``self.state``.

    ``self.state`` is ``{"params", "opt_state", "grid"}``; ``self.data`` the scene's device arrays.
    """

    def __init__(self, config: NeRFFitConfig, scene):
        self.config = config
        self.model = NeRFField(config.field, backend=config.backend)
        optimizer = make_optimizer(config)
        self.data = scene_arrays(scene)
        self.state = initial_state(config, self.model, optimizer)
        self.step = 0
        self.train_seconds = 0.0
        self._chunk = make_train_chunk(self.model, optimizer, config)
        self._key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1)

    def compile(self) -> float:
        """Compiles the training chunk; returns seconds."""
        import time

        start = time.perf_counter()
        self._chunk = self._chunk.lower(self.state, self.data, self._key, jnp.int32(0), jnp.int32(1)).compile()
        return time.perf_counter() - start

    def run(self, num_steps: int) -> dict[str, float]:
        """Trains ``num_steps`` more steps; returns the chunk's mean loss and complete-ray fraction."""
        import time

        start = time.perf_counter()
        self.state, stats = self._chunk(self.state, self.data, self._key, jnp.int32(self.step), jnp.int32(num_steps))
        stats = {name: float(value) for name, value in stats.items()}  # one host read per chunk
        self.train_seconds += time.perf_counter() - start
        if not math.isfinite(stats["loss"]):
            raise FloatingPointError(f"loss became {stats['loss']} in steps {self.step}..{self.step + num_steps}")
        self.step += num_steps
        return stats


@dataclasses.dataclass
class NeRFBatchResult:
    """What ``fit_nerf_batch`` returns: ``params`` and ``grids`` (occupancy states) with a leading
    field axis (numpy), test ``psnr`` and ``ssim`` of shape ``[N]``, and timings."""

    params: dict
    grids: dict
    psnr: np.ndarray
    ssim: np.ndarray
    train_seconds: float
    compile_seconds: float


@functools.lru_cache(maxsize=4)
def compiled_nerf_batch(config: NeRFFitConfig, structure, leaf_shapes: tuple, sharding: FieldSharding):
    """The compiled ``jax.vmap`` of ``make_train_chunk`` for batches whose ``(state, data)`` has the tree
    ``structure`` and ``leaf_shapes`` (``((shape, dtype), ...)``; a field count that divides over
    ``sharding``'s devices), cached so that successive batches of one shape compile once."""
    model = NeRFField(config.field, backend=config.backend)
    single = make_train_chunk(model, make_optimizer(config), config)
    batched = jax.vmap(single, in_axes=(0, 0, 0, None, None))
    state, data = jax.tree_util.tree_unflatten(
        structure, [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in leaf_shapes])
    num_fields = jax.tree_util.tree_leaves(state)[0].shape[0]
    keys = jax.ShapeDtypeStruct((num_fields, 2), jnp.uint32)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    return sharding.compile(batched, (state, data, keys, scalar, scalar), num_batched=3, donate_argnums=(0,))


def fit_nerf_batch(scenes, config: NeRFFitConfig, seeds, max_eval_views: int | None = None,
                   init_seeds=None, num_devices: int = 0) -> NeRFBatchResult:
    """Fits one NeRF per ``(train, test)`` scene pair, all at once: ``make_train_chunk`` under ``jax.vmap``.

    Field ``i`` is initialised and sampled as ``Trainer(replace(config, seed=seeds[i]), train_i)``
    would. The train splits must have the same number of images of the same size. ``init_seeds``
    (``[N]``, optional) seed the initial weights instead. The scenes are split over ``num_devices``
    local devices (0: all; see ``fields.training.FieldSharding``).

    Raises:
        ValueError: scenes of different shapes, or a seed count that does not match.
        FloatingPointError: a field's loss became non-finite (its index is named).
    """
    import time

    if len(seeds) != len(scenes):
        raise ValueError(f"need one seed per scene: {len(scenes)} scenes, {len(seeds)} seeds")
    shapes = [train.images.shape for train, _ in scenes]
    if len(set(shapes)) > 1:
        raise ValueError(f"scenes fitted together need train splits of one shape, got {sorted(set(shapes))}")
    model = NeRFField(config.field, backend=config.backend)
    optimizer = make_optimizer(config)
    stack = functools.partial(jax.tree_util.tree_map, lambda *leaves: jnp.stack(leaves))
    if init_seeds is not None and len(init_seeds) != len(scenes):
        raise ValueError(f"need one init seed per scene: {len(scenes)} scenes, {len(init_seeds)} init seeds")
    state = stack(*[initial_state(dataclasses.replace(config, seed=int(seed)), model, optimizer)
                    for seed in (seeds if init_seeds is None else init_seeds)])
    data = stack(*[scene_arrays(train) for train, _ in scenes])
    keys = jnp.stack([jax.random.fold_in(jax.random.PRNGKey(int(seed)), 1) for seed in seeds])
    num_fields = len(scenes)
    sharding = FieldSharding.over(num_devices)
    state, data, keys = sharding.place(sharding.pad((state, data, keys), num_fields))
    compile_start = time.perf_counter()
    leaves, structure = jax.tree_util.tree_flatten((state, data))
    compiled = compiled_nerf_batch(config, structure, tuple((leaf.shape, str(leaf.dtype)) for leaf in leaves),
                                    sharding)
    compile_seconds = time.perf_counter() - compile_start

    def run_chunk(state, first, count):
        state, stats = compiled(state, data, keys, first, count)
        return state, stats["loss"]

    (state,), _, train_seconds = run_batched_chunks(run_chunk, (state,), config.steps, config.log_every * 4,
                                                    check_every_chunk=True, num_fields=num_fields)
    params = jax.tree_util.tree_map(lambda leaf: np.asarray(leaf)[:num_fields], state["params"])
    grids = jax.tree_util.tree_map(lambda leaf: np.asarray(leaf)[:num_fields], state["grid"])
    render = make_view_renderer(model, config)
    psnrs, ssims = [], []
    for index, (_, test) in enumerate(scenes):
        field = jax.tree_util.tree_map(lambda leaf, i=index: leaf[i], params)
        result = evaluate_views(render, field, grids["bitfield"][index], test, max_views=max_eval_views)
        psnrs.append(result["psnr"])
        ssims.append(result["ssim"])
    return NeRFBatchResult(params, grids, np.asarray(psnrs, np.float32), np.asarray(ssims, np.float32),
                           train_seconds, compile_seconds)


def white_composite(images: np.ndarray) -> np.ndarray:
    """``[..., 4]`` straight-alpha RGBA -> ``[..., 3]`` over white; RGB passes through."""
    if images.shape[-1] == 4:
        return images[..., :3] * images[..., 3:] + (1.0 - images[..., 3:])
    return images


def evaluate_views(render, params, bitfield, scene, out_dir: str | None = None, max_views: int | None = None,
                   save_depth: bool = True) -> dict:
    """Renders the views of ``scene`` over white and compares them with the images.

    Returns ``{"views": [{"index", "psnr", "ssim"}...], "psnr", "ssim", "rays_per_second",
    "frames_per_second"}``; writes ``test_XXX.png`` (and ``depth_XXX.png``) to ``out_dir`` if given.
    """
    import os
    import time

    from fields import metrics
    from fields.data.images import save_image

    count = len(scene) if max_views is None else min(max_views, len(scene))
    views, render_seconds = [], 0.0
    for index in range(count):
        start = time.perf_counter()
        rgb, depth, _ = render(params, bitfield, scene.camera_to_world[index], scene.intrinsics[index], scene.height,
                               scene.width, np.ones(3, np.float32))
        render_seconds += time.perf_counter() - start
        target = white_composite(scene.images[index])
        views.append({"index": index, "psnr": metrics.psnr(rgb, target), "ssim": metrics.ssim(rgb, target)})
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
            save_image(os.path.join(out_dir, f"test_{index:03d}.png"), rgb)
            if save_depth:
                save_image(os.path.join(out_dir, f"depth_{index:03d}.png"), depth_to_image(depth))
    return {
        "views": views,
        "psnr": float(np.mean([v["psnr"] for v in views])),
        "ssim": float(np.mean([v["ssim"] for v in views])),
        "rays_per_second": count * scene.height * scene.width / max(render_seconds, 1e-9),
        "frames_per_second": count / max(render_seconds, 1e-9),
    }


def depth_to_image(depth: np.ndarray) -> np.ndarray:
    """Depth ``[H, W]`` -> grey ``[H, W, 1]`` in [0, 1], near = bright, no hit = black."""
    hit = depth > 0
    if not hit.any():
        return np.zeros(depth.shape + (1,), np.float32)
    near, far = float(depth[hit].min()), float(depth[hit].max())
    scaled = np.where(hit, 1.0 - (depth - near) / max(far - near, 1e-6) * 0.8, 0.0)
    return scaled[..., None].astype(np.float32)


def density_grid(model: NeRFField, params, resolution: int, chunk: int = 1 << 16) -> np.ndarray:
    """Density on a ``resolution^3`` lattice over the unit cube, ``[R, R, R]`` indexed (x, y, z)."""
    axis = (np.arange(resolution, dtype=np.float32) + 0.5) / resolution
    x, y, z = np.meshgrid(axis, axis, axis, indexing="ij")
    points = np.stack([x.ravel(), y.ravel(), z.ravel()], axis=-1)
    density_fn = jax.jit(lambda p, q: model.apply({"params": p}, q, method=NeRFField.density))
    values = []
    for start in range(0, len(points), chunk):
        part = points[start : start + chunk]
        padded = np.concatenate([part, np.zeros((chunk - len(part), 3), np.float32)])
        values.append(np.asarray(density_fn(params, jnp.asarray(padded)))[: len(part)])
    return np.concatenate(values).reshape(resolution, resolution, resolution)


def export_mesh(path: str, model: NeRFField, params, config: NeRFFitConfig, resolution: int = 128,
                threshold: float = 10.0) -> tuple[int, int]:
    """Marching cubes of the density field at ``threshold``, vertex colours from the field; PLY.

    Returns ``(num_vertices, num_faces)``.
    """
    from skimage.measure import marching_cubes

    density = density_grid(model, params, resolution)
    if not (density.min() < threshold < density.max()):
        raise ValueError(f"density never crosses the mesh threshold {threshold} "
                         f"(range {density.min():.3g}..{density.max():.3g})")
    vertices, faces, normals, _ = marching_cubes(density, level=threshold, spacing=(1.0 / resolution,) * 3)
    unit = (vertices + 0.5 / resolution).astype(np.float32)
    directions = -normals.astype(np.float32)  # look at the surface from outside
    directions /= np.maximum(np.linalg.norm(directions, axis=-1, keepdims=True), 1e-9)
    colours = np.asarray(jax.jit(lambda p, q, d: model.apply({"params": p}, q, d)[1])(
        params, jnp.asarray(unit), jnp.asarray(directions)))
    world = config.aabb[0] + unit * (config.aabb[1] - config.aabb[0])
    write_ply(path, world, faces, colours)
    return len(world), len(faces)


def write_ply(path: str, vertices: np.ndarray, faces: np.ndarray, colours: np.ndarray) -> None:
    """Binary little-endian PLY with float xyz, uchar rgb per vertex and int triangles."""
    vertex_dtype = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"),
                             ("blue", "u1")])
    vertex_data = np.empty(len(vertices), vertex_dtype)
    for axis, name in enumerate("xyz"):
        vertex_data[name] = vertices[:, axis]
    rgb = np.round(np.clip(colours, 0.0, 1.0) * 255.0).astype(np.uint8)
    for axis, name in enumerate(("red", "green", "blue")):
        vertex_data[name] = rgb[:, axis]
    face_dtype = np.dtype([("count", "u1"), ("indices", "<i4", (3,))])
    face_data = np.empty(len(faces), face_dtype)
    face_data["count"] = 3
    face_data["indices"] = faces
    header = ("ply\nformat binary_little_endian 1.0\n"
              f"element vertex {len(vertices)}\nproperty float x\nproperty float y\nproperty float z\n"
              "property uchar red\nproperty uchar green\nproperty uchar blue\n"
              f"element face {len(faces)}\nproperty list uchar int vertex_indices\nend_header\n")
    with open(path, "wb") as handle:
        handle.write(header.encode("ascii"))
        handle.write(vertex_data.tobytes())
        handle.write(face_data.tobytes())


def orbit_frames(render, params, bitfield, intrinsics: np.ndarray, width: int, height: int, num_frames: int,
                 radius: float, camera_height: float, target=(0.0, 0.0, 0.0), closer_radius: float | None = None,
                 background=(1.0, 1.0, 1.0)) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Renders a circular camera path (and optionally a closer second circle after it).

    Returns lists of RGB ``[H, W, 3]`` and depth-image ``[H, W, 1]`` frames.
    """
    from fields.rendering.cameras import orbit_poses

    poses = list(orbit_poses(num_frames, radius, camera_height, target))
    if closer_radius:
        poses += list(orbit_poses(num_frames, closer_radius, camera_height * closer_radius / radius, target))
    colours, depths = [], []
    for pose in poses:
        rgb, depth, _ = render(params, bitfield, np.asarray(pose, np.float32), intrinsics, height, width,
                               np.asarray(background, np.float32))
        colours.append(rgb)
        depths.append(depth_to_image(depth))
    return colours, depths


def write_video(path: str, frames: list[np.ndarray], fps: int = 24) -> None:
    """Writes RGB frames ``[H, W, 3]`` in [0, 1] to an MP4 (H.264 through imageio-ffmpeg)."""
    import warnings

    import imageio.v2 as imageio

    # imageio-ffmpeg starts ffmpeg with subprocess (fork+exec); Python warns about forking a
    # multithreaded process, which is harmless for an immediate exec.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="os.fork", category=RuntimeWarning)
        with imageio.get_writer(path, fps=fps, codec="libx264", quality=8, macro_block_size=1) as writer:
            for frame in frames:
                writer.append_data(np.round(np.clip(frame, 0, 1) * 255).astype(np.uint8))
