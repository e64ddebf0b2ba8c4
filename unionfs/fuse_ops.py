"""The pyfuse3 adapter: bytes <-> names, inodes and handles <-> union paths, errors <-> errno.

Every handler is thin: it finds the union path of its inode, calls the ``Union`` core (which
makes every union decision: what an open, a setattr, a link or a rename copies up), and turns
the result into ``EntryAttributes``.  Mutations take one lock (``MutationLock``; the core is not
thread-safe and no invariant may span an ``await``); reads do not.  A mutation that would copy
a large lower file up (``Union.copy_cost``) runs in a worker thread while the lock is held, so
reads of other files go on; so does every read of a layer whose bytes may still be arriving
(``Union.blocking``).  Inode numbers come from ``inodes`` (derived from the objects).

A mount must never die of a bug: pyfuse3 ends its main loop on any exception that is not
``FUSEError``, so ``@handler`` answers ``UnionError``/``OSError`` with their errno and anything
else with EIO after logging the traceback (``self.errors`` counts them for the tests).

Caveats:
* Kernel caches are trusted (long entry/attr timeouts, ``keep_cache``, cached listings): lower
  layers never change and the upper changes only through this mount.
* Writes use ``pwrite`` at the offset the kernel gives; O_APPEND is the kernel's business.
* ``fallocate`` needs pyfuse3 built with ``patches/pyfuse3-fallocate.patch`` (stock pyfuse3
  never calls it); the kernel's FUSE module passes on only KEEP_SIZE, PUNCH_HOLE and
  ZERO_RANGE (COLLAPSE_RANGE and INSERT_RANGE get EOPNOTSUPP without reaching us).
* ``flush`` is not implemented: the kernel stops sending it after the first ENOSYS, which
  saves a round trip per close (``release`` closes our descriptor).
"""

from __future__ import annotations

import bisect
import errno
import functools
import logging
import os
import stat
from collections.abc import Callable, Coroutine, Sequence
from os import fsdecode  # names arrive as bytes
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio

from .errors import UnionError
from .handles import DirHandle, Handle, Listing, MutationLock, cookies
from .inodes import ROOT_INO, Inode, InodeTable
from .resolve import Node
from .union import Union
from .upper import UpperLayer, fallocate, fd_xattrs, set_open_attrs

log = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")
BIG_COPY = 8 << 20  # copy-ups of larger files run in a worker thread
BIG_READ = 256 << 10  # reads of at least this much run in worker threads


def handler(fn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as exc:  # UnionError included
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            ops = args[0]
            assert isinstance(ops, Operations)
            ops.errors += 1
            log.exception("unexpected error in %s%r", fn.__name__, args[1:3])
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


# A pyfuse3 built with ``patches/pyfuse3-cache-readdir.patch`` lets ``opendir`` ask the kernel
# to cache listings; the stock one takes only a number there.
CACHE_READDIR = bool(getattr(pyfuse3, "OPENDIR_FILEINFO", False))


class Operations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, union: Union, timeout: float = 86400.0) -> None:
        super().__init__()
        self.union = union
        self.timeout = timeout
        self.inodes = InodeTable(union.resolve(""), union.identity)
        self.handles: dict[int, Handle] = {}
        self.dirs: dict[int, DirHandle] = {}
        self._fh = 0
        self.lock = MutationLock(self._settle)
        self.notify = False  # set by the mount: the kernel's caches can be told of changes
        self.limiter = trio.CapacityLimiter(2)
        self.readers = trio.CapacityLimiter(4)
        self.errors = 0
        self._negative = pyfuse3.EntryAttributes()  # st_ino 0: "no such entry", cached
        self._negative.entry_timeout = timeout
        self._thawed: trio.Event | None = None  # set while frozen (commit in progress)

    async def freeze(self) -> None:
        """Hold every change (namespace changes and data writes) until ``thaw``: take the
        mutation lock, then make writes wait.  For a consistent commit of the upper."""
        await self.lock.acquire()
        self._thawed = trio.Event()

    def thaw(self) -> None:
        if self._thawed is not None:
            self._thawed.set()
            self._thawed = None
            self.lock.release()

    async def rotate(self, upper: UpperLayer) -> None:
        """The writable layer becomes the top read-only one and ``upper`` the new writable
        layer (``Union.rotate``), once no handle is open for writing (EBUSY otherwise: a
        write through it would change a read-only layer).  Holds the mutation lock, so it
        waits for a change in flight; call it frozen to also hold off data writes."""
        if any(h.writable for h in self.handles.values()):
            raise UnionError(errno.EBUSY, "a file is open for writing")
        if self._thawed is None:
            async with self.lock:
                self._rotate(upper)
        else:
            self._rotate(upper)

    def _rotate(self, upper: UpperLayer) -> None:
        self.union.rotate(upper)
        for h in self.handles.values():  # nodes name layers by position: look them up again
            if h.inode.path is not None:
                h.node = self.union.find(h.inode.path) or h.node
        for inode in self.inodes:
            inode.attr_of = None
            if inode.path is not None:
                inode.node = self.union.find(inode.path)
        for d in self.dirs.values():
            d.listing = None  # made again at the next readdir, resumed by cookie

    # -- plumbing ----------------------------------------------------------------------------

    def _inode(self, ino: int) -> Inode:
        inode = self.inodes.get(ino)
        if inode is None:
            raise UnionError(errno.ESTALE)
        return inode

    def _node(self, inode: Inode) -> Node:
        """What ``inode`` is now (upper objects stat'ed afresh: data writes change them)."""
        path = inode.path
        if path is None:
            return self._nameless(inode)
        node = self.union.stat(path)
        self.inodes.refresh(inode, node)
        return node

    def _settle(self) -> None:
        """Tell the kernel that names a copy-up changed behind its back (the copy's ctime,
        the ctime of the directory it went into) have attributes it must fetch again, as
        overlayfs shows them at once."""
        for path in self.union.take_touched():
            inode = self.inodes.at(path)
            if inode is None or not self.notify:
                continue
            try:
                pyfuse3.invalidate_inode(inode.ino, attr_only=True)
            except OSError as exc:  # the kernel no longer holds it: nothing to tell
                if exc.errno != errno.ENOENT:
                    raise

    def _nameless(self, inode: Inode) -> Node:
        """An unlinked file kept alive by open handles: fstat one of them."""
        assert inode.node is not None
        for h in self.handles.values():
            if h.inode is inode and h.fd is not None and not h.lower:
                return self.union.fstat(inode.node, h.fd)
        return inode.node

    def _path(self, ino: int) -> str:
        path = self._inode(ino).path
        if path is None:
            raise UnionError(errno.ENOENT)
        return path

    def _attr(self, inode: Inode, node: Node) -> pyfuse3.EntryAttributes:
        """Attributes of ``node`` as ``inode``; made once per node (nodes are immutable)."""
        if inode.attr_of is node and inode.path is not None:
            return inode.attr  # type: ignore[no-any-return]
        e = node.entry
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode.ino
        a.generation = inode.generation
        a.entry_timeout = self.timeout
        a.attr_timeout = self.timeout
        a.st_mode = e.mode
        a.st_nlink = 0 if inode.path is None else self.union.nlink(node)
        a.st_uid, a.st_gid, a.st_rdev = e.uid, e.gid, e.rdev
        a.st_size = e.size
        a.st_blksize = 4096
        a.st_blocks = e.blocks if e.blocks >= 0 else (e.size + 511) // 512
        a.st_mtime_ns = e.mtime_ns
        a.st_atime_ns = e.atime_ns if e.atime_ns >= 0 else e.mtime_ns
        a.st_ctime_ns = e.ctime_ns if e.ctime_ns >= 0 else e.mtime_ns
        inode.attr, inode.attr_of = a, node
        return a

    def _entry(self, node: Node, count: int = 1, new: bool = False) -> pyfuse3.EntryAttributes:
        """The attributes of ``node`` for a reply that gives the kernel a lookup reference
        (``new``: an object just created)."""
        return self._attr(self.inodes.ref(node, count, new), node)

    def _new_fh(self) -> int:
        self._fh += 1
        return self._fh

    async def _changing(self, path: str, fn: Callable[..., T], *args: Any,
                        size: int | None = None, rename: bool = False) -> T:
        """``fn(*args)``, a union mutation that may copy ``path`` up (truncated to ``size``;
        with its tree for a ``rename``): in a worker thread when that copy is big, so other
        requests go on.  Read handles on the lower file then read the upper copy, as
        overlayfs's do."""
        node = self.union.find(path)
        if node is None or self.union.in_upper(node) and not rename:
            return fn(*args)  # nothing to copy up
        if self.union.copy_cost(path, size, rename) > BIG_COPY:
            got = await trio.to_thread.run_sync(lambda: fn(*args), limiter=self.limiter)
        else:
            got = fn(*args)
        self._reopen_readers(path)
        return got

    def _reopen_readers(self, path: str) -> None:
        """Read-only handles opened on the lower file now read the upper copy."""
        inode = self.inodes.at(path)
        if inode is None:
            return
        node = self.union.find(path)
        if node is None or not self.union.in_upper(node):
            return
        for h in self.handles.values():
            if h.inode is inode and h.lower:
                if h.fd is not None:
                    os.close(h.fd)
                h.fd, h.lower = self.union.open_file(node, False), False

    # -- lookups and attributes ----------------------------------------------------------------

    @handler
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self._path(parent_inode)
        if name == b".":
            return self._entry(self.union.stat(parent))
        if name == b"..":
            return self._entry(self.union.stat(parent.rpartition("/")[0]))
        path = f"{parent}/{fsdecode(name)}" if parent else fsdecode(name)
        try:
            node = self.union.stat(path)
        except UnionError as exc:
            if exc.code != errno.ENOENT:
                raise
            return self._negative  # the kernel keeps the miss (shells, imports probe a lot)
        return self._entry(node)

    @handler
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, n in inode_list:
            self.inodes.forget(ino, n)

    @handler
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        i = self._inode(inode)
        return self._attr(i, self._node(i))

    @handler
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        i = self._inode(inode)
        if i.path is None and fh is not None and self.handles[fh].fd is not None:
            return await self._setattr_nameless(i, attr, fields, self.handles[fh])
        path = self._path(inode)
        size = attr.st_size if fields.update_size else None
        async with self.lock:
            node = await self._changing(
                path, functools.partial(
                    self.union.setattr, path,
                    mode=stat.S_IMODE(attr.st_mode) if fields.update_mode else None,
                    uid=attr.st_uid if fields.update_uid else None,
                    gid=attr.st_gid if fields.update_gid else None, size=size,
                    atime_ns=attr.st_atime_ns if fields.update_atime else None,
                    mtime_ns=attr.st_mtime_ns if fields.update_mtime else None), size=size)
        self.inodes.refresh(i, node)
        return self._attr(i, node)

    async def _setattr_nameless(self, i: Inode, attr: pyfuse3.EntryAttributes,
                                fields: pyfuse3.SetattrFields,
                                h: Handle) -> pyfuse3.EntryAttributes:
        assert h.fd is not None
        set_open_attrs(h.fd, size=attr.st_size if fields.update_size else None,
                       mode=stat.S_IMODE(attr.st_mode) if fields.update_mode else None,
                       atime_ns=attr.st_atime_ns if fields.update_atime else None,
                       mtime_ns=attr.st_mtime_ns if fields.update_mtime else None)
        return self._attr(i, self._node(i))

    @handler
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._node(self._inode(inode))
        if not stat.S_ISLNK(node.entry.mode):
            raise UnionError(errno.EINVAL)
        return os.fsencode(node.entry.target)

    @handler
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        out = pyfuse3.StatvfsData()
        for name, value in self.union.statfs().items():
            setattr(out, name, value)
        return out

    # -- directories ---------------------------------------------------------------------------

    @handler
    async def opendir(  # type: ignore[override]  # the patched pyfuse3 takes a FileInfo
            self, inode: int, ctx: pyfuse3.RequestContext) -> int | pyfuse3.FileInfo:
        """With a pyfuse3 that takes a ``FileInfo`` here (``scripts/install`` builds one), the
        kernel caches the listing and keeps it across opens; every change to a directory goes
        through this mount, and the kernel drops the listing of a directory it changes.  The
        listing is made at the first ``readdir``: an open the cache answers costs nothing."""
        i = self._inode(inode)
        node = self._node(i)
        if not node.is_dir:
            raise UnionError(errno.ENOTDIR)
        fh = self._new_fh()
        self.dirs[fh] = DirHandle(i)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True) if CACHE_READDIR else fh

    def _listing(self, i: Inode) -> Listing:
        """"." and "..", then the visible children as they are now; a removed directory has
        none."""
        node = self._node(i)
        parent = self.inodes.at(node.path.rpartition("/")[0]) if node.path else i
        parent = parent or i
        dots = [(b".", self._attr(i, node)), (b"..", self._attr(parent, self._node(parent)))]
        return (dots, *cookies(self.union.listdir(node) if i.path is not None else []))

    @handler
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        """A listing is made at offset 0 (the first readdir, or a rewinddir: fresh, as in
        overlayfs) and kept while the directory is open; offsets are the children's cookies,
        so a reader resumes after the name it saw last in any listing.  "." and ".." come
        first and, as pyfuse3 asks, add no lookup count.  The kernel applies the attributes
        it gets here to inodes it holds, so a listing made by an earlier call answers with
        what upper files are now (data written since must not read back as lost).  Every
        request is a READDIRPLUS: plain READDIR for the requests the kernel would make
        without attributes was measured and rejected (docs/bench/issue14.md: a first ls 45%
        faster, a find 10-45% slower, as every name then costs a LOOKUP)."""
        d = self.dirs[fh]
        made = d.listing is None or start_id == 0
        if made:
            d.listing = self._listing(d.inode)
        assert d.listing is not None
        dots, offsets, entries = d.listing
        fresh = self.union.fresh
        for i in range(start_id, len(dots)):
            if not pyfuse3.readdir_reply(token, dots[i][0], dots[i][1], i + 1):
                return
        ref, attr, reply, encode = self.inodes.ref, self._attr, pyfuse3.readdir_reply, os.fsencode
        for i in range(bisect.bisect_right(offsets, start_id), len(entries)):
            name, node = entries[i]
            if not made:
                node = fresh(node)
            inode = ref(node, 0)
            if not reply(token, encode(name), attr(inode, node), offsets[i]):
                self.inodes.forget(inode.ino, 0)
                return
            inode.lookups += 1

    @handler
    async def releasedir(self, fh: int) -> None:
        self.dirs.pop(fh, None)

    @handler
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        pass

    @handler
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        async with self.lock:
            node = self.union.mkdir(self._path(parent_inode), fsdecode(name), stat.S_IMODE(mode),
                                    ctx.uid, ctx.gid)
        return self._entry(node, new=True)

    @handler
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        async with self.lock:
            node = self.union.rmdir(self._path(parent_inode), fsdecode(name))
        self.inodes.unlinked(node.path)

    # -- names ---------------------------------------------------------------------------------

    @handler
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        async with self.lock:
            node = self.union.mknod(self._path(parent_inode), fsdecode(name), mode, rdev,
                                    ctx.uid, ctx.gid)
        return self._entry(node, new=True)

    @handler
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        async with self.lock:
            node = self.union.symlink(self._path(parent_inode), fsdecode(name),
                                      os.fsdecode(target), ctx.uid, ctx.gid)
        return self._entry(node, new=True)

    @handler
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        async with self.lock:
            src = self._path(inode)
            node = await self._changing(src, self.union.link, src, self._path(new_parent_inode),
                                        fsdecode(new_name))
            self._node(self._inode(inode))  # the source's link count changed
        return self._entry(node)

    @handler
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        async with self.lock:
            node = self.union.unlink(self._path(parent_inode), fsdecode(name))
        self.inodes.unlinked(node.path)

    @handler
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        src_parent, dst_parent = self._path(parent_inode_old), self._path(parent_inode_new)
        src = f"{src_parent}/{fsdecode(name_old)}" if src_parent else fsdecode(name_old)
        dst = f"{dst_parent}/{fsdecode(name_new)}" if dst_parent else fsdecode(name_new)
        async with self.lock:
            moved, replaced = await self._changing(src, self.union.rename, src_parent,
                                                   fsdecode(name_old), dst_parent,
                                                   fsdecode(name_new), flags, rename=True)
        if not moved:
            return
        if flags & pyfuse3.RENAME_EXCHANGE:
            self.inodes.exchanged(src, dst)
            return
        if replaced is not None:
            self.inodes.unlinked(dst)
        self.inodes.moved(src, dst)

    # -- files ---------------------------------------------------------------------------------

    @handler
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        i = self._inode(inode)
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        if i.path is None:  # unlinked, still open elsewhere: share that descriptor
            fd = self._borrow_fd(i)
            node = self._node(i)
        else:
            if self.union.open_changes(flags):
                if not self.union.writable:
                    raise UnionError(errno.EROFS)
                async with self.lock:
                    # libfuse enables atomic O_TRUNC: the truncate comes with the open
                    size = 0 if flags & os.O_TRUNC else None
                    self.inodes.refresh(i, await self._changing(
                        i.path, self.union.open, i.path, flags, size=size))
            node = self._node(i)
            fd = self.union.open_file(node, writable)
        fh = self._new_fh()
        self.handles[fh] = Handle(i, fd, node, writable, not self.union.in_upper(node))
        self.inodes.opened(i)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    def _borrow_fd(self, i: Inode) -> int | None:
        fd = self._upper_fd(i)
        return None if fd is None else os.dup(fd)

    def _upper_fd(self, i: Inode) -> int | None:
        """A descriptor some handle holds on ``i``'s upper file."""
        for h in self.handles.values():
            if h.inode is i and h.fd is not None and not h.lower:
                return h.fd
        return None

    @handler
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo,
                                                           pyfuse3.EntryAttributes]:
        async with self.lock:
            node, fd = self.union.create_open(self._path(parent_inode), fsdecode(name),
                                              stat.S_IMODE(mode), ctx.uid, ctx.gid)
        attr = self._entry(node, new=True)
        i = self._inode(attr.st_ino)
        fh = self._new_fh()
        self.handles[fh] = Handle(i, fd, node, True, False)
        self.inodes.opened(i)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True), attr

    @handler
    async def read(self, fh: int, off: int, size: int) -> bytes:
        """Large reads (read-ahead) run in worker threads, so several are in flight at once
        and a cold read keeps the disk busy; small ones are answered inline."""
        h = self.handles[fh]
        if h.fd is not None:
            if size >= BIG_READ:
                return await trio.to_thread.run_sync(os.pread, h.fd, size, off,
                                                     limiter=self.readers)
            return os.pread(h.fd, size, off)
        assert h.node is not None
        if size >= BIG_READ or self.union.read_blocks(h.node, off, size):
            return await trio.to_thread.run_sync(self.union.read, h.node, off, size,
                                                 limiter=self.readers)
        return self.union.read(h.node, off, size)

    @handler
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        while self._thawed is not None:
            await self._thawed.wait()
        h = self.handles[fh]
        if h.fd is None or not h.writable:
            raise UnionError(errno.EBADF)
        return os.pwrite(h.fd, buf, off)

    @handler
    async def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        """Passed on to the upper file, as overlayfs does (it was copied up at the open for
        writing).  Runs in a worker thread under the mutation lock: a freeze for commit waits
        for one in flight, and later ones wait for the thaw, as writes do."""
        h = self.handles[fh]
        if h.fd is None or not h.writable:
            raise UnionError(errno.EBADF)
        async with self.lock:
            await trio.to_thread.run_sync(fallocate, h.fd, mode, offset, length,
                                          limiter=self.limiter)

    @handler
    async def release(self, fh: int) -> None:
        h = self.handles.pop(fh)
        if h.fd is not None:
            os.close(h.fd)
        self.inodes.released(h.inode)

    @handler
    async def fsync(self, fh: int, datasync: bool) -> None:
        h = self.handles[fh]
        if h.fd is not None:
            await trio.to_thread.run_sync(os.fdatasync if datasync else os.fsync, h.fd)

    # -- xattrs --------------------------------------------------------------------------------

    @handler
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        i = self._inode(inode)
        if i.path is None:
            value = self._nameless_xattr(i, os.fsdecode(name))
        else:
            value = self.union.xattr(self.union.resolve(i.path), os.fsdecode(name))
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    def _nameless_xattr(self, i: Inode, name: str) -> bytes | None:
        fd = self._upper_fd(i)
        if fd is None:
            assert i.node is not None
            return self.union.xattr(i.node, name)
        return fd_xattrs(fd).get(name)

    @handler
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        i = self._inode(inode)
        fd = self._upper_fd(i) if i.path is None else None
        names = fd_xattrs(fd) if fd is not None else self.union.xattrs(self._node(i))
        return [os.fsencode(n) for n in names]

    @handler
    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        async with self.lock:
            path = self._path(inode)
            await self._changing(path, self.union.setxattr, path, os.fsdecode(name), value)

    @handler
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        async with self.lock:
            path = self._path(inode)
            await self._changing(path, self.union.removexattr, path, os.fsdecode(name))

    def close_all(self) -> None:
        """Close every handle (after the main loop ended)."""
        for fh in list(self.handles):
            h = self.handles.pop(fh)
            if h.fd is not None:
                os.close(h.fd)


__all__ = ["ROOT_INO", "Operations"]
