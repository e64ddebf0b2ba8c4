"""Atomic file operations for the store: temp file in the same file system, fsync, rename.

Caveats:
* ``ENOSPC``/``EDQUOT`` become ``StoreFull`` so the CLI prints one line; the temp file is
  removed first, so a full disk never leaves partial content behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator

from .errors import StoreFull

_FULL = (errno.ENOSPC, errno.EDQUOT)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
