"""skopeo and umoci as independent checkers of what strata reads and writes.

Test images are built here from busybox-static and hand-made layers holding every awkward
thing a rootfs can hold; ``umoci unpack`` of the image is the oracle for the rootfs, and
skopeo converts between the archive formats.  Trees are compared entry for entry: type, mode,
uid, gid, size, content hash, link target, device number, xattrs.

Caveats (observed with skopeo 1.9.3 and umoci 0.4.7, Debian 12):
* umoci 0.4.7 cannot unpack zstd layers, so the oracle for any image is the umoci unpack of
  its gzip twin (the same layer tars, so the same diff_ids and rootfs).
* A layer entry below a *missing* parent that is a symlink in a lower layer (``lib/x`` over
  ``lib -> usr/lib``) is left out: umoci writes through the symlink (``usr/lib/x``), while
  strata, like docker's overlay2 and the kernel's overlayfs, shows ``lib`` as a directory.
* skopeo re-marshals the config when it converts a Docker manifest to OCI, dropping the
  Docker-only fields (Healthcheck, OnBuild, Shell): such a config gets a new digest by
  design, so the save test uses OCI-representable changes only.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard

from tests.builders import (
    E,
    Symlink,
    archive_bytes,
    busybox_entries,
    chardev,
    d,
    diff_trees,
    fifo,
    file,
    image_config,
    link,
    opaque,
    sha256,
    sym,
    tar_bytes,
    tree_of_dir,
    tree_of_tar,
    whiteout,
    write_blob,
)
from tests.conftest import Strata, require_root, require_tool

pytestmark = pytest.mark.interop

Run = Callable[..., subprocess.CompletedProcess[bytes]]
REF = "example.com/demo/img:v1"

L1: list[E] = busybox_entries() + [
    file("etc/shadow", b"root:*:19000::::::\n", mode=0o640, gid=42),
    d("srv", mode=0o2775, uid=1000, gid=1001, xattrs={"user.dir": b"d"}),
    file("srv/tool", b"#!/bin/sh\necho v1\n", mode=0o4755),
    link("srv/tool.hard", "srv/tool"),  # keeps v1 when layer 2 replaces srv/tool
    file("srv/empty", b"", uid=100_000, gid=100_000),
    file("srv/big-ids", b"ids", uid=3_000_000, gid=4_000_000),  # beyond ustar's octal fields
    file("srv/ünïcödé-名前", b"utf-8 name"),
    file("srv/latin1-caf\udce9", b"not utf-8"),
    E("srv/loop0", "block", mode=0o660, gid=6, dev=(7, 0)),
    file("srv/data", b"data", mode=0o2640, uid=7, gid=8,
         xattrs={"user.note": b"hello", "user.bin": b"\x00\x01\xfe"}),
    link("srv/data.hard", "srv/data"),
    file("srv/pair", b"pair"),
    link("srv/pair.hard", "srv/pair"),
    sym("srv/abs", "/etc/passwd"),
    sym("srv/rel", "../etc/group"),
    sym("srv/dangling", "nowhere/at/all"),
    sym("srv/dangling-abs", "/no/such/file"),
    sym("srv/loop1", "loop2"),
    sym("srv/loop2", "loop1"),
    sym("srv/self", "self"),
    sym("srv/dirlink", "../bin"),
    fifo("srv/fifo", mode=0o600),
    chardev("srv/null", 1, 3, mode=0o666),
    d("shared", mode=0o1777),
    file("opt/deep/missing-parent", b"x"),  # opt and opt/deep are not in the tar
    d("gone"), file("gone/a", b"a"), d("gone/sub"), file("gone/sub/b", b"b"),
    d("opq", mode=0o750, uid=5, gid=6), file("opq/old", b"old"), d("opq/olddir"),
    file("opq/olddir/f", b"f"),
    file("becomes-dir", b"f"),
    d("becomes-file"), file("becomes-file/inner", b"i"),
    file("long/" + "n" * 120 + "/file-with-a-name-longer-than-100.txt", b"pax"),
    d("usr"), d("usr/lib"), file("usr/lib/libc.so", b"libc"),
    sym("lib", "usr/lib"), sym("lib64", "usr/lib"),  # usrmerge links
]
L2: list[E] = [
    whiteout("gone"),
    whiteout("etc/group"),  # srv/rel now dangles
    opaque("opq"), file("opq/new", b"new"),
    d("becomes-dir", mode=0o750), file("becomes-dir/inner", b"i"),
    file("becomes-file", b"now a file"),
    file("srv/tool", b"#!/bin/sh\necho v2\n", mode=0o4755),
    d("srv", mode=0o3777, uid=1000, gid=1001, xattrs={"user.dir": b"d2"}),
    whiteout("srv/pair"),  # its hardlink stays
    file("opt/deep/again", b"y"),  # the implicit parents keep layer 1's attributes
    d("lib64", mode=0o711),  # a directory replaces the lower symlink
    d("var/lib/app", mode=0o700, uid=33, gid=33),
    file("var/lib/app/db", b"\0" * 4096, mode=0o600, uid=33, gid=33),
]
L3: list[E] = [
    whiteout("srv/data"),  # srv/data.hard keeps the content
    file("srv/new", b"three"), link("srv/new.hard", "srv/new"),
    d("var/lib/app", mode=0o755, uid=33, gid=33),
    opaque("var/lib/app"), file("var/lib/app/fresh", b"fresh"),
    sym("becomes-dir", "/tmp"),
]
LAYERS = [tar_bytes(L1), tar_bytes(L2), tar_bytes(L3)]
DIFF_IDS = [sha256(t) for t in LAYERS]


def _pack(data: bytes, kind: str) -> bytes:
    if kind == "gzip":
        return gzip.compress(data, mtime=0)
    if kind == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    return data


_MT = {"none": "application/vnd.oci.image.layer.v1.tar",
       "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
       "zstd": "application/vnd.oci.image.layer.v1.tar+zstd"}


def write_layout(path: Path, compressions: list[str], tag: str = "t1",
                 config: dict[str, Any] | None = None) -> dict[str, Any]:
    """An OCI layout of LAYERS, each layer compressed as told."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    descs = []
    for tar, kind in zip(LAYERS, compressions, strict=True):
        blob = _pack(tar, kind)
        descs.append({"mediaType": _MT[kind], "digest": write_blob(str(path), blob),
                      "size": len(blob)})
    cfg = {"created": "2024-02-03T04:05:06Z", "architecture": "amd64", "os": "linux",
           "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"], "Labels": {"k": "v"}},
           "rootfs": {"type": "layers", "diff_ids": DIFF_IDS},
           "history": [{"created": "2024-02-03T04:05:06Z", "created_by": f"layer {i}"}
                       for i in range(len(LAYERS))]}
    cfg.update(config or {})
    raw = json.dumps(cfg).encode()
    cdigest = write_blob(str(path), raw)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cdigest,
                   "size": len(raw)},
        "layers": descs}).encode()
    mdigest = write_blob(str(path), manifest)
    (path / "index.json").write_text(json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": mdigest, "size": len(manifest),
                       "annotations": {"org.opencontainers.image.ref.name": tag}}]}))
    return {"config": cdigest, "manifest": mdigest, "layers": [x["digest"] for x in descs]}


def umoci_tree(umoci: str, image: str, bundle: Path) -> dict[str, tuple[Any, ...]]:
    subprocess.run([umoci, "unpack", "--image", image, str(bundle)], check=True,
                   capture_output=True, preexec_fn=lambda: os.umask(0o022), timeout=120)
    return tree_of_dir(str(bundle / "rootfs"))


@pytest.fixture(scope="module")
def oracle(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Any, ...]]:
    """umoci's rootfs of the image (from its all-gzip layout)."""
    require_root()
    umoci = require_tool("umoci")
    work = tmp_path_factory.mktemp("oracle")
    write_layout(work / "layout", ["gzip"] * 3)
    tree = umoci_tree(umoci, f"{work / 'layout'}:t1", work / "bundle")
    # the oracle really holds the awkward things (else the comparisons prove little)
    assert tree["srv/null"][7] == os.makedev(1, 3)
    assert tree["srv"][1] == 0o3777 and tree["srv"][8] == (("user.dir", b"d2"),)
    assert tree["srv/data.hard"][8] == (("user.bin", b"\x00\x01\xfe"), ("user.note", b"hello"))
    assert tree["srv/loop1"][6] == "loop2" and tree["srv/abs"][6] == "/etc/passwd"
    assert "gone" not in tree and "etc/group" not in tree and "opq/old" not in tree
    assert "srv/data" not in tree and "srv/pair" not in tree and "var/lib/app/db" not in tree
    assert tree["opt"][1:4] == (0o755, 0, 0)
    assert tree["srv/tool.hard"][5] != tree["srv/tool"][5]
    assert tree["srv/big-ids"][2:4] == (3_000_000, 4_000_000)
    assert "srv/latin1-caf\udce9" in tree and "srv/ünïcödé-名前" in tree
    return tree


def export_tree(strata: Strata, name: str) -> dict[str, tuple[Any, ...]]:
    return tree_of_tar(strata("export", name).stdout)


def assert_same(ours: dict[str, tuple[Any, ...]], theirs: dict[str, tuple[Any, ...]]) -> None:
    problems = diff_trees(ours, theirs)
    assert not problems, "\n".join(problems)


def inspect(strata: Strata, name: str) -> dict[str, Any]:
    (doc,) = json.loads(strata.out("inspect", name))
    assert isinstance(doc, dict)
    return doc


COMPRESSIONS = {"gzip": ["gzip"] * 3, "zstd": ["zstd"] * 3, "none": ["none"] * 3,
                "mixed": ["gzip", "zstd", "none"]}


@pytest.fixture(params=list(COMPRESSIONS))
def layout(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Path, dict[str,
                                                                               Any]]]:
    path = tmp_path / "layout"
    yield path, write_layout(path, COMPRESSIONS[request.param])


@pytest.fixture(params=["gzip", "none", "mixed"])
def docker_layout(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[
        Path, dict[str, Any]]]:
    """skopeo 1.9 refuses zstd layers in a docker-archive ("zstd compression is not supported
    for docker images"): gzip and uncompressed only."""
    kinds = {"mixed": ["none", "gzip", "none"]}.get(request.param, [request.param] * 3)
    path = tmp_path / "layout"
    yield path, write_layout(path, kinds)


# -- reading what skopeo writes -----------------------------------------------------------------


def test_skopeo_docker_archive_loads_to_umoci_s_rootfs(
        strata: Strata, skopeo: str, run: Run, tmp_path: Path, oracle: dict[str, Any],
        docker_layout: tuple[Path, dict[str, Any]]) -> None:
    path, info = docker_layout
    archive = tmp_path / "docker.tar"
    run(skopeo, "copy", "-q", f"oci:{path}:t1", f"docker-archive:{archive}:{REF}")
    assert strata.out("load", "-i", str(archive)) == f"Loaded image: {REF}\n"
    assert_same(export_tree(strata, REF), oracle)
    doc = inspect(strata, REF)
    assert doc["Id"] == info["config"]  # skopeo keeps the config going OCI -> Docker
    assert doc["RootFS"]["Layers"] == DIFF_IDS and doc["RepoTags"] == [REF]
    # the same archive, compressed as a whole, through stdin
    strata("rmi", REF)
    packed = gzip.compress(archive.read_bytes(), compresslevel=1)
    assert strata.out("load", input=packed) == f"Loaded image: {REF}\n"
    assert_same(export_tree(strata, REF), oracle)


def test_skopeo_oci_archive_and_the_layout_itself_load_to_umoci_s_rootfs(
        strata: Strata, skopeo: str, run: Run, tmp_path: Path, oracle: dict[str, Any],
        layout: tuple[Path, dict[str, Any]]) -> None:
    path, info = layout
    # the layout directory as it is (its ref name is a bare tag: no repository)
    assert strata.out("load", "-i", str(path)) == f"Loaded image ID: {info['config']}\n"
    assert_same(export_tree(strata, info["config"]), oracle)
    doc = inspect(strata, info["config"])
    assert doc["Descriptor"]["digest"] == info["manifest"]  # kept as received
    assert doc["RootFS"]["Layers"] == DIFF_IDS
    strata("rmi", info["config"])
    # skopeo's oci-archive (it compresses uncompressed layers: a new manifest, same config)
    archive = tmp_path / "oci.tar"
    run(skopeo, "copy", "-q", f"oci:{path}:t1", f"oci-archive:{archive}:{REF}")
    assert strata.out("load", "-i", str(archive)) == f"Loaded image: {REF}\n"
    assert_same(export_tree(strata, REF), oracle)
    assert inspect(strata, REF)["Id"] == info["config"]


def test_a_containerd_store_docker_archive_with_compressed_layers(
        strata: Strata, tmp_path: Path, oracle: dict[str, Any]) -> None:
    # docker save from the containerd store: manifest.json names compressed blobs
    blobs = [_pack(t, k) for t, k in zip(LAYERS, ["zstd", "gzip", "none"], strict=True)]
    cfg = image_config(DIFF_IDS)
    members: dict[str, bytes | Symlink] = {
        f"blobs/sha256/{sha256(b)[7:]}": b for b in blobs}
    members[f"blobs/sha256/{sha256(cfg)[7:]}"] = cfg
    members["manifest.json"] = json.dumps([{
        "Config": f"blobs/sha256/{sha256(cfg)[7:]}", "RepoTags": [REF],
        "Layers": [f"blobs/sha256/{sha256(b)[7:]}" for b in blobs]}]).encode()
    (tmp_path / "a.tar").write_bytes(archive_bytes(members))
    assert strata.out("load", "-i", str(tmp_path / "a.tar")) == f"Loaded image: {REF}\n"
    assert_same(export_tree(strata, REF), oracle)
    # the compressed blobs are kept as received, so save --format oci gives them back
    strata("save", "--format", "oci", "-o", str(tmp_path / "oci.tar"), REF)
    with tarfile.open(tmp_path / "oci.tar") as tf:
        names = set(tf.getnames())
    assert {f"blobs/sha256/{sha256(b)[7:]}" for b in blobs} <= names


# -- what strata writes, read by skopeo and umoci -----------------------------------------------


def _skopeo_oci_copy(skopeo: str, run: Run, src: str, dst: Path) -> tuple[dict[str, Any],
                                                                         dict[str, Any]]:
    run(skopeo, "copy", "-q", "--dest-oci-accept-uncompressed-layers", src, f"oci:{dst}:t")
    index = json.loads((dst / "index.json").read_bytes())
    mdigest = index["manifests"][0]["digest"]
    manifest = json.loads((dst / "blobs" / "sha256" / mdigest[7:]).read_bytes())
    return index, manifest


def test_skopeo_reads_our_save_and_keeps_every_digest(
        strata: Strata, skopeo: str, run: Run, tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs.tar"
    rootfs.write_bytes(LAYERS[0])
    image_id = strata.out(
        "import", "--platform", "linux/arm/v7", "-m", "imported <here> & now",
        "-c", 'CMD ["/bin/sh", "-c", "echo <hi>"]', "-c", 'ENTRYPOINT ["/bin/env"]',
        "-c", "ENV A=1 B=two", "-c", "EXPOSE 80 53/udp", "-c", "LABEL z=1 a=2 m=3",
        "-c", "VOLUME /data /cache", "-c", "USER 1000:1000", "-c", "WORKDIR /srv",
        "-c", "STOPSIGNAL SIGINT", str(rootfs), "demo/imported:1").strip()
    strata("tag", "demo/imported:1", "demo/other:2")
    ours = tmp_path / "ours.tar"
    strata("save", "-o", str(ours), "demo/imported:1", "demo/other:2")

    info = json.loads(run(skopeo, "inspect", f"docker-archive:{ours}:demo/other:2").stdout)
    assert info["Layers"] == DIFF_IDS[:1]
    assert info["Labels"] == {"a": "2", "m": "3", "z": "1"}
    assert (info["Architecture"], info["Os"]) == ("arm", "linux")
    assert info["Env"] == ["A=1", "B=two"]
    raw = json.loads(run(skopeo, "inspect", "--config", f"docker-archive:{ours}:demo/imported:1"
                         ).stdout)
    assert raw["config"]["ExposedPorts"] == {"53/udp": {}, "80/tcp": {}}
    assert raw["variant"] == "v7"

    _, manifest = _skopeo_oci_copy(skopeo, run, f"docker-archive:{ours}:demo/imported:1",
                                   tmp_path / "dir2")
    assert [x["digest"] for x in manifest["layers"]] == DIFF_IDS[:1]
    # skopeo re-marshals the config converting Docker -> OCI: our bytes are its bytes
    assert manifest["config"]["digest"] == image_id


def test_skopeo_keeps_a_loaded_multi_layer_image_s_digests(
        strata: Strata, skopeo: str, run: Run, tmp_path: Path) -> None:
    # a config in Go's marshal form (what skopeo itself writes) survives load + save + skopeo
    write_layout(tmp_path / "src", ["gzip", "none", "gzip"])
    run(skopeo, "copy", "-q", f"oci:{tmp_path / 'src'}:t1", f"docker-archive:{tmp_path / 'a.tar'}")
    _, canon = _skopeo_oci_copy(skopeo, run, f"docker-archive:{tmp_path / 'a.tar'}",
                                tmp_path / "canon")
    out = strata.out("load", "-i", str(tmp_path / "canon"))
    image_id = canon["config"]["digest"]
    assert out == f"Loaded image ID: {image_id}\n"
    strata("tag", image_id, REF)
    strata("save", "-o", str(tmp_path / "ours.tar"), REF)
    _, manifest = _skopeo_oci_copy(skopeo, run, f"docker-archive:{tmp_path / 'ours.tar'}",
                                   tmp_path / "dir2")
    assert [x["digest"] for x in manifest["layers"]] == DIFF_IDS
    assert manifest["config"]["digest"] == image_id


def _untar(archive: Path, dst: Path) -> Path:
    dst.mkdir()
    with tarfile.open(archive) as tf:
        tf.extractall(dst, filter="tar")
    return dst


def test_our_oci_and_docker_archives_unpack_with_umoci_to_our_export(
        strata: Strata, umoci: str, skopeo: str, run: Run, tmp_path: Path,
        oracle: dict[str, Any]) -> None:
    require_root()
    gz = write_layout(tmp_path / "gz", ["gzip"] * 3)
    image_id = strata.out("load", "-i", str(tmp_path / "gz")).split()[-1]
    strata("tag", image_id, REF)
    ours = export_tree(strata, REF)
    assert_same(ours, oracle)

    strata("save", "--format", "oci", "-o", str(tmp_path / "oci.tar"), REF)
    tree = umoci_tree(umoci, f"{_untar(tmp_path / 'oci.tar', tmp_path / 'oci')}:v1",
                      tmp_path / "b1")
    assert_same(ours, tree)
    # --format oci keeps the stored manifest and blobs: the original digests
    info = json.loads(run(skopeo, "inspect", f"oci-archive:{tmp_path / 'oci.tar'}:v1").stdout)
    assert (info["Digest"], info["Layers"]) == (gz["manifest"], gz["layers"])
    # Docker 25+'s docker-archive holds an OCI layout too: umoci unpacks it
    strata("save", "-o", str(tmp_path / "docker.tar"), REF)
    tree = umoci_tree(umoci, f"{_untar(tmp_path / 'docker.tar', tmp_path / 'dk')}:v1",
                      tmp_path / "b2")
    assert_same(ours, tree)


def test_an_imported_rootfs_exports_as_umoci_unpacks_it(
        strata: Strata, umoci: str, tmp_path: Path) -> None:
    require_root()
    flat = tar_bytes(L1)
    (tmp_path / "rootfs.tar.gz").write_bytes(gzip.compress(flat))
    strata("import", str(tmp_path / "rootfs.tar.gz"), "flat:1")
    strata("save", "--format", "oci", "-o", str(tmp_path / "oci.tar"), "flat:1")
    tree = umoci_tree(umoci, f"{_untar(tmp_path / 'oci.tar', tmp_path / 'oci')}:1",
                      tmp_path / "bundle")
    assert_same(export_tree(strata, "flat:1"), tree)
    assert tree["srv/data"][8] == (("user.bin", b"\x00\x01\xfe"), ("user.note", b"hello"))


def test_a_docker_typed_manifest_is_saved_as_oci_that_umoci_unpacks(
        strata: Strata, umoci: str, skopeo: str, run: Run, tmp_path: Path,
        oracle: dict[str, Any]) -> None:
    require_root()
    # a layout whose manifest and layers carry Docker media types (as pulled from a registry)
    path = tmp_path / "layout"
    info = write_layout(path, ["gzip"] * 3, tag="localhost/docker-typed:1")
    mpath = path / "blobs" / "sha256" / info["manifest"][7:]
    doc = json.loads(mpath.read_bytes())
    doc["mediaType"] = "application/vnd.docker.distribution.manifest.v2+json"
    doc["config"]["mediaType"] = "application/vnd.docker.container.image.v1+json"
    for layer in doc["layers"]:
        layer["mediaType"] = "application/vnd.docker.image.rootfs.diff.tar.gzip"
    raw = json.dumps(doc).encode()
    mdigest = write_blob(str(path), raw)
    index = json.loads((path / "index.json").read_bytes())
    index["manifests"][0].update(mediaType=doc["mediaType"], digest=mdigest, size=len(raw))
    (path / "index.json").write_text(json.dumps(index))
    assert strata.out("load", "-i", str(path)) == "Loaded image: localhost/docker-typed:1\n"
    assert_same(export_tree(strata, "localhost/docker-typed:1"), oracle)
    strata("save", "--format", "oci", "-o", str(tmp_path / "oci.tar"), "localhost/docker-typed:1")
    tree = umoci_tree(umoci, f"{_untar(tmp_path / 'oci.tar', tmp_path / 'oci')}:1",
                      tmp_path / "bundle")
    assert_same(tree, oracle)
    got = json.loads(run(skopeo, "inspect", "--raw", f"oci-archive:{tmp_path / 'oci.tar'}:1"
                         ).stdout)
    assert got["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert [x["digest"] for x in got["layers"]] == info["layers"]  # the same gzip blobs
    assert got["config"]["digest"] == info["config"]
