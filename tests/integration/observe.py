"""What a user can see of a mounted tree, and how two of them are compared step by step.

``observe`` walks a tree through directory descriptors (so trees deeper than PATH_MAX work)
and records, for every name: type and mode, owner, size (regular files and symlinks), link
count, a digest of the content (or the errno reading it gave), the link target, the ``user.*``
xattrs, ``st_ino``, ``st_mtime``/``st_ctime`` and the ``d_ino`` its directory listing gave.

``compare`` takes the observations of two mounts before and after one step and reports:
* any field that differs (type, mode, owner, size, nlink, content, target, xattrs);
* the ``st_ino`` equality classes: which names share an inode number, as partitions of the
  names (the raw numbers of two file systems never match);
* per name present before and after: did this step change its inode number, its mtime, its
  ctime (booleans: the two mounts run at different instants);
* on each mount, every listing's ``d_ino`` must equal ``lstat``'s ``st_ino``.

``stable`` checks that nothing observable changed between two observations of one mount (a
cache reclaim in between must be invisible, inode numbers included).

Caveats:
* Time comparisons are only meaningful if a step cannot land in the same clock tick as the last
  change: ``settle`` waits until the coarse clock (file times come from it) has passed every
  time observed so far.
* atime is not compared (relatime, and strata does not update it on reads, see the README);
  directory sizes are not compared (strata's image layers report 0).
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass

_COARSE = getattr(time, "CLOCK_REALTIME_COARSE", 5)


@dataclass(frozen=True)
class Obs:
    mode: str
    uid: int
    gid: int
    size: int
    nlink: int
    content: str
    target: str
    xattrs: tuple[tuple[str, bytes], ...]
    ino: int
    mtime: int
    ctime: int
    dino: int | None  # what the parent's listing said; None for the root

    def visible(self) -> tuple[object, ...]:
        """The fields two file systems must agree on directly."""
        return (self.mode, self.uid, self.gid, self.size, self.nlink, self.content,
                self.target, self.xattrs)


VISIBLE = ("mode", "uid", "gid", "size", "nlink", "content", "target", "xattrs")
Observation = dict[str, Obs]


def _content(dirfd: int, name: str) -> str:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dirfd)
    except OSError as exc:
        return f"E{errno.errorcode.get(exc.errno or 0, exc.errno)}"
    try:
        h = hashlib.sha256()
        while chunk := os.read(fd, 1 << 20):
            h.update(chunk)
        return h.hexdigest()[:16]
    except OSError as exc:
        return f"E{errno.errorcode.get(exc.errno or 0, exc.errno)}"
    finally:
        os.close(fd)


def _xattrs(dirfd: int, name: str) -> tuple[tuple[str, bytes], ...]:
    path = f"/proc/self/fd/{dirfd}/{name}" if name else f"/proc/self/fd/{dirfd}"
    try:
        names = sorted(n for n in os.listxattr(path, follow_symlinks=False)
                       if n.startswith("user."))
        return tuple((n, os.getxattr(path, n, follow_symlinks=False)) for n in names)
    except OSError as exc:
        return (("error", str(exc.errno).encode()),)


def _obs(dirfd: int, name: str, st: os.stat_result, dino: int | None) -> Obs:
    content, target, size = "", "", 0
    if stat.S_ISREG(st.st_mode):
        content, size = _content(dirfd, name), st.st_size
    elif stat.S_ISLNK(st.st_mode):
        target, size = os.readlink(name, dir_fd=dirfd), st.st_size
    xattrs = () if stat.S_ISLNK(st.st_mode) else _xattrs(dirfd, name)
    return Obs(stat.filemode(st.st_mode), st.st_uid, st.st_gid, size, st.st_nlink, content,
               target, xattrs, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, dino)


def observe(root: str | os.PathLike[str] | int, below: str = "") -> Observation:
    """Every name under ``root`` (a path or a directory descriptor), keyed by its path
    relative to it; ``""`` is the root itself.  ``below``: observe only that subtree (names
    still relative to ``root``)."""
    out: Observation = {}
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC) if not isinstance(
        root, int) else os.dup(root)
    try:
        if below:
            sub = os.open(below, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                          dir_fd=fd)
            os.close(fd)
            fd = sub
        out[below] = _obs(fd, "", os.stat(fd), None)
        _walk(fd, below, out)
    finally:
        os.close(fd)
    return out


def _walk(dirfd: int, rel: str, out: Observation) -> None:
    try:
        with os.scandir(dirfd) as it:
            entries = sorted((e.name, e.inode()) for e in it)
    except OSError as exc:
        out[rel + "/"] = Obs(f"E{exc.errno}", 0, 0, 0, 0, "", "", (), 0, 0, 0, None)
        return
    for name, dino in entries:
        path = f"{rel}/{name}" if rel else name
        try:
            st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        except OSError as exc:
            out[path] = Obs(f"E{exc.errno}", 0, 0, 0, 0, "", "", (), 0, 0, 0, dino)
            continue
        out[path] = _obs(dirfd, name, st, dino)
        if stat.S_ISDIR(st.st_mode):
            try:
                sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                              dir_fd=dirfd)
            except OSError as exc:
                out[path + "/"] = Obs(f"E{exc.errno}", 0, 0, 0, 0, "", "", (), 0, 0, 0, None)
                continue
            try:
                _walk(sub, path, out)
            finally:
                os.close(sub)


def classes(obs: Observation) -> set[frozenset[str]]:
    """The names grouped by inode number (only groups of two or more)."""
    by: dict[int, set[str]] = {}
    for name, o in obs.items():
        if o.ino:
            by.setdefault(o.ino, set()).add(name)
    return {frozenset(v) for v in by.values() if len(v) > 1}


def _changed(before: Observation, after: Observation, name: str) -> tuple[bool, bool, bool]:
    b, a = before[name], after[name]
    return b.ino != a.ino, b.mtime != a.mtime, b.ctime != a.ctime


def dino_problems(obs: Observation, tag: str) -> list[str]:
    return [f"{tag}: readdir d_ino {o.dino} != st_ino {o.ino} of {name!r}"
            for name, o in sorted(obs.items()) if o.dino is not None and o.dino != o.ino]


def compare(k0: Observation, k1: Observation, s0: Observation, s1: Observation,
            no_ctime: Iterable[str] = ()) -> list[str]:
    """Problems of strata (``s0`` before, ``s1`` after a step) against the kernel (``k0``,
    ``k1``).  ``no_ctime``: names whose ctime change is not compared (see the caller)."""
    out: list[str] = []
    for name in sorted(set(k1) | set(s1)):
        if name not in s1:
            out.append(f"missing on strata: {name!r} {k1[name].visible()}")
        elif name not in k1:
            out.append(f"extra on strata: {name!r} {s1[name].visible()}")
        elif k1[name].visible() != s1[name].visible():
            diffs = [f"{f} kernel={getattr(k1[name], f)!r} strata={getattr(s1[name], f)!r}"
                     for f in VISIBLE if getattr(k1[name], f) != getattr(s1[name], f)]
            out.append(f"{name!r}: " + ", ".join(diffs))
    kc, sc = classes(k1), classes(s1)
    if kc != sc:
        out.append(f"names sharing an inode number: kernel {sorted(map(sorted, kc))}, "
                   f"strata {sorted(map(sorted, sc))}")
    skip = set(no_ctime)
    for name in sorted(set(k0) & set(k1) & set(s0) & set(s1)):
        kch, sch = _changed(k0, k1, name), _changed(s0, s1, name)
        for what, k, s, f in zip(("st_ino", "mtime", "ctime"), kch, sch,
                                 ("ino", "mtime", "ctime"), strict=True):
            if k != s and not (what == "ctime" and name in skip):
                b, a = getattr(s0[name], f), getattr(s1[name], f)
                out.append(f"{name!r}: this step {'changed' if k else 'kept'} its {what} on "
                           f"the kernel, {'changed' if s else 'kept'} it on strata "
                           f"({b} -> {a})")
    return out + dino_problems(k1, "kernel") + dino_problems(s1, "strata")


class Reported:
    """Differences reported so far: a field that differs stays different step after step and
    is reported once, at the first step that shows it."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def new(self, problems: list[str]) -> list[str]:
        out = [p for p in problems if p not in self.seen]
        self.seen.update(out)
        return out


def stable(before: Observation, after: Observation, tag: str) -> list[str]:
    """What changed between two observations of one mount with nothing done in between."""
    out = []
    for name in sorted(set(before) | set(after)):
        b, a = before.get(name), after.get(name)
        if b is None or a is None:
            out.append(f"{tag}: {name!r} was {b}, is {a}")
        elif b != a:
            diffs = [f"{f} {getattr(b, f)!r} -> {getattr(a, f)!r}" for f in b.__dataclass_fields__
                     if getattr(b, f) != getattr(a, f)]
            out.append(f"{tag}: {name!r} " + ", ".join(diffs))
    return out


def settle(*observations: Observation) -> None:
    """Wait until the coarse clock is past every mtime/ctime observed, so the next change of
    any of them gives a time different from the one seen."""
    now = time.clock_gettime_ns(_COARSE)
    # a time set in the future (utime) differs from any "now" a change will write anyway
    latest = max((t for obs in observations for o in obs.values() for t in (o.mtime, o.ctime)
                  if t <= now + 1_000_000_000), default=0)
    while time.clock_gettime_ns(_COARSE) <= latest:
        time.sleep(0.002)
