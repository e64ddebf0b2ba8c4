"""Every ``open(2)`` flag combination on every kind of name, strata against kernel overlayfs.

Access mode (O_RDONLY, O_WRONLY, O_RDWR) times every subset of O_TRUNC, O_CREAT, O_EXCL,
O_APPEND, O_NOFOLLOW, O_DIRECTORY: 192 combinations, each in a directory of its own holding one
name of each kind: a lower file, a lower hardlink, a file written through the mount, a lower
file already copied up, a directory, symlinks to a lower file, to an upper file, to a
directory, dangling and looping, a FIFO (opened with O_NONBLOCK unless O_RDWR: nobody is at
the other end), and a missing name.  Each open must give the same errno on both mounts; an open
descriptor the same fstat, and a write then a read through it the same results.  Then the
whole directory must look the same on both (sizes, content, modes, times changed or not, inode
classes): the state after an error as much as after a success.  Created files get mode 0444,
so O_CREAT with write access also checks that a file can be opened for writing by the open
that creates it read-only.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from tests.conftest import Mounter, require_root
from tests.integration.observe import compare, observe, settle
from tests.integration.pair import mounted_pair
from tests.integration.unionops import Actor, Op, flag_names, fstat_summary, open_flag_sets

pytestmark = [pytest.mark.fuse, pytest.mark.root]

FLAGS = list(open_flag_sets())
KINDS = {"lower-file": "f", "lower-hardlink": "h", "upper-file": "u", "copied-up": "cu",
         "dir": "d", "symlink-to-lower-file": "sf", "symlink-to-upper-file": "su",
         "symlink-to-dir": "sd", "dangling-symlink": "sx", "symlink-loop": "sl", "fifo": "p",
         "missing": "m"}


def case_dir(flags: int) -> str:
    return "c-" + flag_names(flags).replace("|", "-")


def build_lower(base: Path) -> list[Path]:
    """One layer with a directory per flag combination (see the module docstring)."""
    layer = base / "l1"
    for flags in FLAGS:
        c = layer / case_dir(flags)
        (c / "d").mkdir(parents=True)
        (c / "d2").mkdir()
        (c / "d/in").write_bytes(b"inside")
        (c / "f").write_bytes(b"lower-data12")
        (c / "t1").write_bytes(b"target-one")
        (c / "cu").write_bytes(b"copied-up")
        (c / "h").write_bytes(b"hardlinked")
        os.link(c / "h", c / "h2")
        os.symlink("t1", c / "sf")
        os.symlink("t2", c / "su")
        os.symlink("d2", c / "sd")
        os.symlink("missing-target", c / "sx")
        os.symlink("sl", c / "sl")
        os.mkfifo(c / "p", 0o644)
    return [layer]


def _fd_outcome(actor: Actor, slot: int, flags: int) -> tuple[object, ...]:
    """fstat, then a write (if writable) and a read from offset 0, through the new fd."""
    fd = actor.fds[slot]
    got: list[object] = [fstat_summary(fd)]
    if flags & os.O_ACCMODE != os.O_RDONLY:
        got.append(actor.apply(Op("fdwrite", (slot, b"W"))))
    got.append(actor.apply(Op("fdread", (slot,))))
    got.append(fstat_summary(fd))
    return tuple(got)


@pytest.mark.parametrize("access", ["RDONLY", "WRONLY", "RDWR"])
def test_open_flag_matrix(tmp_path: Path, mounter: Mounter, access: str) -> None:
    require_root()
    problems = open_matrix(tmp_path, mounter, access)
    assert not problems, f"{len(problems)} differences:\n" + "\n".join(problems[:60])


def open_matrix(tmp_path: Path, mounter: Mounter, access: str,
                engine: str = "strata") -> list[str]:
    """The differences the matrix of one access mode finds."""
    lowers = build_lower(tmp_path / "lowers")
    flag_sets = [f for f in FLAGS if flag_names(f).split("|")[0] == access]
    problems: list[str] = []
    with mounted_pair(mounter, lowers, engine=engine) as pair:
        actors = (pair.k, pair.s)
        kb, sb = pair.kobs, pair.sobs
        settle(kb, sb)
        for flags in flag_sets:  # the names written through the mount, in every case
            c = case_dir(flags)
            for a in actors:
                for op in (Op("create", (f"{c}/u", b"upper-data")),
                           Op("create", (f"{c}/t2", b"target-two")),
                           Op("chmod", (f"{c}/cu", 0o640))):
                    code, _ = a.apply(op)
                    assert code == 0, f"setting up: {op} failed on {a.root}: {_err((code, 0))}"
        ka, sa = observe(pair.k.root), observe(pair.s.root)
        problems += [f"setting up (create u, t2; chmod cu): {p}" for p in compare(kb, ka, sb, sa)]
        for flags in flag_sets:
            c = case_dir(flags)
            kb, sb = observe(pair.k.root, c), observe(pair.s.root, c)
            settle(kb, sb)
            for kind, name in KINDS.items():
                op = Op("open", (f"{c}/{name}", flags, 0o444, 0))
                rk, rs = pair.k.apply(op), pair.s.apply(op)
                if rk != rs:
                    problems.append(f"{op} on a {kind}: kernel {_err(rk)}, strata {_err(rs)}")
                elif rk[0] == 0:
                    fk, fs = _fd_outcome(pair.k, 0, flags), _fd_outcome(pair.s, 0, flags)
                    if fk != fs:
                        problems.append(f"{op} on a {kind}: through the descriptor kernel "
                                        f"{fk}, strata {fs}")
                for a in actors:
                    a.close_all()
            ka, sa = observe(pair.k.root, c), observe(pair.s.root, c)
            problems += [f"{flag_names(flags)}: {p}" for p in compare(kb, ka, sb, sa)]
    return problems


def _err(outcome: tuple[int, object]) -> str:
    return errno.errorcode.get(outcome[0], "ok") if outcome[0] else "ok"
