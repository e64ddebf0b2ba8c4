"""Real mounts of images and containers through the CLI: contents, lifecycle, crash recovery,
POSIX corners (unlinked-but-open files, mmap, big files, inode numbers)."""

from __future__ import annotations

import errno
import json
import mmap
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imagestore import Store, mounting
from imagestore.mounting import wait_gone
from imagestore.mounts import process_alive
from tests.builders import diff_trees, tree_of_dir, tree_of_tar
from tests.conftest import REPO, Mounter, Strata, force_unmount, is_mounted
from tests.integration.apihelpers import daemons

pytestmark = pytest.mark.fuse

def test_image_mount_equals_export(strata: Strata, mounter: Mounter, sample_image: str,
                                   tmp_path: Path) -> None:
    mp = mounter.mount(sample_image, at=mounter.mountpoint("m"))
    exported = strata("export", sample_image).stdout
    assert not diff_trees(tree_of_dir(str(mp)), tree_of_tar(exported))
    assert (mp / "etc/app/conf").read_bytes() == b"v3"
    assert not (mp / "etc/app/old").exists()
    assert sorted(os.listdir(mp / "var/lib/data")) == ["c"]
    assert sorted(os.listdir(mp / "usr")) == ["local"]
    assert os.readlink(mp / "bin/abs") == "/bin/busybox"
    assert os.stat(mp / "shared").st_ino == os.stat(mp / "shared-link").st_ino
    assert os.stat(mp / "shared").st_nlink == 2
    st = os.stat(mp / "etc/app/conf")
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (1000, 1000, 0o600)
    with pytest.raises(OSError) as exc:
        (mp / "newfile").write_bytes(b"x")
    assert exc.value.errno == errno.EROFS
    proc = subprocess.run(["chroot", str(mp), "/bin/sh", "-c", "echo hello from the image"],
                          capture_output=True, text=True)
    assert proc.stdout == "hello from the image\n"


def test_image_mount_equals_umoci_unpack(strata: Strata, mounter: Mounter, sample_image: str,
                                         tmp_path: Path, umoci: str) -> None:
    mp = mounter.mount(sample_image, at=mounter.mountpoint("m"))
    bundle = tmp_path / "bundle"
    subprocess.run([umoci, "unpack", "--image", f"{tmp_path / 'layout'}:v1", str(bundle)],
                   check=True, capture_output=True)
    problems = diff_trees(tree_of_dir(str(bundle / "rootfs")), tree_of_dir(str(mp)))
    assert not problems, "\n".join(problems)


def test_container_changes_survive_remount(strata: Strata, mounter: Mounter,
                                           sample_image: str, engine: str) -> None:
    cid = strata.out("create", "--name", "web", sample_image).strip()
    assert len(cid) == 64
    assert "web" in strata.out("ps")
    mp = mounter.mount("--engine", engine, "web", at=mounter.mountpoint("c"))
    assert strata.out("mounts").splitlines()[1].split()[5] == engine
    (mp / "etc/app/conf").write_bytes(b"changed")
    (mp / "new").mkdir()
    (mp / "new/file").write_bytes(b"n")
    os.unlink(mp / "shared")
    ps = strata("rm", "web", check=False)
    assert ps.returncode != 0 and b"mounted" in ps.stderr
    again = strata("mount", "web", str(mounter.mountpoint("c2")), check=False)
    assert again.returncode != 0 and b"already mounted" in again.stderr
    mounter.umount(mp)
    mp2 = mounter.mount("--engine", engine, "web", at=mounter.mountpoint("c3"))
    assert (mp2 / "etc/app/conf").read_bytes() == b"changed"
    assert (mp2 / "new/file").read_bytes() == b"n"
    assert not (mp2 / "shared").exists()
    assert (mp2 / "shared-link").read_bytes() == b"shared data"
    strata("rm", "-f", "web")
    assert not is_mounted(mp2)
    assert strata.out("ps", "-q") == ""
    mounter.active.remove(mp2)


def test_rmi_refuses_an_image_a_container_uses(strata: Strata, sample_image: str) -> None:
    strata("create", "--name", "keep", sample_image)
    proc = strata("rmi", sample_image, check=False)
    assert proc.returncode != 0 and b"container" in proc.stderr


def test_posix_corners(strata: Strata, mounter: Mounter, sample_image: str,
                       engine: str) -> None:
    strata("create", "--name", "p", sample_image)
    mp = mounter.mount("--engine", engine, "p", at=mounter.mountpoint("p"))
    ino = os.stat(mp / "etc/passwd").st_ino
    with open(mp / "etc/passwd", "ab") as f:  # copy-up keeps the inode number
        f.write(b"extra\n")
    assert os.stat(mp / "etc/passwd").st_ino == ino
    # an unlinked file stays readable and writable through its descriptor
    fd = os.open(mp / "etc/group", os.O_RDWR)
    os.unlink(mp / "etc/group")
    assert not (mp / "etc/group").exists()
    os.pwrite(fd, b"ROOT", 0)
    assert os.pread(fd, 4, 0) == b"ROOT"
    assert os.fstat(fd).st_nlink == 0
    os.close(fd)
    # shared writable mmap
    (mp / "mm").write_bytes(b"\0" * 8192)
    with open(mp / "mm", "r+b") as f, mmap.mmap(f.fileno(), 8192) as m:
        m[100:105] = b"hello"
        m.flush()
    assert (mp / "mm").read_bytes()[100:105] == b"hello"
    # files over 4 GiB
    with open(mp / "big", "wb") as f:
        f.seek(5 << 30)
        f.write(b"tail")
    with open(mp / "big", "rb") as f:
        f.seek(5 << 30)
        assert f.read() == b"tail"
    assert os.stat(mp / "big").st_size == (5 << 30) + 4
    # directory link counts
    (mp / "dd/sub1").mkdir(parents=True)
    (mp / "dd/sub2").mkdir()
    assert os.stat(mp / "dd").st_nlink == 4


def test_mount_umount_many_times_leaks_nothing(strata: Strata, mounter: Mounter,
                                               sample_image: str) -> None:
    mp = mounter.mountpoint("loop")
    before = _strata_daemons(strata.root)
    for _ in range(50):
        mounter.mount(sample_image, at=mp)
        assert (mp / "etc/app/conf").read_bytes() == b"v3"
        mounter.umount(mp)
        assert not is_mounted(mp)
    time.sleep(0.2)
    assert _strata_daemons(strata.root) == before
    assert strata.out("mounts", "-q") == ""


def _strata_daemons(root: Path) -> set[int]:
    """Mount daemons serving this store (other tests may run beside this one)."""
    return set(daemons(Store(str(root))))


def test_sigterm_unmounts_cleanly(strata: Strata, mounter: Mounter, sample_image: str) -> None:
    mp = mounter.mount(sample_image, at=mounter.mountpoint("t"))
    pid = int(strata.out("mounts").splitlines()[1].split()[3])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while is_mounted(mp) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not is_mounted(mp)
    mounter.active.remove(mp)


@pytest.mark.parametrize("tool", [["fusermount3", "-u"], ["umount"]])
def test_an_unmount_by_other_tools_ends_the_daemon_and_its_record(
        strata: Strata, mounter: Mounter, sample_image: str, tool: list[str],
        engine: str) -> None:
    """``fusermount3 -u`` or ``umount`` (milliseconds; ``strata umount`` pays a Python start)
    leave the store as ``strata umount`` does: the daemon sees the session end, drops its
    mount record and exits.  (The kernel engine's overlay is no FUSE mount: ``umount`` only;
    its FUSE session ends with the overlay.)"""
    if engine == "kernel" and tool[0] == "fusermount3":
        pytest.skip("fusermount3 unmounts FUSE mounts only")
    cid = strata.out("create", sample_image).strip()
    mp = mounter.mount("--engine", engine, cid, at=mounter.mountpoint("t"))
    (mp / "kept").write_bytes(b"k")
    pid = int(strata.out("mounts").splitlines()[1].split()[3])
    subprocess.run([*tool, str(mp)], check=True)
    mounter.active.remove(mp)
    wait_gone(pid)
    assert not process_alive(pid), "the daemon is still running"
    assert strata.out("mounts", "-q") == ""
    assert (strata.root / "containers" / cid / "upper/kept").read_bytes() == b"k"
    strata("check")
    assert sorted(os.listdir(strata.root / "containers" / cid)) == ["mount.lock", "upper",
                                                                     "work"]


def test_kill_9_mid_write_then_umount_recovers(strata: Strata, mounter: Mounter,
                                               sample_image: str, engine: str) -> None:
    """A daemon killed mid-write: its mount answers ENOTCONN (the kernel engine's overlay for
    all of the image below it, while its upper stays readable), ``strata umount`` clears it,
    the next mount starts from a clean work dir."""
    cid = strata.out("create", "--name", "k", sample_image).strip()
    mp = mounter.mount("--engine", engine, "k", at=mounter.mountpoint("k"))
    pid = int(strata.out("mounts").splitlines()[1].split()[3])
    writer = subprocess.Popen(["sh", "-c", f"while cat {mp}/bin/busybox >> {mp}/grow; do :; "
                                           f"done"], stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    os.kill(pid, signal.SIGKILL)
    try:
        writer.wait(timeout=10)
    finally:
        writer.kill()
    with pytest.raises(OSError) as exc:
        os.statvfs(mp) if engine == "fuse" else os.listdir(mp)
    assert exc.value.errno == errno.ENOTCONN
    if engine == "kernel":  # what is in the upper is still there, on the upper's own disk
        assert (mp / "grow").stat().st_size > 0
    strata("umount", str(mp))
    assert not is_mounted(mp)
    mounter.active.remove(mp)
    upper = strata.root / "containers" / cid / "upper"
    assert sorted(os.listdir(upper)) == ["grow"]
    # nothing half-copied is ever in the upper; the next mount starts from a clean work dir
    mp2 = mounter.mount("--engine", engine, "k", at=mounter.mountpoint("k2"))
    assert (mp2 / "etc/passwd").read_bytes().startswith(b"root:")
    assert os.listdir(strata.root / "containers" / cid / "work/work") == []


def test_a_daemon_orphaned_before_it_is_ready_leaves_no_mount(strata: Strata, mounter: Mounter,
                                                              sample_image: str) -> None:
    """The process that started a mount dies at once (its lifeline closed before the daemon
    runs): the daemon must unmount and exit, not wait forever on its own readiness check of a
    mount nobody serves (which hung every process that touched the mountpoint)."""
    store = Store(str(strata.root))
    for i in range(8):
        mp = mounter.mountpoint(f"m{i}")
        plan = mounting.plan(store, sample_image, mp)
        r, w = os.pipe()
        os.close(w)
        spec = plan.spec_fd(lifeline_fd=r)
        proc = subprocess.Popen(plan.command(spec), pass_fds=(r, spec), cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        os.close(r)
        os.close(spec)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            force_unmount(mp)
            pytest.fail(f"run {i}: the orphaned daemon hung")
        finally:
            assert proc.stderr is not None
            proc.stderr.close()
        assert not is_mounted(mp), f"run {i}: left mounted"


def test_gh13_df_of_an_image_mount_counts_its_layers(strata: Strata, mounter: Mounter,
                                                     sample_image: str) -> None:
    """As a read-only file system would: the layers' tars as blocks, their entries as inodes,
    nothing free (through the daemon the spawner starts, from the stored layers' own numbers)."""
    mp = mounter.mount(sample_image, at=mounter.mountpoint("df"))
    store = Store(str(strata.root))
    image = store.resolve(sample_image)
    infos = [store.layers.info(d) for d in image.diff_ids]
    st = os.statvfs(mp)
    assert st.f_blocks == -(-sum(i.size for i in infos) // st.f_frsize) > 0
    assert st.f_files == sum(i.entries for i in infos) > 0
    assert (st.f_bfree, st.f_bavail, st.f_ffree) == (0, 0, 0)
    df = subprocess.run(["df", "--output=size,itotal", str(mp)], capture_output=True,
                        text=True, check=True).stdout.split()
    assert int(df[-1]) == st.f_files and int(df[-2]) > 0


def test_gh13_a_refused_mount_is_one_line_in_the_log(tmp_path: Path) -> None:
    """In a user namespace the kernel refuses FUSE mounts: ``strata mount`` says why in one
    line, and the daemon's log holds one error line of its own (beside fusermount3's), no
    traceback."""
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "-U", "-r", "true"]).returncode != 0:
        pytest.skip("user namespaces are not available (unshare -U -r)")
    root, lower, mp = tmp_path / "store", tmp_path / "lower", tmp_path / "mp"
    lower.mkdir()
    mp.mkdir()
    proc = subprocess.run([unshare, "-U", "-r", sys.executable, "-m", "cli.main", "--root",
                           str(root), "mount", "--lower", str(lower), str(mp)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert re.search("operation not permitted|permission denied", proc.stderr.lower())
    [log] = (root / "mounts").glob("*.log")
    text = log.read_text()
    assert "Traceback" not in text, text
    assert [line for line in text.splitlines() if not line.startswith("fusermount")] == [
        f"ERROR unionfs.mount: cannot mount {mp}: fuse_session_mount failed"], text
    assert not is_mounted(mp)


def test_mount_f_serves_in_the_foreground_and_ends_on_sigterm(strata: Strata, mounter: Mounter,
                                                              sample_image: str,
                                                              engine: str) -> None:
    """``strata mount -f --debug``: the command becomes the daemon (its pid is the record's),
    logs every request to its stderr, and SIGTERM unmounts and ends it with status 0."""
    cid = strata.out("create", sample_image).strip()
    mp = mounter.mountpoint("fg")
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "--root", str(strata.root),
                             "mount", "-f", "--debug", "--engine", engine, cid, str(mp)],
                            cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not strata.out("mounts", "-q"):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        mounter.active.append(mp)
        assert int(strata.out("mounts").splitlines()[1].split()[3]) == proc.pid
        (mp / "written").write_text("fg\n")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.stderr is not None
    log = proc.stderr.read().decode()
    proc.stderr.close()
    assert "DEBUG" in log and "Traceback" not in log, log
    assert not is_mounted(mp)
    mounter.active.remove(mp)
    assert strata.out("mounts", "-q") == ""
    assert (strata.root / "containers" / cid / "upper/written").read_text() == "fg\n"


def test_strata_mount_forks_its_daemon_without_loading_it(strata: Strata, mounter: Mounter,
                                                          sample_image: str) -> None:
    """``strata mount`` forks its daemon from its own process (issue 14 part 4: no second
    interpreter start, no second import of what the command loaded): the command itself never
    imports the daemon's code (pyfuse3, trio, the union's request handlers); its fork does,
    and serves after the command has exited."""
    program = ("import json, sys\nfrom cli.main import main\nstatus = main(sys.argv[1:])\n"
               "print(json.dumps({'status': status, 'modules': sorted(sys.modules)}))\n")
    mp = mounter.mountpoint("forked")
    proc = subprocess.Popen([sys.executable, "-c", program, "--root", str(strata.root),
                             "mount", sample_image, str(mp)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate(timeout=60)
    mounter.active.append(mp)
    out = json.loads(stdout.splitlines()[-1])
    assert out["status"] == 0, stderr
    loaded = set(out["modules"])
    assert not loaded & {"pyfuse3", "trio", "unionfs.mount", "unionfs.fuse_ops",
                         "unionfs.union"}, sorted(loaded)
    [line] = strata.out("mounts").splitlines()[1:]
    pid = int(line.split()[3])
    assert process_alive(pid) and pid != proc.pid  # the command is gone, its fork serves
    assert (mp / "etc/app/conf").read_bytes() == b"v3"
    assert os.readlink(f"/proc/{pid}/fd/2").startswith(str(strata.root / "mounts"))
    mounter.umount(mp)
    wait_gone(pid)
    assert not process_alive(pid)
