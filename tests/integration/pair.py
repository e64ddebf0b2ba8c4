"""A kernel overlayfs mount and a strata mount of the same lower directories, driven step by
step: every operation runs on both, and after *every* step their outcomes and everything a user
can see (``observe``) must agree, the state after an error included.

``mounted_pair`` mounts both (fresh uppers) and yields a ``Pair``; ``Pair.step(op)`` applies one
``Op`` and raises ``AssertionError`` naming the step, the steps before it and each difference.
With ``reclaim=True`` the kernel is made to forget its dentries and inodes after each step
(``reclaim.Reclaimer``) and both mounts must look exactly as before, inode numbers included.

The kernel mounts with ``index=on`` (a copied-up hardlink stays one file, as strata keeps it)
and ``redirect_dir=on`` (a directory with lower content is renamed, as strata renames it, rather
than refused with EXDEV).

Caveats:
* strata renames such a directory by copying its tree up (README, "How strata differs"); the
  copies are new upper inodes, so the ctime of the names below it changes where the kernel's
  redirect leaves it: after a successful rename those names' ctime changes are not compared.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import Mounter, force_unmount
from tests.integration.observe import Observation, compare, observe, settle, stable
from tests.integration.reclaim import Reclaimer
from tests.integration.unionops import Actor, Op, Outcome

KERNEL_OPTS = "index=on,redirect_dir=on"


def whiteout(path: Path) -> None:
    os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(0, 0))


def build_lowers(base: Path) -> list[Path]:
    """Two lower layers in overlayfs format, top first: a merged directory, a whiteout, an
    opaque directory, hardlinks across directories, symlinks to a file, to a directory,
    dangling and looping, a FIFO, a file owned by someone else with an xattr, a big file."""
    l1, l2 = base / "l1", base / "l2"
    for d in ("d", "opq", "emptyd"):
        (l1 / d).mkdir(parents=True)
    (l1 / "d/x").write_bytes(b"x1")
    (l1 / "f").write_bytes(b"f-top-12byte")
    whiteout(l1 / "wd")
    os.setxattr(l1 / "opq", "trusted.overlay.opaque", b"y")
    (l1 / "opq/new").write_bytes(b"new")
    (l1 / "hl1").write_bytes(b"hardlinked")
    os.link(l1 / "hl1", l1 / "hl2")
    os.link(l1 / "hl1", l1 / "d/hl3")
    os.symlink("d/x", l1 / "sym")
    os.symlink("d", l1 / "sdir")
    os.symlink("nowhere", l1 / "dang")
    os.symlink("loop", l1 / "loop")
    for d in ("d/sub", "wd", "opq", "e"):
        (l2 / d).mkdir(parents=True)
    (l2 / "d/y").write_bytes(b"y2")
    (l2 / "d/sub/z").write_bytes(b"z2")
    (l2 / "wd/inner").write_bytes(b"hidden")
    (l2 / "opq/old").write_bytes(b"old")
    (l2 / "g").write_bytes(b"g-bottom")
    os.chown(l2 / "g", 1000, 1000)
    os.chmod(l2 / "g", 0o640)
    os.setxattr(l2 / "g", "user.origin", b"bottom")
    (l2 / "big").write_bytes(os.urandom(100_000))
    (l2 / "e/k").write_bytes(b"k")
    os.mkfifo(l2 / "fifo", 0o644)
    return [l1, l2]


def _fmt(o: Outcome) -> str:
    code, value = o
    if code:
        return errno.errorcode.get(code, str(code))
    return f"ok {value!r}" if value is not None else "ok"


class Pair:
    def __init__(self, kernel: Path, strata: Path, reclaimer: Reclaimer | None = None,
                 uppers: tuple[Path, Path] | None = None) -> None:
        self.k, self.s = Actor(kernel), Actor(strata)
        self.reclaimer = reclaimer
        self.uppers = uppers  # (kernel's, strata's): where each has copied what up
        self.done: list[str] = []
        self.kobs: Observation = observe(kernel)
        self.sobs: Observation = observe(strata)

    def close(self) -> None:
        self.k.close_all()
        self.s.close_all()

    def step(self, op: Op) -> Outcome:
        """Apply ``op`` to both mounts; returns the (common) outcome."""
        settle(self.kobs, self.sobs)
        early = self._copied_early(op)
        rk, rs = self.k.apply(op), self.s.apply(op)
        problems = [] if rk == rs else [f"outcome: kernel {_fmt(rk)}, strata {_fmt(rs)}"]
        k1, s1 = observe(self.k.root), observe(self.s.root)
        problems += compare(self.kobs, k1, self.sobs, s1,
                            self._no_ctime(op, rk, k1, self.kobs) | early)
        if self.reclaimer is not None and not problems:
            self.reclaimer.reclaim()
            k2, s2 = observe(self.k.root), observe(self.s.root)
            problems += stable(k1, k2, "kernel, after a cache reclaim")
            problems += stable(s1, s2, "strata, after a cache reclaim")
            k1, s1 = k2, s2
        self.kobs, self.sobs = k1, s1
        self.done.append(f"{op} = {_fmt(rk)}")
        if problems:
            history = "\n".join(f"  {i}: {s}" for i, s in enumerate(self.done))
            more = f"\n... and {len(problems) - 40} more" if len(problems) > 40 else ""
            how = (f" (caches reclaimed after every step: {self.reclaimer.method})"
                   if self.reclaimer is not None else "")
            raise AssertionError(f"after step {len(self.done) - 1} ({op}){how}:\n"
                                 + "\n".join(problems[:40]) + more + f"\nsteps:\n{history}")
        return rk

    def run(self, ops: list[Op]) -> None:
        for op in ops:
            self.step(op)

    def _copied_early(self, op: Op) -> set[str]:
        """The directories holding names this step names that strata has copied up already
        and the kernel has not (strata copies a hardlinked file's every name up at once, with
        their directories): where the kernel copies up now, the directory's ctime moves on
        the kernel only."""
        if self.uppers is None:
            return set()
        ku, su = self.uppers
        out: set[str] = set()
        for target in op.args[:2]:
            if not isinstance(target, str):
                continue
            name = target
            while name:
                if os.path.lexists(su / name) and not os.path.lexists(ku / name):
                    out.add(name.rpartition("/")[0])
                name = name.rpartition("/")[0]
        return out

    @staticmethod
    def _no_ctime(op: Op, outcome: Outcome, after: Observation, before: Observation) -> set[str]:
        """Names whose ctime change is not compared after ``op``: what strata copies up where
        the kernel does not, by design (README, "How strata differs").  A directory with lower
        content renamed: the tree below it (and the other names of hardlinked files in it,
        which its copy-up copies up too).  A hardlinked lower file copied up: strata copies
        up every name of its group, and so the directories holding them."""
        out: set[str] = set()
        groups: list[tuple[str, bool]] = []  # a hardlinked name, and whether its names count
        if op.name == "rename" and outcome[0] == 0:
            tops = [op.args[0] + "/", op.args[1] + "/"]
            out |= {n for n in after if any(n.startswith(t) for t in tops)}
            groups += [(n, True) for n in before if any(n.startswith(t) for t in tops)]
        # the object, and what a rename or link replaces
        groups += [(t, False) for t in op.args[:2] if isinstance(t, str)]
        for target, names_too in groups:
            o = before.get(target)
            if o is None or o.nlink < 2 or o.mode.startswith("d"):
                continue
            for name, other in before.items():
                if other.ino == o.ino:
                    if names_too:
                        out.add(name)
                    while name:
                        name = name.rpartition("/")[0]
                        out.add(name)
        return out


def make_dirs(base: Path, *names: str) -> list[Path]:
    out = []
    for n in names:
        (base / n).mkdir()
        out.append(base / n)
    return out


def unmount_kernel(mounter: Mounter, at: Path) -> None:
    """Unmount a kernel overlay (``Mounter.umount`` also waits for a strata daemon, which
    costs a CLI start)."""
    if at in mounter.active:
        mounter.active.remove(at)
    if subprocess.run(["umount", str(at)], capture_output=True).returncode != 0:
        force_unmount(at)


@contextlib.contextmanager
def mounted_pair(mounter: Mounter, lowers: list[Path], reclaim: bool = False,
                 kernel_opts: str = KERNEL_OPTS, strata_opts: tuple[str, ...] = (),
                 base: Path | None = None, engine: str = "strata") -> Iterator[Pair]:
    """Kernel overlayfs and strata over ``lowers`` with fresh uppers (in ``base``, default a
    new directory of the test's tmp), both unmounted at the end.  ``engine="kernel"`` mounts
    a second kernel overlay in strata's place: the harness checking itself (the oracle
    against itself must show no difference)."""
    base = base or Path(tempfile.mkdtemp(dir=mounter.tmp))
    ku, kw, su, sw, km, sm = make_dirs(base, "ku", "kw", "su", "sw", "km", "sm")
    mounter.overlay(lowers, km, ku, kw, kernel_opts)
    try:
        if engine == "kernel":
            mounter.overlay(lowers, sm, su, sw, kernel_opts)
        else:
            mounter.mount("--lower", ":".join(map(str, lowers)), "--upper", str(su), "--work",
                          str(sw), *strata_opts, at=sm)
        pair = None
        try:
            with Reclaimer() if reclaim else contextlib.nullcontext() as r:
                pair = Pair(km, sm, r, (ku, su))
                yield pair
        finally:
            if pair is not None:
                pair.close()
            if engine == "kernel":
                unmount_kernel(mounter, sm)
            else:
                mounter.umount(sm)
    finally:
        unmount_kernel(mounter, km)
