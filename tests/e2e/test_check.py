"""``strata check [--repair]``: each kind of damage or leftover is reported in one line (exit
status 1); ``--repair`` fixes exactly what no image needs and leaves the rest reported; a
sound store — resumable downloads and content no image names included — checks clean."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from imagestore import Store
from tests.builders import busybox_entries, file, oci_layout, tar_bytes
from tests.forkserver import Warm, WarmMount, mounted


@pytest.fixture
def populated(warm: Warm, tmp_path: Path) -> dict[str, str]:
    """An image (two layers, gzip) with a tag and a container; returns its ids."""
    layers = [tar_bytes(busybox_entries()), tar_bytes([file("etc/motd", b"hi\n")])]
    info = oci_layout(str(tmp_path / "layout"), layers, tag="v1")
    image = warm.out("load", "-i", str(tmp_path / "layout")).split()[-1]
    warm("tag", image, "img:1")
    cid = warm.out("create", "--name", "c", "img:1").strip()
    return {"image": image, "cid": cid, "config": str(info["config"]),
            "manifest": str(info["manifest"]), "diff_id": str(info["diff_ids"][1]),
            "blob": str(info["layers"][1])}


def lines(result: object) -> list[str]:
    return result.stdout.decode(errors="replace").splitlines()  # type: ignore[attr-defined]


def test_a_sound_store_is_clean(warm: Warm, populated: dict[str, str]) -> None:
    root = warm.root
    (root / "tmp" / ("partial-" + "e" * 64)).write_bytes(b"half a download")
    Store(str(root)).blobs.put(b"content no image names")  # what a failed pull keeps
    result = warm("check")
    assert lines(result) == []
    assert b"1 unreferenced blobs" in result.stderr and b"no problems" in result.stderr


def _hex(d: str) -> str:
    return d.partition(":")[2]


def _edit_state(root: Path, change: Callable[[dict[str, object]], None]) -> None:
    state = json.loads((root / "state.json").read_text())
    change(state)
    (root / "state.json").write_text(json.dumps(state))


def _miscount_xattrs(index: Path) -> None:
    """Rewrite the index's header with a wrong count of entries with xattrs (a count of 0
    where there are some would hide them under the kernel engine)."""
    import marshal

    from unionfs.layerindex import _MAGIC

    raw = index.read_bytes()
    n = int.from_bytes(raw[len(_MAGIC):len(_MAGIC) + 8], "little")
    version, root, table, stats = marshal.loads(raw[len(_MAGIC) + 8:len(_MAGIC) + 8 + n])
    header = marshal.dumps((version, root, table, (stats[0], stats[1], stats[2] + 7)), 4)
    index.write_bytes(_MAGIC + len(header).to_bytes(8, "little") + header
                      + raw[len(_MAGIC) + 8 + n:])


Damage = Callable[[Path, dict[str, str]], None]
CASES: dict[str, tuple[Damage, str, bool]] = {
    # name: (damage, the line it gives, repaired?)
    "stray-blob": (lambda r, i: (r / "blobs/sha256/junk").write_bytes(b"x"),
                   r"^blob junk: stray entry", True),
    "corrupt-unused-blob": (
        lambda r, i: Path(Store(str(r)).blobs.path(Store(str(r)).blobs.put(b"orphan"))
                          ).write_bytes(b"tampered"),
        r"^blob sha256:\w+: content does not match its digest$", True),
    "corrupt-config": (lambda r, i: (r / "blobs/sha256" / _hex(i["config"])).write_bytes(b"{}"),
                       r"^blob sha256:\w+: content does not match its digest \(an image needs "
                       r"it", False),
    "corrupt-index": (lambda r, i: (r / "layers/sha256" / _hex(i["diff_id"]) / "index"
                                    ).write_bytes(b"garbage"),
                      r"^layer sha256:\w+: corrupt layer index .*the index can be rebuilt", True),
    "index-miscounts-xattrs": (
        lambda r, i: _miscount_xattrs(r / "layers/sha256" / _hex(i["diff_id"]) / "index"),
        r"^layer sha256:\w+: index miscounts the entries with xattrs .*the index can be rebuilt",
        True),
    "bad-meta": (lambda r, i: (r / "layers/sha256" / _hex(i["diff_id"]) / "meta.json"
                               ).write_text("{"), r"bad meta.json", True),
    "corrupt-layer-tar": (lambda r, i: (r / "layers/sha256" / _hex(i["diff_id"]) / "layer.tar"
                                        ).write_bytes(b"\0" * 1024),
                          r"^layer sha256:\w+: tar hashes to .*an image needs it", False),
    "missing-layer": (lambda r, i: os.rename(r / "layers/sha256" / _hex(i["diff_id"]),
                                             r.parent / "moved-away"),
                      r"^image sha256:\w+: layer sha256:\w+ is missing from the store", False),
    "missing-layer-blob": (lambda r, i: (r / "blobs/sha256" / _hex(i["blob"])).unlink(),
                           r"^image sha256:\w+: layer blob sha256:\w+ is missing", False),
    "dangling-tag": (lambda r, i: _edit_state(r, lambda s: s["tags"].update(  # type: ignore
        {"docker.io/library/ghost:1": "sha256:" + "f" * 64})),
        r"^tag docker.io/library/ghost:1: names image sha256:f+, which does not exist", True),
    "container-without-upper": (lambda r, i: os.rename(r / "containers" / i["cid"] / "upper",
                                                       r.parent / "gone"),
                                r"^container \w+: its upper directory is missing", False),
    "orphan-container-dir": (lambda r, i: (r / "containers" / ("a" * 64) / "upper").mkdir(
        parents=True), r"^container a+: directory without a container record", True),
    "work-leftover": (lambda r, i: (os.makedirs(r / "containers" / i["cid"] / "work/work"),
                                    (r / "containers" / i["cid"] / "work/work/#1-0"
                                     ).write_bytes(b"half")),
                      r"^container \w+: 1 leftover\(s\) in work/", True),
    "tmp-leftovers": (lambda r, i: ((r / "tmp/layer-x").mkdir(),
                                    (r / "tmp/blob-y").write_bytes(b"y")),
                      r"^tmp (layer-x|blob-y): leftover of an interrupted command", True),
    "partial-of-a-stored-blob": (lambda r, i: (r / "tmp" / f"partial-{_hex(i['blob'])}"
                                               ).write_bytes(b"x"),
                                 r"^tmp partial-\w+: partial download of a blob that is stored",
                                 True),
    "stale-mount-record": (lambda r, i: (r / "mounts/0123.json").write_text(json.dumps({
        "mountpoint": "/nowhere", "pid": 2**22 + 7, "kind": "image", "target": i["image"],
        "name": "x", "log": "", "started": "", "read_only": True})),
        r"^mount /nowhere: record of a mount whose daemon \(pid \d+\) is gone$", True),
    "state-corrupt": (lambda r, i: (r / "state.json").write_text("{not json"),
                      r"^state state.json: .* is corrupt", False),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_damage_is_reported_and_repaired_when_no_image_needs_it(
        warm: Warm, populated: dict[str, str], name: str) -> None:
    damage, pattern, repairable = CASES[name]
    assert warm("check").returncode == 0
    damage(warm.root, populated)
    found = warm("check", check=False)
    assert found.returncode == 1
    assert any(re.search(pattern, line) for line in lines(found)), lines(found)
    blobs_before = set(os.listdir(warm.root / "blobs/sha256"))
    repaired = warm("check", "--repair", check=False)
    assert repaired.returncode == (0 if repairable else 1), lines(repaired)
    assert any(line.startswith("repaired: ") for line in lines(repaired)) == repairable or \
        name == "state-corrupt"
    after = warm("check", check=False)
    assert after.returncode == (0 if repairable else 1), lines(after)
    if name != "state-corrupt":  # what an image uses is never removed
        needed = {_hex(populated[k]) for k in ("config", "manifest", "blob")}
        assert needed & blobs_before <= set(os.listdir(warm.root / "blobs/sha256"))
    if repairable:
        assert warm.out("inspect", "-f", "{{.Id}}", "img:1").strip() == populated["image"]


@pytest.mark.fuse
def test_a_mount_whose_daemon_died_is_reported_and_cleared(warm: Warm, populated: dict[str, str],
                                                           tmp_path: Path) -> None:
    WarmMount(warm, "c", tmp_path / "mp").kill()
    found = warm("check", check=False)
    assert found.returncode == 1
    assert any("whose daemon" in line and "is still mounted" in line for line in lines(found))
    warm("check", "--repair")
    deadline = time.monotonic() + 10
    while mounted(tmp_path / "mp") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not mounted(tmp_path / "mp")
    assert warm("check").returncode == 0
    with WarmMount(warm, "c", tmp_path / "mp") as again:  # and it mounts again
        assert (again.mountpoint / "etc/motd").read_bytes() == b"hi\n"


def test_a_damaged_image_does_not_hide_the_others(warm: Warm, populated: dict[str, str],
                                                  tmp_path: Path) -> None:
    """``images`` lists what it can read and names each damaged image in an error line
    (exit 1); ``inspect`` names it too; ``rmi`` removes it; then the store checks clean."""
    rootfs = tmp_path / "rootfs.tar"
    rootfs.write_bytes(tar_bytes([file("hello", b"hi\n")]))
    good = warm.out("import", str(rootfs), "good:1").strip()
    (warm.root / "blobs/sha256" / _hex(populated["config"])).write_bytes(b"{}")
    listed = warm("images", "-q", "--no-trunc", check=False)
    assert listed.returncode == 1
    assert listed.stdout.decode().split() == [good]
    short = _hex(populated["image"])[:12]
    assert listed.stderr.decode().splitlines() == [
        f"Error: image {short} is damaged (image config has no rootfs.diff_ids): "
        "`strata check` tells more, `strata rmi` removes it"]
    inspected = warm("inspect", "img:1", check=False)
    assert inspected.returncode == 1 and short in inspected.stderr.decode()
    warm("rm", "c")
    warm("rmi", "-f", populated["image"])
    assert warm.out("images", "-q", "--no-trunc").split() == [good]
    assert warm("check").returncode == 0
