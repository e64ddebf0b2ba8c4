"""Shared CLI plumbing: the store from ``--root``, user errors, and output files."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported when used: start-up time of the commands that need no store
    from imagestore.store import Store


class UserError(Exception):
    """A problem the user can fix: printed as one line, exit status ``exit_code``."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def store_of(args: argparse.Namespace) -> Store:
    from imagestore.store import Store

    return Store(args.root, max_layer_size=getattr(args, "max_layer_size", None))


def size_arg(text: str) -> int:
    """An argparse type: ``10G``, ``512M``, ``1T`` or bytes."""
    from imagestore.compress import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


@contextlib.contextmanager
def output_sink(path: str | None, what: str) -> Iterator[Callable[[bytes], object]]:
    """Where an archive goes: ``path`` (written to a temp file, renamed on success, so a failure
    never leaves a partial file) or stdout when ``path`` is None or ``-``."""
    import tempfile

    if path in (None, "-"):
        if sys.stdout.isatty():
            raise UserError(f"cowardly refusing to save {what} to a terminal. "
                            "Use the -o flag or redirect")
        out = sys.stdout.buffer
        yield out.write
        out.flush()
        return
    assert path is not None
    if os.path.isdir(path):
        raise UserError(f"invalid output path: {path} is a directory")
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".strata-")
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            yield f.write
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        try:
            os.rename(tmp, path)
        except OSError as exc:
            raise UserError(f"cannot write {path}: {exc.strerror}") from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def confirm(question: str) -> bool:
    """Ask on the terminal; a closed or non-terminal stdin answers no (as docker does on EOF)."""
    print(f"{question} [y/N] ", end="", flush=True)
    answer = sys.stdin.readline()
    return answer.strip().lower() in ("y", "yes")
