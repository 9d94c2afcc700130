"""Tests of the compiled hash-grid kernels (ngp_kernels) against the pure-JAX reference.

Tolerances. The kernels compute the same float32 function as ``encode_reference`` under
``jax.jit``: the same cell and fraction (``x * scale + 0.5`` rounded once, as XLA fuses it into an
FMA; the eager, unfused reference differs from both by up to one ulp of that value), the same
weight products (dim 0 first), but sums may run in another order: the forward sums 2**D corner
products, the table gradient sums w * g over points, the position gradient sums over corners,
levels and features and is derived by hand instead of by autodiff. So results agree to a few
float32 ulps of the summed terms: we check
``|kernel - reference| <= RTOL * |reference| + ATOL * max|reference|`` with RTOL = 1e-5 and
ATOL = 1e-6 (forward) / 1e-5 (gradients, longer sums), i.e. relative to the scale of the compared
quantity. A wrong row or weight anywhere shows up as an O(1) relative error, far above that.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ngp_kernels = pytest.importorskip("ngp_kernels")

from fields.models.hash_grid import HashGridConfig, encode_reference  # noqa: E402

RTOL = 1e-5
ATOL_FWD = 1e-6
ATOL_GRAD = 1e-5

# (num_dims, num_levels, features, log2_table_size, min_res, max_res, num_points)
CONFIGS = [
    (2, 4, 2, 10, 4, 128, 300),  # dense then hashed levels, F=2 fast path, tail block
    (3, 3, 2, 8, 2, 32, 130),  # 3D, dense + hashed
    (2, 3, 1, 6, 2, 50, 7),  # F=1, tiny batch
    (3, 2, 4, 12, 8, 16, 64),  # all dense, F=4, non power-of-two level sizes
    (2, 2, 3, 7, 16, 300, 257),  # generic F=3, hashed
    (3, 1, 8, 9, 16, 16, 33),  # single level, F=8
    (2, 5, 2, 14, 16, 2048, 1000),  # mostly hashed, large resolutions
]


def _config(num_dims, levels, features, log2_t, nmin, nmax, _):
    return HashGridConfig(num_dims, levels, features, log2_t, nmin, nmax)


def _table(key, config, batch=()):
    # U(-1, 1) instead of the model's U(-1e-4, 1e-4): same code path, friendlier tolerances.
    return jax.random.uniform(key, (*batch, config.num_entries, config.features_per_level), jnp.float32, -1, 1)


def _positions(key, config, num_points, batch=()):
    pos = jax.random.uniform(key, (*batch, num_points, config.num_dims), jnp.float32)
    # Exact corners of the domain and the centre hit cell boundaries / the top row.
    special = jnp.asarray([[0.0] * config.num_dims, [1.0] * config.num_dims, [0.5] * config.num_dims])
    special = jnp.broadcast_to(special, (*batch, 3, config.num_dims))
    return jnp.concatenate([special, pos], axis=-2)


def assert_close(actual, expected, atol, rtol=RTOL):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    err = np.abs(actual - expected)
    bound = rtol * np.abs(expected) + atol * max(scale, 1e-30)
    assert np.all(err <= bound), f"max err {err.max():.3g}, scale {scale:.3g}"


def _loss(encode, config, cotangent):
    return lambda table, pos: jnp.sum(encode(table, pos, config) * cotangent)


@pytest.mark.parametrize("case", CONFIGS, ids=lambda c: "d{}l{}f{}t{}r{}-{}b{}".format(*c))
def test_forward_and_gradients_match_reference(case):
    config = _config(*case)
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(sum(case)), 3)
    table, pos = _table(k1, config), _positions(k2, config, case[-1])
    with jax.numpy_dtype_promotion("strict"):
        out = jax.jit(ngp_kernels.hash_grid_encode, static_argnums=2)(table, pos, config)
        ref = jax.jit(encode_reference, static_argnums=2)(table, pos, config)
        assert out.shape == (pos.shape[0], config.output_dim)
        assert_close(out, ref, ATOL_FWD)

        cotangent = jax.random.normal(k3, ref.shape, jnp.float32)
        kernel_loss = _loss(ngp_kernels.hash_grid_encode, config, cotangent)
        ref_loss = _loss(encode_reference, config, cotangent)
        gt, gp = jax.jit(jax.grad(kernel_loss, argnums=(0, 1)))(table, pos)  # fused kernel
        rt, rp = jax.jit(jax.grad(ref_loss, argnums=(0, 1)))(table, pos)
        assert_close(gt, rt, ATOL_GRAD)
        assert_close(gp, rp, ATOL_GRAD)
        # Table-only and positions-only backward kernels.
        assert_close(jax.jit(jax.grad(kernel_loss, argnums=0))(table, pos), rt, ATOL_GRAD)
        assert_close(jax.jit(jax.grad(kernel_loss, argnums=1))(table, pos), rp, ATOL_GRAD)


@pytest.fixture(scope="module")
def vmap_data():
    config = HashGridConfig(3, 4, 2, 9, 2, 64)
    keys = jax.random.split(jax.random.PRNGKey(7), 3)
    tables = _table(keys[0], config, (2, 3))  # [2, 3, E, F]
    positions = _positions(keys[1], config, 40, (2, 3))  # [2, 3, B, D]
    return config, tables, positions


VMAPS = {
    "both": (lambda f: jax.vmap(f), lambda t, p: (t[0], p[0])),
    "table_only": (lambda f: jax.vmap(f, (0, None)), lambda t, p: (t[0], p[0, 0])),
    "positions_only": (lambda f: jax.vmap(f, (None, 0)), lambda t, p: (t[0, 0], p[0])),
    "nested": (lambda f: jax.vmap(jax.vmap(f)), lambda t, p: (t, p)),
    "nested_mixed": (lambda f: jax.vmap(jax.vmap(f, (0, None)), (None, 0)), lambda t, p: (t[0], p[:, 0])),
}


@pytest.mark.parametrize("name", sorted(VMAPS))
def test_vmap_values_and_gradients(vmap_data, name):
    config, tables, positions = vmap_data
    wrap, pick = VMAPS[name]
    table, pos = pick(tables, positions)

    def loss(encode):
        def per_field(t, p):
            return jnp.sum(jnp.sin(3.0 * encode(t, p, config)))

        return lambda t, p: jnp.sum(wrap(per_field)(t, p))

    with jax.numpy_dtype_promotion("strict"):
        encode_k = jax.jit(wrap(lambda t, p: ngp_kernels.hash_grid_encode(t, p, config)))
        encode_r = wrap(lambda t, p: encode_reference(t, p, config))
        assert_close(encode_k(table, pos), jax.jit(encode_r)(table, pos), ATOL_FWD)
        gk = jax.jit(jax.grad(loss(ngp_kernels.hash_grid_encode), argnums=(0, 1)))(table, pos)
        gr = jax.jit(jax.grad(loss(encode_reference), argnums=(0, 1)))(table, pos)
        assert_close(gk[0], gr[0], ATOL_GRAD)
        assert_close(gk[1], gr[1], ATOL_GRAD)
        # vmap of grad (per-field gradients), table only.
        per_k = jax.grad(lambda t, p: jnp.sum(jnp.sin(3.0 * ngp_kernels.hash_grid_encode(t, p, config))))
        per_r = jax.grad(lambda t, p: jnp.sum(jnp.sin(3.0 * encode_reference(t, p, config))))
        assert_close(jax.jit(wrap(per_k))(table, pos), jax.jit(wrap(per_r))(table, pos), ATOL_GRAD)


def test_vmap_is_one_kernel_call(vmap_data):
    config, tables, positions = vmap_data
    fn = jax.vmap(jax.vmap(lambda t, p: ngp_kernels.hash_grid_encode(t, p, config)))
    hlo = jax.jit(fn).lower(tables, positions).as_text()
    assert hlo.count("ngp_hash_grid_fwd") == 1
    assert "while" not in hlo


def test_explicit_field_axis_broadcasts(vmap_data):
    config, tables, positions = vmap_data
    flat_t, flat_p = tables.reshape(6, *tables.shape[2:]), positions.reshape(6, *positions.shape[2:])
    out = ngp_kernels.hash_grid_encode(flat_t, flat_p, config)  # [6, B, L*F]
    ref = jax.jit(jax.vmap(lambda t, p: encode_reference(t, p, config)))(flat_t, flat_p)
    assert_close(out, ref, ATOL_FWD)
    shared = ngp_kernels.hash_grid_encode(flat_t[0], flat_p, config)  # one table, 6 point sets
    assert shared.shape == (6, flat_p.shape[1], config.output_dim)
    assert_close(shared[4], encode_reference(flat_t[0], flat_p[4], config), ATOL_FWD)
    # Gradient of a broadcast table sums over the fields.
    g = jax.grad(lambda t: jnp.sum(ngp_kernels.hash_grid_encode(t, flat_p, config)))(flat_t[0])
    r = jax.jit(jax.grad(lambda t: jnp.sum(jax.vmap(lambda p: encode_reference(t, p, config))(flat_p))))(flat_t[0])
    assert_close(g, r, ATOL_GRAD)


@pytest.mark.parametrize("argnums", [0, 1, (0, 1)], ids=["table", "positions", "both"])
def test_backward_is_deterministic(argnums):
    # Large enough for every CPU thread to get work; two fields, dense and hashed levels.
    config = HashGridConfig(3, 6, 2, 12, 4, 256)
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(3), 3)
    table, pos = _table(k1, config, (2,)), _positions(k2, config, 20000, (2,))
    cotangent = jax.random.normal(k3, (2, pos.shape[1], config.output_dim), jnp.float32)
    grad = jax.jit(jax.grad(_loss(ngp_kernels.hash_grid_encode, config, cotangent), argnums=argnums))
    first = jax.tree.map(np.asarray, grad(table, pos))
    for _ in range(3):
        again = jax.tree.map(np.asarray, grad(table, pos))
        for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again), strict=True):
            assert np.array_equal(a.view(np.uint32), b.view(np.uint32))


def test_grid_spec_and_errors():
    config = HashGridConfig(2, 3, 2, 8, 4, 64)
    spec = ngp_kernels.GridSpec.from_config(config)
    assert spec.num_entries == config.num_entries and spec.output_dim == config.output_dim
    table = _table(jax.random.PRNGKey(0), config)
    pos = _positions(jax.random.PRNGKey(1), config, 10)
    assert_close(ngp_kernels.hash_grid_encode(table, pos, spec), encode_reference(table, pos, config), ATOL_FWD)
    with pytest.raises(TypeError):
        ngp_kernels.hash_grid_encode(table.astype(jnp.bfloat16), pos, config)
    with pytest.raises(ValueError):
        ngp_kernels.hash_grid_encode(table[:-1], pos, config)
    with pytest.raises(ValueError):
        ngp_kernels.hash_grid_encode(table, pos[:, :1], config)
    assert isinstance(ngp_kernels.built_with_cuda(), bool)
    assert ngp_kernels.cpu_num_threads() >= 1


def _has_gpu() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


@pytest.mark.gpu
def test_cuda_matches_reference():
    if not ngp_kernels.built_with_cuda():
        pytest.skip("ngp_kernels was built without CUDA")
    if not _has_gpu():
        pytest.skip("no GPU")
    gpu = jax.devices("gpu")[0]
    for case in (CONFIGS[0], CONFIGS[1], CONFIGS[4]):
        _check_on_device(_config(*case), case[-1], gpu)


def _check_on_device(config, num_points, device):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(11), 3)
    table = jax.device_put(_table(k1, config, (2,)), device)
    pos = jax.device_put(_positions(k2, config, num_points, (2,)), device)
    ref = jax.jit(jax.vmap(lambda t, p: encode_reference(t, p, config)))(table, pos)
    out = jax.jit(jax.vmap(lambda t, p: ngp_kernels.hash_grid_encode(t, p, config)))(table, pos)
    assert out.devices() == {device}
    assert_close(out, ref, ATOL_FWD)
    cotangent = jax.device_put(jax.random.normal(k3, ref.shape, jnp.float32), device)

    def loss(encode):
        return lambda t, p: jnp.sum(jax.vmap(lambda a, b: encode(a, b, config))(t, p) * cotangent)

    gk = jax.jit(jax.grad(loss(ngp_kernels.hash_grid_encode), argnums=(0, 1)))(table, pos)
    gr = jax.jit(jax.grad(loss(encode_reference), argnums=(0, 1)))(table, pos)
    assert_close(gk[0], gr[0], ATOL_GRAD)  # GPU: atomics, order differs, sums still close
    assert_close(gk[1], gr[1], ATOL_GRAD)
