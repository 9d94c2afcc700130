"""Atomic file writes: a synced temporary file in the destination's folder, then a rename, so a
reader or a job killed mid-write sees the old file or the new one, never a part of one."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from typing import Any, BinaryIO


@contextlib.contextmanager
def atomic_writer(path: str) -> Iterator[BinaryIO]:
    """``with atomic_writer(path) as handle: ...`` writes ``path`` atomically (its folder is created)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=directory, prefix=".", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        try:  # make the rename durable too (best effort; not every filesystem allows it)
            directory_descriptor = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(directory_descriptor)
            finally:
                os.close(directory_descriptor)
        except OSError:
            pass
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_atomic(path: str, data: str | bytes) -> None:
    """Writes ``data`` (text as UTF-8) to ``path`` atomically."""
    with atomic_writer(path) as handle:
        handle.write(data.encode() if isinstance(data, str) else data)


def write_json(path: str, values: Any) -> None:
    """Writes ``values`` as indented, key-sorted JSON, atomically."""
    write_atomic(path, json.dumps(values, indent=2, sort_keys=True) + "\n")
