"""Shared CLI plumbing: the store from ``--root``, user errors, and where files come from and
go to (a path, or ``-`` for stdin/stdout)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, BinaryIO

from imagestore.errors import StoreError

if TYPE_CHECKING:  # the store loads when a command uses it (strata umount does not)
    from imagestore import Store


class UserError(Exception):
    """A problem the user can fix: printed as one line, exit status ``exit_code``."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def store_of(args: argparse.Namespace) -> Store:
    from imagestore import Store

    return Store(args.root, max_layer_size=getattr(args, "max_layer_size", None))


def root_of(args: argparse.Namespace) -> str:
    """The store's root directory, without opening the store."""
    from imagestore.paths import root_of

    return root_of(args.root)


def size_arg(text: str) -> int:
    """An argparse type: ``10G``, ``512M``, ``1T`` or bytes."""
    from imagestore.compress import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def output(path: str | None, what: str) -> str | BinaryIO:
    """Where an archive goes: ``path``, or stdout when ``path`` is None or ``-`` (refused on a
    terminal, as docker does)."""
    if path not in (None, "-"):
        assert path is not None
        return path
    if sys.stdout.isatty():
        raise UserError(f"cowardly refusing to save {what} to a terminal. "
                        "Use the -o flag or redirect")
    sys.stdout.flush()
    return sys.stdout.buffer


def source(path: str) -> str | BinaryIO:
    """A file argument, or stdin for ``-``."""
    return sys.stdin.buffer if path == "-" else path


def each(items: Sequence[str], act: Callable[[str], object]) -> int:
    """``act`` on every item, as docker's ``rm``/``rmi`` do: an error is one line on stderr
    and makes the exit status 1, and the other items go on."""
    status = 0
    for item in items:
        try:
            act(item)
        except StoreError as exc:
            print(f"Error: {exc}", file=sys.stderr)
            status = 1
    return status


def confirm(question: str) -> bool:
    """Ask on the terminal; a closed or non-terminal stdin answers no (as docker does on EOF)."""
    print(f"{question} [y/N] ", end="", flush=True)
    answer = sys.stdin.readline()
    return answer.strip().lower() in ("y", "yes")
