"""Several strata processes on one store at once: parallel pulls of images sharing layers,
commit while pulling, prune while pulling, rmi while save/export/a mount read the image,
create racing rmi, two mounts of one image.  Every result is checked against the same image
handled alone (an oracle store), the store passes ``strata check`` afterwards, and nothing an
image being read or added needs is ever collected."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.builders import busybox_entries, d, diff_trees, file, oci_layout, tar_bytes, tree_of_dir
from tests.builders import tree_of_tar as tar_tree
from tests.conftest import REPO
from tests.forkserver import Warm, WarmMount
from tests.registry_images import upload_layout

MB = 1 << 20


def layers_for(tag: int) -> list[bytes]:
    """Two base layers every image shares, and one of its own."""
    base = [tar_bytes(busybox_entries()),
            tar_bytes([d("opt"), file("opt/shared", os.urandom(2 * MB))])]
    return base + [tar_bytes([d("opt"), file(f"opt/own-{tag}", os.urandom(MB))])]


@pytest.fixture(scope="module")
def shared_images(registry: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Four images in the registry sharing two base layers (refs), their layouts, and a
    big one to keep a pull busy."""
    work = tmp_path_factory.mktemp("shared")
    base = layers_for(0)[:2]
    refs, layouts = [], []
    for i in range(4):
        layout = work / f"img{i}"
        oci_layout(str(layout), base + [tar_bytes([d("opt"), file(f"opt/own-{i}",
                                                                  os.urandom(MB))])])
        upload_layout(registry.host, str(layout), f"conc/img{i}", "1")
        refs.append(f"{registry.host}/conc/img{i}:1")
        layouts.append(layout)
    big = work / "big"
    oci_layout(str(big), [tar_bytes([file(f"b{i}", os.urandom(8 * MB))]) for i in range(4)])
    upload_layout(registry.host, str(big), "conc/big", "1")
    return {"refs": refs, "layouts": layouts, "big": f"{registry.host}/conc/big:1",
            "big_layout": big}


def oracle(warm: Warm, tmp: Path, layout: Path) -> dict[str, Any]:
    """The exported tree of ``layout`` loaded alone into a fresh store."""
    alone = Warm(warm.server, tmp / f"oracle-{layout.name}")
    image = alone.out("load", "-i", str(layout)).split()[-1]
    return tar_tree(alone("export", image).stdout)


def clean(warm: Warm) -> None:
    proc = warm("check", check=False)
    assert proc.returncode == 0, proc.stdout.decode()


def run_all(warm: Warm, *commands: tuple[str, ...]) -> list[Any]:
    runs = [warm.start(*c) for c in commands]
    return [warm.server.wait(r, 300) for r in runs]


@pytest.mark.registry
def test_parallel_pulls_of_images_sharing_layers(warm: Warm, tmp_path: Path,
                                                 shared_images: dict[str, Any]) -> None:
    refs = shared_images["refs"]
    for _ in range(3):
        results = run_all(warm, *[("pull", "-q", r) for r in refs], ("pull", "-q", refs[0]))
        assert [r.returncode for r in results] == [0] * 5, [r.stderr for r in results]
        clean(warm)
        for ref, layout in zip(refs, shared_images["layouts"], strict=True):
            got = tar_tree(warm("export", ref).stdout)
            assert not diff_trees(got, oracle(warm, tmp_path, layout))
        assert len(os.listdir(warm.root / "layers/sha256")) == 2 + len(refs)
        for ref in refs:
            warm("rmi", ref)
        warm("image", "prune", "-a", "-f")


@pytest.mark.registry
def test_commit_and_prune_while_pulling(warm: Warm, tmp_path: Path,
                                        shared_images: dict[str, Any]) -> None:
    layout = shared_images["layouts"][0]
    image = warm.out("load", "-i", str(layout)).split()[-1]
    cid = warm.out("create", "--name", "box", image).strip()
    upper = warm.root / "containers" / cid / "upper"
    (upper / "made-here").write_bytes(os.urandom(3 * MB))
    for _ in range(3):
        pull = warm.start("pull", "-q", shared_images["big"])
        time.sleep(0.05)
        commit = warm("commit", "box", "committed:1")
        prune = warm("image", "prune", "-f")  # its collection waits: never eats the pull
        assert warm.server.wait(pull).returncode == 0
        assert commit.returncode == prune.returncode == 0
        clean(warm)
        big = tar_tree(warm("export", shared_images["big"]).stdout)
        assert not diff_trees(big, oracle(warm, tmp_path, shared_images["big_layout"]))
        tree = tar_tree(warm("export", "committed:1").stdout)
        assert "made-here" in tree
        warm("rmi", shared_images["big"])


def _slow_read(args: list[str], root: Path, pause: threading.Event) -> tuple[int, bytes, bytes]:
    """Run a strata command writing to a pipe that is read only once ``pause`` is set, so
    the command stays in the middle of its output meanwhile."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with subprocess.Popen([sys.executable, "-m", "cli.main", "--root", str(root), *args],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        head = proc.stdout.read(1 << 20)  # the command is running; then the pipe fills up
        pause.wait(60)
        rest = proc.stdout.read()
        return proc.wait(), head + rest, proc.stderr.read()


@pytest.mark.parametrize("reader", ["save", "export"])
def test_rmi_while_a_command_reads_the_image(warm: Warm, tmp_path: Path, reader: str) -> None:
    layout = tmp_path / "layout"
    oci_layout(str(layout), [tar_bytes([file(f"f{i}", os.urandom(6 * MB))]) for i in range(4)],
               compression="none")
    image = warm.out("load", "-i", str(layout)).split()[-1]
    warm("tag", image, "victim:1")
    go = threading.Event()
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(_slow_read([reader, "victim:1"], warm.root,
                                                              go)))
    t.start()
    time.sleep(1.0)  # the reader is blocked on its full pipe, in the middle of the image
    rmi = warm("rmi", "victim:1")
    assert b"Deleted: " + image.encode() in rmi.stdout
    go.set()
    t.join(120)
    rc, data, err = out[0]
    assert rc == 0, err  # the reader finished: nothing it needed was collected under it
    if reader == "save":
        other = Warm(warm.server, tmp_path / "other")
        assert other.out("load", "-i", "-", input=data).startswith("Loaded image")
        assert not diff_trees(tar_tree(other("export", "victim:1").stdout),
                              oracle(warm, tmp_path, layout))
    else:
        assert not diff_trees(tar_tree(data), oracle(warm, tmp_path, layout))
    clean(warm)
    warm("image", "prune", "-f")  # the collection rmi left for later
    assert os.listdir(warm.root / "layers/sha256") == []
    clean(warm)


@pytest.mark.fuse
def test_rmi_and_prune_under_mounts_of_the_image(warm: Warm, tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    data = {f"f{i}": os.urandom(2 * MB) for i in range(3)}
    oci_layout(str(layout), [tar_bytes([file(n, v)]) for n, v in data.items()])
    image = warm.out("load", "-i", str(layout)).split()[-1]
    with WarmMount(warm, image, tmp_path / "a") as a, WarmMount(warm, image, tmp_path / "b") as b:
        assert not diff_trees(tree_of_dir(str(a.mountpoint)), tree_of_dir(str(b.mountpoint)))
        warm("rmi", image)
        warm("image", "prune", "-a", "-f")
        for m in (a, b):  # both still serve the image they mounted, byte for byte
            for n, v in data.items():
                assert (m.mountpoint / n).read_bytes() == v
        a.close()
        assert (b.mountpoint / "f0").read_bytes() == data["f0"]
    clean(warm)


def test_create_racing_rmi_never_orphans_a_container(warm: Warm, tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    oci_layout(str(layout), [tar_bytes(busybox_entries())])
    for i in range(15):
        image = warm.out("load", "-i", str(layout)).split()[-1]
        warm("tag", image, "race:1")
        create, rmi = run_all(warm, ("create", "--name", f"c{i}", "race:1"), ("rmi", "race:1"))
        assert create.returncode in (0, 1) and rmi.returncode in (0, 1)
        for r in (create, rmi):
            assert b"Traceback" not in r.stderr and len(r.stderr.splitlines()) <= 1, r.stderr
        clean(warm)  # no container names a missing image, no orphan directory
        if create.returncode == 0:
            warm("rm", f"c{i}")
        warm("image", "prune", "-a", "-f")
    clean(warm)


@pytest.mark.fuse
def test_a_container_mounts_once(warm: Warm, tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    oci_layout(str(layout), [tar_bytes(busybox_entries())])
    image = warm.out("load", "-i", str(layout)).split()[-1]
    warm("create", "--name", "once", image)
    (tmp_path / "two").mkdir()
    with WarmMount(warm, "once", tmp_path / "one"):
        second = warm("mount", "once", str(tmp_path / "two"), check=False)
        assert second.returncode == 1
        assert b"is already mounted at" in second.stderr
    clean(warm)
