"""The pure-JAX hash-grid encoding against an independent NumPy model of Instant-NGP's definition."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fields.models import hash_grid
from fields.models.hash_grid import HashGridConfig, encode_reference

LARGE_IMAGE = HashGridConfig(2, 8, 2, 14, 64, 2048)
SMALL_2D = HashGridConfig(num_dims=2, num_levels=4, features_per_level=2, log2_table_size=8,
                          min_resolution=4, max_resolution=64)
SMALL_3D = HashGridConfig(num_dims=3, num_levels=4, features_per_level=3, log2_table_size=9,
                          min_resolution=3, max_resolution=40)


def numpy_row(coords, level, config):
    """Independent model: table row of integer grid point ``coords`` at ``level`` (Python ints)."""
    layout = config.layout
    resolution = layout.resolutions[level]
    if resolution**config.num_dims <= config.table_size:
        index = sum(int(c) * resolution**dim for dim, c in enumerate(coords))
    else:
        index = 0
        for dim, c in enumerate(coords):
            index ^= (int(c) * hash_grid.HASH_PRIMES[dim]) % 2**32
    return layout.offsets[level] + index % layout.sizes[level]


def random_table(key, config):
    return jax.random.normal(key, (config.num_entries, config.features_per_level), jnp.float32)


def test_layout_follows_instant_ngp():
    layout = LARGE_IMAGE.layout
    growth = math.exp((math.log(2048) - math.log(64)) / 7)
    for level, scale in enumerate(layout.scales):
        assert scale == pytest.approx(64 * growth**level - 1, rel=1e-5)
        assert layout.resolutions[level] == math.ceil(scale) + 1
    assert layout.scales[-1] == pytest.approx(2047.0)
    # 64^2 and 106^2 fit in 2^14 entries, 173^2 does not.
    assert layout.dense == (True, True, False, False, False, False, False, False)
    assert layout.sizes[:2] == (64 * 64, 11240)  # 106^2 = 11236 rounded up to a multiple of 8
    assert all(size == 2**14 for size in layout.sizes[2:])
    assert layout.offsets == tuple(np.cumsum((0,) + layout.sizes[:-1]))
    assert LARGE_IMAGE.num_params == layout.num_entries * 2


def test_init_range_and_shape(key):
    table = hash_grid.init_table(key, SMALL_3D)
    assert table.shape == (SMALL_3D.num_entries, 3) and table.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(table))) <= 1e-4
    assert float(jnp.std(table)) > 3e-5  # really spread over the range, not constant


@pytest.mark.parametrize("config", [SMALL_2D, SMALL_3D, LARGE_IMAGE], ids=["2d", "3d", "large"])
def test_rows_match_independent_model(config, key):
    """Dense levels index densely, hashed levels use XOR of uint32 prime products."""
    positions = jax.random.uniform(key, (64, config.num_dims))
    rows, weights = hash_grid.corner_indices_and_weights(positions, config)
    rows, weights = np.asarray(rows), np.asarray(weights)
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)
    for point in range(0, 64, 7):
        for level, scale in enumerate(config.layout.scales):
            scaled = np.float32(positions[point]) * np.float32(scale) + np.float32(0.5)
            cell = np.floor(scaled).astype(np.int64)
            for corner in range(2**config.num_dims):
                coords = [cell[dim] + ((corner >> dim) & 1) for dim in range(config.num_dims)]
                assert rows[point, level, corner] == numpy_row(coords, level, config)


@pytest.mark.parametrize("config", [SMALL_2D, SMALL_3D], ids=["2d", "3d"])
def test_exact_values_at_grid_vertices(config, key):
    """At a grid vertex the encoding equals that vertex's table entry (one weight is 1)."""
    table = random_table(key, config)
    layout = config.layout
    rng = np.random.default_rng(0)
    for level, scale in enumerate(layout.scales):
        vertices = rng.integers(1, int(scale), size=(16, config.num_dims))
        positions = ((vertices - 0.5) / np.float64(scale)).astype(np.float32)
        # Nudge so that x * scale + 0.5 lands on the vertex in float32 arithmetic.
        scaled = positions * np.float32(scale) + np.float32(0.5)
        positions = np.where(scaled < vertices, np.nextafter(positions, np.float32(1)), positions)
        features = np.asarray(encode_reference(table, jnp.asarray(positions), config))
        level_features = features[:, level * config.features_per_level : (level + 1) * config.features_per_level]
        expected = np.stack([np.asarray(table)[numpy_row(v, level, config)] for v in vertices])
        np.testing.assert_allclose(level_features, expected, atol=2e-5 * max(1.0, scale / 16))


@pytest.mark.parametrize("config", [SMALL_2D, SMALL_3D], ids=["2d", "3d"])
def test_continuous_across_cell_borders(config, key):
    """Along a dense line, no step exceeds what the interpolation slope allows.

    With entries bounded by M, each level's output changes by at most 2*M*scale*|dx| per axis;
    swapped corner weights would instead jump by O(M) at cell borders.
    """
    table = random_table(key, config)
    bound = float(jnp.max(jnp.abs(table)))
    samples = 20001
    t = np.linspace(0.0, 1.0, samples, dtype=np.float64)
    direction = np.linspace(0.3, 1.0, config.num_dims)
    positions = (0.02 + 0.96 * t[:, None] * direction / direction.max()).astype(np.float32)
    features = np.asarray(encode_reference(table, jnp.asarray(positions), config))
    steps = np.abs(np.diff(features, axis=0))
    delta = np.abs(np.diff(positions, axis=0)).sum(axis=1)  # L1 length of each step
    for level, scale in enumerate(config.layout.scales):
        f = config.features_per_level
        allowed = 2.0 * bound * scale * delta * 1.01 + 1e-5
        assert np.all(steps[:, level * f : (level + 1) * f] <= allowed[:, None]), f"jump at level {level}"


def test_gradient_wrt_table_is_scatter_of_weights(key):
    config = SMALL_2D
    table = random_table(key, config)
    positions = jax.random.uniform(jax.random.PRNGKey(1), (32, 2))
    cotangent = jax.random.normal(jax.random.PRNGKey(2), (32, config.output_dim))
    grad = jax.grad(lambda t: jnp.sum(encode_reference(t, positions, config) * cotangent))(table)
    rows, weights = hash_grid.corner_indices_and_weights(positions, config)
    expected = np.zeros_like(np.asarray(table))
    cot = np.asarray(cotangent).reshape(32, config.num_levels, config.features_per_level)
    np.add.at(expected, np.asarray(rows).reshape(-1),
              (np.asarray(weights)[..., None] * cot[:, :, None, :]).reshape(-1, config.features_per_level))
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("config", [SMALL_2D, SMALL_3D], ids=["2d", "3d"])
def test_gradient_wrt_positions_matches_finite_differences(config, key):
    table = random_table(key, config)
    rng = np.random.default_rng(1)
    positions = rng.uniform(0.05, 0.95, size=(200, config.num_dims)).astype(np.float32)
    # Keep points whose finite-difference stencil stays inside one cell on every level.
    eps = 1e-3
    fractions = (positions[:, None, :] * np.asarray(config.layout.scales, np.float32)[None, :, None] + 0.5) % 1.0
    margin = eps * max(config.layout.scales) * 1.5
    positions = positions[np.all((fractions > margin) & (fractions < 1 - margin), axis=(1, 2))][:20]
    assert len(positions) >= 5
    weights = jax.random.normal(jax.random.PRNGKey(3), (config.output_dim,))

    def scalar(p):
        return jnp.sum(encode_reference(table, p[None], config)[0] * weights)

    for point in positions:
        analytic = np.asarray(jax.grad(scalar)(jnp.asarray(point)))
        numeric = np.zeros(config.num_dims)
        for dim in range(config.num_dims):
            step = np.zeros(config.num_dims, np.float32)
            step[dim] = eps
            numeric[dim] = (float(scalar(jnp.asarray(point + step))) - float(scalar(jnp.asarray(point - step)))) / (
                2 * eps
            )
        np.testing.assert_allclose(analytic, numeric, rtol=2e-2, atol=2e-2 * max(config.layout.scales))


def test_vmap_over_a_leading_field_axis(key):
    config = SMALL_3D
    num_fields = 3
    tables = jax.vmap(lambda k: random_table(k, config))(jax.random.split(key, num_fields))
    positions = jax.random.uniform(jax.random.PRNGKey(5), (num_fields, 17, 3))
    batched = jax.jit(jax.vmap(lambda t, p: encode_reference(t, p, config)))(tables, positions)
    assert batched.shape == (num_fields, 17, config.output_dim)
    # Batched and single calls may sum the 2^d corners in another order: float32 rounding, ~1e-6.
    for field in range(num_fields):
        single = encode_reference(tables[field], positions[field], config)
        np.testing.assert_allclose(np.asarray(batched[field]), np.asarray(single), rtol=1e-5, atol=2e-6)
    # Shared positions, many tables (in_axes=None) and gradients through vmap.
    shared = jax.vmap(lambda t: encode_reference(t, positions[0], config))(tables)
    np.testing.assert_allclose(np.asarray(shared[2]), np.asarray(encode_reference(tables[2], positions[0], config)),
                               rtol=1e-5, atol=2e-6)
    grads = jax.vmap(jax.grad(lambda t, p: jnp.sum(encode_reference(t, p, config) ** 2)))(tables, positions)
    single_grad = jax.grad(lambda t: jnp.sum(encode_reference(t, positions[1], config) ** 2))(tables[1])
    np.testing.assert_allclose(np.asarray(grads[1]), np.asarray(single_grad), rtol=1e-5, atol=2e-6)


def test_backend_selection():
    config = SMALL_2D
    table = jnp.ones((config.num_entries, 2), jnp.float32)
    positions = jnp.full((4, 2), 0.5, jnp.float32)
    np.testing.assert_allclose(hash_grid.encode(table, positions, config, backend="jax"), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="unknown hash-grid backend"):
        hash_grid.encode(table, positions, config, backend="cuda-magic")


@pytest.mark.parametrize("field,value", [("num_dims", 4), ("num_levels", 0), ("log2_table_size", 30)])
def test_invalid_configs_are_named(field, value):
    with pytest.raises(ValueError, match=field):
        HashGridConfig(**{field: value})
