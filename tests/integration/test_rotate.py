"""The control socket's ``rotate`` request (a build's step boundary) on a real mount: the
upper becomes a read-only layer and a fresh upper takes its place in the same mount."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from imagestore import Directories, Store
from imagestore.errors import MountFailed
from imagestore.mounts import Mounts, rotate
from tests.conftest import require_fuse, require_root

pytestmark = [pytest.mark.fuse, pytest.mark.root]


@pytest.fixture
def dirs(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name in ("lower", "up1", "work1", "up2", "work2", "up3", "work3", "mnt"):
        out[name] = tmp_path / name
        out[name].mkdir()
    (out["lower"] / "base").write_bytes(b"base\n")
    return out


def test_rotate_turns_the_upper_into_a_layer(store: Store, dirs: dict[str, Path]) -> None:
    require_fuse()
    require_root()
    target = Directories((str(dirs["lower"]),), str(dirs["up1"]), str(dirs["work1"]))
    with store.mount(target, dirs["mnt"]) as mp:
        (mp / "one").write_bytes(b"1\n")
        (mp / "dir").mkdir()
        (mp / "dir" / "f").write_bytes(b"f\n")
        ino = os.stat(mp / "one").st_ino
        rec = Mounts(store.root).record_for(str(mp))
        assert rec is not None and rec.control
        old = rotate(str(mp), rec.control, str(dirs["up2"]), str(dirs["work2"]))
        assert old == str(dirs["up1"])
        # the same tree, the same inode numbers; the new upper is empty
        assert (mp / "one").read_bytes() == b"1\n"
        assert os.stat(mp / "one").st_ino == ino
        assert os.listdir(dirs["up2"]) == []
        # changes now go to the new upper: a copy-up from the rotated layer, a whiteout
        (mp / "one").write_bytes(b"changed\n")
        os.unlink(mp / "dir" / "f")
        (mp / "two").write_bytes(b"2\n")
        assert (dirs["up1"] / "one").read_bytes() == b"1\n"
        assert (dirs["up1"] / "dir" / "f").exists()
        assert (dirs["up2"] / "one").read_bytes() == b"changed\n"
        assert sorted(os.listdir(dirs["up2"])) == ["dir", "one", "two"]
        assert not (mp / "dir" / "f").exists()
        assert sorted(os.listdir(mp)) == ["base", "dir", "one", "two"]
        # refused while a file is open for writing; the mount is unchanged
        with open(mp / "two", "r+b") as f:
            with pytest.raises(MountFailed, match="busy"):
                rotate(str(mp), rec.control, str(dirs["up3"]), str(dirs["work3"]))
            f.write(b"3")
        assert (dirs["up2"] / "two").read_bytes() == b"3\n"
        rotate(str(mp), rec.control, str(dirs["up3"]), str(dirs["work3"]))
        (mp / "three").write_bytes(b"3\n")
        assert os.listdir(dirs["up3"]) == ["three"]
        assert (mp / "one").read_bytes() == b"changed\n"


def test_rotate_refuses_a_new_upper_that_is_not_empty(store: Store,
                                                      dirs: dict[str, Path]) -> None:
    require_fuse()
    require_root()
    (dirs["up2"] / "junk").write_bytes(b"")
    target = Directories((str(dirs["lower"]),), str(dirs["up1"]), str(dirs["work1"]))
    with store.mount(target, dirs["mnt"]) as mp:
        rec = Mounts(store.root).record_for(str(mp))
        assert rec is not None
        with pytest.raises(MountFailed, match="not empty"):
            rotate(str(mp), rec.control, str(dirs["up2"]), str(dirs["work2"]))
        (mp / "still").write_bytes(b"x")
        assert (dirs["up1"] / "still").exists()


def test_guarded_process_dies_with_the_mounts_parent(store: Store,
                                                     dirs: dict[str, Path]) -> None:
    """``guard PID``: a process the daemon kills when the process that made the mount dies
    (SIGKILL: the lifeline); ``unguard`` takes that back."""
    require_fuse()
    require_root()
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO

    sleeper = subprocess.Popen(["sleep", "60"])
    spared = subprocess.Popen(["sleep", "60"])
    code = (
        "import sys, time\n"
        "from imagestore import Directories, Store\n"
        "from imagestore.mounts import Mounts, guard\n"
        f"store = Store({store.root!r})\n"
        f"target = Directories(({str(dirs['lower'])!r},), {str(dirs['up1'])!r}, "
        f"{str(dirs['work1'])!r})\n"
        f"with store.mount(target, {str(dirs['mnt'])!r}) as mp:\n"
        "    rec = Mounts(store.root).record_for(str(mp))\n"
        f"    guard(rec.control, {sleeper.pid})\n"
        f"    guard(rec.control, {spared.pid})\n"
        f"    guard(rec.control, {spared.pid}, on=False)\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                              env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    try:
        assert parent.stdout is not None
        assert parent.stdout.readline() == b"ready\n"
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        assert sleeper.wait(20) == -signal.SIGKILL
        time.sleep(0.2)
        assert spared.poll() is None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and store.mounts():
            time.sleep(0.05)
        assert store.mounts() == []
    finally:
        for p in (sleeper, spared, parent):
            if p.poll() is None:
                p.kill()
                p.wait()
        if parent.stdout is not None:
            parent.stdout.close()
