"""Hostile and broken input to ``import`` and ``load``: a one-line error naming the problem, a
non-zero exit, and the store exactly as it was (tmp/ included).  Overlay-private xattrs in a
layer are dropped, never applied."""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.builders import (
    Symlink,
    archive_bytes,
    busybox_entries,
    d,
    docker_archive,
    file,
    image_config,
    listing,
    oci_layout,
    sha256,
    sym,
    tar_bytes,
    tree_of_tar,
)
from tests.conftest import Strata

BASE = tar_bytes(busybox_entries())
GOOD = tar_bytes([d("srv"), file("srv/index.html", b"<h1>hi</h1>\n" * 100)])
NOISE = tar_bytes([file("noise", os.urandom(100_000))])


def raw_tar(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "",
            data: bytes = b"x") -> bytes:
    """One hostile entry after a harmless one (tarfile writes what it is told)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        ok = tarfile.TarInfo("fine")
        ok.size = 2
        tf.addfile(ok, io.BytesIO(b"ok"))
        ti = tarfile.TarInfo(name)
        ti.type, ti.linkname = kind, linkname
        if kind == tarfile.REGTYPE:
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
        else:
            tf.addfile(ti)
    return buf.getvalue()


DOTDOT = raw_tar("a/../../escaped")
ABSOLUTE = raw_tar("/etc/evil")
LINK_OUT = raw_tar("x", tarfile.LNKTYPE, "../../etc/shadow")
LINK_ABS = raw_tar("x", tarfile.LNKTYPE, "/etc/shadow")
LINK_LATER = raw_tar("x", tarfile.LNKTYPE, "not-in-this-layer")


def truncated(data: bytes) -> bytes:
    """Cut in the middle of the largest member's data."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        big = max(tf.getmembers(), key=lambda m: m.size)
    return data[: big.offset_data + big.size // 2]


@pytest.fixture
def populated(strata: Strata, tmp_path: Path) -> Callable[[], dict[str, tuple[int, int]]]:
    """A store holding one image; returns a function that lists the store."""
    src = tmp_path / "good.tar"
    src.write_bytes(GOOD)
    strata("import", str(src), "good:1")
    return lambda: listing(str(strata.root))


def assert_refused(strata: Strata, args: list[str], pattern: str, before: dict[str, object],
                   stdin: bytes | None = None) -> str:
    proc = strata(*args, input=stdin, check=False)
    err = proc.stderr.decode()
    assert proc.returncode != 0, f"strata {args} succeeded: {proc.stdout.decode()}"
    assert len(err.strip().splitlines()) == 1, f"not one line:\n{err}"
    assert err.startswith("Error: ") and "Traceback" not in err
    assert re.search(pattern, err, re.I), f"{err!r} does not name the problem ({pattern})"
    assert listing(str(strata.root)) == before, "the store changed"
    assert os.listdir(strata.root / "tmp") == []
    return err


# -- import -------------------------------------------------------------------------------------


IMPORT_CASES = {
    "truncated": (truncated(BASE), r"truncated|past the end"),
    "not-a-tar": (os.urandom(4096), r"not a valid tar"),
    "empty": (b"", r"not a valid tar|empty"),
    "truncated-gzip": (gzip.compress(BASE)[:50_000], r"truncated gzip"),
    "corrupt-gzip": (gzip.compress(BASE)[:100] + b"\x00" * 5000 + gzip.compress(BASE)[5100:],
                     r"gzip"),
    "dotdot": (DOTDOT, r"'a/../../escaped'.*'\.\.'"),
    "absolute": (ABSOLUTE, r"'/etc/evil'.*absolute"),
    "hardlink-out": (LINK_OUT, r"climbs out|outside"),
    "hardlink-absolute": (LINK_ABS, r"absolute"),
    "hardlink-not-in-layer": (LINK_LATER, r"hardlink 'x'"),
    "entry-below-symlink": (tar_bytes([sym("etc", "/tmp"), file("etc/passwd", b"x")]),
                            r"not a directory"),
}


@pytest.mark.parametrize("case", list(IMPORT_CASES))
def test_import_refuses(strata: Strata, tmp_path: Path, populated: Callable[[], dict[str, tuple[
        int, int]]], case: str) -> None:
    data, pattern = IMPORT_CASES[case]
    path = tmp_path / "in.tar"
    path.write_bytes(data)
    before = populated()
    assert_refused(strata, ["import", str(path), "bad:1"], pattern, before)
    assert_refused(strata, ["import", "-", "bad:1"], pattern, before, stdin=data)


def test_import_of_a_missing_file(strata: Strata, populated: Callable[[], dict[str, tuple[
        int, int]]], tmp_path: Path) -> None:
    assert_refused(strata, ["import", str(tmp_path / "nope.tar")], r"no such file", populated())


# -- load ---------------------------------------------------------------------------------------


def _archive(members: dict[str, bytes | Symlink]) -> bytes:
    return archive_bytes(members)


def _swap_config(members: dict[str, bytes | Symlink], cfg: bytes) -> dict[str, bytes | Symlink]:
    """Replace the config, keeping its (now wrong) file name."""
    name = next(k for k in members if k.endswith(".json") and k != "manifest.json")
    return {**members, name: cfg}


def _manifest(members: dict[str, bytes | Symlink], **change: object) -> dict[str, bytes | Symlink]:
    doc = json.loads(members["manifest.json"])  # type: ignore[arg-type]
    doc[0].update(change)
    return {**members, "manifest.json": json.dumps(doc).encode()}


def _two(top: bytes, **kw: object) -> dict[str, bytes | Symlink]:
    """A two-layer archive: a fine new base, then ``top``."""
    return docker_archive([BASE, top], ["bad:1"], **kw)  # type: ignore[arg-type]


def _mismatched_diff_id() -> dict[str, bytes | Symlink]:
    cfg = image_config([sha256(BASE), sha256(GOOD + b"\0" * 512)])
    return docker_archive([BASE, GOOD], ["bad:1"], config=cfg)


def _layer_count() -> dict[str, bytes | Symlink]:
    m = docker_archive([BASE, GOOD], ["bad:1"])
    return _manifest(m, Layers=json.loads(m["manifest.json"])[0]["Layers"][:1])  # type: ignore


def _symlinked_layer(target: str) -> dict[str, bytes | Symlink]:
    m = _two(GOOD)
    layer = json.loads(m["manifest.json"])[0]["Layers"][1]  # type: ignore[arg-type]
    return {**m, layer: Symlink(target)}


def _gzip_truncated_layer() -> dict[str, bytes | Symlink]:
    m = _two(NOISE)
    layer = json.loads(m["manifest.json"])[0]["Layers"][1]  # type: ignore[arg-type]
    packed = gzip.compress(NOISE)
    return {**m, layer: packed[: len(packed) // 2]}


LOAD_CASES: dict[str, tuple[Callable[[], bytes], str]] = {
    "not-a-tar": (lambda: os.urandom(10_000), r"not a valid image archive"),
    "empty": (lambda: b"", r"empty"),
    "truncated": (lambda: truncated(_archive(_two(GOOD))), r"truncated|end of data"),
    "no-manifest": (lambda: _archive({"hello": b"x"}), r"neither manifest.json nor index.json"),
    "manifest-not-json": (lambda: _archive({**_two(GOOD), "manifest.json": b"[{"}),
                          r"manifest.json is not valid JSON"),
    "config-name-mismatch": (
        lambda: _archive(_swap_config(_two(GOOD), image_config([sha256(BASE), sha256(GOOD)],
                                                               author="x"))),
        r"config .* hashes to sha256:"),
    "diff-id-mismatch": (lambda: _archive(_mismatched_diff_id()), r"diff_id"),
    "layer-count": (lambda: _archive(_layer_count()), r"1 layers but the config has 2"),
    "dotdot-entry": (lambda: _archive(_two(DOTDOT)), r"'\.\.'"),
    "absolute-entry": (lambda: _archive(_two(ABSOLUTE)), r"absolute"),
    "hardlink-out": (lambda: _archive(_two(LINK_OUT)), r"climbs out|outside"),
    "hardlink-not-in-layer": (lambda: _archive(_two(LINK_LATER)), r"hardlink 'x'"),
    "config-outside": (lambda: _archive(_manifest(_two(GOOD), Config="../../etc/passwd")),
                       r"outside the archive"),
    "config-absolute": (lambda: _archive(_manifest(_two(GOOD), Config="/etc/passwd")),
                        r"absolute"),
    "layer-outside": (lambda: _archive(_manifest(_two(GOOD), Layers=["x/../../layer.tar"] * 2)),
                      r"outside the archive"),
    "layer-missing": (lambda: _archive(_manifest(_two(GOOD), Layers=["nope/layer.tar"] * 2)),
                      r"no entry 'nope/layer.tar'"),
    "layer-symlink-absolute": (lambda: _archive(_symlinked_layer("/etc/passwd")),
                               r"outside the archive"),
    "layer-symlink-dotdot": (lambda: _archive(_symlinked_layer("../../etc/passwd")),
                             r"outside the archive"),
    "layer-symlink-loop": (lambda: _archive({**_symlinked_layer("../loop"),
                                             "loop": Symlink("./loop")}), r"too many levels"),
    "gzip-layer-truncated": (lambda: _archive(_gzip_truncated_layer()),
                             r"truncated gzip|diff_id"),
    "bad-repo-tag": (lambda: _archive(_manifest(_two(GOOD), RepoTags=["Not/A:Valid:Tag"])),
                     r"invalid reference format"),
}


@pytest.mark.parametrize("case", list(LOAD_CASES))
def test_load_refuses(strata: Strata, tmp_path: Path,
                      populated: Callable[[], dict[str, tuple[int, int]]], case: str) -> None:
    make, pattern = LOAD_CASES[case]
    data = make()
    path = tmp_path / "in.tar"
    path.write_bytes(data)
    before = populated()
    assert_refused(strata, ["load", "-i", str(path)], pattern, before)
    assert_refused(strata, ["load"], pattern, before, stdin=data)
    path.write_bytes(gzip.compress(data, compresslevel=1))
    assert_refused(strata, ["load", "-i", str(path)], pattern, before)


def _layout(tmp_path: Path, top: bytes = GOOD) -> tuple[Path, dict[str, object]]:
    layout = tmp_path / "layout"
    info = oci_layout(str(layout), [BASE, top], tag="v1", compression="gzip")
    return layout, info


def _blob(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest[7:]


def _rewrite_manifest(layout: Path, info: dict[str, object], change: Callable[[dict[str, object]],
                      None]) -> None:
    mpath = _blob(layout, str(info["manifest"]))
    doc = json.loads(mpath.read_bytes())
    change(doc)
    raw = json.dumps(doc).encode()
    mpath.unlink()
    digest = sha256(raw)
    _blob(layout, digest).write_bytes(raw)
    index = json.loads((layout / "index.json").read_bytes())
    index["manifests"][0].update(digest=digest, size=len(raw))
    (layout / "index.json").write_text(json.dumps(index))


def _missing_layer_blob(tmp_path: Path) -> Path:
    layout, info = _layout(tmp_path)
    _blob(layout, info["layers"][1]).unlink()  # type: ignore[index]
    return layout


def _missing_config_blob(tmp_path: Path) -> Path:
    layout, info = _layout(tmp_path)
    _blob(layout, str(info["config"])).unlink()
    return layout


def _tampered_layer(tmp_path: Path) -> Path:
    layout, info = _layout(tmp_path)
    path = _blob(layout, info["layers"][1])  # type: ignore[index]
    path.write_bytes(gzip.compress(GOOD + b"\0" * 1024, mtime=0))
    return layout


def _oci_layer_count(tmp_path: Path) -> Path:
    layout, info = _layout(tmp_path)
    _rewrite_manifest(layout, info, lambda m: m.update(layers=m["layers"][:1]))  # type: ignore
    return layout


def _oci_diff_id(tmp_path: Path) -> Path:
    layout = tmp_path / "layout"
    cfg = {"rootfs": {"type": "layers", "diff_ids": [sha256(BASE), sha256(b"other")]}}
    oci_layout(str(layout), [BASE, GOOD], tag="v1", config=cfg)
    return layout


def _blob_symlink_outside(tmp_path: Path) -> Path:
    layout, info = _layout(tmp_path)
    path = _blob(layout, info["layers"][1])  # type: ignore[index]
    outside = tmp_path / "outside"
    outside.write_bytes(path.read_bytes())
    path.unlink()
    path.symlink_to(outside)
    return layout


def _oci_dotdot_layer(tmp_path: Path) -> Path:
    return _layout(tmp_path, DOTDOT)[0]


def _oci_index_missing_manifest(tmp_path: Path) -> Path:
    layout, info = _layout(tmp_path)
    _blob(layout, str(info["manifest"])).unlink()
    return layout


LAYOUT_CASES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "missing-layer-blob": (_missing_layer_blob, r"no (file|entry) 'blobs/sha256/"),
    "missing-config-blob": (_missing_config_blob, r"no (file|entry) 'blobs/sha256/"),
    "missing-manifest-blob": (_oci_index_missing_manifest, r"no (file|entry) 'blobs/sha256/"),
    "tampered-layer": (_tampered_layer, r"digest mismatch|bytes, expected|larger than"),
    "layer-count": (_oci_layer_count, r"manifest has 1 layers but the config lists 2"),
    "diff-id": (_oci_diff_id, r"diff_id"),
    "dotdot-entry": (_oci_dotdot_layer, r"'\.\.'"),
}


@pytest.mark.parametrize("case", list(LAYOUT_CASES))
def test_load_of_a_bad_oci_layout_refuses(
        strata: Strata, tmp_path: Path, populated: Callable[[], dict[str, tuple[int, int]]],
        case: str) -> None:
    make, pattern = LAYOUT_CASES[case]
    layout = make(tmp_path)
    before = populated()
    assert_refused(strata, ["load", "-i", str(layout)], pattern, before)
    packed = tmp_path / "layout.tar"
    with tarfile.open(packed, "w") as tf:
        for name in sorted(os.listdir(layout)):
            tf.add(layout / name, name)
    assert_refused(strata, ["load", "-i", str(packed)], pattern, before)


def test_load_refuses_a_layout_blob_that_is_a_symlink_out_of_it(
        strata: Strata, tmp_path: Path,
        populated: Callable[[], dict[str, tuple[int, int]]]) -> None:
    layout = _blob_symlink_outside(tmp_path)
    assert_refused(strata, ["load", "-i", str(layout)], r"outside the layout", populated())


def test_a_good_archive_still_loads_after_the_refusals(strata: Strata, tmp_path: Path) -> None:
    # the refusals above are not the loader refusing everything
    path = tmp_path / "ok.tar"
    path.write_bytes(_archive(_two(GOOD)))
    assert strata.out("load", "-i", str(path)) == "Loaded image: bad:1\n"
    layout, _ = _layout(tmp_path)
    assert strata.out("load", "-i", str(layout)).startswith("Loaded image ID: sha256:")
    # skopeo's form: layers at the top as <diffid>.tar, <v1id>/layer.tar symlinks to them
    members = _two(NOISE)
    layers = json.loads(members["manifest.json"])[0]["Layers"]  # type: ignore[arg-type]
    for name in layers:
        tar = members[name]
        assert isinstance(tar, bytes)
        members[sha256(tar)[7:] + ".tar"] = tar
        members[name] = Symlink("../" + sha256(tar)[7:] + ".tar")
    path.write_bytes(_archive(members))
    assert strata.out("load", "-i", str(path)) == "Loaded image: bad:1\n"


# -- overlay-private xattrs -------------------------------------------------------------------


PRIVATE = {"trusted.overlay.opaque": b"y", "user.overlay.opaque": b"y",
           "trusted.overlay.redirect": b"/elsewhere", "user.overlay.whiteout": b"",
           "trusted.overlay.whiteout": b"", "user.fuseoverlayfs.opaque": b"y"}


def test_overlay_xattrs_in_layers_are_dropped_never_applied(strata: Strata,
                                                            tmp_path: Path) -> None:
    lower = tar_bytes([d("etc"), file("etc/passwd", b"root\n"), d("data"),
                       file("data/keep", b"k")])
    upper = tar_bytes([
        d("etc", xattrs={**PRIVATE, "user.note": b"kept"}),  # an xattr "opaque" hides nothing
        file("data/empty", b"", xattrs={"trusted.overlay.whiteout": b"",
                                        "user.overlay.whiteout": b""}),
        file("data/meta", b"m", xattrs={"trusted.overlay.metacopy": b"", "user.ok": b"1"}),
    ])
    layout = tmp_path / "layout"
    oci_layout(str(layout), [lower, upper], tag="v1")
    out = strata.out("load", "-i", str(layout))
    image = out.split()[-1]
    strata("export", image, "-o", str(tmp_path / "rootfs.tar"))
    tree = tree_of_tar((tmp_path / "rootfs.tar").read_bytes())
    assert sorted(tree) == ["data", "data/empty", "data/keep", "data/meta", "etc", "etc/passwd"]
    assert tree["etc"][8] == (("user.note", b"kept"),)
    assert tree["data/empty"][0] == 0o100000 and tree["data/empty"][8] == ()
    assert tree["data/meta"][8] == (("user.ok", b"1"),)
    for name, entry in tree.items():
        assert not any(k.startswith(("trusted.overlay.", "user.overlay.", "user.fuseoverlayfs."))
                       for k, _ in entry[8]), name
    # the same through import (one layer)
    src = tmp_path / "upper.tar"
    src.write_bytes(upper)
    strata("import", str(src), "flat:1")
    strata("export", "flat:1", "-o", str(tmp_path / "flat.tar"))
    flat = tree_of_tar((tmp_path / "flat.tar").read_bytes())
    assert flat["etc"][8] == (("user.note", b"kept"),)
    assert all(not k.startswith(("trusted.", "user.overlay")) for e in flat.values()
               for k, _ in e[8])


def test_no_leftovers_when_the_output_cannot_be_written(strata: Strata, tmp_path: Path,
                                                        populated: Callable[[], dict[str, tuple[
                                                            int, int]]]) -> None:
    before = populated()
    target = tmp_path / "no" / "such" / "dir" / "out.tar"
    outdir = tmp_path / "outdir"
    outdir.mkdir()
    for args in (["save", "good:1", "-o", str(target)], ["export", "good:1", "-o", str(target)],
                 ["save", "good:1", "-o", str(outdir)], ["export", "good:1", "-o", str(outdir)]):
        proc = strata(*args, check=False)
        err = proc.stderr.decode()
        assert proc.returncode == 1 and len(err.splitlines()) == 1, err
        assert re.match(r"Error: (cannot write|invalid output path)", err), err
    assert listing(str(strata.root)) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.tar", "outdir", "store"]
    assert list(outdir.iterdir()) == []
