"""The cases of the POSIX conformance pass (``test_posix``): one system call each, on names of
the layers ``build_lowers`` makes, run as root or as an unprivileged user in a child process.

Each case is a function of the mount's root path returning what the call gave (an errno, via
``OSError``, is the outcome too).  Cases that set times check them inside the same child (the
values set, ``UTIME_NOW`` giving both times one value, ``UTIME_OMIT`` leaving one alone), since
"now" differs between two mounts.  The order matters: later cases see what earlier ones did,
on both mounts alike.

Seams: ``as_user`` runs a function with other credentials (``setresuid``/``setresgid`` in a
fork; the user needs no passwd entry); ``utimensat`` reaches UTIME_NOW/UTIME_OMIT (ctypes).

Caveats:
* The user is ``USER``:``GROUP`` with ``OTHER_GROUP`` as a supplementary group; ``STRANGER``
  owns files that are neither root's nor the user's.
* ``fs.protected_hardlinks`` decides one case (link to a file one does not own); both mounts
  run on the same kernel, so the sysctl applies to both alike.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import select
import signal
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.integration.pair import whiteout
from tests.integration.unionops import RENAME_EXCHANGE, RENAME_NOREPLACE, renameat2

USER, GROUP, OTHER_GROUP, STRANGER = 4242, 4242, 100, 1000
UTIME_NOW, UTIME_OMIT = (1 << 30) - 1, (1 << 30) - 2
_COARSE = getattr(time, "CLOCK_REALTIME_COARSE", 5)
_AT_FDCWD = -100
_AT_SYMLINK_NOFOLLOW = 0x100
_libc = ctypes.CDLL(None, use_errno=True)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _ts(t: int) -> _Timespec:
    if t in (UTIME_NOW, UTIME_OMIT):
        return _Timespec(0, t)
    return _Timespec(t // 10**9, t % 10**9)


def utimensat(path: str, atime: int, mtime: int, nofollow: bool = False) -> None:
    """utimensat(2); a time is nanoseconds, UTIME_NOW or UTIME_OMIT."""
    times = (_Timespec * 2)(_ts(atime), _ts(mtime))
    if _libc.utimensat(_AT_FDCWD, os.fsencode(path), times,
                       _AT_SYMLINK_NOFOLLOW if nofollow else 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), path)


def as_user(uid: int | None, fn: Callable[[], Any], timeout: float = 30.0) -> tuple[int, Any]:
    """``fn()`` in a child process with umask 022, as ``uid`` (``GROUP`` and ``OTHER_GROUP``)
    or, with None, as root: (0, its result) or (errno, None)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            os.close(r)
            os.umask(0o022)
            if uid is not None:
                os.setgroups([OTHER_GROUP])
                os.setresgid(GROUP, GROUP, GROUP)
                os.setresuid(uid, uid, uid)
            try:
                res: tuple[int, Any] = (0, fn())
            except OSError as exc:
                res = (exc.errno or -1, None)
            data = pickle.dumps(res)
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            data, code = pickle.dumps((-1, repr(exc))), 1
        os.write(w, data)
        os._exit(code)
    os.close(w)
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([r], [], [], timeout)
            if not ready:
                os.kill(pid, signal.SIGKILL)
                return -2, "timed out"
            chunk = os.read(r, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    got: tuple[int, Any] = pickle.loads(b"".join(chunks))
    return got


def build_lowers(base: Path) -> list[Path]:
    """Two layers: directories of every permission kind, files of root, of the user and of a
    stranger, setuid/setgid files, a whiteout, a merged directory."""
    l1, l2 = base / "l1", base / "l2"
    spec: list[tuple[Path, str, int, int, int]] = [  # path, kind, mode, uid, gid
        (l2 / "home", "d", 0o755, USER, GROUP),
        (l2 / "home/old", "f", 0o644, USER, GROUP),
        (l2 / "pub", "d", 0o777, 0, 0),
        (l2 / "pub/others", "f", 0o600, STRANGER, STRANGER),
        (l2 / "pub/open", "f", 0o666, 0, 0),
        (l2 / "sticky", "d", 0o1777, 0, 0),
        (l2 / "sticky/others", "f", 0o666, STRANGER, STRANGER),
        (l2 / "sticky/mine", "f", 0o644, USER, GROUP),
        (l2 / "sticky/rootf", "f", 0o644, 0, 0),
        (l2 / "sticky/odir", "d", 0o777, STRANGER, STRANGER),
        (l2 / "sgid", "d", 0o2777, 0, OTHER_GROUP),
        (l2 / "ro", "d", 0o555, 0, 0),
        (l2 / "ro/f", "f", 0o666, 0, 0),
        (l2 / "nosearch", "d", 0o666, 0, 0),
        (l2 / "nosearch/f", "f", 0o644, 0, 0),
        (l1 / "rootfile", "f", 0o644, 0, 0),
        (l1 / "rofile", "f", 0o444, USER, GROUP),
        (l1 / "userfile", "f", 0o644, USER, GROUP),
        (l1 / "usergrp0", "f", 0o755, USER, 0),
        (l1 / "setuid", "f", 0o4755, USER, GROUP),
        (l1 / "setuidroot", "f", 0o6755, 0, 0),
        (l1 / "userdir", "d", 0o755, USER, GROUP),
        (l1 / "userdir/f", "f", 0o644, 0, 0),
        (l1 / "merged", "d", 0o755, 0, 0),
        (l2 / "merged", "d", 0o755, 0, 0),
        (l2 / "merged/low", "f", 0o644, STRANGER, STRANGER),
        (l1 / "merged/top", "f", 0o644, USER, GROUP),
    ]
    for path, kind, mode, uid, gid in spec:
        if kind == "d":
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(path.name.encode() + b"-data")
        os.chown(path, uid, gid)
        os.chmod(path, mode)
    os.symlink("userfile", l1 / "link")
    os.lchown(l1 / "link", USER, GROUP)
    os.setxattr(l1 / "userfile", "user.lower", b"1")
    whiteout(l1 / "merged/gone")
    (l2 / "merged/gone").write_bytes(b"hidden")
    return [l1, l2]


def _create(p: str, mode: int = 0o666, data: bytes = b"") -> tuple[int, ...]:
    fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode)
    try:
        os.write(fd, data)
        st = os.fstat(fd)
        return st.st_mode, st.st_uid, st.st_gid, st.st_size
    finally:
        os.close(fd)


def _write(p: str, data: bytes, flags: int = 0) -> tuple[int, int]:
    fd = os.open(p, os.O_WRONLY | flags)
    try:
        os.write(fd, data)
        st = os.fstat(fd)
        return st.st_mode, st.st_size
    finally:
        os.close(fd)


def _open(p: str, flags: int, data: bytes = b"") -> tuple[int, int]:
    """open(2) with ``flags`` (mode 0666), write ``data`` if given; the file's mode and size."""
    fd = os.open(p, flags, 0o666)
    try:
        if data:
            os.write(fd, data)
        st = os.fstat(fd)
        return st.st_mode, st.st_size
    finally:
        os.close(fd)


def _read(p: str) -> bytes:
    with open(p, "rb") as f:
        return f.read()


def _times(p: str, atime: int, mtime: int, nofollow: bool = False) -> tuple[object, ...]:
    """Set times, then say what became of them: explicit values must be exact, UTIME_NOW
    gives both times the same new value, UTIME_OMIT keeps the old one."""
    before = os.stat(p, follow_symlinks=not nofollow)
    start = time.clock_gettime_ns(_COARSE)  # file times come from the coarse clock
    utimensat(p, atime, mtime, nofollow)
    end = time.time_ns()
    after = os.stat(p, follow_symlinks=not nofollow)
    out: list[object] = []
    for t, b, a in ((atime, before.st_atime_ns, after.st_atime_ns),
                    (mtime, before.st_mtime_ns, after.st_mtime_ns)):
        out.append("kept" if t == UTIME_OMIT and a == b
                   else "now" if t == UTIME_NOW and start <= a <= end
                   else a if a == t else f"wrong: {b} -> {a}")
    out.append(after.st_ctime_ns != before.st_ctime_ns)
    return tuple(out)


def _access(p: str) -> tuple[bool, ...]:
    return tuple(os.access(p, m, follow_symlinks=False)
                 for m in (os.F_OK, os.R_OK, os.W_OK, os.X_OK))


def _xattrs(p: str) -> list[str]:
    return sorted(n for n in os.listxattr(p, follow_symlinks=False) if n.startswith("user."))


def _mode(p: str) -> tuple[str, int, int]:
    st = os.lstat(p)
    return stat.filemode(st.st_mode), st.st_uid, st.st_gid


T1 = 1_500_000_000_123_456_789
T2 = 1_600_000_000_987_654_321

Case = tuple[str, Callable[[str], Any]]

CASES: list[Case] = [
    # creating: mode (umask 022), owner, group (setgid directories pass theirs on)
    ("create", lambda r: _create(r + "/home/a", 0o666, b"a")),
    ("create-0444-then-write", lambda r: _create(r + "/home/ro-new", 0o444, b"w")),
    ("create-existing", lambda r: _create(r + "/home/a")),
    ("mkdir", lambda r: (os.mkdir(r + "/home/d", 0o777), _mode(r + "/home/d"))),
    ("mkdir-existing", lambda r: os.mkdir(r + "/home/d")),
    ("mkfifo", lambda r: (os.mkfifo(r + "/home/p", 0o666), _mode(r + "/home/p"))),
    ("mknod-chardev", lambda r: os.mknod(r + "/home/c", stat.S_IFCHR | 0o600,
                                         os.makedev(1, 3))),
    ("symlink", lambda r: (os.symlink("a", r + "/home/s"), _mode(r + "/home/s"))),
    ("symlink-existing", lambda r: os.symlink("x", r + "/home/a")),
    ("create-in-sgid", lambda r: _create(r + "/sgid/f", 0o644)),
    ("mkdir-in-sgid", lambda r: (os.mkdir(r + "/sgid/sub", 0o755), _mode(r + "/sgid/sub"))),
    ("create-in-sgid-sub", lambda r: _create(r + "/sgid/sub/g", 0o640)),
    ("create-in-ro-dir", lambda r: _create(r + "/ro/new")),
    ("create-in-nosearch", lambda r: _create(r + "/nosearch/new")),
    ("create-in-sticky", lambda r: _create(r + "/sticky/new", 0o644)),
    ("create-over-whiteout", lambda r: _create(r + "/merged/gone", 0o600, b"again")),
    ("create-in-merged", lambda r: _create(r + "/merged/new", 0o600)),
    ("symlink-in-sgid", lambda r: (os.symlink("f", r + "/sgid/sl"), _mode(r + "/sgid/sl"))),
    ("mkfifo-in-sgid", lambda r: (os.mkfifo(r + "/sgid/p", 0o600), _mode(r + "/sgid/p"))),
    ("symlink-in-ro-dir", lambda r: os.symlink("x", r + "/ro/sl")),
    ("mkdir-in-sticky", lambda r: (os.mkdir(r + "/sticky/mydir"), _mode(r + "/sticky/mydir"))),
    # creat(2) and O_TRUNC (Linux truncates on O_TRUNC whatever the access mode)
    ("creat-own", lambda r: _open(r + "/home/old", os.O_CREAT | os.O_WRONLY | os.O_TRUNC,
                                  b"new")),
    ("creat-open-file", lambda r: _open(r + "/pub/open", os.O_CREAT | os.O_WRONLY | os.O_TRUNC,
                                        b"c")),
    ("o-trunc-no-write-permission", lambda r: _open(r + "/rootfile", os.O_WRONLY | os.O_TRUNC)),
    ("o-trunc-read-only-open", lambda r: _open(r + "/merged/top", os.O_RDONLY | os.O_TRUNC)),
    ("o-creat-excl-existing", lambda r: _open(r + "/merged/top",
                                              os.O_CREAT | os.O_EXCL | os.O_RDWR)),
    # reading and writing: permission checks, setuid cleared by a write
    ("stat-in-nosearch", lambda r: _mode(r + "/nosearch/f")),
    ("read-others", lambda r: _read(r + "/pub/others")),
    ("read-rootfile", lambda r: _read(r + "/rootfile")),
    ("write-rootfile", lambda r: _write(r + "/rootfile", b"x")),
    ("write-own-0444", lambda r: _write(r + "/rofile", b"x")),
    ("write-open-file", lambda r: _write(r + "/pub/open", b"x", os.O_APPEND)),
    ("write-setuid", lambda r: _write(r + "/setuid", b"x", os.O_APPEND)),
    ("truncate-setuid-root", lambda r: os.truncate(r + "/setuidroot", 3)),
    ("truncate-rootfile", lambda r: os.truncate(r + "/rootfile", 1)),
    ("truncate-dir", lambda r: os.truncate(r + "/home", 1)),
    ("truncate-grow", lambda r: (os.truncate(r + "/home/a", 10000), os.stat(r + "/home/a")
                                 .st_size)),
    ("access-rootfile", lambda r: _access(r + "/rootfile")),
    ("access-others", lambda r: _access(r + "/pub/others")),
    ("access-setuid", lambda r: _access(r + "/setuid")),
    ("access-nosearch", lambda r: _access(r + "/nosearch")),
    # modes and owners
    ("chmod-own", lambda r: (os.chmod(r + "/userfile", 0o600), _mode(r + "/userfile"))),
    ("chmod-rootfile", lambda r: os.chmod(r + "/rootfile", 0o666)),
    ("chmod-sgid-not-member", lambda r: (os.chmod(r + "/usergrp0", 0o2755),
                                         _mode(r + "/usergrp0"))),
    ("chmod-sticky-file", lambda r: (os.chmod(r + "/home/a", 0o1644), _mode(r + "/home/a"))),
    ("chown-own-to-member-group", lambda r: (os.chown(r + "/userfile", -1, OTHER_GROUP),
                                             _mode(r + "/userfile"))),
    ("chown-own-to-other-group", lambda r: os.chown(r + "/userfile", -1, 0)),
    ("chown-own-to-root", lambda r: os.chown(r + "/userfile", 0, -1)),
    ("chown-rootfile", lambda r: os.chown(r + "/rootfile", USER, GROUP)),
    ("chown-setuid-root", lambda r: (os.chown(r + "/setuidroot", STRANGER, -1),
                                     _mode(r + "/setuidroot"))),
    ("lchown-own-symlink", lambda r: (os.lchown(r + "/link", -1, OTHER_GROUP),
                                      _mode(r + "/link"))),
    # times
    ("utime-explicit-own", lambda r: _times(r + "/home/old", T1, T2)),
    ("utime-now-own", lambda r: _times(r + "/home/old", UTIME_NOW, UTIME_NOW)),
    ("utime-omit-atime", lambda r: _times(r + "/userfile", UTIME_OMIT, T1)),
    ("utime-omit-both", lambda r: _times(r + "/userfile", UTIME_OMIT, UTIME_OMIT)),
    ("utime-now-mtime-only", lambda r: _times(r + "/userfile", UTIME_OMIT, UTIME_NOW)),
    ("utime-now-writable", lambda r: _times(r + "/pub/open", UTIME_NOW, UTIME_NOW)),
    ("utime-explicit-writable", lambda r: _times(r + "/pub/open", T1, T1)),
    ("utime-now-rootfile", lambda r: _times(r + "/rootfile", UTIME_NOW, UTIME_NOW)),
    ("utime-symlink-nofollow", lambda r: _times(r + "/link", T2, T1, nofollow=True)),
    ("utime-dir", lambda r: _times(r + "/merged", T1, T2)),
    ("utime-explicit-own-read-only", lambda r: _times(r + "/rofile", T2, T2)),
    # xattrs
    ("setxattr-own", lambda r: (os.setxattr(r + "/userfile", "user.k", b"v"),
                                _xattrs(r + "/userfile"))),
    ("setxattr-create-existing", lambda r: os.setxattr(r + "/userfile", "user.k", b"w",
                                                       os.XATTR_CREATE)),
    ("setxattr-replace-missing", lambda r: os.setxattr(r + "/userfile", "user.none", b"w",
                                                       os.XATTR_REPLACE)),
    ("getxattr-lower", lambda r: os.getxattr(r + "/userfile", "user.lower")),
    ("getxattr-missing", lambda r: os.getxattr(r + "/userfile", "user.none")),
    ("setxattr-rootfile", lambda r: os.setxattr(r + "/rootfile", "user.k", b"v")),
    ("setxattr-symlink", lambda r: os.setxattr(r + "/link", "user.k", b"v",
                                               follow_symlinks=False)),
    ("setxattr-trusted", lambda r: os.setxattr(r + "/home/a", "trusted.k", b"v")),
    ("listxattr-rootfile", lambda r: _xattrs(r + "/rootfile")),
    ("setxattr-writable-file-of-root", lambda r: os.setxattr(r + "/pub/open", "user.o", b"1")),
    ("removexattr-lower", lambda r: (os.removexattr(r + "/userfile", "user.lower"),
                                     _xattrs(r + "/userfile"))),
    ("removexattr-missing", lambda r: os.removexattr(r + "/userfile", "user.none")),
    # names: links, renames, removal (sticky directories, directories of others)
    ("readlink", lambda r: os.readlink(r + "/link")),
    ("readlink-not-symlink", lambda r: os.readlink(r + "/userfile")),
    ("link-own", lambda r: (os.link(r + "/home/a", r + "/home/a2"), os.stat(r + "/home/a")
                            .st_nlink)),
    ("link-others-file", lambda r: os.link(r + "/pub/others", r + "/home/hl")),
    ("link-dir", lambda r: os.link(r + "/home/d", r + "/home/dl")),
    ("link-existing", lambda r: os.link(r + "/home/a", r + "/home/s")),
    ("link-lower", lambda r: (os.link(r + "/home/old", r + "/home/old2"),
                              os.stat(r + "/home/old").st_nlink)),
    ("unlink-link", lambda r: (os.unlink(r + "/home/a2"), os.stat(r + "/home/a").st_nlink)),
    ("unlink-sticky-others", lambda r: os.unlink(r + "/sticky/others")),
    ("rename-sticky-others", lambda r: os.rename(r + "/sticky/others", r + "/sticky/o2")),
    ("unlink-sticky-mine", lambda r: os.unlink(r + "/sticky/mine")),
    ("rename-sticky-root", lambda r: os.rename(r + "/sticky/rootf", r + "/home/taken")),
    ("unlink-in-ro-dir", lambda r: os.unlink(r + "/ro/f")),
    ("unlink-in-nosearch", lambda r: os.unlink(r + "/nosearch/f")),
    ("rename-out-of-ro-dir", lambda r: os.rename(r + "/ro/f", r + "/home/from-ro")),
    ("link-into-ro-dir", lambda r: os.link(r + "/home/a", r + "/ro/hl")),
    ("rmdir-sticky-others-dir", lambda r: os.rmdir(r + "/sticky/odir")),
    ("chown-sgid-dir", lambda r: (os.chown(r + "/sgid/sub", STRANGER, -1),
                                  _mode(r + "/sgid/sub"))),
    ("unlink-root-file-in-own-dir", lambda r: os.unlink(r + "/userdir/f")),
    ("rename-noreplace", lambda r: renameat2(r + "/home/a", r + "/home/s", RENAME_NOREPLACE)),
    ("rename-exchange", lambda r: renameat2(r + "/home/a", r + "/home/s", RENAME_EXCHANGE)),
    ("rename-exchange-missing", lambda r: renameat2(r + "/home/a", r + "/home/zz",
                                                    RENAME_EXCHANGE)),
    ("rename-file-over-dir", lambda r: os.rename(r + "/home/a", r + "/home/d")),
    ("rename-dir-over-file", lambda r: os.rename(r + "/home/d", r + "/home/a")),
    ("rename-dir-into-itself", lambda r: os.rename(r + "/home/d", r + "/home/d/x")),
    ("rename-merged-dir", lambda r: os.rename(r + "/merged", r + "/home/m2")),
    ("rename-lower-over-lower", lambda r: os.rename(r + "/home/old2", r + "/home/old")),
    ("rmdir-not-empty", lambda r: os.rmdir(r + "/userdir")),
    ("rmdir-file", lambda r: os.rmdir(r + "/home/a")),
    ("unlink-dir", lambda r: os.unlink(r + "/home/d")),
    ("rmdir", lambda r: os.rmdir(r + "/userdir")),
    ("rmdir-sgid-sub-not-empty", lambda r: os.rmdir(r + "/sgid/sub")),
    ("unlink-missing", lambda r: os.unlink(r + "/home/none")),
    ("stat-under-file", lambda r: os.stat(r + "/home/a/x")),
]
