"""diff, commit and export of containers, end to end with real mounts, checked against the
container's own merged view, umoci, skopeo and kernel overlayfs."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
from pathlib import Path
from typing import Any

import pytest

from imagestore import Store
from tests.builders import diff_trees, file, listing, tar_bytes, tree_of_dir, tree_of_tar
from tests.conftest import Mounter, Strata, fill, require_root

pytestmark = pytest.mark.fuse


def change(mp: Path) -> None:
    """The scripted change list (issue 4): every kind of change a rootfs sees."""
    (mp / "new.txt").write_bytes(b"a new file")
    (mp / "etc/passwd").write_bytes(b"overwritten\n")
    with open(mp / "etc/group", "ab") as f:
        f.write(b"appended:x:5:\n")
    os.unlink(mp / "bin/dangling")
    shutil.rmtree(mp / "var/lib")
    shutil.rmtree(mp / "etc/app")
    (mp / "etc/app").write_bytes(b"a dir became a file")
    os.unlink(mp / "xattrs")
    (mp / "xattrs").mkdir()
    (mp / "xattrs/inside").write_bytes(b"a file became a dir")
    os.chmod(mp / "usr/local/new", 0o4750)
    os.chown(mp / "usr/local/new", 123, 456)
    os.link(mp / "new.txt", mp / "new-hardlink")
    os.symlink("/etc/passwd", mp / "abs-link")
    os.setxattr(mp / "new.txt", "user.note", b"kept")
    os.mkfifo(mp / "run/fifo2")


EXPECTED_DIFF = """C /bin
D /bin/dangling
A /abs-link
C /etc
C /etc/app
C /etc/group
C /etc/passwd
A /new-hardlink
A /new.txt
C /run
A /run/fifo2
C /usr
C /usr/local
C /usr/local/new
C /var
D /var/lib
C /xattrs
A /xattrs/inside
"""


def _sorted_diff(text: str) -> list[str]:
    return sorted(text.splitlines(), key=lambda line: line[2:])


@pytest.fixture(params=["fuse", "kernel"])
def changed(strata: Strata, mounter: Mounter, sample_image: str,
            request: pytest.FixtureRequest) -> tuple[Path, dict]:
    """The change list made through a mount of the container ``box`` by either engine."""
    strata("create", "--name", "box", sample_image)
    mp = mounter.mount("--engine", request.param, "box", at=mounter.mountpoint("box"))
    assert strata.out("mounts").splitlines()[1].split()[5] == request.param
    change(mp)
    return mp, tree_of_dir(str(mp))


def test_diff_lists_the_changes(strata: Strata, changed: tuple[Path, dict]) -> None:
    assert _sorted_diff(strata.out("diff", "box")) == _sorted_diff(EXPECTED_DIFF)


def test_commit_round_trip(strata: Strata, mounter: Mounter, changed: tuple[Path, dict],
                          tmp_path: Path) -> None:
    mp, merged = changed
    image_id = strata.out("commit", "-a", "Jane <j@example.com>", "-m", "scripted",
                          "-c", "ENV STAGE=committed", "box", "test/committed:1").strip()
    assert image_id.startswith("sha256:")
    view = mounter.mount("test/committed:1", at=mounter.mountpoint("committed"))
    problems = diff_trees(merged, tree_of_dir(str(view)))
    assert not problems, "\n".join(problems)
    # export of the container and of the image agree with the merged view too
    assert not diff_trees(merged, tree_of_tar(strata("export", "box").stdout))
    assert not diff_trees(merged, tree_of_tar(strata("export", "test/committed:1").stdout))
    inspect = json.loads(strata.out("inspect", "test/committed:1"))[0]
    assert inspect["Author"] == "Jane <j@example.com>"
    assert "STAGE=committed" in inspect["Config"]["Env"]
    assert inspect["Config"]["Cmd"] == ["/bin/sh"]
    assert len(inspect["RootFS"]["Layers"]) == 5
    history = strata.out("history", "--no-trunc", "test/committed:1")
    assert "scripted" in history.splitlines()[1]


def test_committed_image_reads_the_same_in_umoci_and_skopeo(
        strata: Strata, changed: tuple[Path, dict], tmp_path: Path, umoci: str,
        skopeo: str) -> None:
    _, merged = changed
    strata("commit", "box", "test/committed:gz")
    strata("commit", "--compression", "zstd", "box", "test/committed:zstd")
    archive = tmp_path / "oci.tar"
    strata("save", "--format", "oci", "-o", str(archive), "test/committed:gz",
           "test/committed:zstd")
    layout = tmp_path / "layout-out"
    with tarfile.open(archive) as tf:
        tf.extractall(layout, filter="tar")
    for tag in ("gz", "zstd"):  # umoci 0.4.7 reads no zstd; skopeo reads both
        info = subprocess.run([skopeo, "inspect", f"oci:{layout}:{tag}"], check=True,
                              capture_output=True).stdout
        assert len(json.loads(info)["Layers"]) == 5
    bundle = tmp_path / "bundle"
    subprocess.run([umoci, "unpack", "--image", f"{layout}:gz", str(bundle)], check=True,
                   capture_output=True)
    problems = diff_trees(merged, tree_of_dir(str(bundle / "rootfs")))
    assert not problems, "\n".join(problems)


def test_squash_writes_one_layer(strata: Strata, mounter: Mounter,
                                 changed: tuple[Path, dict]) -> None:
    _, merged = changed
    strata("commit", "--squash", "box", "test/squashed:1")
    inspect = json.loads(strata.out("inspect", "test/squashed:1"))[0]
    assert len(inspect["RootFS"]["Layers"]) == 1
    view = mounter.mount("test/squashed:1", at=mounter.mountpoint("sq"))
    assert not diff_trees(merged, tree_of_dir(str(view)))


def test_fixed_timestamp_commits_are_reproducible(strata: Strata,
                                                  changed: tuple[Path, dict]) -> None:
    env = {"SOURCE_DATE_EPOCH": "1700000000"}
    first = strata.out("commit", "box", env=env).strip()
    second = strata.out("commit", "box", env=env).strip()
    assert first == second
    third = strata.out("commit", "--timestamp", "1700000000", "box").strip()
    assert third == first
    inspect = json.loads(strata.out("inspect", first))[0]
    assert inspect["Created"] == "2023-11-14T22:13:20Z"
    # The same content asked for in zstd is the same image (the ID names the config), and
    # its manifest now carries the zstd layer that was asked for.
    zstd = strata.out("commit", "--compression", "zstd", "box", env=env).strip()
    assert zstd == first
    top = Store(str(strata.root)).resolve(zstd).manifest.layers[-1]
    assert top.media_type == "application/vnd.oci.image.layer.v1.tar+zstd"


def test_commit_while_writes_go_on(strata: Strata, mounter: Mounter, sample_image: str) -> None:
    strata("create", "--name", "busy", sample_image)
    mp = mounter.mount("busy", at=mounter.mountpoint("busy"))
    stop = threading.Event()

    def writer() -> None:
        with open(mp / "log", "ab") as f:
            while not stop.is_set():
                f.write(b"x" * 4096)
                f.flush()

    t = threading.Thread(target=writer)
    t.start()
    try:
        for _ in range(3):
            strata("commit", "busy")  # the layer is consistent: no file grows while archived
    finally:
        stop.set()
        t.join()


def test_commit_of_an_upper_written_by_kernel_overlayfs(strata: Strata, mounter: Mounter,
                                                        sample_image: str,
                                                        tmp_path: Path) -> None:
    require_root()
    lower = tmp_path / "flat"
    lower.mkdir()
    with tarfile.open(fileobj=__import__("io").BytesIO(strata("export", sample_image).stdout)
                      ) as tf:
        tf.extractall(lower, filter="fully_trusted")
    upper, work = tmp_path / "kupper", tmp_path / "kwork"
    upper.mkdir()
    work.mkdir()
    kmp = mounter.overlay([lower], mounter.mountpoint("kernel"), upper, work,
                          "index=off,redirect_dir=off,metacopy=off")
    change(kmp)
    kernel_view = tree_of_dir(str(kmp))
    mounter.umount(kmp)
    cid = strata.out("create", "--name", "fromkernel", sample_image).strip()
    container_upper = strata.root / "containers" / cid / "upper"
    shutil.rmtree(container_upper)
    subprocess.run(["cp", "-a", str(upper), str(container_upper)], check=True)
    strata("commit", "fromkernel", "test/fromkernel:1")
    view = mounter.mount("test/fromkernel:1", at=mounter.mountpoint("fk"))
    problems = diff_trees(kernel_view, tree_of_dir(str(view)))
    assert not problems, "\n".join(problems)


def _one_line_full(proc: subprocess.CompletedProcess[bytes]) -> str:
    assert proc.returncode != 0
    err = proc.stderr.decode().strip()
    assert err.startswith("Error:") and len(err.splitlines()) == 1, err
    assert "space" in err, err
    return err


def _consistent(s: Strata) -> None:
    """``strata check`` is clean and every tag resolves (an inspect opens it)."""
    check = s("check", check=False)
    assert check.returncode == 0, check.stdout.decode()
    for tag in s.out("images", "--format", "{{.Repository}}:{{.Tag}}").split():
        s("inspect", tag)


def test_commit_on_a_full_file_system_changes_nothing(strata: Strata, sample_image: str,
                                                      tmp_path: Path, small_fs: Any) -> None:
    small = small_fs("24m")
    s2 = Strata(small / "store")
    image_tar = tmp_path / "img.tar"
    strata("save", "-o", str(image_tar), sample_image)
    s2("load", "-i", str(image_tar))
    cid = s2.out("create", "--name", "full", sample_image).strip()
    upper = small / "store/containers" / cid / "upper"
    (upper / "big").write_bytes(os.urandom(12 << 20))  # the layer will not fit beside it
    before = listing(str(small / "store"))
    _one_line_full(s2("commit", "--compression", "none", "full", check=False))
    assert listing(str(small / "store")) == before
    _consistent(s2)


def test_load_and_tag_on_a_full_file_system_change_nothing(strata: Strata, sample_image: str,
                                                           tmp_path: Path,
                                                           small_fs: Any) -> None:
    small = small_fs("16m")
    s2 = Strata(small / "store")
    image_tar = tmp_path / "img.tar"
    strata("save", "-o", str(image_tar), sample_image)
    s2("load", "-i", str(image_tar))
    big = tmp_path / "big.tar"
    big.write_bytes(tar_bytes([file("noise", os.urandom(8 << 20))]))
    s2("check")  # creates the lock files
    fill(small, leave=2 << 20)
    before = listing(str(small / "store"))
    strata("import", str(big), "big:1")
    strata("save", "-o", str(tmp_path / "big-image.tar"), "big:1")
    _one_line_full(s2("load", "-i", str(tmp_path / "big-image.tar"), check=False))
    _one_line_full(s2("import", str(big), "big:2", check=False))
    assert listing(str(small / "store")) == before
    (small / "filler").write_bytes(b"")  # the state file cannot be rewritten either
    fill(small, leave=0)
    _one_line_full(s2("tag", sample_image, "another:1", check=False))
    assert listing(str(small / "store")) == before
    (small / "filler").unlink()
    _consistent(s2)
    assert s2.out("images", "--format", "{{.Repository}}:{{.Tag}}").split() == [sample_image]


@pytest.mark.registry
def test_pull_on_a_full_file_system_then_resume(tmp_path: Path, small_fs: Any,
                                                registry: Any) -> None:
    from tests.builders import oci_layout
    from tests.registry_images import upload_layout

    layout = tmp_path / "layout"
    oci_layout(str(layout), [tar_bytes([file(f"f{i}", os.urandom(3 << 20))]) for i in range(3)])
    upload_layout(registry.host, str(layout), "full/pull", "1")
    ref = f"{registry.host}/full/pull:1"
    small = small_fs("12m")
    s2 = Strata(small / "store")
    s2("check")
    _one_line_full(s2("pull", "-q", ref, check=False))
    _consistent(s2)  # partial downloads stay, for the resume
    assert s2.out("images", "-q") == ""
    subprocess.run(["mount", "-o", "remount,size=64m", str(small)], check=True)
    assert s2.out("pull", "-q", ref).strip() == ref
    _consistent(s2)
    assert os.listdir(small / "store/tmp") == []


def test_writes_through_a_mount_on_a_full_file_system(strata: Strata, sample_image: str,
                                                     tmp_path: Path, small_fs: Any) -> None:
    small = small_fs("20m")
    s2 = Strata(small / "store")
    image_tar = tmp_path / "img.tar"
    big = os.urandom(6 << 20)
    layer = tmp_path / "big.tar"
    layer.write_bytes(tar_bytes([file("lower-big", big)]))
    strata("import", str(layer), "with-big:1")
    strata("save", "-o", str(image_tar), "with-big:1")
    s2("load", "-i", str(image_tar))
    cid = s2.out("create", "--name", "w", "with-big:1").strip()
    m = Mounter(s2, tmp_path)
    try:
        mp = m.mount("w", at=m.mountpoint("w"))
        fill(small, leave=3 << 20)
        with pytest.raises(OSError) as exc, open(mp / "new", "wb") as f:
            for _ in range(8):
                f.write(os.urandom(1 << 20))
                f.flush()
                os.fsync(f.fileno())
        assert exc.value.errno == errno.ENOSPC
        os.unlink(mp / "new")
        with pytest.raises(OSError) as exc, open(mp / "lower-big", "r+b") as f:
            f.write(b"!")  # copy-up of a 6 MiB lower file: no room
        assert exc.value.errno == errno.ENOSPC
        upper = small / "store/containers" / cid / "upper"
        assert sorted(os.listdir(upper)) == []  # no partial copy, no partial new file
        assert os.listdir(small / "store/containers" / cid / "work/work") == []
        assert (mp / "lower-big").read_bytes() == big
        (small / "filler").unlink()
        with open(mp / "lower-big", "r+b") as f:  # room again: the copy-up works
            f.write(b"!")
        assert (upper / "lower-big").read_bytes() == b"!" + big[1:]
        m.umount(mp)
    finally:
        m.cleanup()
    log = (small / "store/mounts").glob("*.log")
    assert not any("unexpected error in" in p.read_text() for p in log)
    _consistent(s2)


# The peak RSS of one command: measured by a small parent that forks it, because a child's
# ru_maxrss includes the high-water mark of the memory it was forked from (the kernel records
# the old mm's at exec) — spawned from pytest, it would be pytest's own peak.
_PEAK = """import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
_, status, usage = os.wait4(pid, 0)
sys.stderr.write(f"maxrss={usage.ru_maxrss}\\n")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def test_big_uppers_stream(strata: Strata, sample_image: str) -> None:
    cid = strata.out("create", "--name", "big", sample_image).strip()
    with open(strata.root / "containers" / cid / "upper/huge", "wb") as f:
        f.truncate(2 << 30)  # 2 GiB (sparse in the upper, real in the layer)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.run([sys.executable, "-c", _PEAK, "-m", "cli.main", "--root",
                           str(strata.root), "commit", "--compression", "none", "big",
                           "test/big:1"], capture_output=True, env=env, check=True)
    peak_kib = int(proc.stderr.decode().rpartition("maxrss=")[2])
    assert peak_kib < 300 * 1024, f"commit peaked at {peak_kib // 1024} MiB"
