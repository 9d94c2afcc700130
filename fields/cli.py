"""Command-line plumbing shared by the entry points: one-line errors with exit status 2."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable

EXIT_USAGE = 2


class UserError(Exception):
    """Bad input from the user (file, config, argument). Printed as one line, exit status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (and exit status 2), without the usage."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def prepare_workdir(workdir: str) -> None:
    """Creates ``workdir`` and checks that it is writable (``UserError`` otherwise)."""
    try:
        os.makedirs(workdir, exist_ok=True)
        # A probe file of its own (several processes of one multi-host run prepare the same workdir).
        with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_test-") as handle:
            handle.write(b"ok")
    except OSError as error:
        raise UserError(f"cannot write to workdir {workdir}: {error.strerror or error}") from None


def run_main(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Runs ``main`` and turns ``UserError`` into one line on stderr and exit status 2."""
    try:
        status = main(argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(status or 0)
