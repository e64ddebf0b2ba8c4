"""Where COPY and ADD read from: the build context (a host directory less what .dockerignore
excludes) or another stage's or image's rootfs (its layers, read without a mount).

Both are a ``Tree``: ``entry(path)`` (lstat), ``children(path)``, ``chunks(path)`` (file data),
``xattrs(path)``, all on ``/``-separated paths relative to the tree's root.  On top of that:

* ``resolve(tree, path)`` follows symlinks the way docker does inside a build context or a
  rootfs (``FollowSymlinkInScope``): every component, an absolute target starting again at
  the tree's root, ``..`` never above it;
* ``find_sources(tree, path, wildcards)`` is docker's ``calcCopyInfo``: a path with ``*``,
  ``?`` or ``[`` matches every path of the tree with Go's ``filepath.Match``; any other must
  exist (a path that leaves the tree is refused by name);
* ``checksum(tree, sources)``: the cache's view of the sources, a sha256 over every file's
  path, type, mode, size, content digest and link target (mtimes are left out, as BuildKit
  leaves them out: touching a file does not invalidate the cache).

Caveats:
* The context is read through ordinary paths (it is the user's directory, not an image).
* A file of the context that is neither regular, directory nor symlink (a socket, a device)
  is skipped by COPY, as docker's context tar skips sockets.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from unionfs.resolve import Node, UnionView

from ..errors import StoreError
from .ignore import Matcher

__all__ = ["CopySourceError", "HostTree", "Source", "SrcEntry", "Tree", "ViewTree",
           "checksum", "find_sources", "resolve"]

CHUNK = 1 << 20
MAX_LINKS = 255


class CopySourceError(StoreError):
    """A COPY or ADD source that is missing, excluded by .dockerignore, outside the build
    context, or matches nothing."""


@dataclass(frozen=True)
class SrcEntry:
    mode: int  # st_mode, type bits included
    uid: int
    gid: int
    size: int
    mtime_ns: int
    target: str = ""  # a symlink's
    rdev: int = 0
    ino: tuple[int, int] = (0, 0)  # identity, for hardlinks
    nlink: int = 1

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_link(self) -> bool:
        return stat.S_ISLNK(self.mode)

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.mode)


class Tree:
    """The protocol of a source tree (``path``: relative, ``""`` is the root)."""

    name = "tree"

    def entry(self, path: str) -> SrcEntry | None:
        raise NotImplementedError

    def children(self, path: str) -> list[str]:
        raise NotImplementedError

    def chunks(self, path: str) -> Iterator[bytes]:
        raise NotImplementedError

    def xattrs(self, path: str) -> dict[str, bytes]:
        return {}

    def host_path(self, path: str) -> str | None:
        """A host path with the file's data (for ``copy_file_range``), if there is one."""
        return None


class HostTree(Tree):
    """The build context: ``root`` on the host, less what ``matcher`` excludes."""

    name = "build context"

    def __init__(self, root: str, matcher: Matcher | None = None) -> None:
        self.root = os.path.abspath(root)
        self.matcher = matcher or Matcher(())
        self._kept: dict[str, bool] = {}

    def _full(self, path: str) -> str:
        return os.path.join(self.root, path) if path else self.root

    def entry(self, path: str) -> SrcEntry | None:
        try:
            st = os.lstat(self._full(path))
        except (FileNotFoundError, NotADirectoryError):
            return None
        if path and self.matcher.excluded(path) and not (
                stat.S_ISDIR(st.st_mode) and self.matcher.has_exceptions
                and self._any_kept(path)):
            return None
        target = os.readlink(self._full(path)) if stat.S_ISLNK(st.st_mode) else ""
        return SrcEntry(st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, target,
                        st.st_rdev, (st.st_dev, st.st_ino), st.st_nlink)

    def children(self, path: str) -> list[str]:
        out = []
        for name in sorted(os.listdir(self._full(path))):
            child = f"{path}/{name}" if path else name
            if self.matcher.excluded(child):
                if self.matcher.has_exceptions and os.path.isdir(self._full(child)) and \
                        not os.path.islink(self._full(child)) and self._any_kept(child):
                    out.append(name)
                continue
            out.append(name)
        return out

    def _any_kept(self, directory: str) -> bool:
        """Does an exception pattern bring back something below the excluded ``directory``?"""
        if directory in self._kept:
            return self._kept[directory]
        self._kept[directory] = self._find_kept(directory)
        return self._kept[directory]

    def _find_kept(self, directory: str) -> bool:
        for dirpath, dirnames, filenames in os.walk(self._full(directory)):
            rel = os.path.relpath(dirpath, self.root)
            for n in [*dirnames, *filenames]:
                if not self.matcher.excluded(join("" if rel == "." else rel, n)):
                    return True
        return False

    def chunks(self, path: str) -> Iterator[bytes]:
        with open(self._full(path), "rb") as f:
            while data := f.read(CHUNK):
                yield data

    def xattrs(self, path: str) -> dict[str, bytes]:
        full = self._full(path)
        out: dict[str, bytes] = {}
        try:
            names = os.listxattr(full, follow_symlinks=False)
        except OSError:
            return out
        for n in names:
            if n.startswith("security.") and n != "security.capability":
                continue
            try:
                out[n] = os.getxattr(full, n, follow_symlinks=False)
            except OSError:
                continue
        return out

    def host_path(self, path: str) -> str | None:
        return self._full(path)


class ViewTree(Tree):
    """An image's rootfs through its layers (a ``UnionView``), read in place."""

    def __init__(self, view: UnionView, name: str) -> None:
        self.view = view
        self.name = name
        self._nodes: dict[str, Node | None] = {"": view.root()}

    def node(self, path: str) -> Node | None:
        if path in self._nodes:
            return self._nodes[path]
        parent, _, name = path.rpartition("/")
        pnode = self.node(parent)
        found = self.view.lookup(pnode, name) if pnode is not None and pnode.is_dir else None
        self._nodes[path] = found
        return found

    def entry(self, path: str) -> SrcEntry | None:
        n = self.node(path)
        if n is None:
            return None
        e = n.entry
        return SrcEntry(e.mode, e.uid, e.gid, e.size, e.mtime_ns, e.target, e.rdev, n.key,
                        n.nlink)

    def children(self, path: str) -> list[str]:
        n = self.node(path)
        if n is None:
            return []
        out = []
        for name, child in self.view.listdir(n):
            self._nodes[f"{path}/{name}" if path else name] = child
            out.append(name)
        return out

    def chunks(self, path: str) -> Iterator[bytes]:
        n = self.node(path)
        assert n is not None
        offset = 0
        while offset < n.entry.size:
            data = self.view.read(n, offset, CHUNK)
            if not data:
                raise StoreError(f"short read of {path} in {self.name}")
            offset += len(data)
            yield data

    def xattrs(self, path: str) -> dict[str, bytes]:
        n = self.node(path)
        return self.view.xattrs(n) if n is not None else {}


# -- paths -----------------------------------------------------------------------------------------


def join(a: str, b: str) -> str:
    """Two relative paths joined (either may be ``""``, the root)."""
    return f"{a}/{b}" if a and b else a or b


def clean(path: str) -> str:
    """``path`` relative to a tree's root, cleaned; ``..`` stays if it leaves the root."""
    p = posixpath.normpath("/" + path) if path.startswith("/") else posixpath.normpath(path)
    return p.lstrip("/") if p != "/" else ""


def resolve(tree: Tree, path: str, follow_last: bool = True) -> str | None:
    """``path`` with every symlink followed inside ``tree`` (the last one only with
    ``follow_last``); None when something on the way is missing."""
    todo = [c for c in path.split("/") if c and c != "."]
    done: list[str] = []
    links = 0
    while todo:
        name = todo.pop(0)
        if name == "..":
            if done:
                done.pop()
            continue
        cur = "/".join([*done, name])
        e = tree.entry(cur)
        if e is None:
            return None
        if e.is_link and (todo or follow_last):
            links += 1
            if links > MAX_LINKS:
                raise CopySourceError(f"too many levels of symbolic links at {cur}")
            target = [c for c in e.target.split("/") if c and c != "."]
            if e.target.startswith("/"):
                done = []
            todo = target + todo
            continue
        done.append(name)
    return "/".join(done)


_WILD = re.compile(r"(?<!\\)[*?\[]")


def has_wildcards(path: str) -> bool:
    return _WILD.search(path) is not None


def go_match(pattern: str) -> re.Pattern[str]:
    """Go's ``filepath.Match`` as a regex: ``*``/``?`` never cross ``/``, ``[^..]`` negates."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "*":
            out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        elif ch == "\\" and i + 1 < len(pattern):
            i += 1
            out.append(re.escape(pattern[i]))
        elif ch == "[":
            end = pattern.find("]", i + 2)
            if end < 0:
                raise CopySourceError(f"bad pattern {pattern!r}: syntax error in pattern")
            body = pattern[i + 1:end]
            neg = body.startswith("^")
            body = body[1:] if neg else body
            body = "".join("\\" + c if c in "\\]" else c for c in body)
            out.append(f"[{'^/' if neg else ''}{body}]")
            i = end
        else:
            out.append(re.escape(ch))
        i += 1
    return re.compile("".join(out) + r"\Z", re.DOTALL)


@dataclass(frozen=True)
class Source:
    path: str  # in the tree, symlinks resolved
    given: str  # as the instruction matched it (for the destination's name)
    entry: SrcEntry


def _walk_paths(tree: Tree, path: str = "") -> Iterator[str]:
    for name in tree.children(path):
        child = f"{path}/{name}" if path else name
        yield child
        e = tree.entry(child)
        if e is not None and e.is_dir:
            yield from _walk_paths(tree, child)


def find_sources(tree: Tree, path: str, wildcards: bool, what: str = "COPY") -> list[Source]:
    """The sources ``path`` names in ``tree``.  Raises ``CopySourceError`` naming the path."""
    rel = path.lstrip("/") if isinstance(tree, ViewTree) else path
    cleaned = posixpath.normpath(rel) if rel else "."
    if cleaned == ".." or cleaned.startswith("../"):
        raise CopySourceError(f"{what} failed: forbidden path outside the {tree.name}: {path}")
    cleaned = "" if cleaned == "." else cleaned.lstrip("/")
    if wildcards and has_wildcards(cleaned):
        rx = go_match(cleaned)
        found = []
        for p in _walk_paths(tree):
            if rx.match(p):
                real = resolve(tree, p)
                e = tree.entry(real) if real is not None else None
                if e is not None:
                    found.append(Source(real or "", p, e))
        if not found:
            raise CopySourceError(f"{what} failed: no source files were specified: {path} "
                                  f"matches nothing in the {tree.name}")
        return found
    real = resolve(tree, cleaned)
    e = tree.entry(real) if real is not None else None
    if e is None:
        hint = " or excluded by .dockerignore" if isinstance(tree, HostTree) else ""
        raise CopySourceError(f"{what} failed: file not found in {tree.name}{hint}: "
                              f"stat {path}: file does not exist")
    return [Source(real or "", cleaned, e)]


def walk(tree: Tree, path: str) -> Iterator[tuple[str, SrcEntry]]:
    """``path`` (a directory) and everything below it, depth first, parents first, as
    (path relative to ``path``, entry); the root itself has the relative path ``""``."""
    root = tree.entry(path)
    if root is None:
        return
    yield "", root
    if root.is_dir:
        yield from _below(tree, path, "")


def _below(tree: Tree, base: str, rel: str) -> Iterator[tuple[str, SrcEntry]]:
    here = f"{base}/{rel}" if base and rel else base or rel
    for name in tree.children(here):
        child_rel = f"{rel}/{name}" if rel else name
        e = tree.entry(f"{here}/{name}" if here else name)
        if e is None:
            continue
        yield child_rel, e
        if e.is_dir:
            yield from _below(tree, base, child_rel)


def checksum(tree: Tree, sources: list[Source], *, metadata: bool = True) -> str:
    """sha256 over the sources as COPY would see them: paths, types, modes, sizes, content,
    link targets (no mtimes)."""
    h = hashlib.sha256()
    for src in sources:
        h.update(f"source {src.given}\0".encode())
        for rel, e in walk(tree, src.path):
            h.update(f"{rel}\0{stat.S_IFMT(e.mode):o}\0".encode())
            if metadata:
                h.update(f"{stat.S_IMODE(e.mode):o}\0{e.uid if isinstance(tree, ViewTree) else 0}"
                         f"\0{e.gid if isinstance(tree, ViewTree) else 0}\0".encode())
            if e.is_link:
                h.update(e.target.encode() + b"\0")
            elif e.is_file:
                h.update(f"{e.size}\0".encode())
                fh = hashlib.sha256()
                for chunk in tree.chunks(join(src.path, rel)):
                    fh.update(chunk)
                h.update(fh.digest())
    return h.hexdigest()
