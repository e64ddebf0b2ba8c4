"""Union: a ``UnionView`` plus the upper layer, and every mutation with overlayfs's copy-up rules.

Reads are ``Lookup``'s (lookup.py: caches, identities, data).  Mutations follow the kernel:

* the first change to a lower object copies it up (data, owner, mode, times, xattrs) through the
  work directory; parents are copied up first; a hardlinked lower file is copied up with every
  visible name of its group, linked in the upper, so the names stay one file (overlayfs with
  ``index=on``);
* deleting a name that a lower layer also has leaves a whiteout; a directory created where lower
  directories would merge in is opaque;
* renaming a directory that has lower content copies the whole subtree up and makes it opaque at
  the new place (no ``redirect_dir``), so it always works — never EXDEV — and the upper stays a
  plain overlayfs upper that any tool reads the same way.

Caveats:
* Not thread-safe: the caller serialises mutations (``fuse_ops`` holds one lock); reads may run
  between mutations.
* Ownership of new objects is the caller's ``uid``/``gid`` (the FUSE request context).
"""

from __future__ import annotations

import errno
import os
import stat
import sys

from . import whiteout as wh
from .errors import UnionError
from .layers import DirLayer, Entry, LowerLayer, join, split
from .lookup import Lookup
from .resolve import Node, UnionView, merge
from .upper import RENAME_EXCHANGE, RENAME_NOREPLACE, RENAME_WHITEOUT, Attrs, UpperLayer

NAME_MAX = 255


def check_name(name: str) -> None:
    if wh.is_reserved_name(name):
        raise UnionError(errno.EINVAL, f"{name!r} would read as a whiteout")
    if len(name.encode("utf-8", "surrogateescape")) > NAME_MAX:
        raise UnionError(errno.ENAMETOOLONG, name)
    if not name or name in (".", "..") or "/" in name:
        raise UnionError(errno.EINVAL, name)


class Union(Lookup):
    """The merged tree of ``lowers`` (top first) under an optional writable ``upper``, with
    every mutation (reading: ``Lookup``)."""

    def rotate(self, upper: UpperLayer) -> LowerLayer:
        """Turn the writable layer into the top read-only one and write to ``upper`` (empty)
        from now on: a build's step is done.  Inode numbers stay what they were (the old
        upper keeps its layer id).  Returns the layer that was the upper, now a lower."""
        old = self._up()
        lower = DirLayer(old.root)
        old.close()
        self.upper = upper
        self.view = UnionView([upper, lower, *self.view.layers[1:]])
        self.ids = [max(self.ids) + 1, *self.ids]
        self._cache.clear()
        self._dirs.clear()
        self._kids.clear()
        return lower

    # -- rules of the mutations ---------------------------------------------------------------

    def _lower_candidates(self, parent: Node, path: str) -> list[tuple[int, Entry]]:
        return [(li, e) for li, e in self.view.candidates(parent.stack, path)
                if li != 0 or self.upper is None]

    def _lower_visible(self, parent: Node, path: str) -> bool:
        """Would a lower layer show something at ``path`` if the upper had nothing there?"""
        return merge(path, self._lower_candidates(parent, path)) is not None

    def _lower_dirs_join(self, parent: Node, path: str) -> bool:
        """Would lower directories merge into an upper directory at ``path``?"""
        return _dirs_join(self._lower_candidates(parent, path))

    def _whiteout_in_upper(self, path: str) -> bool:
        e = self._up().entry(path)
        return e is not None and e.is_whiteout

    def attrs_of(self, node: Node) -> Attrs:
        e = node.entry
        return Attrs(stat.S_IMODE(e.mode), e.uid, e.gid, e.mtime_ns,
                     e.atime_ns if e.atime_ns >= 0 else None, self.xattrs(node))

    # -- copy-up -------------------------------------------------------------------------------

    def copy_up(self, path: str, size: int | None = None) -> Node:
        """Make ``path`` an upper object (idempotent); ``size`` truncates a regular file's data
        as it is copied.  Returns the node as it is now."""
        upper = self._up()
        node = self.resolve(path)
        if self.in_upper(node):
            return node
        parent = split(path)[0]
        if path:
            self.copy_up(parent)
        e = node.entry
        attrs = self.attrs_of(node)
        origin = self.identity(node)
        # a copy-up is no change of the directory it lands in: its times stay (as overlayfs
        # keeps them); only its ctime moves
        kept = upper.times(parent)
        if node.is_dir:
            upper.make_dir(path, attrs, over=self._whiteout_in_upper(path))
        elif stat.S_ISREG(e.mode):
            upper.make_file(path, attrs, (self.layer_of(node), e), size=size)
        else:
            upper.make_special(path, attrs, stat.S_IFMT(e.mode), e.rdev, e.target)
        upper.set_times(parent, kept)
        self.touched += (path, parent)
        self._changed(path, tree=node.is_dir)
        copied = self._origin(path, origin)
        if stat.S_ISREG(e.mode):
            self._link_group(node)
        return copied

    def take_touched(self) -> list[str]:
        """The names whose attributes copy-ups changed since the last call."""
        got, self.touched = self.touched, []
        return got

    def _origin(self, path: str, origin: tuple[int, int]) -> Node:
        """Record that the upper object now at ``path`` was copied up from ``origin``."""
        node = self.resolve(path)
        self.origins[(self.ids[0], node.entry.obj)] = origin
        return node

    def _link_group(self, node: Node) -> None:
        """Copy up the other visible names of a hardlinked lower file as links to the copy."""
        if node.entry.nlink < 2:
            return
        upper = self._up()
        for other in self.layer_of(node).hardlinks(node.entry):
            if other == node.path:
                continue
            n = self.find(other)
            if n is None or n.key != node.key:
                continue
            parent = split(other)[0]
            self.copy_up(parent)
            kept = upper.times(parent)
            upper.link(node.path, other, over=self._whiteout_in_upper(other))
            upper.set_times(parent, kept)
            self.touched += (other, parent)
            self._changed(other)

    def copy_up_tree(self, path: str) -> None:
        """Copy up ``path`` and everything visible below it."""
        node = self.copy_up(path)
        if node.is_dir:
            for name, child in self.listdir(self.resolve(path)):
                if child.is_dir or not self.in_upper(child):
                    self.copy_up_tree(join(path, name))

    def _needs_tree_copy(self, node: Node) -> bool:
        return node.is_dir and (len(node.stack) > 1 or not self.in_upper(node))

    # -- creating --------------------------------------------------------------------------------

    def _owned(self, parent_path: str, mode: int, gid: int, is_dir: bool) -> tuple[int, int]:
        """The mode and group of a new object in ``parent_path``: in a setgid directory it
        takes the directory's group, and a new directory the setgid bit too (the kernel
        leaves this to the file system)."""
        parent = self.resolve(parent_path).entry
        if parent.mode & stat.S_ISGID:
            return (mode | stat.S_ISGID if is_dir else mode), parent.gid
        return mode, gid

    def _prepare_new(self, parent_path: str,
                     name: str) -> tuple[str, bool, list[tuple[int, Entry]]]:
        """Check that ``name`` can be made in ``parent_path`` and copy the parent up.  Returns
        the new path, whether a whiteout of it is in the upper, and what the lower layers
        have there (to decide opaqueness and to build the new node without looking again)."""
        check_name(name)
        parent = self.resolve(parent_path)
        if not parent.is_dir:
            raise UnionError(errno.ENOTDIR, parent_path)
        path = join(parent_path, name)
        candidates = list(self.view.candidates(parent.stack, path))
        if merge(path, candidates) is not None:
            raise UnionError(errno.EEXIST, path)
        over = any(li == 0 and e.is_whiteout for li, e in candidates)
        self.copy_up(parent_path)
        lower = [(li, e) for li, e in candidates if li != 0]
        return path, over, lower

    def _made(self, path: str, lower: list[tuple[int, Entry]], new: bool = True) -> Node:
        """The node of an object just made in the upper at ``path`` (``new``: a new object,
        not one more name of an existing one)."""
        self._changed(path)
        e = self._up().entry(path)
        node = merge(path, [(0, e), *lower]) if e is not None else None
        if node is None:
            return self.resolve(path)
        if new:
            # a new object: its host inode number may have been someone's before
            self.origins.pop((self.ids[0], node.entry.obj), None)
        self._remember(path, node)
        return node

    def mkdir(self, parent_path: str, name: str, mode: int, uid: int, gid: int) -> Node:
        mode, gid = self._owned(parent_path, mode, gid, True)
        path, over, lower = self._prepare_new(parent_path, name)
        opaque = _dirs_join(lower)
        self._up().make_dir(path, Attrs(mode, uid, gid), opaque=opaque, over=over)
        return self._made(path, lower)

    def create(self, parent_path: str, name: str, mode: int, uid: int, gid: int) -> Node:
        node, fd = self.create_open(parent_path, name, mode, uid, gid)
        os.close(fd)
        return node

    def create_open(self, parent_path: str, name: str, mode: int, uid: int,
                    gid: int) -> tuple[Node, int]:
        """``create``, returning the new file open for reading and writing as well."""
        mode, gid = self._owned(parent_path, mode, gid, False)
        path, over, lower = self._prepare_new(parent_path, name)
        upper = self._up()
        if over:  # a whiteout is there: the file is built in the work dir and put over it
            upper.make_file(path, Attrs(mode, uid, gid), over=True)
            node = self._made(path, lower)
            return node, upper.open_path(path, os.O_RDWR)
        fd, e = upper.create_file(path, Attrs(mode, uid, gid))
        self._changed(path)
        node = Node(path, e, 0, ((0, e),))
        self.origins.pop((self.ids[0], e.obj), None)  # its host inode number may be reused
        self._remember(path, node)
        return node, fd

    def mknod(self, parent_path: str, name: str, mode: int, rdev: int, uid: int,
              gid: int) -> Node:
        kind = stat.S_IFMT(mode)
        if kind == stat.S_IFREG or kind == 0:
            return self.create(parent_path, name, stat.S_IMODE(mode), uid, gid)
        if kind not in (stat.S_IFIFO, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFSOCK):
            raise UnionError(errno.EINVAL, f"mknod of type {oct(kind)}")
        if kind == stat.S_IFCHR and rdev == 0:
            raise UnionError(errno.EPERM, "a 0/0 character device is a whiteout")
        mode, gid = self._owned(parent_path, mode, gid, False)
        path, over, lower = self._prepare_new(parent_path, name)
        self._up().make_special(path, Attrs(stat.S_IMODE(mode), uid, gid), kind, rdev,
                                over=over)
        return self._made(path, lower)

    def symlink(self, parent_path: str, name: str, target: str, uid: int, gid: int) -> Node:
        _, gid = self._owned(parent_path, 0, gid, False)
        path, over, lower = self._prepare_new(parent_path, name)
        self._up().make_special(path, Attrs(0o777, uid, gid), stat.S_IFLNK, target=target,
                                over=over)
        return self._made(path, lower)

    def link(self, src_path: str, parent_path: str, name: str) -> Node:
        node = self.resolve(src_path)
        if node.is_dir:
            raise UnionError(errno.EPERM, "hardlink to a directory")
        path, over, lower = self._prepare_new(parent_path, name)
        self.copy_up(src_path)
        self._up().link(src_path, path, over=over)
        self._changed(src_path)  # its nlink
        return self._made(path, lower, new=False)

    # -- removing --------------------------------------------------------------------------------

    def _remove(self, parent: Node, path: str) -> None:
        node = self.resolve(path)
        if not node.is_dir and node.entry.nlink > 1:
            # the other names of a lower hardlink must lose a link, as with overlayfs index=on
            self.copy_up(path)
        self.copy_up(parent.path)
        if self._lower_visible(parent, path):
            self._up().whiteout(path)
        else:
            self._up().remove(path)
        self._changed(path, tree=node.is_dir)

    def unlink(self, parent_path: str, name: str) -> Node:
        """Remove a non-directory; returns the node that was there."""
        self._up()
        parent = self.resolve(parent_path)
        path = join(parent_path, name)
        node = self.resolve(path)
        if node.is_dir:
            raise UnionError(errno.EISDIR, path)
        self._remove(parent, path)
        return node

    def rmdir(self, parent_path: str, name: str) -> Node:
        self._up()
        parent = self.resolve(parent_path)
        path = join(parent_path, name)
        node = self.resolve(path)
        if not node.is_dir:
            raise UnionError(errno.ENOTDIR, path)
        if self.listdir(node):
            raise UnionError(errno.ENOTEMPTY, path)
        self._remove(parent, path)
        return node

    # -- rename ----------------------------------------------------------------------------------

    def rename(self, src_parent: str, src_name: str, dst_parent: str, dst_name: str,
               flags: int = 0) -> tuple[bool, Node | None]:
        """rename(2) with RENAME_NOREPLACE/RENAME_EXCHANGE.  Returns whether anything moved and
        the node that was at the destination (None when nothing was)."""
        upper = self._up()
        check_name(dst_name)
        sp = self.resolve(src_parent)
        src = join(src_parent, src_name)
        node = self.resolve(src)
        dp = self.resolve(dst_parent)
        if not dp.is_dir:
            raise UnionError(errno.ENOTDIR, dst_parent)
        dst = join(dst_parent, dst_name)
        if src == dst:
            return False, None
        target = self.view.lookup(dp, dst_name)
        if node.is_dir and (dst + "/").startswith(src + "/"):
            raise UnionError(errno.EINVAL, "a directory cannot move below itself")
        if flags & RENAME_EXCHANGE:
            if target is None:
                raise UnionError(errno.ENOENT, dst)
            if target.is_dir and (src + "/").startswith(dst + "/"):
                raise UnionError(errno.EINVAL, "a directory cannot move below itself")
            return True, self._exchange(sp, src, node, dp, dst, target)
        if target is not None:
            if flags & RENAME_NOREPLACE:
                raise UnionError(errno.EEXIST, dst)
            if node.is_dir and not target.is_dir:
                raise UnionError(errno.ENOTDIR, dst)
            if not node.is_dir and target.is_dir:
                raise UnionError(errno.EISDIR, dst)
            if target.is_dir and self.listdir(target):
                raise UnionError(errno.ENOTEMPTY, dst)
            if not node.is_dir and target.key == node.key:
                return False, None  # two names of one file: rename does nothing
            if not target.is_dir and target.entry.nlink > 1:
                self.copy_up(dst)  # its other names lose a link
        tree = self._needs_tree_copy(node)
        if tree:
            self.copy_up_tree(src)
        else:
            self.copy_up(src)
        self.copy_up(dst_parent)
        src_lower = self._lower_visible(sp, src)
        dst_join = node.is_dir and self._lower_dirs_join(dp, dst)
        dst_entry = upper.entry(dst)
        if dst_entry is not None and (dst_entry.is_dir or (node.is_dir and dst_entry.is_whiteout)):
            upper.remove(dst)  # an empty (in the union) directory or a whiteout a dir can't replace
        if src_lower:
            try:
                upper.rename(src, dst, RENAME_WHITEOUT)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.EPERM, errno.ENOSYS):
                    raise
                upper.rename(src, dst)
                upper.whiteout(src)
        else:
            upper.rename(src, dst)
        if dst_join:
            upper.set_opaque(dst)
        self._changed(src, tree=node.is_dir)
        self._changed(dst, tree=node.is_dir or (target is not None and target.is_dir))
        if tree:
            self.renamed.add((self.ids[0], self.resolve(dst).entry.obj))
        return True, target

    def _exchange(self, sp: Node, src: str, a: Node, dp: Node, dst: str, b: Node) -> Node:
        upper = self._up()
        for path, node in ((src, a), (dst, b)):
            if self._needs_tree_copy(node):
                self.copy_up_tree(path)
            else:
                self.copy_up(path)
        upper.rename(src, dst, RENAME_EXCHANGE)
        if a.is_dir and self._lower_dirs_join(dp, dst):
            upper.set_opaque(dst)
        if b.is_dir and self._lower_dirs_join(sp, src):
            upper.set_opaque(src)
        self._changed(src, tree=a.is_dir or b.is_dir)
        self._changed(dst, tree=a.is_dir or b.is_dir)
        return b

    # -- opening ---------------------------------------------------------------------------------

    @staticmethod
    def open_changes(flags: int) -> bool:
        """Whether open(2) with ``flags`` changes the object: opening for writing, and
        O_TRUNC whatever the access mode (Linux truncates a regular file on O_RDONLY|O_TRUNC
        too; the kernel has checked write permission)."""
        return flags & os.O_ACCMODE != os.O_RDONLY or bool(flags & os.O_TRUNC)

    def open(self, path: str, flags: int) -> Node:
        """open(2) of the object at ``path``: one opened to change (``open_changes``) is copied
        up first, and O_TRUNC truncates a regular file (FUSE's atomic O_TRUNC: no setattr
        follows).  Returns the node as it is now."""
        node = self.stat(path)
        if not self.open_changes(flags):
            return node
        self._up()
        if flags & os.O_TRUNC and stat.S_ISREG(node.entry.mode):
            return self.setattr(path, size=0)  # times change even at size 0, as POSIX says
        return self.copy_up(path)

    def copy_cost(self, path: str, size: int | None = None, rename: bool = False) -> int:
        """How many bytes a copy-up of ``path`` (truncated to ``size``) would copy now: 0 for
        an upper object, a file's size, and for a directory whose ``rename`` copies its tree
        up, more than any file (the caller runs big copies off its request loop)."""
        node = self.find(path)
        if node is None or self.upper is None:
            return 0
        if node.is_dir:
            return sys.maxsize if rename and self._needs_tree_copy(node) else 0
        if self.in_upper(node) or not stat.S_ISREG(node.entry.mode):
            return 0
        if self.blocking(node):
            return sys.maxsize  # its bytes may have to come over the network
        return node.entry.size if size is None else min(size, node.entry.size)

    # -- attributes ------------------------------------------------------------------------------

    def setattr(self, path: str, *, mode: int | None = None, uid: int | None = None,
                gid: int | None = None, size: int | None = None,
                atime_ns: int | None = None, mtime_ns: int | None = None) -> Node:
        node = self.resolve(path)
        if size is not None:
            if node.is_dir:
                raise UnionError(errno.EISDIR, path)
            if not stat.S_ISREG(node.entry.mode):
                raise UnionError(errno.EINVAL, path)
        node = self.copy_up(path, size=size)
        times = None if atime_ns is None and mtime_ns is None else (atime_ns, mtime_ns)
        e = self._up().set_attrs(path, node.entry, mode=mode, uid=uid, gid=gid, size=size,
                                 times=times)
        # only the top entry's attributes changed: no need to look the path up again
        self._changed(path)
        fresh = Node(path, e, 0, ((0, e), *node.stack[1:]))
        self._remember(path, fresh)
        return fresh

    def xattr(self, node: Node, name: str) -> bytes | None:
        """One extended attribute of ``node`` (None when absent); private ones never show.
        An upper object is asked directly: one syscall, not a listing."""
        if wh.is_private_xattr(name):
            return None
        if self.in_upper(node) and self.upper is not None:
            try:
                return self.upper.getxattr(node.path, name)
            except OSError as exc:
                if exc.errno in (errno.ENODATA, errno.ENOTSUP):
                    return None
                raise
        return self.xattrs(node).get(name)

    def setxattr(self, path: str, name: str, value: bytes) -> None:
        if wh.is_private_xattr(name):
            raise UnionError(errno.EOPNOTSUPP, name)
        self.copy_up(path)
        self._up().setxattr(path, name, value)
        self._changed(path)

    def removexattr(self, path: str, name: str) -> None:
        if wh.is_private_xattr(name):
            raise UnionError(errno.EOPNOTSUPP, name)
        node = self.resolve(path)
        if name not in self.xattrs(node):
            raise UnionError(errno.ENODATA, name)
        self.copy_up(path)
        self._up().removexattr(path, name)
        self._changed(path)


def _dirs_join(lower: list[tuple[int, Entry]]) -> bool:
    """Would these lower candidates (top first) merge into an upper directory?"""
    return bool(lower) and lower[0][1].is_dir
