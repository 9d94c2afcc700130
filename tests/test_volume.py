"""Occupancy grid, ray marching and compositing (pure-JAX twins) against naive per-ray loops."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fields.rendering import occupancy_grid, volume

AABB = jnp.asarray([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]], jnp.float32)


def random_rays(key, num_rays):
    key_origin, key_target = jax.random.split(key)
    directions_to = jax.random.normal(key_origin, (num_rays, 3))
    origins = 3.0 * directions_to / jnp.linalg.norm(directions_to, axis=-1, keepdims=True)
    targets = jax.random.uniform(key_target, (num_rays, 3), minval=-0.5, maxval=0.5)
    directions = targets - origins
    return origins, directions / jnp.linalg.norm(directions, axis=-1, keepdims=True)


def test_pack_unpack_and_lookup():
    config = occupancy_grid.OccupancyGridConfig(resolution=16)
    occupied = jax.random.bernoulli(jax.random.PRNGKey(0), 0.3, (config.num_cells,))
    bits = occupancy_grid.pack_bits(occupied)
    assert bits.shape == (config.num_cells // 8,) and bits.dtype == jnp.uint8
    np.testing.assert_array_equal(occupancy_grid.unpack_bits(bits), occupied)
    corners = jnp.asarray(occupancy_grid.cell_centres(16)) + 0.5 / 16
    np.testing.assert_array_equal(occupancy_grid.is_occupied(bits, corners, 16), occupied)
    assert not bool(occupancy_grid.is_occupied(bits, jnp.asarray([[1.2, 0.5, 0.5]]), 16)[0])


def test_grid_update_finds_a_sphere():
    config = occupancy_grid.OccupancyGridConfig(resolution=16, warmup_steps=4)
    state = occupancy_grid.initial_state(config)

    def density(unit):  # dense ball of radius 0.25 around the centre
        return jnp.where(jnp.linalg.norm(unit - 0.5, axis=-1) < 0.25, 50.0, 0.0).astype(jnp.float32)

    for step in range(12):
        state = occupancy_grid.update(state, density, jax.random.PRNGKey(step), jnp.int32(step), config, 0.01)
    occupied = np.asarray(occupancy_grid.unpack_bits(state["bitfield"]))
    centres = occupancy_grid.cell_centres(16) + 0.5 / 16
    distance = np.linalg.norm(centres - 0.5, axis=-1)
    assert occupied[distance < 0.15].all()
    assert not occupied[distance > 0.4].any()


def test_aabb_intersection():
    origins = jnp.asarray([[-3.0, 0.0, 0.0], [0.0, 0.0, 0.0], [-3.0, 5.0, 0.0]])
    directions = jnp.asarray([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    t_near, t_far = volume.intersect_aabb(origins, directions, AABB)
    np.testing.assert_allclose(t_near[:2], [2.0, 0.0])
    np.testing.assert_allclose(t_far[:2], [4.0, 1.0])
    assert t_near[2] >= t_far[2]  # misses


@pytest.mark.parametrize("budget", [4096, 150])
def test_marching_keeps_occupied_candidates_in_order(budget):
    resolution = 16
    occupied = jax.random.bernoulli(jax.random.PRNGKey(3), 0.5, (resolution**3,))
    bitfield = occupancy_grid.pack_bits(occupied)
    origins, directions = random_rays(jax.random.PRNGKey(4), 12)
    step = 2 * math.sqrt(3) / 64
    samples = volume.march_rays(origins, directions, bitfield, AABB, resolution, step, 64, budget)
    # Naive model: every candidate, one ray after another.
    t_near, t_far = (np.asarray(x) for x in volume.intersect_aabb(origins, directions, AABB))
    expected = []
    for ray in range(12):
        for k in range(64):
            t = np.float32(t_near[ray]) + np.float32((k + 0.5) * step)
            point = np.asarray(origins[ray]) + np.asarray(directions[ray]) * t
            unit = (point + 1.0) / 2.0
            if t < t_far[ray] and bool(occupancy_grid.is_occupied(bitfield, jnp.asarray(unit[None]), resolution)[0]):
                expected.append((ray, t))
    assert int(samples.num_samples) == len(expected)
    kept = min(budget, len(expected))
    valid = np.asarray(samples.valid)
    assert valid[:kept].all() and not valid[kept:].any()
    np.testing.assert_array_equal(np.asarray(samples.ray_indices[:kept]), [ray for ray, _ in expected[:kept]])
    np.testing.assert_allclose(np.asarray(samples.ts[:kept]), [t for _, t in expected[:kept]], rtol=1e-5)
    assert float(jnp.sum(samples.dts)) == pytest.approx(kept * step, rel=1e-5)
    counts = np.bincount([ray for ray, _ in expected], minlength=12)
    np.testing.assert_array_equal(np.asarray(samples.ray_counts), counts)
    np.testing.assert_array_equal(np.asarray(samples.complete_rays()), np.cumsum(counts) <= budget)


def test_compositing_matches_a_per_ray_loop():
    rng = np.random.default_rng(0)
    num_rays, budget = 6, 64
    ray_indices = np.sort(rng.integers(0, num_rays, 50))
    ray_indices = np.concatenate([ray_indices, np.full(budget - 50, num_rays)]).astype(np.int32)
    valid = ray_indices < num_rays
    ts = np.where(valid, rng.uniform(0, 4, budget), 0).astype(np.float32)
    dts = np.where(valid, 0.1, 0.0).astype(np.float32)
    sigmas = rng.exponential(8.0, budget).astype(np.float32)
    sigmas[ray_indices == 2] = 200.0  # an opaque ray: early termination must kick in
    rgbs = rng.uniform(size=(budget, 3)).astype(np.float32)
    counts = jnp.asarray(np.bincount(ray_indices[valid], minlength=num_rays), jnp.int32)
    samples = volume.PackedSamples(jnp.zeros((budget, 3)), jnp.zeros((budget, 3)), jnp.asarray(ts), jnp.asarray(dts),
                                   jnp.asarray(ray_indices), jnp.asarray(valid), jnp.int32(50), counts)
    colour, opacity, depth = volume.composite_reference(jnp.asarray(sigmas), jnp.asarray(rgbs), samples, num_rays)
    for ray in range(num_rays):
        transmittance, c, o, d = 1.0, np.zeros(3), 0.0, 0.0
        for i in np.flatnonzero(ray_indices == ray):
            if transmittance < volume.TERMINATION_THRESHOLD:
                break
            alpha = 1.0 - math.exp(-sigmas[i] * dts[i])
            weight = transmittance * alpha
            c, o, d = c + weight * rgbs[i], o + weight, d + weight * ts[i]
            transmittance *= 1.0 - alpha
        np.testing.assert_allclose(np.asarray(colour[ray]), c, rtol=1e-5, atol=1e-6)
        assert float(opacity[ray]) == pytest.approx(o, rel=1e-5, abs=1e-6)
        assert float(depth[ray]) == pytest.approx(d, rel=1e-5, abs=1e-6)
