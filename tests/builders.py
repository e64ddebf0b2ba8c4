"""Hand-built test content: layer tars (written with Python's tarfile, independently of
strata's own tar writer), OCI layouts, and tree snapshots of directories and tars for
entry-for-entry comparison."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import zstandard

BUSYBOX = shutil.which("busybox") or "/bin/busybox"


@dataclass
class E:
    """One tar entry to build."""

    name: str
    kind: str = "file"  # file dir symlink hardlink fifo char block
    data: bytes = b""
    mode: int | None = None
    uid: int = 0
    gid: int = 0
    target: str = ""
    xattrs: dict[str, bytes] = field(default_factory=dict)
    mtime: int = 1_700_000_000
    dev: tuple[int, int] = (0, 0)


def file(name: str, data: bytes = b"", **kw: Any) -> E:
    return E(name, "file", data, **kw)


def d(name: str, **kw: Any) -> E:
    return E(name, "dir", **kw)


def sym(name: str, target: str, **kw: Any) -> E:
    return E(name, "symlink", target=target, **kw)


def link(name: str, target: str, **kw: Any) -> E:
    return E(name, "hardlink", target=target, **kw)


def fifo(name: str, **kw: Any) -> E:
    return E(name, "fifo", **kw)


def chardev(name: str, major: int, minor: int, **kw: Any) -> E:
    return E(name, "char", dev=(major, minor), **kw)


def whiteout(path: str) -> E:
    parent, _, name = path.rpartition("/")
    return E((parent + "/" if parent else "") + ".wh." + name, "file", mode=0o644)


def opaque(dirpath: str) -> E:
    return E(dirpath.rstrip("/") + "/.wh..wh..opq", "file", mode=0o644)


_KIND = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
         "hardlink": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE, "char": tarfile.CHRTYPE,
         "block": tarfile.BLKTYPE}
_DEFAULT_MODE = {"file": 0o644, "dir": 0o755, "symlink": 0o777, "hardlink": 0o644,
                 "fifo": 0o644, "char": 0o600, "block": 0o600}


def tar_bytes(entries: Iterable[E], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8",
                      errors="surrogateescape") as tf:
        for e in entries:
            ti = tarfile.TarInfo(e.name)
            ti.type = _KIND[e.kind]
            ti.mode = _DEFAULT_MODE[e.kind] if e.mode is None else e.mode
            ti.uid, ti.gid, ti.mtime = e.uid, e.gid, e.mtime
            ti.linkname = e.target
            ti.devmajor, ti.devminor = e.dev
            if e.xattrs:
                ti.pax_headers = {"SCHILY.xattr." + k: v.decode("utf-8", "surrogateescape")
                                  for k, v in e.xattrs.items()}
            if e.kind == "file":
                ti.size = len(e.data)
                tf.addfile(ti, io.BytesIO(e.data))
            else:
                tf.addfile(ti)
    return buf.getvalue()


def busybox_entries(prefix: str = "") -> list[E]:
    with open(BUSYBOX, "rb") as f:
        data = f.read()
    return [
        d(prefix + "bin"),
        file(prefix + "bin/busybox", data, mode=0o755),
        sym(prefix + "bin/sh", "busybox"),
        sym(prefix + "bin/ls", "/bin/busybox"),
        d(prefix + "etc"),
        file(prefix + "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"),
        file(prefix + "etc/group", b"root:x:0:\n"),
        d(prefix + "tmp", mode=0o1777),
    ]


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def compress(data: bytes, kind: str) -> bytes:
    if kind == "gzip":
        return gzip.compress(data, mtime=0)
    if kind == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    return data


_LAYER_MT = {"none": "application/vnd.oci.image.layer.v1.tar",
             "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
             "zstd": "application/vnd.oci.image.layer.v1.tar+zstd"}


def write_blob(layout: str, data: bytes) -> str:
    digest = sha256(data)
    path = os.path.join(layout, "blobs", "sha256", digest[7:])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return digest


def oci_layout(layout: str, layers: list[bytes], tag: str = "latest", compression: str = "gzip",
               config: dict[str, Any] | None = None, arch: str = "amd64") -> dict[str, Any]:
    """Write an OCI image layout with ``layers`` (uncompressed tars); returns digests."""
    os.makedirs(layout, exist_ok=True)
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion":"1.0.0"}')
    descs = []
    for tar in layers:
        blob = compress(tar, compression)
        descs.append({"mediaType": _LAYER_MT[compression], "digest": write_blob(layout, blob),
                      "size": len(blob)})
    cfg = {"created": "2024-01-02T03:04:05Z", "architecture": arch, "os": "linux",
           "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]},
           "rootfs": {"type": "layers", "diff_ids": [sha256(t) for t in layers]},
           "history": [{"created": "2024-01-02T03:04:05Z", "created_by": f"layer {i}"}
                       for i in range(len(layers))]}
    cfg.update(config or {})
    cfg_raw = json.dumps(cfg).encode()
    cdigest = write_blob(layout, cfg_raw)
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": cdigest, "size": len(cfg_raw)},
                "layers": descs}
    mraw = json.dumps(manifest).encode()
    mdigest = write_blob(layout, mraw)
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                            "digest": mdigest, "size": len(mraw),
                            "annotations": {"org.opencontainers.image.ref.name": tag}}]}
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump(index, f)
    return {"config": cdigest, "manifest": mdigest, "layers": [x["digest"] for x in descs],
            "diff_ids": cfg["rootfs"]["diff_ids"]}


# -- tree snapshots ------------------------------------------------------------------------------

Tree = dict[str, tuple[Any, ...]]
_SKIP_XATTRS = ("security.selinux",)


def _xattrs_of(path: str) -> dict[str, bytes]:
    out = {}
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    for n in names:
        if n.startswith(_SKIP_XATTRS):
            continue
        try:
            out[n] = os.getxattr(path, n, follow_symlinks=False)
        except OSError:
            continue
    return out


def tree_of_dir(root: str, xattrs: bool = True) -> Tree:
    """path -> (type, mode, uid, gid, size, sha256, link target, rdev, xattrs)."""
    out: Tree = {}
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(dirs + files):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            kind = stat.S_IFMT(st.st_mode)
            size, digest, target = 0, "", ""
            if stat.S_ISREG(st.st_mode):
                size = st.st_size
                with open(full, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                target = os.readlink(full)
            rdev = st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else 0
            xa = tuple(sorted(_xattrs_of(full).items())) if xattrs else ()
            out[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, size, digest,
                        target, rdev, xa)
    return out


_TAR_KIND = {tarfile.REGTYPE: stat.S_IFREG, tarfile.AREGTYPE: stat.S_IFREG,
             tarfile.DIRTYPE: stat.S_IFDIR, tarfile.SYMTYPE: stat.S_IFLNK,
             tarfile.FIFOTYPE: stat.S_IFIFO, tarfile.CHRTYPE: stat.S_IFCHR,
             tarfile.BLKTYPE: stat.S_IFBLK}


def tree_of_tar(data: bytes, xattrs: bool = True) -> Tree:
    """The same snapshot for a flat (exported) tar; hardlinks take their target's content."""
    out: Tree = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:", encoding="utf-8",
                      errors="surrogateescape") as tf:
        for ti in tf:
            name = ti.name.rstrip("/")
            if name.startswith("./"):
                name = name[2:]
            if name in ("", "."):
                continue
            if ti.islnk():
                out[name] = out[ti.linkname.rstrip("/").removeprefix("./")]
                continue
            kind = _TAR_KIND[ti.type]
            size, digest, target = 0, "", ""
            if ti.isreg():
                f = tf.extractfile(ti)
                assert f is not None
                body = f.read()
                size, digest = len(body), hashlib.sha256(body).hexdigest()
            elif ti.issym():
                target = ti.linkname
            rdev = os.makedev(ti.devmajor, ti.devminor) if ti.ischr() or ti.isblk() else 0
            xa = tuple(sorted(
                (k[len("SCHILY.xattr."):], v.encode("utf-8", "surrogateescape"))
                for k, v in ti.pax_headers.items()
                if k.startswith("SCHILY.xattr.") and not k[13:].startswith(_SKIP_XATTRS)
            )) if xattrs else ()
            out[name] = (kind, ti.mode & 0o7777, ti.uid, ti.gid, size, digest, target, rdev, xa)
    return out


def diff_trees(a: Tree, b: Tree) -> list[str]:
    """Human-readable differences (empty when equal)."""
    out = []
    for k in sorted(set(a) | set(b)):
        if k not in a:
            out.append(f"only in second: {k} {b[k][:4]}")
        elif k not in b:
            out.append(f"only in first: {k} {a[k][:4]}")
        elif a[k] != b[k]:
            out.append(f"differs: {k}: {a[k]} != {b[k]}")
    return out


def listing(root: str) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with (size, mtime_ns): a store snapshot for "nothing
    changed" assertions."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            out[os.path.relpath(full, root)] = (st.st_size, st.st_mtime_ns)
    return out


def sample_layers() -> list[bytes]:
    """A four-layer image exercising the layer rules: busybox, whiteouts, an opaque dir, a
    whited-out tree re-created, hardlinks, symlinks of every kind, a FIFO, xattrs, setuid and
    sticky modes, owners, a device node."""
    entries = [
        busybox_entries() + [
            d("etc/app"), file("etc/app/conf", b"v1"), file("etc/app/old", b"old"),
            d("var/lib/data"), file("var/lib/data/a", b"a"), file("var/lib/data/b", b"b"),
            file("usr/bin/tool", b"#!/bin/sh\necho tool\n", mode=0o4755),
            file("shared", b"shared data"), link("shared-link", "shared"),
        ],
        [
            file("etc/app/conf", b"v2"), whiteout("etc/app/old"),
            opaque("var/lib/data"), file("var/lib/data/c", b"c"),
            sym("bin/abs", "/bin/busybox"), sym("bin/dangling", "../nowhere"),
            sym("loop1", "loop2"), sym("loop2", "loop1"),
            fifo("run/fifo"), file("xattrs", b"x", xattrs={"user.k": b"v"}),
        ],
        [
            whiteout("usr"), d("usr/local"), file("usr/local/new", b"new"),
            file("etc/app/conf", b"v3", mode=0o600, uid=1000, gid=1000),
            d("tmp", mode=0o1777),
        ],
        [chardev("dev/null", 1, 3, mode=0o666)],
    ]
    return [tar_bytes(e) for e in entries]


# -- image archives ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Symlink:
    """A symlink member of an archive (skopeo's docker-archive has them)."""

    target: str


def archive_bytes(members: dict[str, bytes | Symlink]) -> bytes:
    """An (uncompressed) archive tar with ``members`` in order: bytes are files."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, value in members.items():
            ti = tarfile.TarInfo(name)
            if isinstance(value, Symlink):
                ti.type, ti.linkname = tarfile.SYMTYPE, value.target
                tf.addfile(ti)
            else:
                ti.size = len(value)
                tf.addfile(ti, io.BytesIO(value))
    return buf.getvalue()


def image_config(diff_ids: list[str], **extra: Any) -> bytes:
    cfg = {"created": "2024-01-02T03:04:05Z", "architecture": "amd64", "os": "linux",
           "config": {"Cmd": ["/bin/sh"]},
           "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    cfg.update(extra)
    return json.dumps(cfg).encode()


def docker_archive(layers: list[bytes], tags: list[str] | None = None,
                   config: bytes | None = None) -> dict[str, bytes | Symlink]:
    """The members of a classic docker-archive (``<v1id>/layer.tar``, ``<hex>.json``) for
    ``layers`` (tars, stored as given); ``config`` defaults to one naming their diff_ids."""
    cfg = config if config is not None else image_config([sha256(t) for t in layers])
    members: dict[str, bytes | Symlink] = {}
    paths = []
    for i, tar in enumerate(layers):
        v1 = hashlib.sha256(b"v1 %d" % i + tar[:64]).hexdigest()
        members[f"{v1}/VERSION"] = b"1.0"
        members[f"{v1}/layer.tar"] = tar
        paths.append(f"{v1}/layer.tar")
    cfg_name = sha256(cfg)[7:] + ".json"
    members[cfg_name] = cfg
    members["manifest.json"] = json.dumps(
        [{"Config": cfg_name, "RepoTags": tags or None, "Layers": paths}]).encode()
    return members
