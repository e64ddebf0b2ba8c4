"""Read-only layers: the ``LowerLayer`` protocol, the ``Entry`` record, and ``DirLayer``.

A lower layer answers a handful of questions about relative POSIX paths (``""`` is the root):
what is at a path (``entry``), what a directory holds (``children``), the bytes of a file
(``read``/``copy_data``) and its xattrs.  Whiteouts and opaque directories are reported in the
entry's ``flags`` whatever the layer's own encoding, so ``UnionView`` never sees an encoding.

Two implementations: ``TarLayer`` (an indexed layer tar, tarlayer.py) and ``DirLayer`` (a plain
directory in overlayfs format).  Anything else implementing the protocol (an in-memory layer in
tests, a lazily fetched blob) plugs into the union unchanged.

Caveats:
* ``DirLayer`` assumes its directory does not change while mounted (as overlayfs does for lower
  layers) and caches nothing but hardlink groups.
* Entry attributes are a snapshot: the ``mode`` includes the file type bits (``S_IFMT``).
"""

from __future__ import annotations

import os
import stat
import weakref
from collections.abc import Iterator
from typing import NamedTuple, Protocol

from . import whiteout as wh
from .hostdir import HostDir

WHITEOUT = 1  # the name is hidden from the layers below
OPAQUE = 2  # a directory that hides every lower child
IMPLICIT = 4  # a directory that exists only because a layer entry lives below it

CHUNK = 1 << 20


class Entry(NamedTuple):
    """What one layer holds at one path.

    ``ref`` locates the data inside the layer (an index for tars, a path for directories);
    ``obj`` identifies the object within the layer: names of one hardlink group share it.
    A named tuple: a listing makes one per name and layer, and a tuple is made fastest.
    """

    mode: int
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime_ns: int = 0
    rdev: int = 0
    nlink: int = 1
    target: str = ""
    flags: int = 0
    ref: int | str = 0
    obj: int = 0
    atime_ns: int = -1  # -1: same as mtime (layer tars carry no atime/ctime)
    ctime_ns: int = -1
    blocks: int = -1  # 512-byte blocks allocated; -1: as many as the size needs (tars)

    @property
    def is_whiteout(self) -> bool:
        return bool(self.flags & WHITEOUT)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode) and not self.flags & WHITEOUT

    @property
    def opaque(self) -> bool:
        return bool(self.flags & OPAQUE)

    @property
    def implicit(self) -> bool:
        return bool(self.flags & IMPLICIT)


WHITEOUT_ENTRY = Entry(mode=0, flags=WHITEOUT)


def restat(e: Entry, st: os.stat_result, mode: bool) -> Entry:
    """``e`` with what changes behind a union's back once an object is in the upper (data
    writes and link counts): size, times, link count, blocks; and the mode bits when ``mode``
    says the host's are the object's (not a recorded override).  ``e`` itself when none did."""
    new_mode = st.st_mode if mode else e.mode
    if (st.st_size == e.size and st.st_mtime_ns == e.mtime_ns and st.st_ctime_ns == e.ctime_ns
            and st.st_atime_ns == e.atime_ns and st.st_nlink == e.nlink
            and st.st_blocks == e.blocks and new_mode == e.mode):
        return e
    return e._replace(mode=new_mode, size=st.st_size, mtime_ns=st.st_mtime_ns,
                      ctime_ns=st.st_ctime_ns, atime_ns=st.st_atime_ns, nlink=st.st_nlink,
                      blocks=st.st_blocks)


class LowerLayer(Protocol):
    """A read-only layer.  Every method is side-effect free and safe to call concurrently.

    Threading contract (what the FUSE adapter and the union do with a layer):

    * ``entry``, ``children``, ``xattrs`` and ``hardlinks`` are called on the mount's request
      loop (its one trio thread) and must answer from local data, promptly: a layer whose
      index lives elsewhere fetches it before it is mounted.
    * ``read`` and ``copy_data`` may run in worker threads, several at once (large reads,
      copy-ups of large files).  A layer whose bytes may still be arriving sets the class
      attribute ``blocking = True``: then every ``read`` and ``copy_data`` of it runs in a
      worker thread, and the layer itself bounds how long one may wait (a timeout, then
      ``OSError(EIO)``; the next read tries again).  Such a layer may also offer
      ``read_would_block(entry, offset, size) -> bool``: False lets a small ``read`` whose
      bytes are at hand run on the request loop, without a thread's round trip.
    * Optional: ``open_file(entry) -> fd`` lets a handle read the file's descriptor directly
      (directory layers); ``usage() -> (bytes, entries)`` sizes the layer for ``statfs``;
      ``xattr_free() -> True`` says no entry has an extended attribute (the kernel engine's
      lower then stops the kernel's ``getxattr`` requests; a subclass of ``TarLayer`` that
      serves other xattrs than its index holds must override it).
    * ``close`` is called once, after the mount has ended.
    """

    def entry(self, path: str) -> Entry | None:
        """The entry at ``path`` in this layer (a whiteout entry for a hidden name), or None."""
        ...

    def children(self, path: str) -> Iterator[tuple[str, Entry]]:
        """Names directly under the directory ``path`` in this layer, whiteouts included."""
        ...

    def read(self, entry: Entry, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes of a regular file's data from ``offset``."""
        ...

    def copy_data(self, entry: Entry, dst_fd: int) -> None:
        """Write the whole data of a regular file to ``dst_fd`` (at its current position 0)."""
        ...

    def xattrs(self, entry: Entry) -> dict[str, bytes]:
        """Extended attributes of the entry, overlay-private ones excluded."""
        ...

    def hardlinks(self, entry: Entry) -> list[str]:
        """Every path in this layer naming the object of ``entry`` (itself included)."""
        ...

    def close(self) -> None: ...


def join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def split(path: str) -> tuple[str, str]:
    parent, _, name = path.rpartition("/")
    return parent, name


def copy_range(src_fd: int, dst_fd: int, offset: int, size: int) -> None:
    """Copy ``size`` bytes at ``offset`` of ``src_fd`` to the current position of ``dst_fd``."""
    done = 0
    while done < size:
        want = min(size - done, 1 << 30)
        try:
            n = os.copy_file_range(src_fd, dst_fd, want, offset + done)
        except OSError:
            n = 0
        if n == 0:
            data = os.pread(src_fd, min(want, CHUNK), offset + done)
            if not data:
                raise OSError(5, "short read from layer data")
            n = os.write(dst_fd, data)
        done += n


class DirLayer:
    """A plain directory in overlayfs format used as a read-only layer (and the read side of
    ``UpperLayer``): whiteouts as char 0/0, ``.wh.NAME`` files or overlay whiteout xattrs;
    opaque directories by xattr or ``.wh..wh..opq``; ownership overridden by
    ``user.containers.override_stat`` where a non-root writer recorded it.  Every host call
    goes through ``HostDir`` (``*at()`` calls on the root's descriptor)."""

    def __init__(self, root: str) -> None:
        self.dir = HostDir(root)
        self.root = self.dir.root
        self.dev = os.fstat(self.dir.fd).st_dev
        self._closer = weakref.finalize(self, self.dir.close)
        self._links: dict[int, list[str]] | None = None
        self._aufs: dict[str, frozenset[str]] = {}  # dir -> names hidden by .wh.NAME files

    def aufs_whiteouts(self, directory: str) -> frozenset[str]:
        """Names that ``.wh.NAME`` files hide in ``directory`` (one listing per directory,
        instead of one more lstat for every name that is not there)."""
        got = self._aufs.get(directory)
        if got is None:
            try:
                raw = [n for n in self._names(directory) if n.startswith(wh.WH_PREFIX)]
            except OSError:
                raw = []
            hidden = []
            for name in raw:
                try:
                    kind, target = wh.classify_tar_name(name)
                except wh.WhiteoutError:
                    continue
                if kind is wh.TarName.WHITEOUT:
                    hidden.append(target)
            got = self._aufs[directory] = frozenset(hidden)
        return got

    def _names(self, directory: str) -> list[str]:
        fd = self.dir.opendir(directory)
        try:
            return os.listdir(fd)
        finally:
            os.close(fd)

    def entry(self, path: str) -> Entry | None:
        return self.dir.call(path, lambda fd, name: self._entry_at(path, fd, name))

    def _entry_at(self, path: str, fd: int, name: str) -> Entry | None:
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            if path:
                parent, base = split(path)
                if base in self.aufs_whiteouts(parent):
                    return WHITEOUT_ENTRY
            return None
        if path and wh.is_reserved_name(split(path)[1]):
            return None
        return self._from_stat(path, st, fd, name)

    def _from_stat(self, path: str, st: os.stat_result, fd: int, name: str) -> Entry:
        """The entry of ``path`` whose lstat is ``st``; ``name`` relative to the directory
        descriptor ``fd`` names it for the calls that need more than the stat."""
        if wh.is_whiteout_stat(st):
            return WHITEOUT_ENTRY
        proc = f"/proc/self/fd/{fd}/{name}"
        names: list[str] = []
        if not stat.S_ISLNK(st.st_mode):
            try:
                names = os.listxattr(proc, follow_symlinks=False)
            except OSError:
                names = []
        flags = 0
        mode, uid, gid = st.st_mode, st.st_uid, st.st_gid
        if stat.S_ISDIR(st.st_mode):
            if wh.opaque_from_xattrs(names, lambda k: os.getxattr(proc, k, follow_symlinks=False)
                                     ) or _lexists(f"{name}/{wh.OPAQUE_MARKER}", fd):
                flags |= OPAQUE
        elif stat.S_ISREG(st.st_mode) and st.st_size == 0 and wh.whiteout_from_xattrs(names):
            return WHITEOUT_ENTRY
        if wh.OVERRIDE_STAT_XATTR in names:
            override = wh.parse_override(
                os.getxattr(proc, wh.OVERRIDE_STAT_XATTR, follow_symlinks=False))
            if override is not None:
                uid, gid, perm = override
                mode = stat.S_IFMT(mode) | perm
        return Entry(
            mode=mode, uid=uid, gid=gid, size=st.st_size, mtime_ns=st.st_mtime_ns,
            rdev=st.st_rdev, nlink=st.st_nlink,
            target=os.readlink(name, dir_fd=fd) if stat.S_ISLNK(st.st_mode) else "",
            flags=flags, ref=path, obj=self._obj(st), atime_ns=st.st_atime_ns,
            ctime_ns=st.st_ctime_ns, blocks=st.st_blocks,
        )

    def _obj(self, st: os.stat_result) -> int:
        """The object's number in this layer: its inode number, mixed with its device when
        the directory spans file systems (inode numbers repeat across them)."""
        if st.st_dev == self.dev:
            return st.st_ino
        return hash((st.st_dev, st.st_ino)) & ((1 << 52) - 1) | (1 << 52)

    def children(self, path: str) -> Iterator[tuple[str, Entry]]:
        try:
            fd = self.dir.opendir(path)
        except (FileNotFoundError, NotADirectoryError):
            return
        try:
            with os.scandir(fd) as it:
                stats = {e.name: e for e in it}
            names = sorted(stats)
            present = set(names)
            for name in names:
                if wh.is_reserved_name(name):
                    try:
                        kind, target = wh.classify_tar_name(name)
                    except wh.WhiteoutError:
                        continue
                    if kind is wh.TarName.WHITEOUT and target not in present:
                        yield target, WHITEOUT_ENTRY
                    continue
                try:
                    st = stats[name].stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                yield name, self._from_stat(join(path, name), st, fd, name)
        finally:
            os.close(fd)

    def open_file(self, entry: Entry) -> int:
        """A read-only descriptor of a regular file's data (the caller closes it)."""
        return self.dir.open(str(entry.ref), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)

    def read(self, entry: Entry, offset: int, size: int) -> bytes:
        fd = self.open_file(entry)
        try:
            return os.pread(fd, size, offset)
        finally:
            os.close(fd)

    def copy_data(self, entry: Entry, dst_fd: int) -> None:
        fd = self.open_file(entry)
        try:
            copy_range(fd, dst_fd, 0, os.fstat(fd).st_size)
        finally:
            os.close(fd)

    def xattrs(self, entry: Entry) -> dict[str, bytes]:
        return self.xattrs_at(str(entry.ref))

    def xattrs_at(self, path: str) -> dict[str, bytes]:
        return self.dir.proc(path, _private_free_xattrs)

    XATTR_SCAN = 4096  # entries: a larger directory layer is not scanned for ``xattr_free``

    def xattr_free(self) -> bool | None:
        """Whether no entry has an extended attribute (overlay-private ones aside), for a
        small layer such as a run's init layer of stubs; None for a larger one (not scanned)
        or one that cannot be read."""
        try:
            if self.xattrs_at(""):
                return False
            seen, todo = 0, [""]
            while todo:
                directory = todo.pop()
                for name in self._names(directory):
                    seen += 1
                    if seen > self.XATTR_SCAN:
                        return None
                    path = join(directory, name)
                    if self.xattrs_at(path):
                        return False
                    if stat.S_ISDIR(self.dir.lstat(path).st_mode):
                        todo.append(path)
        except OSError:
            return None
        return True

    def hardlinks(self, entry: Entry) -> list[str]:
        if entry.nlink < 2 or stat.S_ISDIR(entry.mode):
            return [str(entry.ref)]
        if self._links is None:
            links: dict[int, list[str]] = {}
            for dirpath, _dirs, files, dfd in os.fwalk(".", dir_fd=self.dir.fd):
                rel = "" if dirpath == "." else dirpath[2:]
                for name in files:
                    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                    if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                        links.setdefault(self._obj(st), []).append(join(rel, name))
            self._links = links
        return sorted(self._links.get(entry.obj, [str(entry.ref)]))

    def close(self) -> None:
        self._closer()


def _lexists(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        return False
    return True


def _private_free_xattrs(proc: str) -> dict[str, bytes]:
    """The extended attributes of ``proc`` (a /proc/self/fd path), overlay-private ones
    excluded."""
    out: dict[str, bytes] = {}
    try:
        names = os.listxattr(proc, follow_symlinks=False)
    except OSError:
        return out
    for name in names:
        if wh.is_private_xattr(name):
            continue
        try:
            out[name] = os.getxattr(proc, name, follow_symlinks=False)
        except OSError:
            continue
    return out
