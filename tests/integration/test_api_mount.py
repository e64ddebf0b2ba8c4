"""Mounting from Python (``Store.mount``, ``Store.open_mount``) with real FUSE mounts: the
mountpoint is usable inside the block and gone after it, whatever ends the block; a mounted
container commits while mounted."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from imagestore import Conflict, FuseUnavailable, MountFailed, Store, mounting, mountplan
from imagestore.mounts import process_alive
from tests.builders import busybox_entries, d, file, tar_bytes
from tests.conftest import is_mounted, require_fuse
from tests.integration.apihelpers import REFUSED, daemons

pytestmark = pytest.mark.fuse

ROOTFS = tar_bytes(busybox_entries() + [d("etc/app"), file("etc/app/conf", b"v1\n")])


@pytest.fixture
def api_store(store_root: Path) -> Store:
    """Local to this module (HOUSE-STYLE puts shared fixtures in conftest; none is shared)."""
    require_fuse()
    s = Store(str(store_root))
    s.import_rootfs(io.BytesIO(ROOTFS), "demo:1")
    return s


def assert_gone(store: Store, mp: Path) -> None:
    assert not is_mounted(mp)
    assert daemons(store) == []
    assert store.mounts() == []


def test_image_mount_is_read_only_and_its_temp_dir_goes(api_store: Store) -> None:
    with api_store.mount("demo:1") as root:
        assert is_mounted(root)
        assert (root / "etc/app/conf").read_bytes() == b"v1\n"
        assert os.readlink(root / "bin/sh") == "busybox"
        with pytest.raises(OSError) as exc:
            (root / "etc/new").write_text("x")
        assert exc.value.errno == errno.EROFS
        [rec] = api_store.mounts()
        assert (rec.mountpoint, rec.kind, rec.read_only) == (str(root), "image", True)
        assert Path(rec.log).is_file()
    assert not root.exists()
    assert not Path(rec.log).exists()  # a clean temp mount leaves no log behind
    assert_gone(api_store, root)


def test_given_mountpoint_is_kept_a_missing_one_made_and_removed(api_store: Store,
                                                               tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    with api_store.mount(api_store.resolve("demo:1"), tmp_path / "mine") as root:
        assert root == tmp_path / "mine" and is_mounted(root)
    assert (tmp_path / "mine").is_dir() and not is_mounted(tmp_path / "mine")
    with api_store.mount("demo:1", tmp_path / "new" / "mp") as root:
        assert is_mounted(root)
    assert not (tmp_path / "new" / "mp").exists()
    with api_store.mount("demo:1", tmp_path / "mine"), \
            pytest.raises(MountFailed, match="already a mount point"), \
            api_store.mount("demo:1", tmp_path / "mine"):
        pass
    assert_gone(api_store, tmp_path / "mine")


def mount_options(mp: Path) -> set[str]:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(mp):
                return set(fields[5].split(","))
    raise AssertionError(f"{mp} is not mounted")


def test_mount_options(api_store: Store) -> None:
    with api_store.mount("demo:1") as root:
        assert {"ro", "nosuid", "nodev"} <= mount_options(root)
    with api_store.mount("demo:1", suid=True, dev=True) as root:
        assert not {"nosuid", "nodev"} & mount_options(root)
    c = api_store.create_container("demo:1")
    with api_store.mount(c) as root:
        assert "rw" in mount_options(root)


def test_container_commits_while_mounted(api_store: Store, engine: str) -> None:
    c = api_store.create_container("demo:1", name="work")
    with api_store.mount(c, engine=engine) as root:
        assert [r.engine for r in api_store.mounts()] == [engine]
        (root / "etc/app/conf").write_bytes(b"v2\n")
        (root / "etc/new").write_text("new\n")
        os.unlink(root / "etc/passwd")
        with open(root / "etc/open-while-committing", "wb") as f:
            f.write(b"written before the commit")
            f.flush()  # in the kernel's page cache, not yet the daemon's: the pause syncs it
            image = api_store.commit(c, "demo:2")
        [rec] = api_store.mounts()
        assert (rec.kind, rec.read_only, rec.target) == ("container", False, c.id)
        with pytest.raises(Conflict, match="already mounted"), api_store.mount("work"):
            pass
    assert_gone(api_store, root)
    assert api_store.diff(c) == [("C", "/etc"), ("C", "/etc/app"), ("C", "/etc/app/conf"),
                                 ("A", "/etc/new"), ("A", "/etc/open-while-committing"),
                                 ("D", "/etc/passwd")]
    with api_store.mount(image) as root:
        assert (root / "etc/app/conf").read_bytes() == b"v2\n"
        assert (root / "etc/open-while-committing").read_bytes() == b"written before the commit"
        assert not (root / "etc/passwd").exists()
    with api_store.mount(c, read_only=True) as root:
        assert (root / "etc/new").read_text() == "new\n"
        with pytest.raises(OSError):
            (root / "etc/other").write_text("x")
    assert_gone(api_store, root)


def test_remove_container_force_unmounts(api_store: Store, engine: str) -> None:
    c = api_store.create_container("demo:1")
    with api_store.mount(c, engine=engine) as root:
        with pytest.raises(Conflict, match="is mounted"):
            api_store.remove_container(c)
        api_store.remove_container(c, force=True)
        assert not is_mounted(root)
    assert api_store.containers() == []
    assert_gone(api_store, root)


def test_an_exception_in_the_block_unmounts(api_store: Store) -> None:
    with pytest.raises(ZeroDivisionError), api_store.mount("demo:1") as root:
        assert is_mounted(root)
        1 / 0  # noqa: B018
    assert_gone(api_store, root)
    with pytest.raises(KeyboardInterrupt), api_store.mount("demo:1") as root:
        raise KeyboardInterrupt
    assert_gone(api_store, root)


def test_a_sigint_during_the_teardown_waits_for_it(api_store: Store,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    real = mounting._unmount_busy

    def interrupted(mp: str) -> bool:
        signal.raise_signal(signal.SIGINT)  # Ctrl-C pressed again while unmounting
        return real(mp)

    monkeypatch.setattr(mounting, "_unmount_busy", interrupted)
    # Python's own handler, also when this runs with SIGINT ignored (a background job)
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt), api_store.mount("demo:1") as root:
            pass
    finally:
        signal.signal(signal.SIGINT, old)
    assert_gone(api_store, root)


def test_a_busy_mount_is_detached_lazily(api_store: Store) -> None:
    with api_store.mount("demo:1") as root:
        held = open(root / "etc/app/conf", "rb")  # noqa: SIM115 - held open across the exit
    try:
        assert not is_mounted(root)
        assert daemons(api_store) == []  # the daemon was stopped after the lazy unmount
    finally:
        with contextlib.suppress(OSError):  # ENOTCONN: the file system is gone
            held.close()
    assert_gone(api_store, root)


def test_a_dead_daemon_is_cleaned_up(api_store: Store) -> None:
    with api_store.mount("demo:1") as root:
        [rec] = api_store.mounts()
        os.kill(rec.pid, signal.SIGKILL)
        for _ in range(100):
            if not process_alive(rec.pid):
                break
            time.sleep(0.02)
        with pytest.raises(OSError) as exc:
            os.listdir(root)
        assert exc.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    assert_gone(api_store, root)


KILLED_PARENT = """
import sys, time, trio
from imagestore import Store

store = Store(sys.argv[1])
container = store.create_container("demo:1")


async def main():
    async with store.open_mount(container, sys.argv[2] + "/container",
                                engine=sys.argv[3]) as root:
        (root / "etc/written").write_text("x")
        print("mounted", flush=True)
        await trio.sleep(60)


with store.mount("demo:1", sys.argv[2] + "/image"):
    trio.run(main)
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_mounts_end_with_a_killed_parent(api_store: Store, sig: int, tmp_path: Path,
                                         engine: str) -> None:
    """No finalizer runs when the caller is killed: the daemons see their lifeline close
    (the kernel engine's detaches its overlay, and its session ends with it)."""
    with subprocess.Popen([sys.executable, "-c", KILLED_PARENT, api_store.root, str(tmp_path),
                           engine], stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None and proc.stdout.readline() == "mounted\n"
        assert len(api_store.mounts()) == 2
        proc.send_signal(sig)
        proc.wait()
    deadline = time.monotonic() + 10
    while (api_store.mounts() or daemons(api_store)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert api_store.mounts() == [] and daemons(api_store) == []
    assert not is_mounted(tmp_path / "image") and not is_mounted(tmp_path / "container")
    [c] = api_store.containers()  # its changes are kept, as after any unmount
    assert api_store.diff(c) == [("C", "/etc"), ("A", "/etc/written")]


def broken_plan(mp: Path, log: Path) -> mounting.Plan:
    """A plan whose daemon fails: its only layer's tar does not exist."""
    missing = str(mp.parent / "missing")
    spec = {"mountpoint": str(mp), "layers": [{"kind": "tar", "tar": missing,
                                                 "index": missing}]}
    return mounting.Plan(spec, str(mp), False, str(log), "image zero")


def test_the_daemon_s_own_error_is_raised(api_store: Store, tmp_path: Path) -> None:
    (tmp_path / "mp").mkdir()
    plan = broken_plan(tmp_path / "mp", tmp_path / "daemon.log")
    with pytest.raises(MountFailed, match="No such file or directory") as exc, \
            mounting.mounted(plan):
        pass
    assert type(exc.value) is MountFailed
    assert str(tmp_path / "daemon.log") in str(exc.value)
    log = (tmp_path / "daemon.log").read_text()
    assert "No such file or directory" in log
    assert "Traceback" not in log and len(log.splitlines()) == 1, log  # one line, no traceback
    assert_gone(api_store, tmp_path / "mp")


def test_a_refused_mount_is_fuse_unavailable(tmp_path: Path) -> None:
    """In a user namespace the kernel refuses FUSE mounts: the reason is fusermount3's own."""
    require_fuse()
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "-U", "-r", "true"]).returncode != 0:
        pytest.skip("user namespaces are not available (unshare -U -r)")
    code = ("import sys; from imagestore import Store, FuseUnavailable\n"
            "try:\n    Store(sys.argv[1]).check_fuse()\n"
            "except FuseUnavailable as exc:\n    print(exc)\n")
    proc = subprocess.run([unshare, "-U", "-r", sys.executable, "-c", code, str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    # fusermount3's own words (Debian 12: "mount failed: Operation not permitted")
    assert re.fullmatch(REFUSED, proc.stdout.strip()), proc.stdout + proc.stderr


def test_missing_fuse_is_reported_before_a_daemon_starts(api_store: Store,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mountplan.shutil, "which", lambda name: None)
    with pytest.raises(FuseUnavailable, match="fusermount3 is not installed"):
        api_store.check_fuse()
    assert daemons(api_store) == []


async def test_open_mount_in_trio(api_store: Store, engine: str) -> None:
    c = api_store.create_container("demo:1")
    async with api_store.open_mount(c, engine=engine) as root:
        await trio.to_thread.run_sync((root / "etc/hello").write_text, "from trio\n")
        assert is_mounted(root)
        image = await trio.to_thread.run_sync(api_store.commit, c)
    assert not is_mounted(root)
    async with api_store.open_mount(image) as root:
        assert (root / "etc/hello").read_text() == "from trio\n"
    assert_gone(api_store, root)


async def test_open_mount_unmounts_when_cancelled(api_store: Store) -> None:
    with trio.move_on_after(0.5) as scope:
        async with api_store.open_mount("demo:1") as root:
            assert is_mounted(root)
            await trio.sleep(30)
    assert scope.cancelled_caught
    assert_gone(api_store, root)


async def test_open_mount_raises_the_daemon_s_error(api_store: Store, tmp_path: Path) -> None:
    plan = broken_plan(tmp_path, tmp_path / "x.log")
    with pytest.raises(MountFailed, match="No such file or directory"):
        async with mounting.open_mounted(plan):
            pass
    assert_gone(api_store, tmp_path)
