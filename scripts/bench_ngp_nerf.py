"""Benchmark: Instant-NGP NeRF vs a dense-voxel-grid baseline at fixed wall-clock marks.

    python -m scripts.bench_ngp_nerf                     # marks 1, 3, 10 minutes (about 30 min in all)
    python -m scripts.bench_ngp_nerf --marks 0.5,1 --eval-views 5

Makes a procedural scene (100 train / 50 test views at 128^2; generator seed 0 with 2-4 objects,
scene ``--scene-index`` 2: a yellow cylinder, a red sphere, a grey torus and a cyan torus) unless
``--data`` is given,
then trains each method and, whenever its training clock (evaluation excluded) passes a mark,
renders ``--eval-views`` evenly spaced test views over white and records their mean PSNR. Prints
JSON with PSNR per mark, steps and steps/s for both methods. The baseline (this file only): a
dense 128^3 grid of density and RGB logits, trilinear lookup, 128 uniform (jittered) samples per
ray, Adam, pure JAX.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fields import metrics
from fields.data.nerf_scenes import load_scene
from fields.nerf_fitting import PRESETS, Trainer, evaluate_views, make_view_renderer, pixel_rays, white_composite
from fields.rendering.volume import intersect_aabb
from fields.training import optimizer_step

# ------------------------------------------------------------------------------------------------
# Dense-grid baseline


@dataclasses.dataclass(frozen=True)
class DenseGridConfig:
    resolution: int = 128
    num_samples: int = 128
    num_rays: int = 4096
    learning_rate: float = 0.1
    scene_bound: float = 1.0


def dense_init(config: DenseGridConfig) -> dict:
    shape = (config.resolution,) * 3
    return {"density": jnp.full(shape, 0.1, jnp.float32), "rgb": jnp.zeros(shape + (3,), jnp.float32)}


def trilinear(volume: jax.Array, unit: jax.Array) -> jax.Array:
    """``volume [R, R, R, ...]`` (x, y, z), ``unit [n, 3]`` in [0, 1] -> ``[n, ...]`` (cell-centred)."""
    resolution = volume.shape[0]
    coords = jnp.clip(unit * resolution - 0.5, 0.0, resolution - 1.0)
    low = jnp.clip(jnp.floor(coords).astype(jnp.int32), 0, resolution - 2)
    fraction = coords - low.astype(jnp.float32)
    result = 0.0
    for corner in range(8):
        bits = [(corner >> axis) & 1 for axis in range(3)]
        index = tuple(low[:, axis] + bits[axis] for axis in range(3))
        weight = jnp.prod(jnp.stack([fraction[:, a] if bits[a] else 1.0 - fraction[:, a] for a in range(3)]), 0)
        value = volume[index]
        result = result + (weight.reshape((-1,) + (1,) * (value.ndim - 1)) * value)
    return result


def dense_render(grid: dict, origins, directions, config: DenseGridConfig, key, background):
    """Renders rays ``[R, 3]`` with ``num_samples`` uniform samples between the box entry and exit."""
    bound = config.scene_bound
    aabb = jnp.asarray([[-bound] * 3, [bound] * 3], jnp.float32)
    t_near, t_far = intersect_aabb(origins, directions, aabb)
    hit = t_far > t_near
    t_far = jnp.where(hit, t_far, t_near + 1e-3)
    jitter = jax.random.uniform(key, (origins.shape[0], config.num_samples)) if key is not None else 0.5
    steps = (jnp.arange(config.num_samples, dtype=jnp.float32) + jitter) / config.num_samples
    ts = t_near[:, None] + (t_far - t_near)[:, None] * steps
    dt = ((t_far - t_near) / config.num_samples)[:, None]
    points = origins[:, None] + directions[:, None] * ts[..., None]
    unit = ((points + bound) / (2 * bound)).reshape(-1, 3)
    sigma = jax.nn.relu(trilinear(grid["density"], unit)).reshape(ts.shape) * hit[:, None]
    rgb = jax.nn.sigmoid(trilinear(grid["rgb"], unit)).reshape(ts.shape + (3,))
    alpha = 1.0 - jnp.exp(-sigma * dt)
    transmittance = jnp.cumprod(jnp.concatenate([jnp.ones_like(alpha[:, :1]), 1.0 - alpha[:, :-1] + 1e-10], 1), 1)
    weights = alpha * transmittance
    colour = jnp.sum(weights[..., None] * rgb, 1)
    return colour + (1.0 - jnp.sum(weights, 1))[:, None] * background


class DenseTrainer:
    def __init__(self, config: DenseGridConfig, scene, seed: int = 0):
        self.config = config
        self.grid = dense_init(config)
        self.optimizer = optax.adam(config.learning_rate)
        self.opt_state = self.optimizer.init(self.grid)
        self.data = {"images": jnp.asarray(scene.images), "camera_to_world": jnp.asarray(scene.camera_to_world),
                     "intrinsics": jnp.asarray(scene.intrinsics)}
        self.key = jax.random.PRNGKey(seed)
        self.step = 0
        self.train_seconds = 0.0

        def chunk(grid, opt_state, data, key, first, count):
            def body(offset, carry):
                grid, opt_state = carry
                k1, k2, k3 = jax.random.split(jax.random.fold_in(key, first + offset), 3)
                n, h, w, c = data["images"].shape
                flat = jax.random.randint(k1, (config.num_rays,), 0, n * h * w)
                image, pixel = flat // (h * w), flat % (h * w)
                rows, cols = pixel // w, pixel % w
                origins, directions = pixel_rays(data["camera_to_world"], data["intrinsics"], image, cols, rows)
                target = data["images"][image, rows, cols]
                background = jax.random.uniform(k2, (config.num_rays, 3))
                if c == 4:
                    target = target[:, :3] * target[:, 3:] + background * (1.0 - target[:, 3:])

                def loss_fn(g):
                    return jnp.mean(jnp.square(dense_render(g, origins, directions, config, k3, background) - target))

                grads = jax.grad(loss_fn)(grid)
                grid, opt_state = optimizer_step(self.optimizer, grads, opt_state, grid)
                return grid, opt_state

            return jax.lax.fori_loop(0, count, body, (grid, opt_state))

        self._chunk = jax.jit(chunk, donate_argnums=(0, 1))
        self._render = jax.jit(lambda g, o, d: dense_render(g, o, d, config, None, jnp.ones((o.shape[0], 3))))

    def run(self, num_steps: int) -> None:
        start = time.perf_counter()
        self.grid, self.opt_state = self._chunk(self.grid, self.opt_state, self.data, self.key,
                                                jnp.int32(self.step), jnp.int32(num_steps))
        jax.block_until_ready(self.grid)
        self.train_seconds += time.perf_counter() - start
        self.step += num_steps

    def evaluate(self, scene, views) -> float:
        psnrs = []
        for index in views:
            rows, cols = np.divmod(np.arange(scene.height * scene.width), scene.width)
            origins, directions = pixel_rays(jnp.asarray(scene.camera_to_world[index])[None],
                                             jnp.asarray(scene.intrinsics[index])[None],
                                             jnp.zeros(len(rows), jnp.int32), jnp.asarray(cols, jnp.int32),
                                             jnp.asarray(rows, jnp.int32))
            rgb = np.concatenate([np.asarray(self._render(self.grid, origins[s:s + 4096], directions[s:s + 4096]))
                                  for s in range(0, len(rows), 4096)]).reshape(scene.height, scene.width, 3)
            psnrs.append(metrics.psnr(np.clip(rgb, 0, 1), white_composite(scene.images[index])))
        return float(np.mean(psnrs))


# ------------------------------------------------------------------------------------------------


def run_with_marks(trainer, evaluate, marks_seconds, chunk_steps: int, label: str) -> dict:
    """Trains until the training clock passes each mark; evaluates there (clock paused)."""
    results = {}
    for mark in marks_seconds:
        while trainer.train_seconds < mark:
            trainer.run(chunk_steps)
        psnr = evaluate()
        results[f"{mark / 60:g}min"] = {"psnr": psnr, "steps": trainer.step, "train_seconds": trainer.train_seconds}
        print(f"# {label}: {trainer.train_seconds:.0f} s, step {trainer.step}, test PSNR {psnr:.2f} dB", flush=True)
    return {"marks": results, "steps_per_second": trainer.step / trainer.train_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="scene folder (default: generate a procedural scene)")
    parser.add_argument("--scene-index", type=int, default=2, help="which generated scene (default 2)")
    parser.add_argument("--marks", default="1,3,10", help="wall-clock marks in minutes")
    parser.add_argument("--eval-views", type=int, default=10, help="evenly spaced test views per evaluation")
    parser.add_argument("--preset", default="default")
    parser.add_argument("--ngp-steps", type=int, default=12500,
                        help="length of NGP's cosine learning-rate schedule: about the steps the last mark allows "
                             "(~21 steps/s with the default preset on 2 CPU cores x 600 s); past it the rate stays "
                             "at its floor")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--methods", default="ngp,dense")
    parser.add_argument("--ngp-final-lr-fraction", type=float,
                        help="where NGP's cosine schedule ends, as a fraction of the peak (default: the preset's)")
    args = parser.parse_args()

    data = args.data
    if data is None:
        from fields.data.procgen_3d import ViewConfig, generate_scenes

        out = os.path.join(tempfile.gettempdir(), "hfn_bench_scene")
        generate_scenes(out, args.scene_index + 1, ViewConfig(views={"train": 100, "val": 0, "test": 50},
                                                              resolution=128),
                        seed=0, num_objects=(2, 4), progress=False)
        data = os.path.join(out, f"scene_{args.scene_index:04d}")
    train, test = load_scene(data, "train"), load_scene(data, "test")
    views = np.linspace(0, len(test) - 1, args.eval_views).round().astype(int).tolist()
    marks = [float(m) * 60 for m in args.marks.split(",")]
    caption_path = os.path.join(data, "scene.json")
    caption = json.load(open(caption_path)).get("caption") if os.path.exists(caption_path) else None
    report = {"data": data, "caption": caption, "train_views": len(train), "test_views_per_eval": views,
              "resolution": [train.width, train.height], "marks_minutes": args.marks, "devices": str(jax.devices())}

    if "ngp" in args.methods:
        config = dataclasses.replace(PRESETS[args.preset], steps=args.ngp_steps, scene_bound=1.0,
                                     backend=args.backend)
        if args.ngp_final_lr_fraction is not None:
            config = dataclasses.replace(config, final_learning_rate_fraction=args.ngp_final_lr_fraction)
        trainer = Trainer(config, train)
        compile_seconds = trainer.compile()
        render = make_view_renderer(trainer.model, config)

        subset = dataclasses.replace(test, images=test.images[views], camera_to_world=test.camera_to_world[views],
                                     intrinsics=test.intrinsics[views],
                                     file_paths=[test.file_paths[i] for i in views])

        def evaluate_ngp():
            return evaluate_views(render, trainer.state["params"], trainer.state["grid"]["bitfield"], subset)["psnr"]

        report["ngp"] = run_with_marks(trainer, evaluate_ngp, marks, config.log_every * 4, "ngp")
        report["ngp"]["compile_seconds"] = compile_seconds
        report["ngp"]["preset"] = args.preset
    if "dense" in args.methods:
        dense = DenseTrainer(DenseGridConfig(), train)
        report["dense_grid"] = run_with_marks(dense, lambda: dense.evaluate(test, views), marks, 50, "dense")
    if "ngp" in report and "dense_grid" in report:
        report["ngp_minus_dense_db"] = {mark: report["ngp"]["marks"][mark]["psnr"] - value["psnr"]
                                         for mark, value in report["dense_grid"]["marks"].items()}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
