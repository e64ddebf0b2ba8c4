"""Property-based fuzzing (hypothesis) of the layer indexer and of the manifest, index and
config parsers: whatever the input, the only exceptions are the documented ones
(``LayerError``; ``InvalidImage``/``Unsupported``, i.e. ``StoreError``), nothing hangs (an
alarm fails an example that runs past ``HANG`` seconds), and what is accepted can be used:
every file of an accepted layer reads back in full, every accepted config commits.

Bounded for CI (``EXAMPLES`` per property); ``STRATA_LONG_TESTS=1`` runs 10 times more.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imagestore import commit, oci
from imagestore.digest import Digest, sha256_bytes
from imagestore.errors import StoreError
from tests.builders import E, d, file, link, sym, tar_bytes, whiteout
from tests.hostile.corpus import END, b256, entry_pax, header, pad, pax
from unionfs.resolve import UnionView
from unionfs.tarlayer import LayerError, LayerIndex, TarLayer, build_index

LONG = bool(os.environ.get("STRATA_LONG_TESTS"))
EXAMPLES = 2000 if LONG else 200
HANG = 10
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=not LONG,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


@contextlib.contextmanager
def no_hang(seconds: int = HANG) -> Iterator[None]:
    def alarm(signum: int, frame: Any) -> None:
        raise AssertionError(f"hang: still running after {seconds}s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# -- the layer indexer ------------------------------------------------------------------------

NAME_PARTS = ["a", "b", "etc", "..", ".", "", ".wh.a", ".wh..wh..opq", ".wh..wh.plnk", ".wh.",
              ".wh..", "x\ny", "bad\udcff", "/", "n" * 120, "é"]
names = st.lists(st.sampled_from(NAME_PARTS), min_size=1, max_size=4).map("/".join)
xattr_names = st.sampled_from(["user.a", "trusted.overlay.opaque", "user.overlay.redirect",
                               "security.capability", "user.containers.override_stat"])
entries = st.builds(
    E, name=names, kind=st.sampled_from(["file", "dir", "symlink", "hardlink", "fifo", "char"]),
    data=st.binary(max_size=700), mode=st.one_of(st.none(), st.integers(0, 0o7777)),
    uid=st.integers(0, 70000), gid=st.integers(0, 70000),
    target=st.one_of(names, st.just("")),
    xattrs=st.dictionaries(xattr_names, st.binary(max_size=20), max_size=2),
    mtime=st.integers(0, 1 << 33), dev=st.tuples(st.integers(0, 300), st.integers(0, 300)))


def seeds() -> list[bytes]:
    """Valid tars of every kind the indexer meets, to mutate."""
    out = [
        tar_bytes([d("etc"), file("etc/passwd", b"root:x:0:0\n"), sym("etc/l", "/etc/passwd"),
                   link("etc/h", "etc/passwd"), whiteout("gone"), file("d/.wh..wh..opq", b"")]),
        tar_bytes([file("n" * 150, b"long", xattrs={"user.k": b"v"}), sym("s", "t" * 150)],
                  tarfile.GNU_FORMAT),
        tar_bytes([file("f", b"u" * 600)], tarfile.USTAR_FORMAT),
        entry_pax("sparse", {"GNU.sparse.map": b"0,2,10,2", "GNU.sparse.realsize": b"20"},
                  b"abcd") + END,
        pax({"path": b"p\xffq", "hdrcharset": b"BINARY"}) + header(b"x", size=1) + pad(b"x")
        + END,
    ]
    return out


SEEDS = seeds()


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        how = draw(st.sampled_from(["flip", "field", "truncate", "extend", "splice"]))
        if how == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
        elif how == "field":
            block = draw(st.integers(0, max(0, len(data) // 512 - 1))) * 512
            start, width = draw(st.sampled_from([(100, 8), (108, 8), (124, 12), (136, 12),
                                                 (156, 1), (157, 100), (329, 8), (0, 100)]))
            value = draw(st.one_of(
                st.binary(min_size=width, max_size=width),
                st.integers(-(1 << 60), 1 << 60).map(lambda n, w=width: b256(n)[-w:]
                                                     if w == 12 else b"%0*o\0" % (w - 1, abs(n))
                                                     [-(w - 1):])))
            value = value[:width].ljust(width, b"\0")
            if block + 512 <= len(data):
                data[block + start:block + start + width] = value
                data[block + 148:block + 156] = b" " * 8
                data[block + 148:block + 156] = b"%06o\0 " % sum(data[block:block + 512])
        elif how == "truncate" and data:
            del data[draw(st.integers(0, len(data) - 1)):]
        elif how == "extend":
            data += draw(st.binary(max_size=1100))
        elif how == "splice":
            data += draw(st.sampled_from(SEEDS))
    return bytes(data)


def index_and_use(tmp_path: Path, data: bytes) -> None:
    """Index ``data``; if accepted, the layer must serve every entry and read every file."""
    path = tmp_path / "fuzz.tar"
    path.write_bytes(data)
    with no_hang():
        try:
            idx = build_index(str(path))
        except LayerError:
            return
        idx.dump(str(tmp_path / "idx"))
        assert LayerIndex.load(str(tmp_path / "idx")).same_as(idx)
        layer = TarLayer(str(path), str(tmp_path / "idx"))
        try:
            view = UnionView([layer])
            for node in view.walk():
                e = node.entry
                if stat.S_ISREG(e.mode):
                    assert len(view.read(node, 0, e.size + 10)) == e.size
                    fd = os.open(tmp_path / "copy", os.O_CREAT | os.O_TRUNC | os.O_WRONLY)
                    try:
                        layer.copy_data(e, fd)
                    finally:
                        os.close(fd)
                    assert os.path.getsize(tmp_path / "copy") == e.size
                elif stat.S_ISLNK(e.mode):
                    assert e.target and "\0" not in e.target
                assert e.size >= 0 and e.uid >= 0 and e.gid >= 0
                view.xattrs(node)
        finally:
            layer.close()


@FUZZ
@given(data=st.binary(max_size=3000))
def test_random_bytes_are_refused_or_served(tmp_path: Path, data: bytes) -> None:
    index_and_use(tmp_path, data)


@FUZZ
@given(data=mutated())
def test_mutated_tars_are_refused_or_served(tmp_path: Path, data: bytes) -> None:
    index_and_use(tmp_path, data)


@FUZZ
@given(layer=st.lists(entries, max_size=12),
       fmt=st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT]))
def test_generated_layers_are_refused_or_served(tmp_path: Path, layer: list[E],
                                                fmt: int) -> None:
    try:
        data = tar_bytes(layer, fmt)
    except (ValueError, UnicodeError):
        return  # tarfile cannot write it: nothing to index
    index_and_use(tmp_path, data)


# -- manifests, indexes, configs -----------------------------------------------------------------

D1 = "sha256:" + "a" * 64
MANIFEST = {"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST,
            "config": {"mediaType": oci.OCI_CONFIG, "digest": D1, "size": 10},
            "layers": [{"mediaType": oci.OCI_LAYER_GZIP, "digest": D1, "size": 5,
                        "annotations": {"k": "v"}, "urls": ["http://x"]}],
            "annotations": {"a": "b"}}
INDEX = {"schemaVersion": 2, "mediaType": oci.OCI_INDEX,
         "manifests": [{"mediaType": oci.OCI_MANIFEST, "digest": D1, "size": 7,
                        "platform": {"architecture": "amd64", "os": "linux", "variant": "v1"}}]}
CONFIG = {"created": "2024-01-02T03:04:05Z", "architecture": "amd64", "os": "linux",
          "config": {"Env": ["A=1"], "Cmd": ["/bin/sh"], "Labels": {"l": "v"},
                     "ExposedPorts": {"80/tcp": {}}, "Volumes": {"/v": {}}},
          "rootfs": {"type": "layers", "diff_ids": [D1]},
          "history": [{"created": "2024-01-02T03:04:05Z", "created_by": "x"}]}

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70),
              st.floats(allow_nan=False), st.text(max_size=10),
              st.sampled_from([D1, "sha256:zz", oci.OCI_MANIFEST, oci.OCI_INDEX, "linux"])),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=20)


def paths_of(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += paths_of(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += paths_of(v, (*prefix, i))
    return out


@st.composite
def mutated_doc(draw: st.DrawFn, base: dict[str, Any]) -> bytes:
    doc = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(paths_of(doc)))
        value = draw(json_values)
        if not where:
            doc = value
            continue
        parent = doc
        for k in where[:-1]:
            parent = parent[k]
        if draw(st.booleans()) and isinstance(parent, dict):
            parent.pop(where[-1], None)
        else:
            parent[where[-1]] = value
    raw = json.dumps(doc).encode()
    if draw(st.integers(0, 9)) == 0:
        raw = raw[: draw(st.integers(0, len(raw)))]  # truncated
    return raw


hostile_json = st.one_of(
    st.just(b"[" * 100_000), st.just(b'{"a":' * 5000 + b"1" + b"}" * 5000),
    st.just(b"9" * 5000), st.just(json.dumps(CONFIG).encode().replace(b'"layers"',
                                                                      b'"layers","x":1e999')),
    st.binary(max_size=200))


def parse_and_use(raw: bytes, ctype: str | None) -> None:
    with no_hang():
        try:
            doc = oci.parse_document(raw, ctype)
        except StoreError:
            return
        if isinstance(doc, oci.Index):
            oci.select_platform(doc.manifests, oci.Platform("linux", "amd64"))
            oci.index_bytes(doc.manifests)
        else:
            oci.manifest_bytes(doc.config, doc.layers, annotations=doc.annotations)
            [x.to_json() for x in doc.layers]


def config_and_use(raw: bytes) -> None:
    with no_hang():
        try:
            cfg = oci.ImageConfig.parse(raw, sha256_bytes(raw))
        except StoreError:
            return
        assert (cfg.diff_ids, cfg.history, cfg.container_config, cfg.labels, cfg.platform,
                cfg.field("created")) is not None
        new = commit.committed_config(cfg, Digest(D1), created="2024-01-01T00:00:00Z",
                                      changes=["ENV X=1", "LABEL a=b"], author="a",
                                      comment="c", created_by="fuzz")
        oci.canonical_config(new)
        oci.ImageConfig.parse(oci.dumps(new), Digest(D1))


@FUZZ
@given(raw=st.one_of(mutated_doc(MANIFEST), mutated_doc(INDEX), hostile_json),
       ctype=st.sampled_from([None, oci.OCI_MANIFEST, oci.OCI_INDEX, oci.DOCKER_MANIFEST,
                              oci.DOCKER_LIST, "application/vnd.docker.distribution.manifest"
                              ".v1+prettyjws", "text/plain"]))
def test_manifest_and_index_parsers(raw: bytes, ctype: str | None) -> None:
    parse_and_use(raw, ctype)


@FUZZ
@given(raw=st.one_of(mutated_doc(CONFIG), hostile_json))
def test_config_parser_and_commit_transform(raw: bytes) -> None:
    config_and_use(raw)


@pytest.mark.parametrize("raw, message", [
    (b"[" * 100_000, "not valid JSON"), (b"9" * 5000, "not valid JSON"),
    (json.dumps({"x": json.loads("[" * 900 + "]" * 900)}).encode(), "nests deeper than 64"),
    (b'{"n": ' + b"1" * 4301 + b"}", "not valid JSON"),
], ids=["brackets", "digits", "nesting-900", "int-4301-digits"])
def test_hostile_json_is_invalid_image(raw: bytes, message: str) -> None:
    with pytest.raises(StoreError, match=message):
        oci.loads(raw, "doc")


def test_seeds_index(tmp_path: Path) -> None:
    for data in SEEDS:  # the mutation seeds are valid to begin with
        path = tmp_path / "s.tar"
        path.write_bytes(data)
        build_index(str(path))
