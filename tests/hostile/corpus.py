"""The hostile corpus: hand-built malicious layers and image documents, each with the result
strata must give — a one-line error (``error``: a regex) or a safe, documented result
(``expect``: what the merged tree holds).  Built by code, no binary blobs.

Symlink and escape targets point at ``canary`` (a directory the test watches) and every name
meant to escape carries ``TOKEN``, so a test can prove nothing landed outside the store.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tests.builders import E, chardev, d, file, link, sym, tar_bytes

TOKEN = "STRATA-HOSTILE"
Tree = dict[str, tuple[Any, ...]]  # as builders.tree_of_dir: (type, mode, uid, gid, size, ...)
S_IFDIR, S_IFREG, S_IFLNK, S_IFCHR, S_IFBLK = 0o040000, 0o100000, 0o120000, 0o020000, 0o060000


@dataclass(frozen=True)
class Case:
    """``layers``: uncompressed layer tars, bottom first.  ``error``: the message a refusal
    must match; ``expect``: checks the merged tree of an accepted image (and says why)."""

    name: str
    layers: tuple[bytes, ...]
    behaviour: str
    error: str | None = None
    expect: Callable[[Tree], None] | None = None
    compression: str = "gzip"
    env: dict[str, str] = field(default_factory=dict)

    @property
    def refused(self) -> bool:
        return self.error is not None


# -- raw tar pieces tarfile will not write ------------------------------------------------------


def header(name: bytes, *, size: int = 0, typeflag: bytes = b"0", linkname: bytes = b"",
           mode: int = 0o644, size_field: bytes | None = None, dev: tuple[int, int] = (0, 0),
           major_field: bytes | None = None, chksum: bool = True) -> bytes:
    """A ustar header with exactly these fields (``size_field``, ``major_field``: raw bytes,
    e.g. base-256 numbers)."""
    buf = bytearray(512)
    buf[0:100] = name[:100].ljust(100, b"\0")
    buf[100:108] = b"%07o\0" % mode
    buf[108:116] = b"%07o\0" % 0
    buf[116:124] = b"%07o\0" % 0
    buf[124:136] = size_field if size_field is not None else b"%011o\0" % size
    buf[136:148] = b"%011o\0" % 1_700_000_000
    buf[156:157] = typeflag
    buf[157:257] = linkname[:100].ljust(100, b"\0")
    buf[257:265] = b"ustar\x0000"
    buf[329:337] = major_field if major_field is not None else b"%07o\0" % dev[0]
    buf[337:345] = b"%07o\0" % dev[1]
    buf[148:156] = b" " * 8
    if chksum:
        buf[148:156] = b"%06o\0 " % sum(buf)
    return bytes(buf)


def pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 512)


def pax_record(key: str, value: bytes) -> bytes:
    body = b" " + key.encode() + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n = len(str(n)) + len(body)
    return str(n).encode() + body


def pax(records: dict[str, bytes], size: int | None = None) -> bytes:
    body = b"".join(pax_record(k, v) for k, v in records.items())
    return header(b"PaxHeaders/x", size=len(body) if size is None else size,
                  typeflag=b"x") + pad(body)


END = b"\0" * 1024
FINE = header(b"fine", size=2) + pad(b"ok")


def b256(n: int) -> bytes:
    """A 12-byte base-256 (GNU) number field, negative numbers included."""
    return bytes([0xFF if n < 0 else 0x80]) + (n % (1 << 88)).to_bytes(11, "big")


def entry_pax(name: str, records: dict[str, bytes], data: bytes = b"x",
              typeflag: bytes = b"0") -> bytes:
    return pax(records) + header(name.encode(), size=len(data) if typeflag == b"0" else 0,
                                 typeflag=typeflag) + (pad(data) if typeflag == b"0" else b"")


def pax_chain(n: int) -> bytes:
    rec = pax_record("comment", b"x")
    one = header(b"PaxHeaders/x", size=len(rec), typeflag=b"x") + pad(rec)
    return FINE + one * n + header(b"end") + END


def bomb(size: int) -> tuple[bytes, str]:
    """A gzip-compressed layer of one file of ``size`` zero bytes (a few hundred KiB packed)
    and its diff_id."""
    import hashlib

    buf = io.BytesIO()
    h = hashlib.sha256()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9, mtime=0) as gz:

        def put(data: bytes) -> None:
            gz.write(data)
            h.update(data)

        ti = tarfile.TarInfo("zeros")
        ti.size = size
        put(ti.tobuf(tarfile.PAX_FORMAT))
        chunk = bytes(1 << 20)
        left = size
        while left:
            put(chunk[: min(left, len(chunk))])
            left -= min(left, len(chunk))
        put(b"\0" * (-size % 512) + END)
    return buf.getvalue(), "sha256:" + h.hexdigest()


# -- expectations -------------------------------------------------------------------------------


def names(tree: Tree) -> list[str]:
    return sorted(tree)


def expect_names(*want: str) -> Callable[[Tree], None]:
    def check(tree: Tree) -> None:
        assert names(tree) == sorted(want), names(tree)

    return check


def _kind(tree: Tree, path: str) -> int:
    return int(tree[path][0])


# -- the corpus ----------------------------------------------------------------------------------


def layer_cases(canary: str) -> list[Case]:
    """Every hostile layer case; ``canary``: the absolute path symlinks aim at."""
    t = TOKEN
    base = tar_bytes([d("etc"), file("etc/passwd", b"root:x:0:0::/:/bin/sh\n"), d("d"),
                      file("d/old", b"old"), sym("a", canary)])
    cases = [
        # --- names that leave the layer
        Case("dotdot", (tar_bytes([file(f"a/../../{t}-dotdot", b"x")]),),
             "refused: a name with '..' climbs out of the layer", r"'\.\.'"),
        Case("dotdot-leading", (tar_bytes([file(f"../{t}-lead", b"x")]),),
             "refused", r"climbs out of the layer"),
        Case("absolute", (tar_bytes([file(f"/tmp/{t}-abs", b"x")]),),
             "refused: an absolute name", r"absolute name"),
        Case("nul-in-name", (entry_pax("n", {"path": b"a\0" + t.encode()}),),
             "refused", r"NUL byte"),
        # --- a symlink planted, then written through
        Case("symlink-then-write", (tar_bytes([sym("a", canary), file("a/passwd", b"pwned")]),),
             "refused: nothing may live below a non-directory of the same layer",
             r"lies below 'a', which is not a directory"),
        Case("symlink-then-write-relative",
             (tar_bytes([sym("a", "../" * 12 + canary.lstrip("/")), file("a/x", b"pwned")]),),
             "refused", r"not a directory"),
        Case("symlink-then-write-across-layers", (base, tar_bytes([file("a/passwd", b"new")])),
             "accepted: the upper layer's implicit directory 'a' hides the lower symlink (as "
             "overlayfs: a directory above hides a non-directory); nothing is written through "
             "the symlink",
             expect=lambda tr: (expect_names("a", "a/passwd", "d", "d/old", "etc",
                                             "etc/passwd")(tr),
                                _is(tr, "a", S_IFDIR, 0o755))),
        Case("symlink-replaced-by-dir", (tar_bytes([sym("a", canary), d("a"),
                                                    file("a/passwd", b"new")]),),
             "accepted: a later entry of the same path replaces the symlink; its child lives "
             "in the new directory", expect=lambda tr: (
                 expect_names("a", "a/passwd")(tr), _is(tr, "a", S_IFDIR, 0o755))),
        # --- hardlinks
        Case("hardlink-dotdot", (tar_bytes([link("x", "../../etc/shadow")]),), "refused",
             r"climbs out"),
        Case("hardlink-absolute", (tar_bytes([link("x", "/etc/shadow")]),), "refused",
             r"absolute"),
        Case("hardlink-later", (tar_bytes([link("x", "later"), file("later", b"l")]),),
             "refused: a hardlink must name an earlier entry of its layer",
             r"hardlink 'x' -> 'later' does not name an earlier entry"),
        Case("hardlink-across-layers", (base, tar_bytes([link("x", "etc/passwd")])),
             "refused (producers re-include the target in the layer)",
             r"does not name an earlier entry"),
        Case("hardlink-directory", (tar_bytes([d("dir"), link("x", "dir")]),), "refused",
             r"names a directory"),
        Case("hardlink-through-symlink", (tar_bytes([sym("s", canary), link("x", "s/f")]),),
             "refused: link targets are looked up verbatim, never through a symlink",
             r"does not name an earlier entry"),
        # --- whiteouts and opaque markers
        Case("whiteout-dotdot", (tar_bytes([d("a"), file("a/.wh...", b"")]),), "refused",
             r"invalid whiteout '\.wh\.\.\.'"),
        Case("whiteout-dot", (tar_bytes([d("a"), file("a/.wh..", b"")]),), "refused",
             r"invalid whiteout '\.wh\.\.'"),
        Case("whiteout-root", (tar_bytes([file(".wh.", b"")]),),
             "refused: '.wh.' names nothing (the root cannot be whited out)",
             r"invalid whiteout '\.wh\.'"),
        Case("whiteout-of-dot-root", (tar_bytes([file("./.wh..", b"")]),), "refused",
             r"invalid whiteout"),
        Case("whiteout-through-symlink", (tar_bytes([sym("a", canary),
                                                     file("a/.wh.passwd", b"")]),),
             "refused", r"not a directory"),
        Case("whiteout-through-symlink-across-layers",
             (base, tar_bytes([file("a/.wh.passwd", b"")])),
             "accepted: 'a' becomes the upper layer's (empty) directory over the symlink",
             expect=lambda tr: (expect_names("a", "d", "d/old", "etc", "etc/passwd")(tr),
                                _is(tr, "a", S_IFDIR, 0o755))),
        Case("entry-below-whiteout", (tar_bytes([file(".wh.a/b", b"x")]),), "refused",
             r"below a whiteout or opaque marker"),
        Case("opaque-as-directory", (base, tar_bytes([d("d/.wh..wh..opq")])),
             "accepted: a '.wh..wh..opq' entry of any type is the marker: 'd' hides the "
             "lower 'd/old'; the marker never shows", expect=expect_names(
                 "a", "d", "etc", "etc/passwd")),
        Case("opaque-directory-with-child",
             (base, tar_bytes([d("d/.wh..wh..opq"), file("d/.wh..wh..opq/x", b"x")])),
             "refused", r"below a whiteout or opaque marker"),
        Case("opaque-as-symlink", (base, tar_bytes([sym("d/.wh..wh..opq", canary)])),
             "accepted: the marker (its target is never used)",
             expect=expect_names("a", "d", "etc", "etc/passwd")),
        Case("opaque-through-symlink", (tar_bytes([sym("a", canary),
                                                   file("a/.wh..wh..opq", b"")]),),
             "refused", r"not a directory"),
        Case("opaque-at-root", (base, tar_bytes([file(".wh..wh..opq", b""),
                                                 file("new", b"n")])),
             "accepted: the layer's root is opaque: every lower layer is hidden",
             expect=expect_names("new")),
        Case("opaque-twice", (base, tar_bytes([file("d/.wh..wh..opq", b""),
                                               file("d/.wh..wh..opq", b""),
                                               file("d/new", b"n")])),
             "accepted: as once", expect=expect_names("a", "d", "d/new", "etc", "etc/passwd")),
        Case("whiteout-of-missing", (base, tar_bytes([file(".wh.nothing", b"")])),
             "accepted: a whiteout of nothing is a no-op",
             expect=expect_names("a", "d", "d/old", "etc", "etc/passwd")),
        # --- duplicates
        Case("duplicates", (tar_bytes([
            file("f", b"first"), file("f", b"second"),
            d("x"), file("x/child", b"c"), file("x", b"x is a file now"),
            sym("s", canary), file("s", b"a file replaces the symlink"),
            file("y", b"y"), d("y"), file("y/in", b"in"),
            d("m", mode=0o700), file("m/k", b"k"), d("m", mode=0o750)]),),
            "accepted: the last entry of a path wins (two directories merge, a directory "
            "replaced goes with its children); a file replacing a symlink is written as a file, "
            "never through it",
            expect=lambda tr: (expect_names("f", "m", "m/k", "s", "x", "y", "y/in")(tr),
                               _is(tr, "f", S_IFREG, 0o644, b"second"),
                               _is(tr, "s", S_IFREG, 0o644), _is(tr, "x", S_IFREG, 0o644),
                               _is(tr, "m", S_IFDIR, 0o750))),
        # --- devices
        Case("devices", (tar_bytes([d("dev"), chardev("dev/mem", 1, 1, mode=0o666),
                                    E("dev/sda", "block", mode=0o666, dev=(8, 0)),
                                    chardev("dev/null", 1, 3, mode=0o666)]),),
             "accepted: device nodes are listed with their numbers; mounts are nodev unless "
             "-o dev, so opening one fails (see tests/faults/test_security.py)",
             expect=lambda tr: (_dev(tr, "dev/mem", S_IFCHR, 1, 1),
                                _dev(tr, "dev/sda", S_IFBLK, 8, 0))),
        # --- overlay-private xattrs
        Case("overlay-xattrs", (base, tar_bytes([
            d("d", xattrs={"trusted.overlay.opaque": b"y", "user.overlay.opaque": b"y",
                           "trusted.overlay.redirect": b"/etc",
                           "user.fuseoverlayfs.opaque": b"y", "user.note": b"kept"}),
            file("f", b"data", xattrs={"trusted.overlay.metacopy": b"",
                                       "user.overlay.metacopy": b"",
                                       "user.containers.override_stat": b"0:0:04755",
                                       "security.fuseoverlayfs.override_stat": b"0:0:04755"}),
            file("empty", b"", xattrs={"trusted.overlay.whiteout": b"",
                                       "user.overlay.whiteout": b""})])),
            "accepted: overlay-private and strata-internal xattrs are dropped when indexed, "
            "never applied: 'd' is not opaque, 'f' keeps its mode, 'empty' is a file",
            expect=lambda tr: (
                expect_names("a", "d", "d/old", "empty", "etc", "etc/passwd", "f")(tr),
                _is(tr, "f", S_IFREG, 0o644, b"data"), _is(tr, "empty", S_IFREG, 0o644),
                _xattrs(tr, "d", {"user.note": b"kept"}), _xattrs(tr, "f", {}))),
        # --- names
        Case("newline-names", (tar_bytes([d("dir\nwith newline"), file("dir\nwith newline/f\n",
                                                                          b"n"),
                                          sym("link\n", "target\nwith newline")]),),
             "accepted: names and targets are kept byte for byte",
             expect=lambda tr: (expect_names("dir\nwith newline", "dir\nwith newline/f\n",
                                             "link\n")(tr),
                                _target(tr, "link\n", "target\nwith newline"))),
        Case("invalid-utf8-names", (tar_bytes([file("bad-\udcff\udcfe", b"b"),
                                               sym("l-\udce9", "t-\udce9\udc80")]),),
             "accepted: undecodable names are kept as bytes (surrogate escapes inside)",
             expect=lambda tr: (expect_names("bad-\udcff\udcfe", "l-\udce9")(tr),
                                _target(tr, "l-\udce9", "t-\udce9\udc80"))),
        # --- headers that lie
        Case("size-larger-than-data", (header(b"big", size=1 << 20) + pad(b"short") + END,),
             "refused", r"past the end|truncated"),
        Case("size-smaller-than-data", (FINE + header(b"liar", size=10) + pad(b"x" * 2000) + END,),
             "refused: the rest of the data reads as an invalid header",
             r"invalid tar header or trailing data"),
        Case("size-negative", (FINE + header(b"neg", size_field=b256(-512)) + END,),
             "refused (a size of -512 sent tarfile back to the same header forever)",
             r"negative size"),
        Case("pax-size-negative", (FINE + entry_pax("f", {"size": b"-1536"}) + END,),
             "refused (likewise through a PAX size)", r"negative size"),
        Case("pax-size-huge", (FINE + entry_pax("f", {"size": str(1 << 62).encode()}) + END,),
             "refused", r"past the end"),
        Case("sparse-map-outside", (FINE + entry_pax("s", {
            "GNU.sparse.map": b"0,1,9000000000,5", "GNU.sparse.realsize": b"100"}, b"x" * 6)
            + END,), "refused: a sparse map must fit the file", r"sparse map"),
        Case("extended-header-huge", (FINE + pax({"comment": b"x"}, size=1 << 30) + END,),
             "refused: extended headers are at most 16 MiB", r"extended header of"),
        Case("extended-header-chain", (pax_chain(3000),), "refused",
             r"too many chained extended headers"),
        Case("device-number-out-of-range",
             (FINE + header(b"dev", typeflag=b"3", major_field=b"\x80" + (1 << 40).to_bytes(
                 7, "big")) + END,), "refused", r"out-of-range number"),
        Case("owner-out-of-range", (FINE + entry_pax("o", {"uid": str(1 << 40).encode()})
                                    + END,), "refused", r"out-of-range owner"),
        Case("symlink-empty-target", (tar_bytes([sym("l", "")]),), "refused",
             r"empty target"),
        Case("bad-checksum", (header(b"x", size=1, chksum=False) + pad(b"x") + END,),
             "refused", r"not a valid tar archive"),
        Case("trailing-garbage", (tar_bytes([file("a", b"1")])[:-1024] + b"\x01" * 512
                                  + b"\0" * 512,), "refused", r"trailing data"),
        Case("decompression-bomb", (b"",), "refused above --max-layer-size: 200 MiB of zeros "
             "in 200 KiB of gzip, with the limit at 16 MiB",
             r"exceeds the limit of 16 MiB", compression="bomb",
             env={"STRATA_MAX_LAYER_SIZE": "16M"}),
    ]
    return cases


def _is(tree: Tree, path: str, kind: int, mode: int, data: bytes | None = None) -> None:
    import hashlib

    e = tree[path]
    assert (e[0], e[1]) == (kind, mode), (path, oct(e[0]), oct(e[1]))
    if data is not None:
        assert e[5] == hashlib.sha256(data).hexdigest(), path


def _dev(tree: Tree, path: str, kind: int, major: int, minor: int) -> None:
    import os

    assert tree[path][0] == kind and tree[path][7] == os.makedev(major, minor), tree[path]


def _xattrs(tree: Tree, path: str, want: dict[str, bytes]) -> None:
    assert dict(tree[path][8]) == want, tree[path][8]


def _target(tree: Tree, path: str, target: str) -> None:
    assert tree[path][6] == target, tree[path]


# -- image documents ------------------------------------------------------------------------


def deep(n: int) -> Any:
    v: Any = "bottom"
    for _ in range(n):
        v = [v]
    return v


def config_doc(diff_ids: list[str], **extra: Any) -> bytes:
    cfg: dict[str, Any] = {"architecture": "amd64", "os": "linux", "config": {},
                           "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    cfg.update(extra)
    return json.dumps(cfg).encode()
