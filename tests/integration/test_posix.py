"""A POSIX conformance pass over the union, with kernel overlayfs as the oracle in the same run.

Every case of ``posix_cases.CASES`` (open/creat, mkdir, mknod, symlink, link, unlink, rmdir,
rename and renameat2's flags, chmod, chown, truncate, utimensat with UTIME_NOW/UTIME_OMIT,
setxattr/getxattr/listxattr/removexattr, readlink, access) runs on a kernel overlay mount and
on a strata mount (``-o allow_other``) of the same layers, once as root and once as an
unprivileged user (uid 4242 in a child process: no passwd entry needed).  The layers hold
files of root, of the user and of a stranger, sticky and setgid directories, a directory
without search permission, setuid files.  After each case both must agree on the outcome
(errno included: EACCES and EPERM are not interchangeable) and on everything ``observe``
sees: modes, owners, link counts, content, which names' mtime/ctime/inode number the call
changed (parents included).
"""

from __future__ import annotations

import errno
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Mounter, require_root
from tests.integration import posix_cases as pc
from tests.integration.observe import Reported, compare, observe, settle
from tests.integration.pair import mounted_pair

pytestmark = [pytest.mark.fuse, pytest.mark.root]


@pytest.fixture(scope="module")
def lowers(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    require_root()
    return pc.build_lowers(tmp_path_factory.mktemp("posix-lowers"))


@pytest.fixture
def reachable() -> Iterator[Path]:
    """A directory every user can reach (pytest's tmp is root's alone): the mounts go here."""
    d = Path(tempfile.mkdtemp(prefix="strata-posix-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _fmt(o: tuple[int, object]) -> str:
    if o[0] == -2:
        return "timed out"
    if o[0]:
        return errno.errorcode.get(o[0], str(o[0])) if o[0] > 0 else f"crashed: {o[1]}"
    return f"ok {o[1]!r}"


@pytest.mark.parametrize("who", ["root", "user"])
def test_posix_calls_same_as_kernel(lowers: list[Path], mounter: Mounter, reachable: Path,
                                    who: str) -> None:
    problems = posix_pass(lowers, mounter, reachable, who)
    assert not problems, f"as {who}, {len(problems)} differences:\n" + "\n".join(problems)


def posix_pass(lowers: list[Path], mounter: Mounter, base: Path, who: str,
               engine: str = "strata") -> list[str]:
    """Every case as ``who`` on both mounts; the differences found."""
    uid = None if who == "root" else pc.USER
    problems: list[str] = []
    with mounted_pair(mounter, lowers, strata_opts=("-o", "allow_other"), base=base,
                      engine=engine) as pair:
        kroot, sroot = str(pair.k.root), str(pair.s.root)
        kb, sb = pair.kobs, pair.sobs
        reported = Reported()
        for label, fn in pc.CASES:
            settle(kb, sb)
            rk = pc.as_user(uid, lambda fn=fn: fn(kroot))  # type: ignore[misc]
            rs = pc.as_user(uid, lambda fn=fn: fn(sroot))  # type: ignore[misc]
            if rk != rs:
                problems.append(f"{label}: kernel {_fmt(rk)}, strata {_fmt(rs)}")
            ka, sa = observe(kroot), observe(sroot)
            problems += [f"{label} ({_fmt(rk)}): {p}"
                         for p in reported.new(compare(kb, ka, sb, sa))]
            kb, sb = ka, sa
    return problems
