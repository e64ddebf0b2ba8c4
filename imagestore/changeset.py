"""Changesets: walk a container's upper directory once -> ``UpperEntry`` values -> A/C/D changes
(``strata diff``) or an OCI layer tar (``strata commit``); and ``export_rootfs``, a merged view
as one flat tar (``strata export``, ``commit --squash``).

The walk reads the upper in every overlayfs form (FORMATS.md b): a whiteout is a char device
0/0, an empty ``.wh.NAME`` file or a zero-size file with an overlay whiteout xattr; an opaque
directory has an overlay opaque xattr or a ``.wh..wh..opq`` file.  The layer gets OCI
``.wh.NAME`` entries, an opaque directory its entry followed by ``DIR/.wh..wh..opq``, hardlinks
inside the upper one data entry and then typeflag-1 entries, xattrs as PAX records without
overlay-private ones, ownership from ``user.containers.override_stat`` where present.  Output is
deterministic: sorted depth-first, whole-second mtimes clamped to ``epoch`` when given, no
atime/ctime, empty uname/gname.  The lowers are never read.

Caveats:
* An upper made by kernel overlayfs with ``redirect_dir`` or ``metacopy`` is refused: its
  content is not all in the upper (strata never writes either).
* Sockets are skipped (a tar cannot hold them), as docker does.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from unionfs import whiteout as wh
from unionfs.resolve import UnionView

from .errors import StoreError
from .tarstream import LINK, REG, TarEntry, TarWriter, typeflag_for

Sink = Callable[[bytes], object]

CHUNK = 1 << 20


class UnsupportedUpper(StoreError):
    """An upper that cannot become a layer (a real file named .wh.*, redirect/metacopy)."""


@dataclass(frozen=True)
class UpperEntry:
    path: str
    kind: str  # whiteout, dir, file, link (hardlink to link_to), symlink, fifo, char, block
    mode: int = 0  # permission bits
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime: int = 0  # seconds
    rdev: int = 0
    target: str = ""
    link_to: str = ""
    opaque: bool = False
    xattrs: dict[str, bytes] = field(default_factory=dict)


_KINDS = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink",
          stat.S_IFIFO: "fifo", stat.S_IFCHR: "char", stat.S_IFBLK: "block"}


def _xattr_names(full: str) -> list[str]:
    try:
        return os.listxattr(full, follow_symlinks=False)
    except OSError:
        return []


def _is_opaque(full: str, names: list[str]) -> bool:
    return wh.opaque_from_xattrs(names, lambda k: os.getxattr(full, k)) or os.path.lexists(
        os.path.join(full, wh.OPAQUE_MARKER))


def walk_upper(root: str, epoch: int | None = None) -> Iterator[UpperEntry]:
    """Every entry of the upper at ``root``, depth first in name order, the root excluded."""
    seen: dict[tuple[int, int], str] = {}
    yield from _walk(root, "", seen, epoch)


def _walk(root: str, rel: str, seen: dict[tuple[int, int], str],
          epoch: int | None) -> Iterator[UpperEntry]:
    full_dir = os.path.join(root, rel) if rel else root
    names = sorted(os.listdir(full_dir))
    present = set(names)
    for name in names:
        path = f"{rel}/{name}" if rel else name
        full = os.path.join(full_dir, name)
        st = os.lstat(full)
        if name == wh.OPAQUE_MARKER:
            continue  # read with its directory
        if wh.is_reserved_name(name):
            target = _aufs_whiteout(name, st, path)
            if target is not None and target not in present:
                yield UpperEntry(f"{rel}/{target}" if rel else target, "whiteout",
                                 mtime=_clamp(st.st_mtime, epoch))
            continue
        names_x = _xattr_names(full) if not stat.S_ISLNK(st.st_mode) else []
        if any(n.endswith(("overlay.redirect", "overlay.metacopy")) for n in names_x):
            raise UnsupportedUpper(f"{path}: the upper uses overlayfs redirect_dir/metacopy, "
                                   "which strata cannot commit")
        if wh.is_whiteout_stat(st) or (stat.S_ISREG(st.st_mode) and st.st_size == 0
                                       and wh.whiteout_from_xattrs(names_x)):
            yield UpperEntry(path, "whiteout", mtime=_clamp(st.st_mtime, epoch))
            continue
        kind = _KINDS.get(stat.S_IFMT(st.st_mode))
        if kind is None:
            continue  # sockets
        entry = _entry(path, full, st, kind, names_x, epoch)
        if kind == "file" and st.st_nlink > 1:
            key = (st.st_dev, st.st_ino)
            if key in seen:
                entry = UpperEntry(path, "link", entry.mode, entry.uid, entry.gid,
                                   mtime=entry.mtime, link_to=seen[key])
            else:
                seen[key] = path
        yield entry
        if kind == "dir":
            yield from _walk(root, path, seen, epoch)


def _aufs_whiteout(name: str, st: os.stat_result, path: str) -> str | None:
    """The name an AUFS-style ``.wh.NAME`` file hides; any other ``.wh.`` object is refused."""
    try:
        kind, target = wh.classify_tar_name(name)
    except wh.WhiteoutError:
        kind, target = wh.TarName.NORMAL, ""
    if kind is wh.TarName.META:
        return None
    if kind is wh.TarName.WHITEOUT and stat.S_ISREG(st.st_mode) and st.st_size == 0:
        return target
    raise UnsupportedUpper(f"{path}: a file whose name starts with '.wh.' cannot be stored in an "
                           "image layer (it would read as a whiteout)")


def _clamp(mtime: float, epoch: int | None) -> int:
    sec = int(mtime)
    return min(sec, epoch) if epoch is not None else sec


def _entry(path: str, full: str, st: os.stat_result, kind: str, names: list[str],
           epoch: int | None) -> UpperEntry:
    mode, uid, gid = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
    if wh.OVERRIDE_STAT_XATTR in names:
        override = wh.parse_override(os.getxattr(full, wh.OVERRIDE_STAT_XATTR))
        if override is not None:
            uid, gid, mode = override
    xattrs = {}
    for n in names:
        if not wh.is_private_xattr(n):
            try:
                xattrs[n] = os.getxattr(full, n, follow_symlinks=False)
            except OSError:
                continue
    return UpperEntry(
        path, kind, mode, uid, gid, st.st_size if kind == "file" else 0,
        _clamp(st.st_mtime, epoch),
        st.st_rdev if kind in ("char", "block") else 0,
        os.readlink(full) if kind == "symlink" else "",
        opaque=kind == "dir" and _is_opaque(full, names), xattrs=xattrs)


# -- diff ----------------------------------------------------------------------------------------


def changes(upper_root: str, lowers: UnionView | None) -> list[tuple[str, str]]:
    """docker diff: ``(kind, /path)`` with kind A (added), C (changed) or D (deleted), sorted."""
    out: list[tuple[str, str]] = []
    for e in walk_upper(upper_root):
        if e.kind == "whiteout":
            if lowers is not None and lowers.resolve(e.path) is not None:
                out.append(("D", "/" + e.path))
            continue
        existed = lowers is not None and lowers.resolve(e.path) is not None
        out.append(("C" if existed else "A", "/" + e.path))
    return sorted(out, key=lambda c: c[1])


# -- layer ---------------------------------------------------------------------------------------


class ChangedWhileRead(StoreError):
    """A file of the upper changed size while it was being committed: something wrote to the
    container meanwhile that the commit could not hold (the kernel engine holds only writers
    in the container's cgroup)."""


def _data(full: str, size: int) -> Iterator[bytes]:
    """The file's ``size`` bytes (its size when the walk saw it), refusing a file that has
    grown or shrunk since: a layer never holds a file cut short or torn at its end."""
    left = size
    with open(full, "rb") as f:
        while left:
            chunk = f.read(min(CHUNK, left))
            if not chunk:
                break
            left -= len(chunk)
            yield chunk
        if left or f.read(1):
            raise ChangedWhileRead(f"{full} changed size while it was committed (a process "
                                   "wrote to the container; stop it, or run it with strata "
                                   "run, whose containers are frozen for a commit)")


def write_layer(upper_root: str, sink: Callable[[bytes], object],
                epoch: int | None = None) -> int:
    """Write the upper as an OCI layer tar to ``sink``; returns the number of entries."""
    w = TarWriter(sink)
    n = 0
    for e in walk_upper(upper_root, epoch):
        n += 1
        if e.kind == "whiteout":
            parent, _, name = e.path.rpartition("/")
            w.add(TarEntry(name=(f"{parent}/" if parent else "") + wh.tar_whiteout_name(name),
                           typeflag=REG, mode=0, mtime=e.mtime))
            continue
        if e.kind == "link":
            w.add(TarEntry(name=e.path, typeflag=LINK, mode=e.mode, uid=e.uid, gid=e.gid,
                           mtime=e.mtime, linkname=e.link_to))
            continue
        st_mode = {"file": stat.S_IFREG, "dir": stat.S_IFDIR, "symlink": stat.S_IFLNK,
                   "fifo": stat.S_IFIFO, "char": stat.S_IFCHR, "block": stat.S_IFBLK}[e.kind]
        entry = TarEntry(name=e.path, typeflag=typeflag_for(st_mode), mode=e.mode, uid=e.uid,
                         gid=e.gid, size=e.size, mtime=e.mtime, linkname=e.target,
                         devmajor=os.major(e.rdev), devminor=os.minor(e.rdev), xattrs=e.xattrs)
        w.add(entry, _data(os.path.join(upper_root, e.path), e.size) if e.kind == "file"
              else ())
        if e.opaque:
            w.add(TarEntry(name=f"{e.path}/{wh.OPAQUE_MARKER}", typeflag=REG, mode=0,
                           mtime=e.mtime))
    w.close()
    return n


# -- a flat rootfs ---------------------------------------------------------------------------------


def export_rootfs(view: UnionView, sink: Sink, epoch: int | None = None) -> None:
    """The merged tree of ``view`` as one flat tar: no whiteouts, hardlinks kept, symlink
    targets verbatim, xattrs (overlay-private ones excluded) as PAX records; ``epoch`` clamps
    mtimes (reproducible squashed commits)."""
    w = TarWriter(sink)

    def mtime(ns: int) -> int:
        sec = ns // 10**9
        return min(sec, epoch) if epoch is not None else sec

    first_name: dict[tuple[int, int], str] = {}
    for node in view.walk():
        if not node.path:
            continue
        e = node.entry
        if not node.is_dir and e.nlink > 1:
            prior = first_name.get(node.key)
            if prior is not None:
                w.add(TarEntry(name=node.path, typeflag=LINK, mode=e.mode & 0o7777, uid=e.uid,
                               gid=e.gid, mtime=mtime(e.mtime_ns), linkname=prior))
                continue
            first_name[node.key] = node.path
        entry = TarEntry(
            name=node.path, typeflag=typeflag_for(e.mode), mode=e.mode & 0o7777, uid=e.uid,
            gid=e.gid, size=e.size if typeflag_for(e.mode) == REG else 0,
            mtime=mtime(e.mtime_ns), linkname=e.target, devmajor=os.major(e.rdev),
            devminor=os.minor(e.rdev), xattrs=view.xattrs(node))
        w.add(entry, _chunks(view, node) if entry.typeflag == REG else ())
    w.close()


def _chunks(view: UnionView, node: Any) -> Iterator[bytes]:
    offset = 0
    while offset < node.entry.size:
        data = view.read(node, offset, 1 << 20)
        if not data:
            raise StoreError(f"short read exporting {node.path}")
        offset += len(data)
        yield data
