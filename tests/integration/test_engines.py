"""The two engines of a writable container (issue 14 part 2): strata's FUSE union, and kernel
overlayfs over the daemon's read-only FUSE mount of the image.  An upper written by either
reads the same under the other; the kernel engine's mounts are taken down, checked, repaired
and frozen as the FUSE engine's are; ``auto`` picks the kernel where overlayfs may be mounted
and FUSE where the kernel refuses it; the differences the README lists are real."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from imagestore import Store
from imagestore.mounts import Mounts, process_alive
from tests.builders import diff_trees, tree_of_dir, tree_of_tar
from tests.conftest import REPO, Mounter, Strata, is_mounted, require_root
from tests.integration.test_commit import change

pytestmark = pytest.mark.fuse


def mounted_engine(strata: Strata) -> str:
    return strata.out("mounts").splitlines()[1].split()[5]


def more_changes(mp: Path) -> None:
    """Changes beyond ``test_commit.change``: a directory with lower content moved (``mv``
    copies it where the kernel answers EXDEV), renames, a lower hardlink written through one
    name, a truncation, attributes of lower objects."""
    subprocess.run(["mv", str(mp / "var"), str(mp / "var-moved")], check=True)
    os.rename(mp / "bin/abs", mp / "bin/abs-renamed")
    with open(mp / "shared", "ab") as f:
        f.write(b" appended")
    os.truncate(mp / "usr/bin/tool" if (mp / "usr/bin/tool").exists() else mp / "new.txt", 3)
    os.chmod(mp / "etc", 0o750)
    os.setxattr(mp / "etc/app", "user.where", b"upper")
    (mp / "tmp/deep/er").mkdir(parents=True)
    (mp / "tmp/deep/er/file").write_bytes(b"deep")
    os.symlink("deep/er/file", mp / "tmp/rel-link")


def snapshot(strata: Strata, mp: Path, name: str) -> dict:
    return {"tree": tree_of_dir(str(mp)), "diff": strata.out("diff", name)}


@pytest.mark.parametrize("first,second", [("fuse", "kernel"), ("kernel", "fuse")])
def test_an_upper_reads_the_same_under_the_other_engine(
        strata: Strata, mounter: Mounter, sample_image: str, first: str, second: str) -> None:
    """Changes made under one engine, then more under the other, then a third mount under
    the first again: each mount shows what the last one left, and export agrees."""
    require_root()
    strata("create", "--name", "x", sample_image)
    mp = mounter.mount("--engine", first, "x", at=mounter.mountpoint("one"))
    assert mounted_engine(strata) == first
    change(mp)
    before = snapshot(strata, mp, "x")
    mounter.umount(mp)
    mp = mounter.mount("--engine", second, "x", at=mounter.mountpoint("two"))
    assert mounted_engine(strata) == second
    after = snapshot(strata, mp, "x")
    problems = diff_trees(before["tree"], after["tree"])
    assert not problems, "\n".join(problems)
    assert before["diff"] == after["diff"]
    more_changes(mp)
    before = snapshot(strata, mp, "x")
    mounter.umount(mp)
    mp = mounter.mount("--engine", first, "x", at=mounter.mountpoint("three"))
    after = snapshot(strata, mp, "x")
    problems = diff_trees(before["tree"], after["tree"])
    assert not problems, "\n".join(problems)
    assert before["diff"] == after["diff"]
    assert not diff_trees(after["tree"], tree_of_tar(strata("export", "x").stdout))
    mounter.umount(mp)
    strata("check")


def test_the_kernel_engine_is_kernel_overlayfs(strata: Strata, mounter: Mounter,
                                               sample_image: str) -> None:
    """What a user of the kernel engine meets: an overlay mount (nosuid, nodev) with
    redirect_dir=nofollow and no index; EXDEV for a rename of a directory with lower content;
    one st_dev; no FUSE mount left in the tree; the container's directory as it was."""
    require_root()
    cid = strata.out("create", "--name", "k", sample_image).strip()
    mp = mounter.mount("--engine", "kernel", "k", at=mounter.mountpoint("k"))
    with open("/proc/self/mountinfo") as f:
        lines = [ln for ln in f if ln.split()[4] == str(mp)]
    assert len(lines) == 1
    fields = lines[0].split(" - ")
    assert fields[1].split()[0] == "overlay"
    assert {"nosuid", "nodev"} <= set(fields[0].split()[5].split(","))
    options = fields[1].split()[2].split(",")
    assert "redirect_dir=nofollow" in options and "index=on" not in options
    assert "xino=on" in options
    with pytest.raises(OSError) as exc:
        os.rename(mp / "etc/app", mp / "etc/app2")
    assert exc.value.errno == errno.EXDEV
    os.rename(mp / "etc/passwd", mp / "etc/passwd2")  # files rename (a copy-up)
    (mp / "newdir").mkdir()
    os.rename(mp / "newdir", mp / "newdir2")  # and directories made in the upper
    assert len({os.lstat(mp / p).st_dev for p in ("", "etc", "etc/passwd2", "bin/busybox",
                                                  "newdir2")}) == 1
    with open("/proc/self/mountinfo") as f:
        assert not [ln for ln in f if str(strata.root) in ln.split()[4]], "a lower is left"
    assert sorted(os.listdir(strata.root / "containers" / cid)) == ["mount.lock", "upper",
                                                                     "work"]
    ps = strata.out("ps")
    assert f"Mounted at {mp} (kernel engine)" in ps, ps


def test_the_kernel_engine_s_lower_and_extended_attributes(strata: Strata, mounter: Mounter,
                                                           sample_image: str,
                                                           tmp_path: Path) -> None:
    """An image with extended attributes shows them under the kernel engine; over one with
    none the lower answers the kernel's first getxattr with ENOSYS (the kernel then stops
    asking for each file overlayfs meets): a name reads as unsupported rather than absent,
    listings are empty, copy-up and setting one in the upper work."""
    from tests.builders import busybox_entries, oci_layout, tar_bytes

    require_root()
    strata("create", "--name", "with", sample_image)
    mp = mounter.mount("--engine", "kernel", "with", at=mounter.mountpoint("with"))
    assert os.getxattr(mp / "xattrs", "user.k") == b"v"
    with pytest.raises(OSError) as exc:
        os.getxattr(mp / "etc/passwd", "user.k")
    assert exc.value.errno == errno.ENODATA
    oci_layout(str(tmp_path / "plain"), [tar_bytes(busybox_entries())], tag="v1")
    strata("tag", strata.out("load", "-q", "-i", str(tmp_path / "plain")).split()[-1], "plain")
    strata("create", "--name", "without", "plain")
    mp = mounter.mount("--engine", "kernel", "without", at=mounter.mountpoint("without"))
    subprocess.run(["find", str(mp), "-xdev"], check=True, capture_output=True)
    with pytest.raises(OSError) as exc:
        os.getxattr(mp / "bin/busybox", "user.k")
    assert exc.value.errno == errno.EOPNOTSUPP
    assert os.listxattr(mp / "bin/busybox") == []
    os.setxattr(mp / "bin/busybox", "user.k", b"set")  # copied up: the upper's file system
    assert os.getxattr(mp / "bin/busybox", "user.k") == b"set"
    assert subprocess.run([str(mp / "bin/busybox"), "true"]).returncode == 0
    assert "bin/busybox" in strata.out("diff", "without")


def test_umount_rm_f_and_check_with_the_kernel_engine(strata: Strata, mounter: Mounter,
                                                      sample_image: str) -> None:
    require_root()
    cid = strata.out("create", "--name", "a", sample_image).strip()
    mp = mounter.mount("--engine", "kernel", "a", at=mounter.mountpoint("a"))
    pid = int(strata.out("mounts").splitlines()[1].split()[3])
    os.unlink(mp / "etc/group")  # a whiteout: the kernel keeps its template in work/work
    assert strata("check").returncode == 0  # mounted: work/ is the mount's
    strata("umount", str(mp))
    mounter.active.remove(mp)
    assert not is_mounted(mp) and not process_alive(pid)
    assert os.listdir(strata.root / "containers" / cid / "work/work") == []
    assert strata.out("mounts", "-q") == ""
    strata("check")  # nothing left behind
    mp = mounter.mount("--engine", "kernel", "a", at=mounter.mountpoint("a"))
    pid = int(strata.out("mounts").splitlines()[1].split()[3])
    held = open(mp / "etc/passwd", "rb")  # noqa: SIM115 - busy while rm -f runs
    try:
        busy = strata("umount", str(mp), check=False)
        assert busy.returncode == 1 and b"busy" in busy.stderr
        assert strata("rm", "a", check=False).returncode == 1
    finally:
        held.close()
    assert strata.out("rm", "-f", "a") == "a\n"
    assert not is_mounted(mp) and not process_alive(pid)
    mounter.active.remove(mp)
    assert not (strata.root / "containers" / cid).exists()
    strata("check")


def test_a_killed_kernel_engine_daemon_is_checked_and_repaired(
        strata: Strata, mounter: Mounter, sample_image: str) -> None:
    """SIGKILL: the overlay stays mounted with its lower gone (ENOTCONN below it, the upper's
    own files still readable); ``check`` says so and ``--repair`` detaches it."""
    require_root()
    strata("create", "--name", "d", sample_image)
    mp = mounter.mount("--engine", "kernel", "d", at=mounter.mountpoint("d"))
    (mp / "mine").write_text("still here\n")
    pid = int(strata.out("mounts").splitlines()[1].split()[3])
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    with pytest.raises(OSError) as exc:
        (mp / "etc/app/conf").read_bytes()
    assert exc.value.errno == errno.ENOTCONN
    assert (mp / "mine").read_text() == "still here\n"
    assert "Created" in strata.out("ps") and strata.out("mounts", "-q") == ""
    check = strata("check", check=False)
    assert check.returncode == 1
    assert f"mount {mp}: record of a mount whose daemon (pid {pid}) is gone; {mp} is still " \
           "mounted" in check.stdout.decode()
    repaired = strata("check", "--repair", check=False)
    assert repaired.returncode == 0, repaired.stdout.decode()
    assert not is_mounted(mp)
    mounter.active.remove(mp)
    strata("check")
    mp = mounter.mount("--engine", "kernel", "d", at=mounter.mountpoint("d2"))
    assert (mp / "mine").read_text() == "still here\n"
    assert (mp / "etc/app/conf").read_bytes() == b"v3"


def test_a_lower_left_by_a_daemon_killed_as_it_started(strata: Strata, mounter: Mounter,
                                                        sample_image: str) -> None:
    """The daemon's FUSE mount at ``containers/<id>/lower`` lives in the tree only until the
    overlay holds it.  Left there (a SIGKILL at that moment; made here by hand), ``check``
    reports it, ``--repair`` clears it, and so does the next mount of the container."""
    require_root()
    cid = strata.out("create", "--name", "s", sample_image).strip()
    lower = strata.root / "containers" / cid / "lower"
    for clear in (["check", "--repair"], ["mount", "--engine", "kernel", "s"]):
        lower.mkdir()
        mounter.mount(sample_image, at=lower)
        pid = int(strata.out("mounts").splitlines()[1].split()[3])
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while process_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        Mounts(str(strata.root)).unrecord(str(lower))  # such a daemon had written none yet
        check = strata("check", check=False)
        assert check.returncode == 1
        assert f"container {cid}: the image mount of a kernel engine daemon that died as it " \
               "started" in check.stdout.decode(), check.stdout.decode()
        if clear[0] == "mount":
            mp = mounter.mount(*clear[1:], at=mounter.mountpoint("s"))
            assert (mp / "etc/app/conf").read_bytes() == b"v3"
            mounter.umount(mp)
        else:
            strata(*clear)
        mounter.active.remove(lower)
        assert not is_mounted(lower) and not lower.exists()
        strata("check")


def test_sigterm_to_a_kernel_engine_daemon_unmounts(strata: Strata, mounter: Mounter,
                                                    sample_image: str) -> None:
    require_root()
    cid = strata.out("create", "--name", "t", sample_image).strip()
    mp = mounter.mount("--engine", "kernel", "t", at=mounter.mountpoint("t"))
    os.unlink(mp / "etc/group")
    pid = int(strata.out("mounts").splitlines()[1].split()[3])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while (process_alive(pid) or is_mounted(mp)) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not is_mounted(mp) and not process_alive(pid)
    mounter.active.remove(mp)
    assert strata.out("mounts", "-q") == ""
    assert sorted(os.listdir(strata.root / "containers" / cid)) == ["mount.lock", "upper",
                                                                     "work"]
    assert os.listdir(strata.root / "containers" / cid / "work/work") == []


def test_engine_choice(strata: Strata, mounter: Mounter, sample_image: str,
                       tmp_path: Path) -> None:
    """``auto`` is the kernel engine as root; an image, or a read-only container, is a FUSE
    mount whatever the default; ``--engine kernel`` for an image is refused in one line."""
    require_root()
    strata("create", "--name", "c", sample_image)
    mp = mounter.mount("--engine", "auto", "c", at=mounter.mountpoint("c"))
    assert mounted_engine(strata) == "kernel"
    mounter.umount(mp)
    mp = mounter.mount("-o", "ro", "c", at=mounter.mountpoint("r"))
    assert mounted_engine(strata) == "fuse"
    mounter.umount(mp)
    env = {"STRATA_ENGINE": "kernel"}
    proc = strata("mount", sample_image, str(mounter.mountpoint("i")), env=env)
    mounter.active.append(mounter.mountpoint("i"))
    assert proc.returncode == 0 and mounted_engine(strata) == "fuse"
    mounter.umount(mounter.mountpoint("i"))
    proc = strata("mount", "--engine", "kernel", sample_image, str(mounter.mountpoint("j")),
                  check=False)
    assert proc.returncode == 1
    assert proc.stderr.decode() == ("Error: the kernel engine mounts writable containers; "
                                    "images, read-only mounts and directories are FUSE mounts\n")
    proc = strata("mount", "c", str(mounter.mountpoint("e")), env={"STRATA_ENGINE": "fast"},
                  check=False)
    assert proc.returncode == 1
    assert proc.stderr.decode() == "Error: unknown mount engine 'fast' (fuse, kernel, auto)\n"


@pytest.fixture
def store_on_overlayfs(tmp_path: Path) -> Iterator[Path]:
    """A store root inside a kernel overlayfs mount: the kernel refuses an upper there."""
    require_root()
    for d in ("l", "u", "w", "m"):
        (tmp_path / "ovl" / d).mkdir(parents=True)
    m = tmp_path / "ovl" / "m"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={tmp_path}/ovl/l,upperdir={tmp_path}/ovl/u,"
                    f"workdir={tmp_path}/ovl/w", str(m)], check=True)
    try:
        yield m / "store"
    finally:
        with open("/proc/self/mountinfo") as f:
            inside = [ln.split()[4] for ln in f if ln.split()[4].startswith(f"{m}/")]
        for left in sorted(inside, key=len, reverse=True):
            subprocess.run(["umount", "-l", left], capture_output=True)
        subprocess.run(["umount", "-l", str(m)], capture_output=True)


def test_auto_falls_back_to_fuse_where_the_kernel_refuses_the_overlay(
        store_on_overlayfs: Path, tmp_path: Path) -> None:
    """An upper on overlayfs (a store inside a container's root, say): ``kernel`` fails with
    the kernel's errno in one line, ``auto`` mounts with FUSE."""
    from tests.builders import oci_layout, sample_layers

    s = Strata(store_on_overlayfs)
    oci_layout(str(tmp_path / "layout"), sample_layers(), tag="v1")
    image = s.out("load", "-i", str(tmp_path / "layout")).split()[-1]
    cid = s.out("create", "--name", "f", image).strip()
    mp = tmp_path / "mp"
    mp.mkdir()
    proc = s("mount", "--engine", "kernel", "f", str(mp), check=False)
    assert proc.returncode == 1 and proc.stderr.count(b"\n") == 1
    assert b"overlayfs would not mount: Invalid argument" in proc.stderr, proc.stderr
    assert not is_mounted(mp) and s.out("mounts", "-q") == ""
    try:
        s("mount", "--engine", "auto", "f", str(mp))
        assert mounted_engine(s) == "fuse"
        (mp / "written").write_text("w")
        assert (mp / "etc/app/conf").read_bytes() == b"v3"
    finally:
        s("umount", str(mp), check=False)
    assert sorted(os.listdir(store_on_overlayfs / "containers" / cid)) == [
        "mount.lock", "upper", "work"]
    s("check")


def test_auto_in_a_user_namespace_mounts_overlayfs_with_user_xattrs(
        strata: Strata, sample_image: str, tmp_path: Path) -> None:
    """Root of a user namespace that owns its mount namespace (``unshare -Urm``) may mount
    overlayfs (Linux 5.11): ``auto`` is the kernel engine there, with ``userxattr``, and the
    FUSE engine reads the upper it leaves (``user.overlay.opaque``)."""
    require_root()
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-Urm", "true"]).returncode != 0:
        pytest.skip("user namespaces with mount namespaces are not available (unshare -Urm)")
    cid = strata.out("create", "--name", "u", sample_image).strip()
    mp = tmp_path / "u"
    mp.mkdir()
    script = (f"set -e; {sys.executable} -m cli.main --root {strata.root} mount --engine auto u "
              f"{mp}; {sys.executable} -m cli.main --root {strata.root} mounts; "
              f"rm -r {mp}/var/lib; mkdir -p {mp}/var/lib/new; "
              f"{sys.executable} -m cli.main --root {strata.root} umount {mp}")
    proc = subprocess.run(["unshare", "-Urm", "sh", "-c", script], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[1].split()[5] == "kernel", proc.stdout
    upper = strata.root / "containers" / cid / "upper"
    assert os.getxattr(upper / "var/lib", "user.overlay.opaque") == b"y"
    store = Store(str(strata.root))
    with store.mount("u", engine="fuse") as root:
        assert os.listdir(root / "var/lib") == ["new"]
    assert store.diff("u") == [("C", "/var"), ("C", "/var/lib"), ("A", "/var/lib/new")]


# -- the freeze of a commit ---------------------------------------------------------------------


@pytest.fixture
def freezer_cgroup() -> Iterator[Callable[[str], Path]]:
    """``make(container_id)``: the v1 freezer cgroup ``strata/<id>`` a runtime would put the
    container in (or cgroup v2's), removed at teardown."""
    require_root()
    from imagestore import freezer

    made: list[Path] = []

    def make(cid: str) -> Path:
        mounts = freezer._cgroup_mounts()
        if not mounts:
            pytest.skip("no cgroup freezer here (neither v1's controller nor cgroup2)")
        version, top = mounts[0]
        path = Path(top) / freezer.CGROUP_PARENT / cid
        path.mkdir(parents=True)
        made.append(path)
        return path

    yield make
    for path in made:
        procs = path / "cgroup.procs"
        for pid in procs.read_text().split() if procs.exists() else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        deadline = time.monotonic() + 10
        while True:
            try:
                path.rmdir()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        with contextlib.suppress(OSError):
            path.parent.rmdir()


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ")[-1][:1]


def test_commit_freezes_a_container_s_cgroup_and_holds_lower_opens(
        strata: Strata, mounter: Mounter, sample_image: str,
        freezer_cgroup: Callable[[str], Path], engine: str) -> None:
    """During a commit the container's processes are frozen (its cgroup, as a runtime makes
    it) and, with the kernel engine, an open of a lower file from outside the cgroup waits
    in the daemon (no copy-up starts) until the commit is done."""
    cid = strata.out("create", "--name", "fz", sample_image).strip()
    mp = mounter.mount("--engine", engine, "fz", at=mounter.mountpoint("fz"))
    group = freezer_cgroup(cid)
    writer = subprocess.Popen(["sh", "-c", f"while :; do echo x >> {mp}/log; done"])
    try:
        (group / "cgroup.procs").write_text(str(writer.pid))
        seen: dict[str, object] = {}
        store = Store(str(strata.root))

        def during(event: object) -> None:
            if "state" in seen:
                return
            state = (group / "freezer.state") if (group / "freezer.state").exists() else None
            seen["state"] = state.read_text().strip() if state else \
                (group / "cgroup.events").read_text()
            seen["size"] = (strata.root / "containers" / cid / "upper/log").stat().st_size
            if engine == "kernel":
                opener = subprocess.Popen(["sh", "-c", f"echo y >> {mp}/etc/app/conf"])
                deadline = time.monotonic() + 30
                while True:  # blocked in the daemon, or done
                    done = opener.poll() is not None
                    with open(f"/proc/{opener.pid}/wchan") as f:
                        wchan = f.read()
                    if done or "fuse" in wchan or "request_wait" in wchan:
                        break
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
                seen["held"] = not done
                seen["opener"] = opener
            seen["size_after"] = (strata.root / "containers" / cid / "upper/log").stat().st_size

        store.commit("fz", "frozen:1", progress=during)
        assert seen["state"] in ("FROZEN",) or "frozen 1" in str(seen["state"]), seen
        assert seen["size"] == seen["size_after"]
        if engine == "kernel":
            assert seen["held"] is True
            opener = seen["opener"]
            assert isinstance(opener, subprocess.Popen) and opener.wait(timeout=30) == 0
            assert (mp / "etc/app/conf").read_bytes() == b"v3y\n"
        thawed = (group / "freezer.state").read_text().strip() if \
            (group / "freezer.state").exists() else (group / "cgroup.events").read_text()
        assert thawed == "THAWED" or "frozen 0" in thawed
        assert _state(writer.pid) != "D"
    finally:
        writer.kill()
        writer.wait()


def test_a_commit_during_writes_it_cannot_hold_fails_cleanly(strata: Strata, mounter: Mounter,
                                                             sample_image: str) -> None:
    """The kernel engine cannot hold a writer outside the container's cgroup: a commit that
    finds a file changing size fails with one line (or succeeds with a consistent layer),
    never with a traceback or a torn file."""
    require_root()
    strata("create", "--name", "w", sample_image)
    mp = mounter.mount("--engine", "kernel", "w", at=mounter.mountpoint("w"))
    stop = threading.Event()

    def writer() -> None:  # a file that keeps changing size, up to 16 MiB
        with open(mp / "log", "ab") as f:
            while not stop.is_set():
                f.write(b"x" * 4096)
                f.flush()
                if f.tell() >= 16 << 20:
                    f.truncate(0)

    t = threading.Thread(target=writer)
    t.start()
    try:
        for i in range(3):
            proc = strata("commit", "w", f"w:{i}", check=False)
            err = proc.stderr.decode()
            assert proc.returncode == 0 or (err.count("\n") == 1 and "changed size" in err), err
            assert "Traceback" not in err
    finally:
        stop.set()
        t.join()

