"""Weights as data: param maps, normalisation, tokenizers, parquet datasets of fields, scripts.tokenize."""

import json
import math
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fields.cli import UserError, run_main
from fields.config import config_to_dict
from fields.field_datasets import (
    read_dataset,
    read_token_dataset,
    write_shard,
    write_token_shard,
)
from fields.models.hash_grid import HashGridConfig
from fields.models.ngp import NGPField, NGPFieldConfig
from fields.tokenizers import (
    FP8_E4M3_MAGNITUDES,
    BF16Tokenizer,
    FP8E4M3Tokenizer,
    FP16Tokenizer,
    UniformTokenizer,
    make_tokenizer,
    tokenizer_from_json,
)
from fields.weights import (
    NormalizationStats,
    flatten_params,
    matrix_to_params,
    param_count,
    param_map,
    param_map_from_json,
    param_map_to_json,
    params_to_vector,
    section_slices,
    stack_to_matrix,
    stacked_params_to_matrix,
    vector_to_params,
)


def tiny_field_config() -> NGPFieldConfig:
    grid = HashGridConfig(
        num_dims=2, num_levels=2, features_per_level=2, log2_table_size=6, min_resolution=4, max_resolution=16
    )
    return NGPFieldConfig(grid=grid, hidden_width=8, num_hidden_layers=1, output_dim=3)


def init_params(seed: int, config: NGPFieldConfig | None = None) -> dict:
    config = config or tiny_field_config()
    params = NGPField(config, backend="jax").init(jax.random.PRNGKey(seed), jnp.zeros((1, 2), jnp.float32))["params"]
    return jax.tree_util.tree_map(np.asarray, params)


def random_fields(count: int, seed: int = 0) -> tuple[np.ndarray, list]:
    """``count`` valid NGP param vectors ``[count, P]`` with hash features large enough to show."""
    rng = np.random.default_rng(seed)
    params_list = []
    for index in range(count):
        params = init_params(index)
        params["hash_table"] = rng.normal(0.0, 0.5, params["hash_table"].shape).astype(np.float32)
        params_list.append(params)
    pmap = param_map(params_list[0])
    return stack_to_matrix(params_list, pmap), pmap


def leaves_equal(a, b) -> bool:
    flat_a, flat_b = flatten_params(a), flatten_params(b)
    return flat_a.keys() == flat_b.keys() and all(np.array_equal(flat_a[k], flat_b[k]) for k in flat_a)


# ----------------------------------------------------------------------------------- param maps


def test_param_map_and_vector_round_trips():
    params = init_params(0)
    pmap = param_map(params)
    assert [entry.name for entry in pmap] == sorted(flatten_params(params))
    assert pmap[0].name == "hash_table" and pmap[0].section == "hash"
    assert all(entry.section == "mlp" for entry in pmap[1:])
    assert param_count(pmap) == sum(np.size(v) for v in flatten_params(params).values())
    assert param_map_from_json(param_map_to_json(pmap)) == pmap

    vector = params_to_vector(params, pmap)
    assert vector.dtype == np.float32 and vector.shape == (param_count(pmap),)
    assert leaves_equal(vector_to_params(vector, pmap), params)

    params_list = [init_params(seed) for seed in range(3)]
    matrix = stack_to_matrix(params_list)
    assert matrix.shape == (3, param_count(pmap))
    stacked = matrix_to_params(matrix, pmap)
    assert stacked["mlp"]["dense_0"]["kernel"].shape == (3,) + params["mlp"]["dense_0"]["kernel"].shape
    assert np.array_equal(stacked_params_to_matrix(stacked, pmap), matrix)
    for row, original in enumerate(params_list):
        assert leaves_equal(jax.tree_util.tree_map(lambda leaf, r=row: leaf[r], stacked), original)

    slices = section_slices(pmap)
    assert set(slices) == {"hash", "mlp"}
    assert np.array_equal(np.sort(np.concatenate(list(slices.values()))), np.arange(param_count(pmap)))
    assert np.array_equal(vector[slices["hash"]], params["hash_table"].reshape(-1))


def test_params_that_do_not_fit_the_map_are_rejected():
    pmap = param_map(init_params(0))
    other = init_params(0, NGPFieldConfig(grid=tiny_field_config().grid, hidden_width=4, num_hidden_layers=1))
    with pytest.raises(ValueError, match="shape"):
        params_to_vector(other, pmap)
    with pytest.raises(ValueError, match="shape"):
        stacked_params_to_matrix(jax.tree_util.tree_map(lambda leaf: leaf[None], other), pmap)
    with pytest.raises(ValueError):
        vector_to_params(np.zeros(param_count(pmap) + 1, np.float32), pmap)


def test_normalization_is_an_exact_inverse_and_round_trips_json():
    matrix, pmap = random_fields(5)
    matrix[:, section_slices(pmap)["mlp"]] *= 30.0  # very different section scales
    stats = NormalizationStats.from_matrix(matrix, pmap)
    for mode in ("section", "tensor"):
        normalized = stats.normalize(matrix, mode)
        assert normalized.dtype == np.float32
        np.testing.assert_allclose(stats.denormalize(normalized, mode), matrix, rtol=1e-6, atol=1e-6)
    normalized = stats.normalize(matrix, "section")
    for indices in section_slices(pmap).values():
        assert abs(float(normalized[:, indices].mean())) < 1e-5
        assert abs(float(normalized[:, indices].std()) - 1.0) < 1e-4
    normalized = stats.normalize(matrix, "tensor")
    for entry in pmap:
        block = normalized[:, entry.offset : entry.offset + entry.size]
        assert abs(float(block.std()) - 1.0) < 1e-4
    assert NormalizationStats.from_json(stats.to_json()) == stats
    split = NormalizationStats.from_matrices([matrix[:2], matrix[2:]], pmap)
    assert split.count == stats.count == 5
    for name in stats.tensor_mean:
        assert math.isclose(split.tensor_mean[name], stats.tensor_mean[name], rel_tol=1e-12, abs_tol=1e-15)
        assert math.isclose(split.tensor_std[name], stats.tensor_std[name], rel_tol=1e-9)
    with pytest.raises(ValueError, match="mode"):
        stats.normalize(matrix, "global")


# ----------------------------------------------------------------------------------- tokenizers


def test_fp16_round_trips_and_saturates():
    tokenizer = FP16Tokenizer()
    codes = np.arange(1 << 16)
    finite = codes[((codes >> 10) & 0x1F) != 0x1F]  # all codes that are neither inf nor NaN
    values = tokenizer.decode(finite)
    assert np.array_equal(tokenizer.encode(values), finite)  # includes -0 (0x8000) and subnormals
    assert np.array_equal(values, finite.astype(np.uint16).view(np.float16).astype(np.float32))

    rng = np.random.default_rng(0)
    weights = (rng.uniform(-1, 1, size=4096) * np.exp2(rng.uniform(-26, 15.9, size=4096))).astype(np.float32)
    tokens = tokenizer.encode(weights)
    assert tokens.dtype == np.int32
    assert np.array_equal(tokens, weights.astype(np.float16).view(np.uint16))  # round to nearest even

    big = np.array([65504.0, 65519.0, 65520.0, 1e6, 3e38, -65520.0, -3e38], np.float32)
    decoded = tokenizer.decode(tokenizer.encode(big))
    assert np.array_equal(decoded, [65504, 65504, 65504, 65504, 65504, -65504, -65504])
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(ValueError, match="non-finite"):
            tokenizer.encode(np.array([0.0, bad], np.float32))


def test_fp8_e4m3_matches_ml_dtypes_and_saturates_instead_of_nan():
    tokenizer = FP8E4M3Tokenizer()
    codes = np.arange(256)
    reference = codes.astype(np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    decoded = tokenizer.decode(codes)
    assert np.array_equal(np.isnan(decoded), np.isnan(reference))
    assert np.array_equal(decoded[~np.isnan(decoded)], reference[~np.isnan(reference)])
    assert np.count_nonzero(np.isnan(decoded)) == 2 and FP8_E4M3_MAGNITUDES[-1] == 448.0

    valid = codes[(codes & 0x7F) != 0x7F]  # the 254 non-NaN codes, -0 (0x80) included
    assert valid.size == 254
    assert np.array_equal(tokenizer.encode(tokenizer.decode(valid)), valid)
    assert np.signbit(tokenizer.decode(np.array([0x80])))[0]

    rng = np.random.default_rng(0)
    magnitudes = np.exp2(rng.uniform(-14, np.log2(448.0), size=20000))
    midpoints = (FP8_E4M3_MAGNITUDES[:-1] + FP8_E4M3_MAGNITUDES[1:]) / 2  # exact ties: round to even
    weights = np.concatenate([magnitudes, midpoints, FP8_E4M3_MAGNITUDES, [0.0]])
    weights = np.concatenate([weights, -weights]).astype(np.float32)
    expected = weights.astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    assert np.array_equal(tokenizer.encode(weights), expected)

    # Saturation at ±448 (ml_dtypes would give NaN beyond 464), never a NaN code for finite inputs.
    big = np.array([448.0, 449.0, 464.0, 465.0, 1e4, 3.4e38], np.float32)
    assert np.array_equal(tokenizer.encode(big), [0x7E] * 6)
    assert np.array_equal(tokenizer.encode(-big), [0xFE] * 6)
    assert np.array_equal(tokenizer.decode(tokenizer.encode(-big)), -np.full(6, 448.0, np.float32))
    # Subnormals (2^-9 steps), the tie at 2^-10 rounds to the even code 0, underflow keeps the sign.
    small = np.array([2.0**-9, 2.0**-10, 1.5 * 2.0**-9, 7 * 2.0**-9, 2.0**-11, -1e-6, 0.0, -0.0], np.float32)
    assert np.array_equal(tokenizer.encode(small), [1, 0, 2, 7, 0, 0x80, 0, 0x80])
    with pytest.raises(ValueError, match="non-finite"):
        tokenizer.encode(np.array([np.nan], np.float32))
    with pytest.raises(ValueError, match="special tokens"):
        tokenizer.decode(np.array([256]))  # a start token is not a weight


def test_bf16_two_byte_tokens_round_trip():
    tokenizer = BF16Tokenizer()
    bits = np.arange(1 << 16)
    finite = bits[((bits >> 7) & 0xFF) != 0xFF]
    tokens = np.stack([finite >> 8, finite & 0xFF], axis=-1).reshape(-1)
    values = tokenizer.decode(tokens)
    assert values.shape == (finite.size,)
    assert np.array_equal(tokenizer.encode(values), tokens)
    assert np.array_equal(tokenizer.encode(np.array([1.0, -0.0], np.float32)), [0x3F, 0x80, 0x80, 0x00])

    rng = np.random.default_rng(1)
    weights = (rng.normal(size=(3, 4096)) * np.exp2(rng.uniform(-130, 120, size=(3, 4096)))).astype(np.float32)
    tokens = tokenizer.encode(weights)
    assert tokens.shape == (3, 8192)
    expected = weights.astype(ml_dtypes.bfloat16).astype(np.float32)
    assert np.array_equal(tokenizer.decode(tokens), expected)
    top = np.array([np.finfo(np.float32).max, -np.finfo(np.float32).max], np.float32)
    assert np.all(np.isfinite(tokenizer.decode(tokenizer.encode(top))))  # saturates at ±3.39e38


def test_uniform_quantisation_error_bound_and_round_trips():
    matrix, pmap = random_fields(3)
    for bits in (2, 8, 16):
        tokenizer = UniformTokenizer.from_matrix(bits, matrix, pmap)
        assert tokenizer.vocab_size == 1 << bits
        tokens = tokenizer.encode(matrix)
        assert tokens.min() >= 0 and tokens.max() < 1 << bits
        decoded = tokenizer.decode(tokens)
        steps = tokenizer.step_sizes()
        for section, indices in section_slices(pmap).items():
            error = np.abs(decoded[:, indices] - matrix[:, indices]).max()
            assert error <= steps[section] / 2 * (1 + 1e-5) + 1e-6  # + float32 rounding of the decoded value
        codes = np.random.default_rng(bits).integers(0, 1 << bits, size=(4, param_count(pmap)))
        codes[0, :] = np.arange(param_count(pmap)) % (1 << bits)
        assert np.array_equal(tokenizer.encode(tokenizer.decode(codes)), codes)
        clone = tokenizer_from_json(tokenizer.to_json())
        assert np.array_equal(clone.encode(matrix), tokens)

    tokenizer = UniformTokenizer(4, {"all": (-1.0, 1.0)})
    assert np.array_equal(tokenizer.encode(np.array([-5.0, -1.0, 0.0, 1.0, 5.0], np.float32)), [0, 0, 8, 15, 15])
    constant = UniformTokenizer(4, {"all": (2.0, 2.0)})
    assert np.array_equal(constant.decode(constant.encode(np.array([1.0, 2.0, 3.0], np.float32))), [2.0] * 3)
    with pytest.raises(ValueError, match="bits"):
        UniformTokenizer(1, {"all": (0.0, 1.0)})
    with pytest.raises(ValueError, match="section"):
        UniformTokenizer(8, {"hash": (0.0, 1.0)}, pmap)


@pytest.mark.parametrize("name", ["fp16", "fp8_e4m3", "bf16"])
def test_tokenizer_json_round_trip(name):
    tokenizer = make_tokenizer(name)
    clone = tokenizer_from_json(tokenizer.to_json())
    assert type(clone) is type(tokenizer) and clone.to_json() == tokenizer.to_json()


# ----------------------------------------------------------------------------------- datasets


def write_fields(path, matrix, pmap, config=None, first_seed=0, **kwargs):
    rows = matrix.shape[0]
    columns = {
        "source_id": [f"image_{first_seed + i}" for i in range(rows)],
        "label": list(range(rows)),
        "psnr": [30.0 + i for i in range(rows)],
        "seed": [first_seed + i for i in range(rows)],
        "steps": [100] * rows,
    }
    config = config or config_to_dict(tiny_field_config())
    write_shard(str(path), matrix, columns, "ngp_image", config, pmap, **kwargs)


def test_shard_round_trip_plain_pyarrow_and_folders(tmp_path):
    matrix, pmap = random_fields(4)
    stats = NormalizationStats.from_matrix(matrix, pmap)
    extras = {"image_height": 16, "image_width": 12, "source": "42", "note": {"a": [1, 2]}}
    write_fields(tmp_path / "a.parquet", matrix, pmap, normalization=stats, extra_schema_metadata=extras)
    dataset = read_dataset(str(tmp_path / "a.parquet"))
    assert np.array_equal(dataset.matrix, matrix) and dataset.matrix.dtype == np.float32
    assert dataset.field_kind == "ngp_image" and dataset.field_config == config_to_dict(tiny_field_config())
    assert dataset.param_map == pmap and dataset.normalization == stats
    assert dataset.metadata == extras  # extras read back exactly (the string "42" stays a string)
    assert dataset.columns["source_id"] == [f"image_{i}" for i in range(4)]
    assert dataset.columns["label"].dtype == np.int32 and list(dataset.columns["seed"]) == [0, 1, 2, 3]
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]  # atomic write left nothing

    table = pq.read_table(str(tmp_path / "a.parquet"))  # no project code needed
    params_type = table.schema.field("params").type
    assert pa.types.is_fixed_size_list(params_type) and params_type.value_type == pa.float32()
    assert params_type.list_size == param_count(pmap)
    assert table.schema.metadata[b"hfn_format"] == b"fields/v1"
    assert json.loads(table.schema.metadata[b"param_map"])[0]["name"] == "hash_table"

    folder = tmp_path / "folder"
    folder.mkdir()
    write_fields(folder / "shard_001.parquet", matrix[2:], pmap, first_seed=2)
    write_fields(folder / "shard_000.parquet", matrix[:2], pmap)
    dataset = read_dataset(str(folder))
    assert np.array_equal(dataset.matrix, matrix) and dataset.shard_sizes == [2, 2]
    assert dataset.columns["source_id"] == [f"image_{i}" for i in range(4)]
    assert dataset.normalization is None

    write_fields(folder / "shard_002.parquet", matrix[:0], pmap)  # e.g. every field failed a quality gate
    assert read_dataset(str(folder / "shard_002.parquet")).matrix.shape == (0, param_count(pmap))
    assert read_dataset(str(folder)).shard_sizes == [2, 2, 0]
    with pytest.raises(ValueError, match="reserved"):
        write_fields(tmp_path / "b.parquet", matrix, pmap, extra_schema_metadata={"param_map": []})


def test_bad_datasets_give_one_line_user_errors(tmp_path):
    matrix, pmap = random_fields(2)
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(UserError, match="corrupt.parquet") as error:
        read_dataset(str(corrupt))
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match="dataset not found"):
        read_dataset(str(tmp_path / "missing.parquet"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no \\*.parquet shards"):
        read_dataset(str(empty))

    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), str(plain))
    with pytest.raises(UserError, match="plain.parquet.*hfn_format"):
        read_dataset(str(plain))

    mismatched = tmp_path / "mismatched"
    mismatched.mkdir()
    write_fields(mismatched / "a.parquet", matrix, pmap)
    other_config = config_to_dict(tiny_field_config()) | {"hidden_width": 9}
    write_fields(mismatched / "b.parquet", matrix, pmap, config=other_config)
    with pytest.raises(UserError, match="shard .*b.parquet does not match shard .*a.parquet: field_config differs"):
        read_dataset(str(mismatched))

    # P differs from the param map's total (a writer that bypassed write_shard).
    wrong = tmp_path / "wrong_p.parquet"
    values = pa.array(np.zeros(2 * (param_count(pmap) + 1), np.float32))
    column = pa.FixedSizeListArray.from_arrays(values, param_count(pmap) + 1)
    metadata = {
        "hfn_format": "fields/v1", "field_kind": "ngp_image", "field_config": "{}", "param_map": param_map_to_json(pmap)
    }
    pq.write_table(pa.table({"params": column}).replace_schema_metadata(metadata), str(wrong))
    with pytest.raises(UserError, match=f"wrong_p.parquet: params rows have {param_count(pmap) + 1} values"):
        read_dataset(str(wrong))
    no_params = tmp_path / "no_params.parquet"
    pq.write_table(pa.table({"weights": column}).replace_schema_metadata(metadata), str(no_params))
    with pytest.raises(UserError, match="no_params.parquet has no 'params' column"):
        read_dataset(str(no_params))
    with pytest.raises(ValueError):
        write_shard(str(tmp_path / "x.parquet"), matrix[:, :-1], {}, "ngp_image", {}, pmap)


def test_token_shards_store_compact_types_without_special_tokens(tmp_path):
    matrix, pmap = random_fields(3)
    for name, arrow_type in (("fp8_e4m3", pa.uint8()), ("fp16", pa.uint16()), ("bf16", pa.uint8())):
        tokenizer = make_tokenizer(name)
        tokens = tokenizer.encode(matrix)
        path = tmp_path / f"{name}.parquet"
        write_token_shard(str(path), tokens, {"source_id": ["a", "b", "c"]}, tokenizer, "ngp_image",
                          config_to_dict(tiny_field_config()), pmap)
        tokens_type = pq.read_schema(str(path)).field("tokens").type
        assert tokens_type.value_type == arrow_type and tokens_type.list_size == tokens.shape[1]
        dataset = read_token_dataset(str(path))
        assert dataset.tokens.dtype == np.int32 and np.array_equal(dataset.tokens, tokens)
        assert dataset.tokenizer.to_json() == tokenizer.to_json() and dataset.columns["label"].tolist() == [-1] * 3
        with pytest.raises(ValueError, match="special tokens"):
            write_token_shard(str(path), tokens + tokenizer.vocab_size, {}, tokenizer, "ngp_image", {}, pmap)
        with pytest.raises(UserError, match="read_token_dataset"):
            read_dataset(str(path))


# ----------------------------------------------------------------------------------- scripts.tokenize


def run_tokenize(argv):
    from scripts.tokenize import main

    with pytest.raises(SystemExit) as exit_info:
        run_main(main, argv)
    return exit_info.value.code


def test_tokenize_script_end_to_end(tmp_path, capsys):
    matrix, pmap = random_fields(4)
    fields = tmp_path / "fields"
    write_fields(fields / "part_0.parquet", matrix[:2], pmap, extra_schema_metadata={"image_height": 16})
    write_fields(fields / "part_1.parquet", matrix[2:], pmap, first_seed=2, extra_schema_metadata={"image_height": 16})

    reports = {}
    for name in ("fp16", "fp8_e4m3"):
        out = tmp_path / name
        code = run_tokenize(["--fields", str(fields), "--tokenizer", name, "--out", str(out), "--report", "--quiet",
                             "--render-size", "16,16"])
        assert code == 0
        reports[name] = json.loads((out / "_report.json").read_text())
        assert sorted(os.listdir(out)) == ["_report.json", "part_0.parquet", "part_1.parquet"]
        assert pq.read_table(str(out)).num_rows == 4  # the whole folder opens with plain pyarrow
        tokens = read_token_dataset(str(out))
        assert tokens.columns["source_id"] == [f"image_{i}" for i in range(4)]
        assert tokens.metadata["image_height"] == 16 and tokens.param_map == pmap
    for report in reports.values():
        assert report["num_fields"] == 4 and report["render_size"] == [16, 16]
        assert all(math.isfinite(report["render_psnr_db"][key]) for key in ("mean", "worst", "best"))
    assert reports["fp16"]["render_psnr_db"]["worst"] > reports["fp8_e4m3"]["render_psnr_db"]["mean"]

    out = tmp_path / "uniform"
    code = run_tokenize(["--fields", str(fields), "--tokenizer", "uniform", "--bits", "12", "--normalize", "section",
                         "--out", str(out), "--quiet"])
    assert code == 0
    tokens = read_token_dataset(str(out))
    assert tokens.normalization_mode == "section" and tokens.tokenizer.vocab_size == 4096
    np.testing.assert_allclose(tokens.decode_weights(), matrix, atol=5e-3)
    capsys.readouterr()

    assert run_tokenize(["--fields", str(fields), "--tokenizer", "uniform", "--out", str(out), "--quiet"]) == 2
    assert "already holds" in capsys.readouterr().err
    assert run_tokenize(["--fields", str(tmp_path / "nope"), "--tokenizer", "fp16", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: dataset not found") and error.count("\n") == 1
    assert run_tokenize(["--fields", str(fields), "--tokenizer", "fp16", "--bits", "4", "--out", str(out)]) == 2
    assert run_tokenize(["--fields", str(fields), "--tokenizer", "fp9", "--out", str(out)]) == 2
