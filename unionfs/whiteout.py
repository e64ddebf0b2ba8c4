"""Whiteout and opaque-directory encodings: the only module that knows them.

Three encodings meet here:

* **OCI layer tars**: ``.wh.NAME`` hides NAME of lower layers, ``DIR/.wh..wh..opq`` makes DIR
  opaque.  Other ``.wh..wh.*`` names are AUFS metadata and are ignored.
* **overlayfs directories** (an upper, or a lower given as a plain directory): a whiteout is a
  character device 0/0, or (Linux 6.7+) a zero-size file carrying ``trusted.overlay.whiteout``;
  an opaque directory carries ``trusted.overlay.opaque=y`` (``user.overlay.opaque`` with the
  ``userxattr`` option, ``user.fuseoverlayfs.opaque`` from fuse-overlayfs).
* **AUFS-style files in directories**: fuse-overlayfs falls back to an empty ``.wh.NAME`` file
  when mknod is refused, and writes ``.wh..wh..opq`` files; both are read here as well.

Seams: ``classify_tar_name`` for the tar indexer, ``is_whiteout_stat``/``opaque_from_xattrs`` for
directory layers, ``make_whiteout*``/``drop_whiteout_file``/``make_opaque`` for the upper (the
only writer; nothing else encodes a whiteout), and
``is_private_xattr`` for every place that must hide or drop overlay-private attributes.

Caveats:
* ``trusted.*`` xattrs need CAP_SYS_ADMIN; without it the ``user.overlay.*`` forms are written.
* A name that merely starts with ``.wh.`` can never be stored in a layer: it would read as a
  whiteout.  The union refuses to create such names (``is_reserved_name``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable
from enum import Enum

WH_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
_AUFS_META_PREFIX = ".wh..wh."

OVERLAY_OPAQUE_XATTRS = (
    "trusted.overlay.opaque",
    "user.overlay.opaque",
    "user.fuseoverlayfs.opaque",
)
OVERLAY_WHITEOUT_XATTRS = ("trusted.overlay.whiteout", "user.overlay.whiteout")

# Ownership/mode recorded for copy-ups a non-root mount cannot chown (containers/storage).
OVERRIDE_STAT_XATTR = "user.containers.override_stat"

_PRIVATE_PREFIXES = (
    "trusted.overlay.",
    "user.overlay.",
    "user.fuseoverlayfs.",
    "security.fuseoverlayfs.",
    "user.containers.override_",
)


class TarName(Enum):
    NORMAL = "normal"
    WHITEOUT = "whiteout"
    OPAQUE = "opaque"
    META = "meta"  # AUFS metadata such as .wh..wh.plnk: ignored


class WhiteoutError(ValueError):
    """A whiteout name that cannot be honoured (``.wh.`` alone, ``.wh..``, ``.wh..wh..opq``
    used as a target)."""


def classify_tar_name(basename: str) -> tuple[TarName, str]:
    """Classify the basename of a layer-tar entry.

    Returns ``(kind, target)`` where ``target`` is the hidden name for a whiteout and ``""``
    otherwise.  Raises ``WhiteoutError`` for whiteouts that name nothing or climb out.
    """
    if not basename.startswith(WH_PREFIX):
        return TarName.NORMAL, ""
    if basename == OPAQUE_MARKER:
        return TarName.OPAQUE, ""
    if basename.startswith(_AUFS_META_PREFIX):
        return TarName.META, ""
    target = basename[len(WH_PREFIX) :]
    if target in ("", ".", ".."):
        raise WhiteoutError(f"invalid whiteout {basename!r}")
    return TarName.WHITEOUT, target


def tar_whiteout_name(name: str) -> str:
    """The OCI tar basename that hides ``name``."""
    return WH_PREFIX + name


def is_reserved_name(name: str) -> bool:
    """True for names that would read as a whiteout or marker in some layer format."""
    return name.startswith(WH_PREFIX)


def is_private_xattr(name: str) -> bool:
    """True for overlay-private and strata-internal xattrs: never shown, never applied."""
    return name.startswith(_PRIVATE_PREFIXES)


def is_whiteout_stat(st: os.stat_result) -> bool:
    """A character device 0/0: the kernel overlayfs whiteout."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def opaque_from_xattrs(names: list[str], get: Callable[[str], bytes]) -> bool:
    """Whether a directory with xattr ``names`` is opaque; ``get(name)`` reads one value."""
    for key in OVERLAY_OPAQUE_XATTRS:
        if key in names:
            with contextlib.suppress(OSError):
                if get(key) == b"y":
                    return True
    return False


def whiteout_from_xattrs(names: list[str]) -> bool:
    """A zero-size regular file with an overlay whiteout xattr (Linux 6.7+ format)."""
    return any(key in names for key in OVERLAY_WHITEOUT_XATTRS)


def _overlay_xattr_prefix() -> str:
    return "trusted.overlay." if os.geteuid() == 0 else "user.overlay."


def make_whiteout_device(dir_fd: int, name: str) -> None:
    """Create the kernel's whiteout, a character device 0/0, as ``name`` in ``dir_fd``;
    PermissionError where mknod is refused (no CAP_MKNOD)."""
    os.mknod(name, 0o600 | stat.S_IFCHR, os.makedev(0, 0), dir_fd=dir_fd)


def make_whiteout(dir_fd: int, name: str) -> None:
    """Create a whiteout for ``name`` in the directory ``dir_fd``.

    A character device 0/0 where mknod is allowed, else an empty ``.wh.NAME`` file (the
    fuse-overlayfs fallback).  Not idempotent: the name must not exist.
    """
    try:
        make_whiteout_device(dir_fd, name)
    except PermissionError:
        fd = os.open(WH_PREFIX + name, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC,
                     0o600, dir_fd=dir_fd)
        os.close(fd)


def drop_whiteout_file(dir_fd: int, name: str) -> None:
    """Remove the ``.wh.NAME`` file that hides ``name`` in ``dir_fd``, if there is one."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(WH_PREFIX + name, dir_fd=dir_fd)


def make_opaque(dir_fd: int, name: str) -> None:
    """Mark the directory ``name`` of ``dir_fd`` opaque (overlay xattr; the marker file where
    xattrs are refused)."""
    try:
        os.setxattr(f"/proc/self/fd/{dir_fd}/{name}", _overlay_xattr_prefix() + "opaque", b"y",
                    follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EACCES):
            raise
        fd = os.open(f"{name}/{OPAQUE_MARKER}", os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600,
                     dir_fd=dir_fd)
        os.close(fd)


def parse_override(raw: bytes) -> tuple[int, int, int] | None:
    """``uid:gid:mode`` from ``user.containers.override_stat`` (mode in octal)."""
    try:
        uid, gid, mode = raw.decode().split(":")[:3]
        return int(uid), int(gid), int(mode, 8) & 0o7777
    except (ValueError, UnicodeDecodeError):
        return None
