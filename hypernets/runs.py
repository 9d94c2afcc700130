"""A hypernet run's ``W/config.json`` (what was trained on what) and its sample grid picture.

``config.json`` holds a record such as ``{"data": path, "diffusion": {...config...}}``. Rerunning in
the same work directory must use the same record, except for fields that only change sampling or
logging (``free_fields``, dotted names such as ``"diffusion.num_samples"``). ``hypernets.evaluate``
checks its ``OUT/config.json`` the same way. Files are written atomically with :mod:`fields.files`.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from fields.cli import UserError
from fields.config import read_config_record
from fields.files import write_json

CONFIG_NAME = "config.json"


def read_saved_run(workdir: str, section: str | None, program: str) -> dict | None:
    """``W/config.json`` as a dict, or None when absent.

    Raises:
        UserError: unreadable JSON, not a JSON object, or (``section`` given) a record without
            ``section`` (another program's run).
    """
    path = os.path.join(workdir, CONFIG_NAME)
    saved = read_config_record(path)
    if saved is None:
        return None
    if not isinstance(saved, dict) or (section is not None and not isinstance(saved.get(section), dict)):
        raise UserError(f"{path} is not a {program} run config")
    return saved


def rerun_free_fields(section: str, names, args, saved: dict | None) -> list[str]:
    """The dotted ``free_fields`` of ``check_run_config`` for a hypernet CLI: ``section.name`` for each
    of ``names`` and, with ``--extend`` (``hypernets.loop.add_loop_arguments``), ``section.loop.steps``:
    a saved run may then go on to a larger ``--steps``.

    Raises:
        UserError: ``--extend`` without a saved run, or without a ``--steps`` above the saved run's.
    """
    free = [f"{section}.{name}" for name in names]
    if not args.extend:
        return free
    saved_steps = ((saved or {}).get(section) or {}).get("loop", {}).get("steps")
    if saved_steps is None:
        raise UserError(f"--extend: {args.workdir} holds no saved run to extend")
    if args.steps is None or args.steps <= saved_steps:
        raise UserError(f"--extend: give --steps above the saved run's {saved_steps}")
    return free + [f"{section}.loop.steps"]


def write_run(workdir: str, current: dict) -> None:
    """Saves ``W/config.json`` atomically."""
    write_json(os.path.join(workdir, CONFIG_NAME), current)


def write_sample_grid(path: str, matrix: np.ndarray, dataset) -> bool:
    """Renders image fields ``matrix [n, P]`` (raw weights laid out like ``dataset``: anything with
    ``field_kind``, ``field_config``, ``param_map`` and ``metadata``) into a grid PNG at ``path``.

    Returns False (nothing written) for kinds without image renders or an unknown image size.
    """
    from hypernets.rendering import IMAGE_KINDS, RenderSettings, render_fields, save_grid

    metadata = dataset.metadata
    if dataset.field_kind not in IMAGE_KINDS or "image_height" not in metadata or "image_width" not in metadata:
        return False
    renders = render_fields(matrix, dataset.field_kind, dataset.field_config, dataset.param_map, metadata,
                            RenderSettings(), where=path)
    save_grid(path, renders.previews, columns=max(1, math.ceil(math.sqrt(len(matrix)))))
    return True


def resolve_run_config(config_class: type, presets: dict, args, saved: dict | None, section: str,
                       overrides: dict[str, Any]):
    """The run's config: ``presets[args.preset]`` (or, without ``--preset``, the config saved in the
    work directory's ``section``, else the ``default`` preset) with the loop arguments of
    ``hypernets.loop.add_loop_arguments`` and the non-None ``overrides`` applied.

    Raises:
        UserError: an unknown preset, a saved config that does not parse, or an override the config rejects.
    """
    import dataclasses

    from fields.config import ConfigError, config_from_dict
    from hypernets.loop import loop_overrides

    if args.preset is None and saved is not None:
        try:
            base = config_from_dict(config_class, saved[section], f"{CONFIG_NAME}: {section}")
        except ConfigError as error:
            raise UserError(str(error)) from None
    else:
        name = args.preset or "default"
        if name not in presets:
            raise UserError(f"unknown preset {name!r}; choose one of: {', '.join(presets)}")
        base = presets[name]
    try:
        loop = dataclasses.replace(base.loop, **loop_overrides(args))
        return dataclasses.replace(base, loop=loop, **{k: v for k, v in overrides.items() if v is not None})
    except (ValueError, TypeError) as error:
        raise UserError(str(error)) from None


# ------------------------------------------------------------------------------------ generators' runs

SAMPLES_DIRECTORY = "samples"
SAMPLES_SHARD = "samples-000000.parquet"


def num_classes_of(labels: np.ndarray) -> int:
    """Classes ``[0, max label]`` of a label column (0 when every label is unknown, -1)."""
    return int(labels.max()) + 1 if labels.size and labels.max() >= 0 else 0


def sample_labels(num_samples: int, num_classes: int, conditional: bool, label: int | None = None) -> np.ndarray:
    """``[num_samples]`` int32: ``label``, or round-robin over the classes, when conditional; else -1."""
    if not conditional or num_classes == 0:
        return np.full(num_samples, -1, np.int32)
    if label is not None:
        return np.full(num_samples, label, np.int32)
    return (np.arange(num_samples) % num_classes).astype(np.int32)


def sample_columns(labels: np.ndarray) -> dict[str, list]:
    """The metadata columns of sampled rows: ``source_id`` ``sample-000000``... and ``label``."""
    return {"source_id": [f"sample-{index:06d}" for index in range(len(labels))],
            "label": [int(label) for label in labels]}


def write_sample_fields(workdir: str, weights: np.ndarray, labels: np.ndarray, dataset, extra: dict,
                        directory: str | None = None) -> str:
    """Raw sampled weights ``[n, P]`` as the field dataset ``W/samples`` (or ``directory``), laid out like
    ``dataset`` (its field kind, config and param map); returns the folder."""
    from fields.field_datasets import write_shard

    directory = directory or os.path.join(workdir, SAMPLES_DIRECTORY)
    write_shard(os.path.join(directory, SAMPLES_SHARD), weights, sample_columns(labels), dataset.field_kind,
                dataset.field_config, dataset.param_map, extra_schema_metadata=extra)
    return directory


def restore_or_train(task, stream, loop_config, workdir: str, run_config: dict, *, sample_only: bool,
                     evaluate=None, progress: bool = True):
    """``hypernets.loop.train`` to the end; with ``sample_only``, only restore the newest checkpoint.

    Raises:
        UserError: ``sample_only`` and no checkpoint yet.
    """
    from hypernets.loop import train

    if sample_only:  # restore the newest checkpoint without training (stop at step 0)
        result = train(task, stream, loop_config, workdir, progress=False, run_config=run_config, stop_at_step=0)
        if result.step == 0:
            raise UserError(f"--sample-only: {workdir} holds no trained run (no checkpoint yet; train first)")
        return result
    return train(task, stream, loop_config, workdir, evaluate=evaluate, progress=progress, run_config=run_config)
