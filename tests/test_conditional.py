"""python -m hypernets.conditional: teachers, conditions, the static and dynamic hypernetworks, distillation,
the zero-shot split and the finetuning-step counter, on 12 procedural 8x8 teacher fields."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from fields.data.procgen_2d import SHAPES_2D, primitive_image
from fields.data.procgen_3d import PALETTE
from fields.field_datasets import read_dataset, write_shard
from fields.metrics import batch_psnr
from fields.weights import ParamEntry, param_count, vector_to_params
from hypernets import conditional
from hypernets.models.conditional_hypernet import (
    PAD_WORD,
    UNKNOWN_WORD,
    ConditionEncoder,
    ConditionSpec,
)
from tests.helpers import assert_one_line_error, run_entry_point

NUM_TEACHERS = 12
SIZE = 8
TEACHER_STEPS = 30
ARGV = ["--make-teachers", str(NUM_TEACHERS), "--size", str(SIZE), "--teacher-steps", str(TEACHER_STEPS),
        "--preset", "tiny", "--quiet"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny run: 12 teachers fitted by --make-teachers, the tiny preset trained, the zero-shot test written."""
    workdir = str(tmp_path_factory.mktemp("conditional") / "run")
    status = conditional.main(ARGV + ["--workdir", workdir])
    assert status == 0
    return workdir


@pytest.fixture(scope="module")
def teachers(trained_run):
    path = os.path.join(trained_run, conditional.TEACHERS_DIRECTORY, conditional.TEACHERS_SHARD)
    return conditional.load_teachers(path, "jax")


def weight_block(param_map, vectors, name):
    """The ``name`` tensor's columns ``[n, size]`` of weight vectors ``[n, P]`` laid out by ``param_map``."""
    entry = next(entry for entry in param_map if entry.name == name)
    return np.asarray(vectors[:, entry.offset:entry.offset + entry.size])


def read_history(workdir):
    with open(os.path.join(workdir, "history.jsonl")) as handle:
        return [json.loads(line) for line in handle if line.strip()]


# ------------------------------------------------------------------------------------------- end to end


def test_tiny_run_distills_and_writes_the_zero_shot_report(trained_run, teachers):
    rows = [row for row in read_history(trained_run) if "render_loss" in row]
    assert len(rows) >= 4 and rows[-1]["step"] == conditional.PRESETS["tiny"].loop.steps
    first, last = rows[0]["render_loss"], rows[-1]["render_loss"]
    assert np.isfinite(last) and last < 0.7 * first, (first, last)
    assert "heldout_psnr_vs_true" in rows[-1] and "heldout_psnr_vs_teacher" in rows[-1]

    with open(os.path.join(trained_run, "zero_shot.json")) as handle:
        report = json.load(handle)
    assert report["reference"] == "true image" and report["num_evaluated"] >= 1
    assert report["num_held_out"] + report["num_training"] == NUM_TEACHERS
    trained_pairs = {(teachers.shapes[row], teachers.colours[row]) for row in range(NUM_TEACHERS)
                     if not conditional.pair_is_held_out(teachers.shapes[row], teachers.colours[row],
                                                         conditional.PRESETS["tiny"].holdout_modulus)}
    for item in report["items"]:
        assert (item["shape"], item["colour"]) not in trained_pairs  # a combination never seen in training
        assert item["caption"] == f"a {item['colour']} {item['shape']}"
        assert 0 <= item["finetune_steps_from_generated"] <= item["max_steps"] == TEACHER_STEPS
        assert 0 < item["finetune_steps_from_fresh"] <= TEACHER_STEPS  # a fresh init never starts at the target
        assert np.isfinite(item["generated_psnr"]) and item["teacher_psnr"] > 8.0
    ratio = report["mean_finetune_steps_from_generated"] / report["mean_finetune_steps_from_fresh"]
    assert report["finetune_steps_ratio"] == pytest.approx(ratio)
    assert report["baseline_nearest_training_psnr"] >= report["baseline_mean_image_psnr"] - 3.0
    assert np.isfinite(report["mean_train_generated_psnr"])

    picture = np.asarray(Image.open(os.path.join(trained_run, "zero_shot.png")))
    cell = picture.shape[1] // 3  # three columns: true | generated | teacher
    assert picture.shape[0] >= report["num_evaluated"] * cell - 8


def test_teachers_carry_attributes_captions_and_layouts(teachers, trained_run):
    dataset = read_dataset(teachers.path)
    assert len(dataset) == NUM_TEACHERS and dataset.field_kind == "ngp_image"
    assert dataset.metadata["image_height"] == SIZE and dataset.metadata["fit"]["steps"] == TEACHER_STEPS
    for row in range(NUM_TEACHERS):
        shape, colour = dataset.columns["shape"][row], dataset.columns["colour"][row]
        assert dataset.columns["caption"][row] == f"a {colour} {shape}"
        assert dataset.columns["label"][row] == SHAPES_2D.index(shape)
        _, _, attributes = primitive_image(row, 0, SIZE)
        assert (attributes["shape"], attributes["colour"]) == (shape, colour)
    # The replayed layout is where the primitive is: every shape is centred on its centre.
    for row in range(NUM_TEACHERS):
        image = primitive_image(row, 0, 64)[0].sum(axis=-1)
        ys, xs = np.mgrid[0:64, 0:64]
        centroid = np.array([(xs * image).sum(), (ys * image).sum()]) / image.sum()
        centre = np.array([teachers.layouts[row, 0], teachers.layouts[row, 1]]) * 64 - 0.5
        assert np.abs(centroid - centre).max() < 3.0, (row, centroid, centre)


def test_rerun_resumes_and_another_config_is_refused(trained_run, capsys):
    status, out, err = run_entry_point(conditional.main, ARGV + ["--workdir", trained_run, "--zero-shot-items", "0"],
                                       capsys)
    assert status == 0, err
    assert "resuming from step 30" in out and "zero_shot_items is 0" in out
    status, out, err = run_entry_point(conditional.main, ARGV + ["--workdir", trained_run, "--variant", "static"],
                                       capsys)
    assert_one_line_error(status, err, "different config")


def test_encode_dataset_style_data_recovers_attributes_from_source_ids(teachers, tmp_path):
    """A dataset as fields.encode_dataset writes it (no attribute columns, procedural source ids) gives the same
    attributes, captions, layouts and true images as the --make-teachers columns."""
    folder = tmp_path / "fields"
    count = len(teachers)
    write_shard(str(folder / "fields-0000000-0000011.parquet"), teachers.matrix,
                {"source_id": teachers.source_ids, "label": teachers.labels.tolist(), "seed": list(range(count)),
                 "steps": [TEACHER_STEPS] * count},
                "ngp_image", read_dataset(teachers.path).field_config, teachers.param_map,
                extra_schema_metadata={"image_height": SIZE, "image_width": SIZE, "source": "procedural:primitives"})
    loaded = conditional.load_teachers(str(folder), "jax")
    assert (loaded.shapes, loaded.colours, loaded.captions) == (teachers.shapes, teachers.colours, teachers.captions)
    np.testing.assert_allclose(loaded.layouts, teachers.layouts, atol=1e-6)
    np.testing.assert_array_equal(loaded.true_images(np.arange(3)), teachers.true_images(np.arange(3)))
    np.testing.assert_array_equal(loaded.steps, TEACHER_STEPS)
    train_rows = np.flatnonzero(~conditional.held_out_mask(loaded, 4, 0)[0])
    for kind in conditional.CONDITION_KINDS:
        data = conditional.build_conditions(kind, True, loaded, train_rows)
        assert all(len(array) == count for array in data.arrays.values()) and data.arrays["layout"].shape[1] == 13
    labels = conditional.build_conditions("label", False, loaded, train_rows)
    np.testing.assert_array_equal(labels.arrays["labels"], [SHAPES_2D.index(shape) for shape in teachers.shapes])


# ------------------------------------------------------------------------------------------- the model


@pytest.mark.parametrize("variant", conditional.VARIANTS)
def test_generated_weights_have_the_teachers_param_map_and_render(teachers, variant, key):
    config = dataclasses.replace(conditional.PRESETS["tiny"], variant=variant)
    task, conditions, held_out, _, train_rows, arrays = conditional.prepare_training(config, teachers)
    batch = {name: jnp.asarray(array[:3]) for name, array in arrays.items()}
    params = jax.jit(task.init)(key, batch)
    normalized, raw = jax.jit(task.generate)(params, conditional.condition_inputs(batch))
    assert raw.shape == (3, param_count(teachers.param_map)) and raw.dtype == jnp.float32
    field = vector_to_params(np.asarray(raw[0]), teachers.param_map)
    expected = vector_to_params(teachers.matrix[0], teachers.param_map)
    assert jax.tree_util.tree_map(np.shape, field) == jax.tree_util.tree_map(np.shape, expected)
    renders = conditional.render_matrix(np.asarray(raw), teachers, "jax")
    assert renders.shape == (3, SIZE, SIZE, 3) and np.all(np.isfinite(renders))
    loss, metrics = jax.jit(task.loss)(params, batch, key)
    assert loss.dtype == jnp.float32 and np.isfinite(float(loss)) and float(metrics["render_loss"]) > 0


def test_dynamic_variant_generates_layers_from_the_previous_layers_activations(teachers, key):
    config = dataclasses.replace(conditional.PRESETS["tiny"], variant="dynamic")
    task, _, _, _, _, arrays = conditional.prepare_training(config, teachers)
    batch = {name: jnp.asarray(array[:2]) for name, array in arrays.items()}
    params = jax.jit(task.init)(key, batch)
    inputs = conditional.condition_inputs(batch)
    generate = jax.jit(task.generate)
    _, before = generate(params, inputs)
    changed = jax.tree_util.tree_map(lambda x: x, params)
    changed["layer_0_out"]["bias"] = params["layer_0_out"]["bias"] + jnp.float32(0.5)
    _, after = generate(changed, inputs)

    def block(vectors, name):
        return weight_block(teachers.param_map, vectors, name)

    np.testing.assert_array_equal(block(before, "hash_table"), block(after, "hash_table"))
    assert not np.allclose(block(before, "mlp/dense_0/kernel"), block(after, "mlp/dense_0/kernel"))
    # Layer 1 reads the statistics of layer 0's activations at the probes, so it changes too.
    assert not np.allclose(block(before, "mlp/dense_1/kernel"), block(after, "mlp/dense_1/kernel"))


def test_caption_encoder_maps_equal_captions_to_equal_embeddings(key):
    words = sorted({word for caption in ("a red circle", "a blue star") for word in conditional.caption_words(caption)})
    captions = ["a red circle", "A red circle.", "circle red a", "a blue star", "a green circle"]
    ids = conditional.encode_captions(captions, words)
    np.testing.assert_array_equal(ids[0], ids[1])
    assert UNKNOWN_WORD in ids[4] and ids.shape == (5, 3) and not np.any(ids == PAD_WORD)
    spec = ConditionSpec("caption", vocab_size=conditional.FIRST_WORD + len(words))
    encoder = ConditionEncoder(spec, width=16)
    params = encoder.init(key, {"words": jnp.asarray(ids)})
    embeddings = np.asarray(encoder.apply(params, {"words": jnp.asarray(ids)}))
    np.testing.assert_array_equal(embeddings[0], embeddings[1])
    np.testing.assert_allclose(embeddings[0], embeddings[2], rtol=1e-6, atol=1e-6)  # a bag of words
    assert not np.allclose(embeddings[0], embeddings[3])
    padded = conditional.encode_captions(["a red circle"], words, length=6)
    assert padded.shape == (1, 6) and np.all(padded[0, 3:] == PAD_WORD)
    np.testing.assert_allclose(np.asarray(encoder.apply(params, {"words": jnp.asarray(padded)}))[0], embeddings[0],
                               rtol=1e-6, atol=1e-6)


def test_text_encoder_embeds_captions_offline_and_knows_unseen_words():
    from hypernets.text_encoder import EMBEDDING_DIM, embed_captions

    embeddings = embed_captions(["a red circle", "a crimson disc", "a blue square", ""])
    assert embeddings.shape == (4, EMBEDDING_DIM) and embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings[:3], axis=1), 1.0, rtol=1e-5)
    # Words no training caption uses still land near their synonyms: a pretrained table, not a learned vocabulary.
    assert embeddings[0] @ embeddings[1] > embeddings[0] @ embeddings[2]
    np.testing.assert_array_equal(embeddings[0], embed_captions(["a red circle"])[0])


def test_text_condition_trains_from_caption_embeddings(teachers, tmp_path, capsys):
    workdir = tmp_path / "text"
    status, _, err = run_entry_point(conditional.main, ["--data", teachers.path, "--workdir", str(workdir),
                                                        "--preset", "tiny", "--condition", "text", "--quiet"], capsys)
    assert status == 0, err
    vocabulary = json.loads((workdir / "vocabulary.json").read_text())
    assert "wordllama" in vocabulary["text_encoder"]
    zero_shot = json.loads((workdir / "zero_shot.json").read_text())
    assert zero_shot  # the held-out captions were generated and scored


# ------------------------------------------------------------------------------------------- zero-shot


def test_held_out_split_contains_no_training_combination(teachers, trained_run):
    modulus = conditional.PRESETS["tiny"].holdout_modulus
    mask, rule = conditional.held_out_mask(teachers, modulus, 0)
    pairs = list(zip(teachers.shapes, teachers.colours, strict=True))
    held = {pair for pair, out in zip(pairs, mask, strict=True) if out}
    trained = {pair for pair, out in zip(pairs, mask, strict=True) if not out}
    assert held and trained and not held & trained and "held out" in rule
    # Over all pairs the rule keeps every shape and every colour in training.
    for test_modulus in (2, 4, 7):
        out = {(shape, colour) for shape in SHAPES_2D for colour in PALETTE
               if conditional.pair_is_held_out(shape, colour, test_modulus)}
        assert out and all(any((shape, colour) not in out for colour in PALETTE) for shape in SHAPES_2D)
        assert all(any((shape, colour) not in out for shape in SHAPES_2D) for colour in PALETTE)


def test_finetune_counter_is_zero_from_the_teachers_own_weights(teachers):
    rows = np.arange(2)
    images = teachers.true_images(rows)
    target = batch_psnr(images, conditional.render_matrix(teachers.matrix[rows], teachers, "jax"))
    caps = teachers.steps[rows]
    result = conditional.finetune_steps(teachers.matrix[rows], images, target, caps, teachers.fit_config,
                                        teachers.param_map, teachers.seeds[rows], check_every=5)
    np.testing.assert_array_equal(result.steps, [0, 0])
    assert result.reached.all()
    fresh = conditional.initial_weights(teachers.fit_config, teachers.param_map, teachers.seeds[rows] + 7)
    from_fresh = conditional.finetune_steps(fresh, images, target, caps, teachers.fit_config, teachers.param_map,
                                            teachers.seeds[rows], check_every=5)
    assert np.all(from_fresh.steps > 0) and np.all(from_fresh.steps <= caps)


# ------------------------------------------------------------------------------------------- bad input


def test_nerf_data_without_its_fit_config_gets_a_one_line_error(tmp_path, capsys):
    pmap = [ParamEntry("hash_table", (8, 2), 0, 16, "hash"), ParamEntry("mlp/dense_0/kernel", (4, 4), 16, 16, "mlp")]
    path = str(tmp_path / "nerf.parquet")
    write_shard(path, np.zeros((2, 32), np.float32), {"source_id": ["a", "b"]}, "ngp_nerf", {}, pmap)
    workdir = tmp_path / "run"
    status, _, err = run_entry_point(conditional.main, ["--data", path, "--workdir", str(workdir), "--preset", "tiny"],
                                     capsys)
    assert_one_line_error(status, err, "no NeRF fit config")
    assert not workdir.exists()


def test_conflicting_sources_and_missing_attributes_get_one_line_errors(tmp_path, capsys, teachers):
    status, _, err = run_entry_point(conditional.main, ["--data", teachers.path, "--make-teachers", "4",
                                                        "--workdir", str(tmp_path / "a")], capsys)
    assert_one_line_error(status, err, "not both")
    status, _, err = run_entry_point(conditional.main, ["--workdir", str(tmp_path / "b")], capsys)
    assert_one_line_error(status, err, "--make-teachers")
    # A dataset without attributes (no columns, no procedural source ids) cannot be attribute-conditioned.
    plain = str(tmp_path / "plain.parquet")
    write_shard(plain, teachers.matrix[:4], {"source_id": [f"img{k}" for k in range(4)], "label": [0, 1, 0, 1]},
                "ngp_image", read_dataset(teachers.path).field_config, teachers.param_map,
                extra_schema_metadata={"image_height": SIZE, "image_width": SIZE})
    status, _, err = run_entry_point(conditional.main, ["--data", plain, "--workdir", str(tmp_path / "c"),
                                                        "--preset", "tiny", "--condition", "attributes"], capsys)
    assert_one_line_error(status, err, "'shape' and 'colour'")


# ------------------------------------------------------------------------------------------- NeRF teachers

NERF_SCENES = 10
NERF_STEPS = 20


@pytest.fixture(scope="module")
def nerf_fields(tmp_path_factory):
    """Ten single-object 16x16 procedural scenes and their tiny NeRF fields (encode_dataset, shared init)."""
    from fields import encode_dataset
    from fields.data.procgen_3d import ViewConfig, generate_scenes

    root = tmp_path_factory.mktemp("nerf")
    scenes = root / "scenes"
    generate_scenes(str(scenes), NERF_SCENES, ViewConfig(views={"train": 4, "val": 0, "test": 1}, resolution=16),
                    seed=1, num_objects=(1, 1), progress=False)
    out = root / "fields"
    assert encode_dataset.main(["--source", f"scenes:{scenes}", "--out", str(out), "--preset", "tiny", "--steps",
                                str(NERF_STEPS), "--fields-per-batch", str(NERF_SCENES), "--eval-views", "1",
                                "--backend", "jax", "--quiet"]) == 0
    return str(scenes), str(out)


@pytest.fixture(scope="module")
def nerf_teachers(nerf_fields):
    return conditional.load_teachers(nerf_fields[1], "jax", eval_views=1)


@pytest.fixture(scope="module")
def nerf_run(nerf_fields, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("nerf-run") / "run")
    assert conditional.main(["--data", nerf_fields[1], "--workdir", workdir, "--preset", "nerf-tiny", "--quiet"]) == 0
    return workdir


def test_nerf_teachers_carry_their_scenes_attributes_views_and_grids(nerf_fields, nerf_teachers):
    from fields.data.procgen_3d import SHAPES

    teachers = nerf_teachers
    assert teachers.is_nerf and len(teachers) == NERF_SCENES and (teachers.height, teachers.width) == (16, 16)
    for row in range(NERF_SCENES):
        with open(os.path.join(teachers.scenes.folders[row], "scene.json")) as handle:
            info = json.load(handle)
        shape, colour = info["objects"][0]["shape"], info["objects"][0]["colour"]
        assert (teachers.shapes[row], teachers.colours[row], teachers.captions[row]) == (
            shape, colour, f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape}")
        np.testing.assert_allclose(teachers.layouts[row, :3], info["objects"][0]["position"])
    assert teachers.scenes.test_views.shape == (NERF_SCENES, 1, 16, 16, 3)
    assert teachers.scenes.train_cameras.shape == (NERF_SCENES, 4, 4, 4)
    cells = teachers.fit_config.occupancy.resolution ** 3
    assert teachers.scenes.bitfields.shape == (NERF_SCENES, cells // 8) and teachers.scenes.bitfields.dtype == np.uint8
    np.testing.assert_array_equal(teachers.init_seeds, 0)  # encode_dataset --init shared
    mask, rule = conditional.held_out_mask(teachers, conditional.PRESETS["nerf-tiny"].holdout_modulus, 0)
    assert mask.any() and not mask.all()
    for shape, colour, out in zip(teachers.shapes, teachers.colours, mask, strict=True):
        assert out == conditional.pair_is_held_out(shape, colour, conditional.PRESETS["nerf-tiny"].holdout_modulus,
                                                   tuple(SHAPES))
    conditions = conditional.build_conditions("attributes", True, teachers, np.flatnonzero(~mask))
    assert conditions.arrays["layout"].shape == (NERF_SCENES, 15)


def test_nerf_renders_match_the_fitting_renderer(nerf_teachers):
    """The vmapped evaluation renderer gives what fields.nerf_fitting's view renderer gives with the same grid."""
    from fields.models.nerf import NeRFField
    from fields.nerf_fitting import make_view_renderer

    teachers = nerf_teachers
    rows = np.arange(2)
    renders = conditional.render_rows(teachers.matrix[rows], teachers, rows, "jax")
    assert renders.shape == (2, 1, 16, 16, 3)
    model = NeRFField(teachers.field_config, backend="jax")
    render = make_view_renderer(model, teachers.fit_config)
    for row in rows:
        params = vector_to_params(teachers.matrix[row], teachers.param_map)
        rgb, _, _ = render(params, jnp.asarray(teachers.scenes.bitfields[row]), teachers.scenes.test_cameras[row, 0],
                           teachers.scenes.test_intrinsics[row, 0], 16, 16, np.ones(3, np.float32))
        np.testing.assert_allclose(renders[row, 0], rgb, atol=2e-4)
    # Scored as fields.encode_dataset scored them (its grids were the trained ones: close, not equal).
    psnr = conditional.field_psnr(teachers.references(rows), renders)
    dataset_psnr = np.asarray(read_dataset(teachers.path).columns["psnr"])[rows]
    np.testing.assert_allclose(psnr, dataset_psnr, atol=1.5)


@pytest.mark.parametrize("variant", conditional.VARIANTS)
def test_generated_nerf_weights_have_the_teachers_param_map(nerf_teachers, variant, key):
    config = dataclasses.replace(conditional.PRESETS["nerf-tiny"], variant=variant)
    task, _, _, _, _, arrays = conditional.prepare_training(config, nerf_teachers)
    assert {"bitfield", "cameras", "intrinsics"} <= set(arrays)
    batch = {name: jnp.asarray(array[:2]) for name, array in arrays.items()}
    params = jax.jit(task.init)(key, batch)
    _, raw = jax.jit(task.generate)(params, conditional.condition_inputs(batch))
    assert raw.shape == (2, param_count(nerf_teachers.param_map)) and raw.dtype == jnp.float32
    assert np.all(np.isfinite(conditional.render_rows(np.asarray(raw), nerf_teachers, np.arange(2), "jax")))
    if variant == "dynamic":  # the colour MLP is generated from the density MLP's activations
        changed = jax.tree_util.tree_map(lambda x: x, params)
        changed["layer_0_out"]["bias"] = params["layer_0_out"]["bias"] + jnp.float32(0.5)
        _, after = jax.jit(task.generate)(changed, conditional.condition_inputs(batch))

        def block(vectors, name):
            return weight_block(nerf_teachers.param_map, vectors, name)

        np.testing.assert_array_equal(block(raw, "hash_table"), block(after, "hash_table"))
        assert not np.allclose(block(raw, "density_mlp/dense_1/kernel"), block(after, "density_mlp/dense_1/kernel"))
        assert not np.allclose(block(raw, "color_mlp/dense_0/kernel"), block(after, "color_mlp/dense_0/kernel"))


def test_nerf_run_distills_and_writes_the_zero_shot_report(nerf_run, nerf_teachers):
    from fields.data.procgen_3d import SHAPES

    rows = [row for row in read_history(nerf_run) if "render_loss" in row]
    assert rows[-1]["step"] == conditional.PRESETS["nerf-tiny"].loop.steps
    assert np.isfinite(rows[-1]["render_loss"]) and rows[-1]["render_loss"] < rows[0]["render_loss"]
    with open(os.path.join(nerf_run, "zero_shot.json")) as handle:
        report = json.load(handle)
    assert report["field_kind"] == "ngp_nerf" and report["reference"] == "true test views"
    assert report["num_evaluated"] >= 1 and report["num_held_out"] + report["num_training"] == NERF_SCENES
    modulus = conditional.PRESETS["nerf-tiny"].holdout_modulus
    trained = {(shape, colour) for shape, colour in zip(nerf_teachers.shapes, nerf_teachers.colours, strict=True)
               if not conditional.pair_is_held_out(shape, colour, modulus, tuple(SHAPES))}
    for item in report["items"]:
        assert (item["shape"], item["colour"]) not in trained
        assert 0 <= item["finetune_steps_from_generated"] <= item["max_steps"] == NERF_STEPS
        assert 0 < item["finetune_steps_from_fresh"] <= NERF_STEPS
        assert np.isfinite(item["generated_psnr"]) and item["teacher_psnr"] > 5.0  # 20-step teachers
    assert np.isfinite(report["baseline_nearest_training_psnr"]) and np.isfinite(report["baseline_mean_image_psnr"])
    assert os.path.exists(os.path.join(nerf_run, "zero_shot.png"))


def test_nerf_finetune_counter_is_zero_from_the_teachers_own_weights(nerf_teachers):
    teachers = nerf_teachers
    rows = np.arange(2)
    target = conditional.field_psnr(teachers.references(rows),
                                    conditional.render_rows(teachers.matrix[rows], teachers, rows, "jax"))
    caps = teachers.steps[rows]  # the run's finetuning shapes: its compiled chunk is reused
    result = conditional.finetune_nerf_steps(teachers.matrix[rows], rows, teachers, target, caps,
                                             teachers.seeds[rows], check_every=5)
    np.testing.assert_array_equal(result.steps, [0, 0])
    fresh = conditional.initial_weights(teachers.fit_config, teachers.param_map, teachers.init_seeds[rows])
    from_fresh = conditional.finetune_nerf_steps(fresh, rows, teachers, target, caps, teachers.seeds[rows],
                                                 check_every=5)
    assert np.all(from_fresh.steps > 0) and np.all(from_fresh.steps <= NERF_STEPS)
