"""Atomic file operations for the store: temp file in the same file system, fsync, rename;
and ``output_sink``, where an archive or export goes (a path written the same way, or a file).

Caveats:
* ``ENOSPC``/``EDQUOT`` become ``StoreFull`` so the CLI prints one line; the temp file is
  removed first, so a full disk never leaves partial content behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Callable, Iterator
from typing import BinaryIO

from .errors import OutputError, StoreFull

_FULL = (errno.ENOSPC, errno.EDQUOT)


def fsync_path(path: str) -> None:
    """fsync the file or directory at ``path``."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    fsync_path(path)


@contextlib.contextmanager
def disk_full_guard(what: str) -> Iterator[None]:
    """Turn ENOSPC/EDQUOT raised inside the block into ``StoreFull``."""
    try:
        yield
    except OSError as exc:
        if exc.errno in _FULL:
            raise StoreFull(f"no space left on device while writing {what}") from None
        raise


def atomic_write(path: str, data: bytes, tmp_dir: str | None = None, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` atomically (readers see the old or the new file)."""
    directory = tmp_dir or os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with disk_full_guard(path):
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, mode)
            os.rename(tmp, path)
        fsync_dir(os.path.dirname(path))
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def unshared_size(path: str) -> int:
    """Bytes that removing the file or tree at ``path`` gives back: the files whose last link
    it holds (a file hardlinked from elsewhere frees nothing).  Missing is 0."""
    total = 0
    for dirpath, _dirs, files in os.walk(path) if os.path.isdir(path) else [("", [], [path])]:
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(os.path.join(dirpath, name))
                if st.st_nlink == 1:
                    total += st.st_size
    return total


@contextlib.contextmanager
def output_sink(dest: str | os.PathLike[str] | BinaryIO,
                what: str) -> Iterator[Callable[[bytes], object]]:
    """A sink writing to ``dest``: a file object as is, or a path through a temp file in the
    same directory, renamed into place on success (a failure leaves nothing behind).  Errors
    writing it are ``OutputError``; errors of the block pass unchanged."""
    if not isinstance(dest, str | os.PathLike):
        out = dest

        def write_to(data: bytes) -> None:
            try:
                out.write(data)
            except OSError as exc:
                raise OutputError(f"cannot write {what}: {exc.strerror or exc}") from None

        yield write_to
        return
    path = os.fspath(dest)
    if os.path.isdir(path):
        raise OutputError(f"invalid output path: {path} is a directory")

    def fail(exc: OSError) -> OutputError:
        return OutputError(f"cannot write {path}: {exc.strerror or exc}")

    try:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".strata-")
    except OSError as exc:
        raise fail(exc) from None
    try:
        with os.fdopen(fd, "wb") as f:

            def write(data: bytes) -> None:
                try:
                    f.write(data)
                except OSError as exc:
                    raise fail(exc) from None

            yield write
            try:
                f.flush()
                os.fsync(f.fileno())
                os.chmod(tmp, 0o644)
                os.rename(tmp, path)
            except OSError as exc:
                raise fail(exc) from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
