"""Typed, frozen dataclass configs: conversion to and from JSON-able dicts, with clear errors.

Configs are nested frozen dataclasses. ``config_to_dict`` / ``config_from_dict`` round-trip them
through plain dicts (the form saved in work directories and in safetensors metadata).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, TypeVar

ConfigT = TypeVar("ConfigT")


def resolve_preset(presets: dict, name: str, overrides: dict, what: str = "preset"):
    """``presets[name]`` with the non-None ``overrides`` applied.

    Raises:
        UserError: an unknown name, or an override the config rejects (one line, naming the field).
    """
    from fields.cli import UserError

    if name not in presets:
        raise UserError(f"unknown {what} {name!r}; choose one of: {', '.join(presets)}")
    try:
        return dataclasses.replace(presets[name], **{k: v for k, v in overrides.items() if v is not None})
    except ValueError as error:
        raise UserError(str(error)) from None


class ConfigError(ValueError):
    """A config that does not parse or does not fit; the message names the field."""


def config_to_dict(config: Any) -> dict[str, Any]:
    """Nested dataclass -> plain dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def config_to_json(config: Any) -> str:
    return json.dumps(config_to_dict(config), indent=2, sort_keys=True)


def config_from_dict(cls: type[ConfigT], values: dict[str, Any], where: str = "config") -> ConfigT:
    """Builds ``cls`` from a dict, recursing into nested dataclass fields.

    Raises:
        ConfigError: naming the unknown, missing or invalid field.
    """
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected an object, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    known = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}")
    kwargs = {}
    for field in dataclasses.fields(cls):
        if field.name not in values:
            continue
        kwargs[field.name] = _convert(hints[field.name], values[field.name], f"{where}.{field.name}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{where}: {error}") from None


def _convert(hint: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return config_from_dict(hint, value, where)
    origin = typing.get_origin(hint)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(value)
    if origin in (typing.Union, types.UnionType):
        return value
    if hint in (int, float, str, bool) and not isinstance(value, hint):
        if hint is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


# ------------------------------------------------------------------------------ saved run records


def flatten_config(values: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> ``{"a.b.c": value}``."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def read_config_record(path: str) -> Any | None:
    """A saved JSON record (a work directory's ``config.json``, a dataset's ``field_config.json``),
    or None when the file does not exist.

    Raises:
        UserError: the file exists but does not parse.
    """
    import os

    from fields.cli import UserError

    if not os.path.exists(path):
        return None
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"cannot read {path}: {error}") from None


def check_run_config(directory: str, saved: dict | None, current: dict, free_fields=(), *,
                     holds: str = "a run with a different config", option: str = "--workdir") -> None:
    """Refuses (one-line ``UserError``: "``directory`` holds ``holds`` (first difference); use another
    ``option``") a directory whose saved record differs from ``current`` outside ``free_fields``
    (dotted names such as ``"diffusion.num_samples"``). Nothing to check when ``saved`` is None."""
    from fields.cli import UserError

    if saved is None:
        return
    saved_flat, current_flat = flatten_config(saved), flatten_config(json.loads(json.dumps(current)))
    free = set(free_fields)
    differences = [name for name in sorted(set(saved_flat) | set(current_flat))
                   if name not in free and saved_flat.get(name) != current_flat.get(name)]
    if differences:
        name = differences[0]
        more = f"; {len(differences) - 1} more" if len(differences) > 1 else ""
        raise UserError(f"{directory} holds {holds} ({name}: {saved_flat.get(name)!r} there, "
                        f"{current_flat.get(name)!r} now{more}); use another {option}")
