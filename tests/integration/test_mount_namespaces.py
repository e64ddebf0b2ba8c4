"""A mount held by another mount namespace (issue 13 item 7): any ``unshare -m`` started while
a strata mount exists holds a copy of it, so an unmount here does not end the file system and
its daemon serves on.  What strata says and does must follow what is true in *this* namespace:
``umount`` and ``rm -f`` succeed here, ``ps``/``mounts``/``check`` say the daemon lives on for
another namespace, a second ``umount`` (or ``rm -f``, or ``check --repair``) ends it, and the
daemon ends by itself when the other namespace lets go."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest

from imagestore.mounts import process_alive
from tests.conftest import Mounter, Strata, is_mounted, require_root

pytestmark = pytest.mark.fuse


@pytest.fixture
def other_namespace() -> Iterator[subprocess.Popen[bytes]]:
    """Starts a process in a new mount namespace (a copy of ours, as ``unshare -m`` makes on
    CI hosts) when called; kills it at teardown."""
    require_root()
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sleep", "1000"])
        deadline = time.monotonic() + 10  # until the copy exists
        while os.readlink(f"/proc/{proc.pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt"):
            assert time.monotonic() < deadline, "unshare did not make a namespace"
            time.sleep(0.01)
        procs.append(proc)
        return proc

    yield start  # type: ignore[misc]
    for proc in procs:
        proc.kill()
        proc.wait()


def daemon_pid(strata: Strata) -> int:
    return int(strata.out("mounts").splitlines()[1].split()[3])


def wait_gone(pid: int) -> bool:
    deadline = time.monotonic() + 10
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not process_alive(pid)


def test_gh13_rm_f_ends_a_mount_another_namespace_holds(
        strata: Strata, mounter: Mounter, sample_image: str, other_namespace: object,
        engine: str) -> None:
    cid = strata.out("create", "--name", "held", sample_image).strip()
    mp = mounter.mount("--engine", engine, "held", at=mounter.mountpoint("c"))
    pid = daemon_pid(strata)
    other_namespace()  # type: ignore[operator]
    proc = strata("rm", "-f", "held", check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode() == "held\n"
    assert not is_mounted(mp)
    mounter.active.remove(mp)
    assert wait_gone(pid), "the daemon serves a removed container"
    assert not (strata.root / "containers" / cid).exists()
    assert strata.out("ps", "-q") == "" and strata.out("mounts", "-q") == ""
    strata("check")


def test_gh13_umount_here_leaves_the_other_namespace_served_and_says_so(
        strata: Strata, mounter: Mounter, sample_image: str, other_namespace: object,
        engine: str) -> None:
    strata("create", "--name", "held", sample_image)
    mp = mounter.mount("--engine", engine, "held", at=mounter.mountpoint("c"))
    (mp / "kept").write_text("k")
    pid = daemon_pid(strata)
    other = other_namespace()  # type: ignore[operator]
    proc = strata("umount", str(mp), check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    mounter.active.remove(mp)
    assert not is_mounted(mp)
    # the other namespace still reads through the daemon (the image's files too)
    seen = subprocess.run(["nsenter", "-t", str(other.pid), "-m", "cat", str(mp / "kept"),
                           str(mp / "etc/app/conf")], capture_output=True, text=True)
    assert seen.stdout == "kv3", seen.stderr
    assert process_alive(pid)
    ps = strata.out("ps")
    assert "another mount namespace" in ps and f"Mounted at {mp}" not in ps, ps
    [line] = strata.out("mounts").splitlines()[1:]
    assert line.startswith(str(mp)) and line.endswith("another mount namespace only"), line
    check = strata("check", check=False)
    assert check.returncode == 1
    assert f"mount {mp}: unmounted here, but its daemon (pid {pid}) still serves it to " \
           "another mount namespace" in check.stdout.decode()
    refused = strata("mount", "held", str(mounter.mountpoint("again")), check=False)
    assert refused.returncode == 1
    assert "is already mounted in another mount namespace only" in refused.stderr.decode()
    # asked again, umount ends the daemon (the other namespace then sees ENOTCONN)
    proc = strata("umount", str(mp), check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    assert wait_gone(pid)
    assert "Created" in strata.out("ps") and strata.out("mounts", "-q") == ""
    strata("check")
    assert (strata.root / "containers").is_dir()


def test_gh13_the_daemon_ends_when_the_other_namespace_lets_go(
        strata: Strata, mounter: Mounter, sample_image: str, other_namespace: object) -> None:
    mp = mounter.mount(sample_image, at=mounter.mountpoint("i"))
    pid = daemon_pid(strata)
    other = other_namespace()  # type: ignore[operator]
    strata("umount", str(mp))
    mounter.active.remove(mp)
    assert process_alive(pid) and "another mount namespace only" in strata.out("mounts")
    other.kill()
    other.wait()
    assert wait_gone(pid), "the daemon outlived the last namespace holding its mount"
    assert strata.out("mounts", "-q") == ""
    strata("check")
