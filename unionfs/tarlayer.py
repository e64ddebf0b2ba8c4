"""TarLayer: an uncompressed layer tar served in place through an index of its entries.

``build_index`` reads a layer tar once and records, for every path, its type, mode, owner,
mtime, size, the offset of its data in the tar, symlink target, device number, xattrs (PAX
``SCHILY.xattr.*`` and ``LIBARCHIVE.xattr.*``), hardlink groups and the OCI whiteout/opaque
markers.  ``TarLayer`` answers the ``LowerLayer`` protocol from that index and reads file data
with ``os.pread`` on the tar: mounting a layer costs no unpacking.

The indexer is also the layer's safety check.  It refuses names that are absolute or contain
``..``, entries below a non-directory (a symlink planted then written through), hardlinks to
anything but an earlier non-directory entry of the same layer, invalid whiteouts, truncated
data and trailing garbage.  Overlay-private xattrs are dropped, never applied.  Headers that
lie to tarfile itself are refused by tarheaders.CheckedTarInfo.

Layer rules (FORMATS.md b): missing parents become IMPLICIT root-owned 0755 directories; a
duplicate path replaces the earlier entry (two directories merge); a whiteout never hides an entry
of its own layer (a directory with a same-layer whiteout becomes opaque instead); an opaque marker
applies wherever it appears in the archive.

Caveats:
* The index format lives in ``layerindex`` (versioned; other versions are refused, and the
  store rebuilds such indexes rather than misreading them).
* A hardlink takes the attributes of its target: extraction shares one inode.
"""

from __future__ import annotations

import base64
import functools
import os
import stat
import tarfile
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any
from urllib.parse import unquote

from . import tarscan
from . import whiteout as wh
from .layerindex import Block, IndexFile
from .layerindex import LayerIndex as LayerIndex  # re-exported: the store and tests use it
from .layers import IMPLICIT, OPAQUE, WHITEOUT, Entry, copy_range, join, split
from .tarheaders import MAX_SPARSE, tar_errors
from .tarheaders import CheckedTarInfo as CheckedTarInfo  # re-exported: the archive reader
from .tarheaders import LayerError as LayerError

_INT64 = (1 << 63) - 1
_IDS = (1 << 32) - 1
_TAIL_LIMIT = 1 << 20


def normalize_name(name: str) -> str:
    """A tar entry name as a relative POSIX path (``""`` for the root); raises LayerError."""
    if name.startswith("/"):
        raise LayerError(f"entry {name!r} has an absolute name")
    # the common case first (``./usr/bin/``, ``usr/bin``): no empty, "." or ".." component
    # can hide in a name that, after one leading "./" and one trailing "/", neither starts
    # nor ends with "/" or ".", holds no "//" nor "/." and no NUL
    fast = name[2:] if name.startswith("./") else name
    if fast.endswith("/"):
        fast = fast[:-1]
    if fast and "/." not in fast and "//" not in fast and "\0" not in fast and \
            fast[0] not in "/." and fast[-1] not in "/.":
        return fast
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise LayerError(f"entry {name!r} climbs out of the layer with '..'")
    if any("\0" in p for p in parts):
        raise LayerError(f"entry {name!r} has a NUL byte in its name")
    return "/".join(parts)


@dataclass(slots=True)
class _Rec:
    mode: int
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime_ns: int = 0
    rdev: int = 0
    target: str = ""
    flags: int = 0
    offset: int = 0
    stored: int = 0
    group: int = -1  # records of one hardlink group share it (set by the builder)
    xattrs: dict[str, bytes] = field(default_factory=dict)
    sparse: list[tuple[int, int]] | None = None

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


def _implicit_dir() -> _Rec:
    return _Rec(mode=stat.S_IFDIR | 0o755, flags=IMPLICIT)


def _mtime_ns(ti: Any) -> int:
    raw = ti.pax_headers.get("mtime")
    if raw is not None:
        return _pax_mtime_ns(raw)
    try:
        ns = int(ti.mtime) * 10**9
    except (ArithmeticError, ValueError):
        ns = 0
    return max(-_INT64, min(_INT64, ns))


@functools.lru_cache(maxsize=4096)  # the files of a layer share a few times
def _pax_mtime_ns(raw: str) -> int:
    if raw.isascii():  # the common "SECONDS[.FRACTION]", without Decimal
        secs, _, frac = raw.partition(".")
        if secs.isdigit() and (frac.isdigit() or not frac) and len(secs) < 12:
            return min(_INT64, int(secs) * 10**9 + int(frac[:9].ljust(9, "0")))
    try:
        ns = int(Decimal(raw) * 1_000_000_000)
    except (ArithmeticError, ValueError):  # decimal's Overflow and InvalidOperation included
        ns = 0
    return max(-_INT64, min(_INT64, ns))


def _xattrs(ti: Any) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    pax = ti.pax_headers
    if not pax or (len(pax) == 1 and "mtime" in pax):
        return out
    for key, value in pax.items():
        if key.startswith("SCHILY.xattr."):
            name = key[len("SCHILY.xattr.") :]
            data = value.encode("utf-8", "surrogateescape")
        elif key.startswith("LIBARCHIVE.xattr."):
            name = unquote(key[len("LIBARCHIVE.xattr.") :])
            try:
                data = base64.b64decode(value + "=" * (-len(value) % 4))
            except ValueError as exc:
                raise LayerError(f"entry {ti.name!r}: bad xattr encoding") from exc
        else:
            continue
        if name and not wh.is_private_xattr(name):
            out[name] = data
    return out


class _Builder:
    def __init__(self) -> None:
        self.recs: dict[str, _Rec] = {"": _implicit_dir()}
        self.kids: dict[str, dict[str, None]] = {"": {}}
        self.whiteouts: list[str] = []
        self.opaques: list[str] = []
        self.serial = 0

    def ensure_dir(self, path: str, for_name: str) -> None:
        missing: list[str] = []
        rec = self.recs.get(path)
        while rec is None:
            missing.append(path)
            path = split(path)[0]
            rec = self.recs.get(path)
        if not rec.is_dir:
            raise LayerError(f"entry {for_name!r} lies below {path!r}, which is not a directory")
        for p in reversed(missing):
            self._put(p, _implicit_dir())

    def _put(self, path: str, rec: _Rec) -> None:
        if rec.group < 0:
            self.serial += 1
            rec.group = self.serial
        self.recs[path] = rec
        if stat.S_ISDIR(rec.mode):
            self.kids.setdefault(path, {})
        if path:
            parent, _, name = path.rpartition("/")
            self.kids[parent][name] = None

    def _remove_tree(self, path: str) -> None:
        todo = [path]
        while todo:
            p = todo.pop()
            todo.extend(join(p, name) for name in self.kids.pop(p, {}))
            del self.recs[p]

    def add(self, path: str, rec: _Rec) -> None:
        old = self.recs.get(path)
        if old is not None:
            if old.is_dir and rec.is_dir:
                rec.group = old.group
                self.recs[path] = rec  # attributes change, children merge
                return
            if old.is_dir:
                self._remove_tree(path)
        self._put(path, rec)

    def finish(self) -> LayerIndex:
        for target in self.whiteouts:
            parent, name = split(target)
            prec = self.recs.get(parent)
            if prec is None or not prec.is_dir:
                continue  # its directory was replaced later in the archive
            existing = self.recs.get(target)
            if existing is None:
                self._put(target, _Rec(mode=0, flags=WHITEOUT))
            elif existing.is_dir:
                existing.flags |= OPAQUE
        for path in self.opaques:
            rec = self.recs.get(path)
            if rec is not None and rec.is_dir:
                rec.flags |= OPAQUE
        return _pack(self.recs, self.kids)


def _pack(recs: dict[str, _Rec], kids: dict[str, dict[str, None]]) -> LayerIndex:
    paths = list(recs)
    rs = list(recs.values())
    pos = {p: i for i, p in enumerate(paths)}
    first: dict[int, int] = {}
    objs = [first.setdefault(r.group, i) for i, r in enumerate(rs)]
    group: dict[int, int] = {}
    for obj in objs:
        group[obj] = group.get(obj, 0) + 1
    is_dir = [stat.S_ISDIR(r.mode) for r in rs]
    nlink = [2 + sum(1 for n in kids.get(p, ()) if is_dir[pos[join(p, n)]]) if is_dir[i]
             else group[objs[i]] for i, p in enumerate(paths)]
    cols = {"mode": array("q", [r.mode for r in rs]), "uid": array("q", [r.uid for r in rs]),
            "gid": array("q", [r.gid for r in rs]), "size": array("q", [r.size for r in rs]),
            "mtime": array("q", [r.mtime_ns for r in rs]),
            "rdev": array("q", [r.rdev for r in rs]), "nlink": array("q", nlink),
            "offset": array("q", [r.offset for r in rs]), "obj": array("q", objs),
            "flags": array("q", [r.flags for r in rs])}
    targets = {i: r.target for i, r in enumerate(rs) if r.target}
    xattrs = {i: r.xattrs for i, r in enumerate(rs) if r.xattrs}
    sparse = {i: r.sparse for i, r in enumerate(rs) if r.sparse is not None}
    children = {
        pos[d]: [pos[join(d, n)] for n in sorted(names)] for d, names in kids.items() if d in pos
    }
    return LayerIndex(paths, cols, targets, xattrs, sparse, children)


def build_index(tar_path: str) -> LayerIndex:
    """Index the uncompressed layer tar at ``tar_path``; raises LayerError for unsafe input."""
    file_size = os.path.getsize(tar_path)
    try:
        b, end = _index_fast(tar_path, file_size)
    except tarscan.Fallback:
        b, end = _index_tarfile(tar_path, file_size)
    _check_tail(tar_path, end, file_size)
    return b.finish()


def index_members(members: Iterable[Any]) -> LayerIndex:
    """Index members described elsewhere than in a tar (a lazily pulled layer's table of
    contents), under the same rules and refusals as ``build_index``.  Each member has the
    attributes of ``tarscan.Member``; ``offset_data`` is the caller's handle for the file's
    data (hardlinks share their target's), and data sizes are checked only for range."""
    b = _Builder()
    for m in members:
        _add_member(b, m, _INT64)
    return b.finish()


def _index_fast(tar_path: str, file_size: int) -> tuple[_Builder, int]:
    b = _Builder()
    try:
        with open(tar_path, "rb", buffering=1 << 16) as f:
            for m in tarscan.scan(f):
                _add_member(b, m, file_size)
            return b, f.tell()
    except tarscan.BadHeader as exc:
        raise LayerError(f"not a valid tar archive: {exc}") from None


def _index_tarfile(tar_path: str, file_size: int) -> tuple[_Builder, int]:
    """The fallback for what the fast scanner leaves to tarfile (sparse files), with the
    checks tarfile lacks against lying headers."""
    b = _Builder()
    with open(tar_path, "rb") as f:
        with tar_errors():
            tf = tarfile.open(fileobj=f, mode="r:", encoding="utf-8",  # noqa: SIM115
                              errors="surrogateescape", tarinfo=CheckedTarInfo)
        with tf:
            while True:
                with tar_errors():
                    ti = tf.next()
                if ti is None:
                    break
                _add_member(b, ti, file_size)
            return b, tf.offset


def _check_tail(tar_path: str, end: int, file_size: int) -> None:
    if end > file_size:
        raise LayerError("tar archive is truncated")
    with open(tar_path, "rb") as f:
        f.seek(end)
        tail = f.read(_TAIL_LIMIT + 1)
    if tail.strip(b"\0") or len(tail) > _TAIL_LIMIT:
        raise LayerError(f"invalid tar header or trailing data at offset {end}")


def _add_member(b: _Builder, ti: Any, file_size: int) -> None:
    """``ti``: a ``tarfile.TarInfo`` or a ``tarscan.Member`` (the same attributes)."""
    path = normalize_name(ti.name)
    if ti.uid > _IDS or ti.gid > _IDS or ti.uid < 0 or ti.gid < 0:
        raise LayerError(f"entry {ti.name!r} has an out-of-range owner {ti.uid}:{ti.gid}")
    if not path:
        if not ti.isdir():
            raise LayerError("the layer root entry is not a directory")
        b.recs[""] = _Rec(mode=stat.S_IFDIR | (ti.mode & 0o7777), uid=ti.uid, gid=ti.gid,
                          mtime_ns=_mtime_ns(ti), xattrs=_xattrs(ti))
        return
    parent, _, base = path.rpartition("/")
    if wh.WH_PREFIX in path:
        try:
            kind, target = wh.classify_tar_name(base)
            above = ([wh.classify_tar_name(p)[0] for p in parent.split("/")]
                     if wh.WH_PREFIX in parent else [])
        except wh.WhiteoutError as exc:
            raise LayerError(f"entry {ti.name!r}: {exc}") from None
        if wh.TarName.META in above:
            return  # inside AUFS metadata (.wh..wh.plnk/...): ignored
        if any(k is not wh.TarName.NORMAL for k in above):
            raise LayerError(f"entry {ti.name!r} lies below a whiteout or opaque marker")
        b.ensure_dir(parent, ti.name)
        if kind is wh.TarName.META:
            return
        if kind is wh.TarName.OPAQUE:
            b.opaques.append(parent)
            return
        if kind is wh.TarName.WHITEOUT:
            b.whiteouts.append(join(parent, target))
            return
    elif parent not in b.recs or not b.recs[parent].is_dir:
        b.ensure_dir(parent, ti.name)
    rec = _Rec(mode=ti.mode & 0o7777, uid=ti.uid, gid=ti.gid, mtime_ns=_mtime_ns(ti),
               xattrs=_xattrs(ti))
    if ti.islnk():
        _link(b, ti, rec)
    elif ti.isreg():
        rec.mode |= stat.S_IFREG
        rec.size, rec.offset = ti.size, ti.offset_data
        rec.stored = ti.size
        if ti.sparse is not None:
            rec.sparse = _sparse_map(ti)
            rec.stored = sum(n for _, n in rec.sparse)
        if rec.offset + rec.stored > file_size or not 0 <= rec.size <= _INT64:
            raise LayerError(f"entry {ti.name!r}: data runs past the end of the archive")
    elif ti.issym():
        if not ti.linkname or "\0" in ti.linkname:
            raise LayerError(f"symlink {ti.name!r} has an empty target or a NUL byte in it")
        rec.mode |= stat.S_IFLNK
        rec.target = ti.linkname
        rec.size = len(os.fsencode(ti.linkname))
    elif ti.isdir():
        rec.mode |= stat.S_IFDIR
    elif ti.ischr() or ti.isblk():
        if not (0 <= ti.devmajor <= _IDS and 0 <= ti.devminor <= _IDS):
            raise LayerError(f"device {ti.name!r} has an out-of-range number "
                             f"{ti.devmajor}:{ti.devminor}")
        rec.mode |= stat.S_IFCHR if ti.ischr() else stat.S_IFBLK
        rec.rdev = os.makedev(ti.devmajor, ti.devminor)
    elif ti.isfifo():
        rec.mode |= stat.S_IFIFO
    else:
        raise LayerError(f"entry {ti.name!r} has unsupported type {ti.type!r}")
    b.add(path, rec)


def _sparse_map(ti: Any) -> list[tuple[int, int]]:
    """A GNU sparse map, checked: sorted, non-overlapping runs within the file's size."""
    pairs: Any = ti.sparse  # typeshed says list[int]; it is (offset, size) pairs
    if len(pairs) > MAX_SPARSE:
        raise LayerError(f"entry {ti.name!r}: sparse map of {len(pairs)} runs")
    out: list[tuple[int, int]] = []
    end = 0
    for o, n in pairs:
        o, n = int(o), int(n)
        if n == 0 and 0 <= o <= ti.size:
            out.append((o, n))  # empty runs (GNU tar pads the map with them) say nothing
            continue
        if o < end or n < 0 or o + n > ti.size:
            raise LayerError(f"entry {ti.name!r}: its sparse map does not fit its size")
        out.append((o, n))
        end = o + n
    return out


def _link(b: _Builder, ti: Any, rec: _Rec) -> None:
    target = normalize_name(ti.linkname)
    src = b.recs.get(target)
    if src is None or not target or src.flags & (WHITEOUT | IMPLICIT):
        raise LayerError(
            f"hardlink {ti.name!r} -> {ti.linkname!r} does not name an earlier entry of the layer"
        )
    if src.is_dir:
        raise LayerError(f"hardlink {ti.name!r} -> {ti.linkname!r} names a directory")
    rec.mode, rec.uid, rec.gid, rec.mtime_ns = src.mode, src.uid, src.gid, src.mtime_ns
    rec.size, rec.offset, rec.stored, rec.sparse = src.size, src.offset, src.stored, src.sparse
    rec.target, rec.rdev, rec.xattrs = src.target, src.rdev, src.xattrs
    rec.group = src.group


def _entry_of(row: tuple[Any, ...], path: str) -> Entry:
    mode = row[0]
    if stat.S_ISLNK(mode):
        mode = stat.S_IFLNK | 0o777  # a symlink's mode on Linux, whatever its tar header says
    # positional, in Entry's field order: mode uid gid size mtime rdev nlink target flags ref obj
    return Entry(mode, row[1], row[2], row[3], row[4], row[5], row[6], row[10], row[9], path,
                 row[8])


class TarLayer:
    """A ``LowerLayer`` over an uncompressed layer tar and its index file."""

    def __init__(self, tar_path: str, index_path: str, name: str = "") -> None:
        self.name = name or tar_path
        self._index = IndexFile(index_path)
        try:
            self._fd = os.open(tar_path, os.O_RDONLY | os.O_CLOEXEC)
        except BaseException:
            self._index.close()
            raise
        self._groups: dict[int, list[str]] | None = None

    @classmethod
    def open(cls, tar_path: str, index_path: str, name: str = "") -> TarLayer:
        return cls(tar_path, index_path, name)

    def _locate(self, path: str) -> tuple[Block, int] | None:
        parent, _, name = path.rpartition("/")
        block = self._index.block(parent)
        if block is None:
            return None
        j = block.pos.get(name)
        return None if j is None else (block, j)

    def entry(self, path: str) -> Entry | None:
        if not path:
            return _entry_of(self._index.root, "")
        found = self._locate(path)
        if found is None:
            return None
        block, j = found
        return _entry_of(block.row(j), path)

    def children(self, path: str) -> Iterator[tuple[str, Entry]]:
        block = self._index.block(path)
        if block is None:
            return
        prefix = path + "/" if path else ""
        for j, name in enumerate(block.names):
            yield name, _entry_of(block.row(j), prefix + name)

    def _data(self, entry: Entry) -> tuple[int, list[tuple[int, int]] | None]:
        found = self._locate(str(entry.ref))
        if found is None:
            raise LayerError(f"{entry.ref!r} is not in layer {self.name}")
        block, j = found
        return block.cols["offset"][j], block.sparse.get(j)

    def read(self, entry: Entry, offset: int, size: int) -> bytes:
        size = max(0, min(size, entry.size - offset))
        if size == 0:
            return b""
        start, sp = self._data(entry)
        if sp is None:
            return os.pread(self._fd, size, start + offset)
        return self._read_sparse(start, sp, offset, size)

    def _read_sparse(self, stored: int, sp: list[tuple[int, int]], offset: int,
                     size: int) -> bytes:
        out = bytearray(size)
        for start, length in sp:
            lo, hi = max(start, offset), min(start + length, offset + size)
            if lo < hi:
                out[lo - offset : hi - offset] = os.pread(self._fd, hi - lo, stored + lo - start)
            stored += length
        return bytes(out)

    def copy_data(self, entry: Entry, dst_fd: int) -> None:
        stored, sp = self._data(entry)
        if sp is None:
            copy_range(self._fd, dst_fd, stored, entry.size)
            return
        for start, length in sp:
            os.lseek(dst_fd, start, os.SEEK_SET)
            copy_range(self._fd, dst_fd, stored, length)
            stored += length
        os.ftruncate(dst_fd, entry.size)

    def xattrs(self, entry: Entry) -> dict[str, bytes]:
        if not entry.ref:
            return dict(self._index.root[11])
        found = self._locate(str(entry.ref))
        return dict(found[0].xattrs.get(found[1], {})) if found else {}

    def hardlinks(self, entry: Entry) -> list[str]:
        """Every name of ``entry``'s hardlink group (reads every block, once: copy-up of a
        hardlinked file is rare)."""
        if entry.nlink < 2 or entry.is_dir:
            return [str(entry.ref)]
        if self._groups is None:
            groups: dict[int, list[str]] = {}
            for d in self._index.table:
                block = self._index.block(d)
                assert block is not None
                prefix = d + "/" if d else ""
                obj, nlink, mode = block.cols["obj"], block.cols["nlink"], block.cols["mode"]
                for j, name in enumerate(block.names):
                    if nlink[j] > 1 and not stat.S_ISDIR(mode[j]):
                        groups.setdefault(obj[j], []).append(prefix + name)
            self._groups = groups
        return self._groups.get(entry.obj, [str(entry.ref)])

    @property
    def entries(self) -> int:
        return int(self._index.stats[0])

    def xattr_free(self) -> bool | None:
        """Whether no entry of the layer has an extended attribute; None when its index is
        older than that count (indexes written before it say only entries and bytes)."""
        stats = self._index.stats
        return None if len(stats) < 3 else stats[2] == 0

    def usage(self) -> tuple[int, int]:
        """(bytes, entries) of the layer, for ``statfs``: the tar's size and its entries."""
        return os.fstat(self._fd).st_size, self.entries

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._index.close()
