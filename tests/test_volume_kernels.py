"""Tests of the compiled ray-marching and compositing kernels (ngp_kernels) against the pure-JAX twins.

march_rays. The kernel runs the float ops XLA runs for the jitted twin with a constant scene box
(``t_near + fl((k + 0.5) * step)``, ``fma(d, t, o)``, ``(p - lo) * fl(1 / extent)``; see
``csrc/marching.h``), so the discrete output (which samples are kept, ray indices, counts, valid)
must match exactly. XLA's own rounding of ``t`` depends on its fusion decisions: for large
problems (the NeRF presets) it rounds ``(k + 0.5) * step`` before adding ``t_near``, like the
kernel, and the floats are bit-identical; for small ones it fuses the two into one FMA and ``t``
(hence the position) can differ by one float32 ulp. Floats are therefore compared to 1e-6 (one
ulp of values up to 8), and one production-sized case checks bit equality.

composite. Same formulas, but sums run in another order (the twin's exclusive cumsum is an
associative scan computed as ``inclusive - tau``; its gradient is autodiff of that scan, the
kernel accumulates suffix sums back to front) and ``exp`` comes from another library (XLA's vs
libm, <= 2 ulp). Every accumulated term is bounded by the largest term of its sum, so errors stay
a few float32 ulps (6e-8) times the number of summed samples (<= ~100 per ray here) of the
*scale* of the compared quantity: we check ``|kernel - twin| <= RTOL |twin| + ATOL max|twin|`` with
RTOL = ATOL = 1e-5, forward and gradients (the absolute part matters for ``d sigma_i``, the
difference ``T_i e^{-tau_i} g_i - sum_{k>i} w_k g_k`` of two nearly equal terms on opaque rays: its
error is relative to ``dt * max|g|``, not to its own value). Observed: <= 2e-7 (forward) and
<= 5e-7 (gradients) of the scale. A wrong weight, segment or sign shows up as an O(1) relative
error, far above these bounds.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ngp_kernels = pytest.importorskip("ngp_kernels")

from fields.rendering import occupancy_grid, volume  # noqa: E402

AABB = np.array([[-1.5, -1.5, -1.5], [1.5, 1.5, 1.5]], np.float32)
RTOL = 1e-5
ATOL_FWD = 1e-5
ATOL_GRAD = 1e-5


def assert_close(actual, expected, atol, rtol=RTOL):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    err = np.abs(actual - expected)
    bound = rtol * np.abs(expected) + atol * max(scale, 1e-30)
    assert np.all(err <= bound), f"max err {err.max():.3g}, scale {scale:.3g}"


def _rays(rng, num_rays, spread=2.5, axis_aligned=0, inside=0):
    """Random unit rays; the first ``axis_aligned`` point along +-x/y/z, the next ``inside`` start in the box."""
    origins = rng.uniform(-spread, spread, (num_rays, 3)).astype(np.float32)
    directions = rng.normal(size=(num_rays, 3)).astype(np.float32)
    for i in range(axis_aligned):
        directions[i] = 0.0
        directions[i, i % 3] = 1.0 if (i // 3) % 2 == 0 else -1.0
    origins[axis_aligned : axis_aligned + inside] = rng.uniform(-1.4, 1.4, (inside, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True).astype(np.float32)
    return origins, directions.astype(np.float32)


def _bitfield(rng, resolution, occupancy):
    occupied = rng.random(resolution**3) < occupancy
    return np.asarray(jax.device_get(occupancy_grid.pack_bits(jnp.asarray(occupied))))


def _march_both(origins, directions, bitfield, resolution, step, max_steps, max_samples):
    # The scene box is a compile-time constant, as in training (fields.nerf_fitting.march).
    twin = jax.jit(
        lambda o, d, b: volume.march_rays(o, d, b, jnp.asarray(AABB), resolution, step, max_steps, max_samples)
    )(origins, directions, bitfield)
    kernel = jax.jit(
        lambda o, d, b: ngp_kernels.march_rays(
            o,
            d,
            b,
            jnp.asarray(AABB),
            grid_resolution=resolution,
            step_size=step,
            max_steps=max_steps,
            max_samples=max_samples,
        )
    )(origins, directions, bitfield)
    return twin, kernel


def _assert_march_equal(twin, kernel, bitwise=False):
    for name in ngp_kernels.MarchedSamples._fields:
        a, b = np.asarray(getattr(kernel, name)), np.asarray(getattr(twin, name))
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if bitwise or a.dtype != np.float32:
            np.testing.assert_array_equal(a, b, err_msg=name)
        else:
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=name)


# (num_rays, resolution, occupancy, steps_per_diagonal, budget, axis_aligned, inside)
MARCH_CASES = [
    (300, 16, 0.4, 128, 1 << 14, 6, 40),  # coarse grid, everything fits
    (500, 32, 0.2, 256, 3000, 6, 50),  # budget truncation mid-ray
    (257, 64, 0.05, 512, 1 << 15, 12, 100),  # sparse fine grid: long DDA jumps
    (200, 8, 1.0, 64, 1 << 12, 6, 20),  # all occupied
    (100, 16, 0.0, 128, 64, 0, 10),  # empty grid: no samples at all
]


@pytest.mark.parametrize("case", MARCH_CASES, ids=lambda c: "r{}g{}o{}s{}b{}".format(*c[:5]))
def test_march_rays_matches_twin(case):
    num_rays, resolution, occupancy, steps_per_diagonal, budget, axis_aligned, inside = case
    rng = np.random.default_rng(sum(case[:2]))
    origins, directions = _rays(rng, num_rays, axis_aligned=axis_aligned, inside=inside)
    bitfield = _bitfield(rng, resolution, occupancy)
    step = 3.0 * math.sqrt(3.0) / steps_per_diagonal
    twin, kernel = _march_both(origins, directions, bitfield, resolution, step, steps_per_diagonal, budget)
    _assert_march_equal(twin, kernel)
    t_near, t_far = (np.asarray(x) for x in volume.intersect_aabb(origins, directions, AABB))
    assert np.any(t_near >= t_far), "some rays should miss the box"
    if case[1] == 32:
        assert int(kernel.num_samples) > budget, "this case should overflow the budget"


def test_march_rays_production_size_bitwise():
    """The 'large' NeRF preset's shapes: XLA rounds like the kernel, so every output is bit-equal."""
    rng = np.random.default_rng(7)
    resolution = 128
    origins, directions = _rays(rng, 4096, spread=4.0, axis_aligned=6, inside=64)
    # A few occupied balls (~10% of the cells), like a trained grid.
    cells = (np.stack(np.meshgrid(*[np.arange(resolution)] * 3, indexing="ij"), -1)[..., ::-1] + 0.5) / resolution
    occupied = np.zeros((resolution,) * 3, bool)
    for centre, radius in zip(rng.uniform(0.25, 0.75, (4, 3)), rng.uniform(0.1, 0.2, 4), strict=True):
        occupied |= np.linalg.norm(cells - centre, axis=-1) < radius
    bitfield = np.asarray(occupancy_grid.pack_bits(jnp.asarray(occupied.reshape(-1))))
    step = 3.0 * math.sqrt(3.0) / 1024
    twin, kernel = _march_both(origins, directions, bitfield, resolution, step, 1024, 1 << 18)
    _assert_march_equal(twin, kernel, bitwise=True)


def test_march_rays_edge_rays():
    """Zero direction components, rays along cell boundaries and box faces, rays through the corners."""
    resolution = 16
    rng = np.random.default_rng(3)
    bitfield = _bitfield(rng, resolution, 0.5)
    o = [
        [-3.0, 0.0, 0.0],
        [-3.0, 0.1875, -0.375],
        [-3.0, 1.5, 1.5],
        [0.0, 0.0, 0.0],
        [-3, -3, -3],
        [2, 2, 2],
        [0.0, -3.0, 0.3],
        [0.2, 0.2, -1.5],
    ]
    d = [
        [1.0, 0.0, 0.0],
        [1.0, 0.0, 0.0],
        [1.0, 0.0, 0.0],
        [0.0, 0.0, -1.0],
        [1, 1, 1],
        [-1, -1, -1],
        [0.0, 1.0, 1e-10],
        [0.0, 0.0, 1.0],
    ]
    origins = np.asarray(o, np.float32)
    directions = np.asarray(d, np.float32)
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    twin, kernel = _march_both(origins, directions, bitfield, resolution, 0.01, 600, 4096)
    _assert_march_equal(twin, kernel)
    assert int(kernel.num_samples) > 0


def test_march_rays_input_checks():
    o = np.zeros((4, 3), np.float32)
    bitfield = np.zeros(16**3 // 8, np.uint8)
    kwargs = dict(grid_resolution=16, step_size=0.01, max_steps=10, max_samples=10)
    with pytest.raises(TypeError, match="float32"):
        ngp_kernels.march_rays(o.astype(np.float16), o, bitfield, AABB, **kwargs)
    with pytest.raises(ValueError, match="bitfield"):
        ngp_kernels.march_rays(o, o, bitfield[:-1], AABB, **kwargs)


# ------------------------------------------------------------------------------------------------
# Compositing


def _composite_inputs(seed, num_rays=300, resolution=16, budget=6000, opaque_rays=20, sigma_scale=30.0):
    """Marched samples (with truncation and padding) and random densities / colours; the first
    ``opaque_rays`` rays get huge densities so they terminate after a few samples."""
    rng = np.random.default_rng(seed)
    origins, directions = _rays(rng, num_rays, axis_aligned=3, inside=20)
    bitfield = _bitfield(rng, resolution, 0.5)
    samples = ngp_kernels.march_rays(
        origins,
        directions,
        bitfield,
        AABB,
        grid_resolution=resolution,
        step_size=3 * math.sqrt(3) / 128,
        max_steps=128,
        max_samples=budget,
    )
    num = int(samples.num_samples)
    assert 0 < min(num, budget) < budget or num > budget  # some padding or truncation
    sigmas = rng.exponential(sigma_scale, budget).astype(np.float32)
    ray_indices = np.asarray(samples.ray_indices)
    sigmas[ray_indices < opaque_rays] *= 5.0  # tau ~ 6 per sample: T < 1e-4 after 2-3 samples
    rgbs = rng.uniform(0, 1, (budget, 3)).astype(np.float32)
    return volume.PackedSamples(**samples._asdict()), jnp.asarray(sigmas), jnp.asarray(rgbs), num_rays


def _kernel_composite(sigmas, rgbs, samples, num_rays):
    return ngp_kernels.composite(
        sigmas, rgbs, samples.ts, samples.dts, samples.ray_indices, samples.valid, num_rays=num_rays
    )


def _alive(sigmas, samples):
    """Samples with transmittance >= threshold (float64 sequential sums: well away from the threshold
    in these tests)."""
    tau = np.where(samples.valid, np.asarray(sigmas, np.float64) * np.asarray(samples.dts), 0.0)
    ray_indices = np.asarray(samples.ray_indices)
    alive = np.zeros(tau.shape, bool)
    acc = 0.0
    for i in range(tau.size):
        if i == 0 or ray_indices[i] != ray_indices[i - 1]:
            acc = 0.0
        alive[i] = np.exp(-acc) >= volume.TERMINATION_THRESHOLD
        acc += tau[i]
    return alive


def _linear_loss(composite_fn, samples, num_rays, seed):
    rng = np.random.default_rng(seed)
    a = jnp.asarray(rng.normal(size=(num_rays, 3)).astype(np.float32))
    b = jnp.asarray(rng.normal(size=num_rays).astype(np.float32))
    c = jnp.asarray(rng.normal(size=num_rays).astype(np.float32))

    def loss(sigmas, rgbs):
        colour, opacity, depth = composite_fn(sigmas, rgbs, samples, num_rays)
        return jnp.sum(colour * a) + jnp.sum(opacity * b) + jnp.sum(depth * c)

    return loss


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_composite_matches_twin(seed):
    samples, sigmas, rgbs, num_rays = _composite_inputs(seed, budget=[6000, 2000, 1 << 14][seed])
    kernel = jax.jit(_kernel_composite, static_argnums=3)(sigmas, rgbs, samples, num_rays)
    twin = jax.jit(volume.composite_reference, static_argnums=3)(sigmas, rgbs, samples, num_rays)
    for k, t in zip(kernel, twin, strict=True):
        assert_close(k, t, ATOL_FWD)
    # Opaque rays terminate early (well before their last sample), and reach opacity ~1.
    opacity = np.asarray(kernel[1])
    counts = np.asarray(samples.ray_counts)
    assert np.all(opacity[:20][counts[:20] > 3] > 0.999)

    k_loss = _linear_loss(_kernel_composite, samples, num_rays, seed + 10)
    t_loss = _linear_loss(volume.composite_reference, samples, num_rays, seed + 10)
    k_grads = jax.jit(jax.grad(k_loss, argnums=(0, 1)))(sigmas, rgbs)
    t_grads = jax.jit(jax.grad(t_loss, argnums=(0, 1)))(sigmas, rgbs)
    for k, t in zip(k_grads, t_grads, strict=True):
        assert_close(k, t, ATOL_GRAD)
    # Samples past termination and padding slots get exactly zero gradient, as in the twin.
    valid = np.asarray(samples.valid)
    d_sigmas = np.asarray(k_grads[0])
    assert np.all(d_sigmas[~valid] == 0) and np.all(np.asarray(k_grads[1])[~valid] == 0)
    dead = valid & ~_alive(sigmas, samples)
    assert dead.sum() > 10, "expected terminated samples on the opaque rays"
    bad = dead & (d_sigmas != 0)
    assert not bad.any(), (d_sigmas[bad], np.asarray(t_grads[0])[bad])


def test_composite_handmade_segments():
    """Invalid samples inside a ray, a ray with one sample, an empty ray, padding, negative density."""
    ray_indices = np.array([0, 0, 0, 0, 2, 3, 3, 3, 5, 5], np.int32)
    valid = np.array([1, 0, 1, 1, 1, 1, 1, 1, 0, 0], bool)
    ts = np.linspace(0.1, 1.0, 10).astype(np.float32)
    dts = np.where(valid, np.float32(0.05), np.float32(0)).astype(np.float32)
    sigmas = jnp.asarray(np.array([3.0, 100.0, 20.0, 1.0, 5.0, 2.0, -1.0, 4.0, 7.0, 7.0], np.float32))
    rgbs = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (10, 3)).astype(np.float32))
    samples = volume.PackedSamples(
        positions=jnp.zeros((10, 3), jnp.float32),
        directions=jnp.zeros((10, 3), jnp.float32),
        ts=jnp.asarray(ts),
        dts=jnp.asarray(dts),
        ray_indices=jnp.asarray(ray_indices),
        valid=jnp.asarray(valid),
        num_samples=jnp.int32(8),
        ray_counts=jnp.asarray([4, 0, 1, 3, 0], jnp.int32),
    )
    num_rays = 5
    kernel = _kernel_composite(sigmas, rgbs, samples, num_rays)
    twin = volume.composite_reference(sigmas, rgbs, samples, num_rays)
    for k, t in zip(kernel, twin, strict=True):
        assert_close(k, t, ATOL_FWD)
    assert np.all(np.asarray(kernel[1])[[1, 4]] == 0)
    k_grads = jax.grad(_linear_loss(_kernel_composite, samples, num_rays, 1), argnums=(0, 1))(sigmas, rgbs)
    t_grads = jax.grad(_linear_loss(volume.composite_reference, samples, num_rays, 1), argnums=(0, 1))(sigmas, rgbs)
    for k, t in zip(k_grads, t_grads, strict=True):
        assert_close(k, t, ATOL_GRAD)


def test_composite_deterministic():
    samples, sigmas, rgbs, num_rays = _composite_inputs(5, budget=1 << 14)
    loss = jax.jit(jax.value_and_grad(_linear_loss(_kernel_composite, samples, num_rays, 3), argnums=(0, 1)))
    first = jax.device_get(loss(sigmas, rgbs))
    for _ in range(3):
        again = jax.device_get(loss(sigmas, rgbs))
        for x, y in zip(jax.tree_util.tree_leaves(first), jax.tree_util.tree_leaves(again), strict=True):
            np.testing.assert_array_equal(x, y)


def test_composite_input_checks_and_vmap():
    samples, sigmas, rgbs, num_rays = _composite_inputs(0, num_rays=40, budget=512)
    with pytest.raises(TypeError, match="int32"):
        ngp_kernels.composite(
            sigmas,
            rgbs,
            samples.ts,
            samples.dts,
            samples.ray_indices.astype(jnp.int16),
            samples.valid,
            num_rays=num_rays,
        )
    # vmap falls back to a loop over the mapped axis.
    stacked = jnp.stack([sigmas, 2 * sigmas])
    out = jax.vmap(lambda s: _kernel_composite(s, rgbs, samples, num_rays))(stacked)
    for i in range(2):
        single = _kernel_composite(stacked[i], rgbs, samples, num_rays)
        for o, s in zip(out, single, strict=True):
            np.testing.assert_array_equal(o[i], s)


@pytest.mark.gpu
def test_cuda_matches_cpu():
    gpu = jax.devices("gpu")[0]
    cpu = jax.devices("cpu")[0]
    rng = np.random.default_rng(11)
    resolution = 32
    origins, directions = _rays(rng, 1000, axis_aligned=6, inside=50)
    bitfield = _bitfield(rng, resolution, 0.3)
    kwargs = dict(grid_resolution=resolution, step_size=3 * math.sqrt(3) / 256, max_steps=256, max_samples=20000)

    def run(device):
        args = jax.device_put((origins, directions, bitfield, AABB), device)
        march = jax.jit(lambda o, d, b, a: ngp_kernels.march_rays(o, d, b, a, **kwargs))(*args)
        samples = volume.PackedSamples(**march._asdict())
        sigmas = jax.device_put(jnp.asarray(rng_sig), device)
        rgbs = jax.device_put(jnp.asarray(rng_rgb), device)
        loss = _linear_loss(_kernel_composite, samples, 1000, 4)
        fwd = jax.jit(_kernel_composite, static_argnums=3)(sigmas, rgbs, samples, 1000)
        grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(sigmas, rgbs)
        return jax.device_get((march, fwd, grads))

    rng_sig = rng.exponential(30.0, 20000).astype(np.float32)
    rng_rgb = rng.uniform(0, 1, (20000, 3)).astype(np.float32)
    g_march, g_fwd, g_grads = run(gpu)
    c_march, c_fwd, c_grads = run(cpu)
    _assert_march_equal(c_march, g_march, bitwise=True)  # same float ops on both
    for g, c in zip(g_fwd, c_fwd, strict=True):
        assert_close(g, c, ATOL_FWD)  # expf on device vs libm
    for g, c in zip(g_grads, c_grads, strict=True):
        assert_close(g, c, ATOL_GRAD)
