"""Hostile image documents and archives: manifests with thousands of layers, JSON with huge
numbers or deep nesting, mistyped configs, oversized documents, archives whose members point
outside them or whose headers lie — through ``load`` (an OCI layout, a docker-archive) and
``pull`` (the real registry when it stores the document, else a hostile HTTP server that
serves whatever it is given, as a compromised registry would).  Each gives one ``Error:`` line
and leaves no image; the store passes ``strata check``.  (The classic docker-archive path
escapes — Config/Layers with ``..``, absolute paths, symlinks out — are in
tests/e2e/test_bad_input.py.)"""

from __future__ import annotations

import http.server
import json
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.builders import (
    Symlink,
    archive_bytes,
    d,
    docker_archive,
    file,
    image_config,
    listing,
    sha256,
    tar_bytes,
    write_blob,
)
from tests.forkserver import Warm
from tests.hostile.corpus import END, FINE, b256, deep, header
from tests.registry_helpers import free_port
from tests.registry_images import upload_layout

LAYER = tar_bytes([d("etc"), file("etc/hostname", b"hostile\n")])
OCI_M = "application/vnd.oci.image.manifest.v1+json"
OCI_C = "application/vnd.oci.image.config.v1+json"
OCI_L = "application/vnd.oci.image.layer.v1.tar"


def layout_with(path: Path, *, config: bytes | None = None, layers: int = 1,
                manifest_edit: Callable[[dict[str, Any]], None] | None = None,
                index_edit: Callable[[dict[str, Any]], None] | None = None) -> Path:
    """An OCI layout of one image whose documents are exactly as hostile as asked."""
    path.mkdir()
    (path / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    ldigest = write_blob(str(path), LAYER)
    cfg = config if config is not None else image_config([ldigest] * layers)
    cdigest = write_blob(str(path), cfg)
    manifest: dict[str, Any] = {
        "schemaVersion": 2, "mediaType": OCI_M,
        "config": {"mediaType": OCI_C, "digest": cdigest, "size": len(cfg)},
        "layers": [{"mediaType": OCI_L, "digest": ldigest, "size": len(LAYER)}] * layers}
    if manifest_edit:
        manifest_edit(manifest)
    raw = json.dumps(manifest).encode()
    mdigest = write_blob(str(path), raw)
    index: dict[str, Any] = {
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": OCI_M, "digest": mdigest, "size": len(raw),
                       "annotations": {"org.opencontainers.image.ref.name": "v1"}}]}
    if index_edit:
        index_edit(index)
    (path / "index.json").write_text(json.dumps(index))
    return path


def _huge_size(m: dict[str, Any]) -> None:
    m["layers"] = [{**m["layers"][0], "size": 10**30}]


def _many_manifests(i: dict[str, Any]) -> None:
    first = i["manifests"][0]
    i["manifests"] = [{k: first[k] for k in ("mediaType", "digest", "size")}] * 12_000


CONFIG_5000 = image_config([sha256(LAYER)] * 5000)
DOCS: dict[str, tuple[Callable[[Path], Path], str, str]] = {
    # name: (layout maker, error, what the registry does with it: "push" or "serve")
    "manifest-5000-layers": (lambda p: layout_with(p, layers=5000),  # distribution checks
                             r"has 5000 layers; at most 500 are supported", "serve"),  # slowly
    "config-5000-diff-ids": (lambda p: layout_with(p, config=CONFIG_5000),
                             r"image config has 5000 layers; at most 500", "push"),
    "config-deep-nesting": (lambda p: layout_with(p, config=b'{"x":' + b"[" * 100_000
                                                  + b"]" * 100_000 + b"}"),
                            r"image config is not valid JSON", "push"),
    "config-nesting-100": (lambda p: layout_with(p, config=image_config(
        [sha256(LAYER)], config={"Labels": {}}, x=deep(100))),
        r"image config nests deeper than 64 levels", "push"),
    "config-huge-integer": (lambda p: layout_with(p, config=image_config(
        [sha256(LAYER)])[:-1] + b', "n": ' + b"7" * 5000 + b"}"),
        r"image config is not valid JSON.*(digits|limit)", "push"),
    "config-mistyped": (lambda p: layout_with(p, config=image_config(
        [sha256(LAYER)], config={"Labels": True})),
        r"config.Labels has the wrong type", "push"),
    "config-5-mib": (lambda p: layout_with(p, config=image_config(
        [sha256(LAYER)], pad="x" * (5 << 20))), r"larger than 4194304 bytes", "push"),
    "manifest-huge-size": (lambda p: layout_with(p, manifest_edit=_huge_size),
                           r"invalid size", "serve"),
    "manifest-deep-nesting": (lambda p: layout_with(
        p, manifest_edit=lambda m: m.update(annotations={"x": deep(200)})),
        r"(is not valid JSON|nests deeper than 64)", "serve"),
    "index-12000-manifests": (lambda p: layout_with(p, index_edit=_many_manifests),
                              r"lists too many manifests \(12000\)", "load-only"),
}


def assert_refused(strata: Warm, args: list[str], pattern: str,
                   before: dict[str, Any] | None, env: dict[str, str] | None = None) -> None:
    proc = strata(*args, check=False, env=env)
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 1, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("Error: "), err
    assert re.search(pattern, err), err
    assert strata.out("images", "-q", "-a") == ""
    if before is not None:
        assert listing(str(strata.root)) == before
    assert strata("check", check=False).returncode == 0


@pytest.mark.parametrize("name", sorted(DOCS))
def test_load_refuses_hostile_documents(warm: Warm, tmp_path: Path, name: str) -> None:
    make, pattern, _ = DOCS[name]
    layout = make(tmp_path / "layout")
    warm("check")
    assert_refused(warm, ["load", "-i", str(layout)], pattern, listing(str(warm.root)))


class HostileRegistry:
    """A registry that serves whatever manifests and blobs it is given (a compromised or
    malicious one), on 127.0.0.1.  ``errors``: a body for every 404."""

    def __init__(self) -> None:
        self.manifests: dict[str, tuple[str, bytes]] = {}
        self.blobs: dict[str, bytes] = {}
        self.error_body = b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"unknown"}]}'
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                outer.answer(self)

            do_HEAD = do_GET

        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def answer(self, h: http.server.BaseHTTPRequestHandler) -> None:
        m = re.match(r"^/v2/(.+)/(manifests|blobs)/([^/?]+)$", h.path)
        status, ctype, body = 404, "application/json", self.error_body
        if h.path == "/v2/":
            status, body = 200, b"{}"
        elif m and m.group(2) == "manifests" and m.group(3) in self.manifests:
            status = 200
            ctype, body = self.manifests[m.group(3)]
        elif m and m.group(2) == "blobs" and m.group(3) in self.blobs:
            status, ctype, body = 200, "application/octet-stream", self.blobs[m.group(3)]
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)

    def serve_layout(self, layout: Path, tag: str) -> None:
        for blob in (layout / "blobs/sha256").iterdir():
            self.blobs["sha256:" + blob.name] = blob.read_bytes()
        desc = json.loads((layout / "index.json").read_text())["manifests"][0]
        raw = self.blobs[desc["digest"]]
        self.manifests[tag] = (desc["mediaType"], raw)
        self.manifests[desc["digest"]] = (desc["mediaType"], raw)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def hostile_registry() -> Iterator[HostileRegistry]:
    reg = HostileRegistry()
    yield reg
    reg.close()


@pytest.mark.registry
@pytest.mark.parametrize("name", sorted(n for n, v in DOCS.items() if v[2] != "load-only"))
def test_pull_refuses_hostile_documents(warm: Warm, tmp_path: Path, registry: Any,
                                        hostile_registry: HostileRegistry, name: str) -> None:
    make, pattern, how = DOCS[name]
    layout = make(tmp_path / "layout")
    if how == "push":  # the real registry stores it: configs and layers are opaque blobs
        upload_layout(registry.host, str(layout), f"docs/{name}", "v1")
        ref = f"{registry.host}/docs/{name}:v1"
    else:  # a manifest the real registry refuses to store: only a hostile one serves it
        hostile_registry.serve_layout(layout, "v1")
        ref = f"{hostile_registry.host}/docs/{name}:v1"
    assert_refused(warm, ["pull", "-q", ref], pattern, None)


@pytest.mark.parametrize("body", [b"[" * 60_000, b'{"errors":' + b"[" * 5000 + b"]" * 5000
                                  + b"}", b"\xff" * 100], ids=["brackets", "nested", "binary"])
def test_pull_with_hostile_error_bodies(warm: Warm, hostile_registry: HostileRegistry,
                                        body: bytes) -> None:
    hostile_registry.error_body = body
    ref = f"{hostile_registry.host}/nothing/here:v1"
    assert_refused(warm, ["pull", "-q", ref], r"not found|manifest unknown|404", None)


def _archive(tmp_path: Path, members: dict[str, bytes | Symlink]) -> Path:
    path = tmp_path / "archive.tar"
    path.write_bytes(archive_bytes(members))
    return path


def _hardlink_out(tmp_path: Path) -> Path:
    import io
    import tarfile

    m = docker_archive([LAYER], ["hostile:1"])
    layer = json.loads(m["manifest.json"])[0]["Layers"][0]  # type: ignore[arg-type]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, value in m.items():
            ti = tarfile.TarInfo(name)
            if name == layer:  # the layer is a hardlink climbing out of the archive
                ti.type, ti.linkname = tarfile.LNKTYPE, "../../../etc/passwd"
                tf.addfile(ti)
                continue
            assert isinstance(value, bytes)
            ti.size = len(value)
            tf.addfile(ti, io.BytesIO(value))
    path = tmp_path / "archive.tar"
    path.write_bytes(buf.getvalue())
    return path


def _archive_bomb(tmp_path: Path) -> Path:
    """A gzip-compressed archive that inflates to 200 MiB (the limit is set to 16 MiB)."""
    import gzip

    path = tmp_path / "bomb.tar.gz"
    with gzip.open(path, "wb", compresslevel=9) as gz:
        gz.write(archive_bytes({"manifest.json": b"[]"})[:-1024])
        gz.write(header(b"zeros", size=200 << 20))
        for _ in range(200):
            gz.write(bytes(1 << 20))
        gz.write(END)
    return path


ARCHIVES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "compressed-archive-bomb": (_archive_bomb, r"exceeds the limit of 16 MiB"),
    "member-hardlink-outside": (_hardlink_out, r"points outside the archive"),
    "layer-is-a-directory": (lambda t: _archive(t, {
        **{k: v for k, v in docker_archive([LAYER], ["h:1"]).items()},
        "manifest.json": json.dumps([{"Config": sha256(image_config([sha256(LAYER)]))[7:]
                                      + ".json", "RepoTags": ["h:1"],
                                      "Layers": ["dir"]}]).encode(),
        "dir/x": b"x"}), r"no entry 'dir'|is a directory"),
    "header-negative-size": (lambda t: _write(t, FINE + header(b"manifest.json",
                                                                size_field=b256(-1024)) + END),
                             r"not a valid image archive: negative size"),
    "manifest-json-deep": (lambda t: _archive(t, {"manifest.json": b"[" * 100_000}),
                           r"manifest.json is not valid JSON"),
    "manifest-json-many-entries": (lambda t: _archive(t, {
        **docker_archive([LAYER], ["h:1"]),
        "manifest.json": json.dumps([{"Config": "nope.json", "Layers": []}] * 100_000).encode()}),
        r"no entry 'nope.json'"),
}


def _write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "archive.tar"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("name", sorted(ARCHIVES))
def test_load_refuses_hostile_archives(warm: Warm, tmp_path: Path, name: str) -> None:
    make, pattern = ARCHIVES[name]
    path = make(tmp_path)
    warm("check")
    assert_refused(warm, ["load", "-i", str(path)], pattern, listing(str(warm.root)),
                   env={"STRATA_MAX_LAYER_SIZE": "16M"})
