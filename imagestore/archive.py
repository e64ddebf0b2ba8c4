"""Image archives: ``save``/``load`` (docker-archive and OCI layout).

Load reads every form ``docker load`` reads: the classic docker-archive (``manifest.json`` +
``<v1id>/layer.tar``), skopeo's variant with in-archive symlinks, Docker 25+'s (an OCI layout
inside), the containerd store's (compressed layers), and plain OCI layouts as a tar or a
directory.  The archive is read in place (a compressed archive or stdin is first spooled,
decompressed, into the store's tmp/), every digest and diff_id is verified, and an image
becomes visible only when all of it is stored.

Save writes Docker 25+'s docker-archive (uncompressed layers, ``manifest.json`` and an OCI
layout side by side) or, with ``--format oci``, an OCI image layout archive holding the stored
manifest and blobs as they are (docker-typed manifests are rewritten with OCI media types).

Caveats:
* Paths inside an archive are resolved within it: absolute names, ``..`` and symlinks leading
  out are refused (``InvalidImage``).
* Pre-1.10 archives (``repositories`` only) are refused with a clear error.
"""

from __future__ import annotations

import contextlib
import io
import os
import posixpath
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

from unionfs.tarlayer import CheckedTarInfo

from . import gc, images, oci, reference
from .compress import NONE, DecompressReader, sniff
from .digest import Digest, Hasher, parse_digest, sha256_bytes
from .errors import DigestMismatch, InvalidImage, InvalidReference, StoreError, Unsupported
from .fsutil import disk_full_guard
from .images import Image
from .progress import ProgressFactory
from .reference import Reference
from .tarstream import DIR, REG, TarEntry, TarWriter

if TYPE_CHECKING:
    from .api import Store

Sink = Callable[[bytes], object]
# called with a layer's diff_id and the size of its blob in the archive; returns the callback
# that gets the size of every chunk read (or None)
_MAX_LINK_HOPS = 40


@dataclass(frozen=True)
class _Member:
    offset: int
    size: int
    kind: str  # "file", "dir", "symlink", "link"
    target: str = ""


class _Range(io.RawIOBase):
    def __init__(self, f: BinaryIO, offset: int, size: int) -> None:
        self._f, self._pos, self._end = f, offset, offset + size

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = min(len(b), self._end - self._pos)
        if n <= 0:
            return 0
        data = os.pread(self._f.fileno(), n, self._pos)
        if not data:
            raise InvalidImage("archive is truncated")
        b[: len(data)] = data
        self._pos += len(data)
        return len(data)


def _clean(name: str) -> str:
    if name.startswith("/"):
        raise InvalidImage(f"archive entry {name!r} has an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise InvalidImage(f"archive entry {name!r} points outside the archive")
    return "/".join(parts)


def _follow(link: str, target: str) -> str:
    """The archive path the symlink ``link`` -> ``target`` names (skopeo writes
    ``<v1id>/layer.tar -> ../<diffid>.tar``); raises when it leads out of the archive."""
    if target.startswith("/"):
        raise InvalidImage(f"archive symlink {link!r} points outside the archive")
    parts: list[str] = []
    for p in [*posixpath.dirname(link).split("/"), *target.split("/")]:
        if p == "..":
            if not parts:
                raise InvalidImage(f"archive symlink {link!r} points outside the archive")
            parts.pop()
        elif p not in ("", "."):
            parts.append(p)
    return "/".join(parts)


class _TarSource:
    """Members of an uncompressed tar, read in place by offset."""

    def __init__(self, path: str) -> None:
        self._f = open(path, "rb")  # noqa: SIM115 - closed by close()
        self.members: dict[str, _Member] = {}
        try:
            with tarfile.open(fileobj=self._f, mode="r:", encoding="utf-8",
                              errors="surrogateescape", tarinfo=CheckedTarInfo) as tf:
                for ti in tf:
                    name = _clean(ti.name)
                    if ti.isreg():
                        m = _Member(ti.offset_data, ti.size, "file")
                    elif ti.isdir():
                        m = _Member(0, 0, "dir")
                    elif ti.issym():
                        m = _Member(0, 0, "symlink", ti.linkname)
                    elif ti.islnk():
                        m = _Member(0, 0, "link", _clean(ti.linkname))
                    else:
                        continue
                    self.members[name] = m
        except (tarfile.TarError, ValueError, ArithmeticError, UnicodeError) as exc:
            self._f.close()
            raise InvalidImage(f"not a valid image archive: {exc}") from None
        except RecursionError:
            self._f.close()
            raise InvalidImage("not a valid image archive: too many chained extended "
                               "headers") from None
        except BaseException:
            self._f.close()
            raise
        size = os.fstat(self._f.fileno()).st_size
        for name, m in self.members.items():
            if m.kind == "file" and m.offset + m.size > size:
                self._f.close()
                raise InvalidImage(f"archive is truncated (entry {name!r})")

    def _resolve(self, name: str) -> _Member:
        path = _clean(name)
        for _ in range(_MAX_LINK_HOPS):
            m = self.members.get(path)
            if m is None:
                raise InvalidImage(f"archive has no entry {name!r}")
            if m.kind == "file":
                return m
            if m.kind == "link":
                path = m.target
            elif m.kind == "symlink":
                path = _follow(path, m.target)
            else:
                raise InvalidImage(f"archive entry {name!r} is a directory")
        raise InvalidImage(f"too many levels of links resolving {name!r} in the archive")

    def exists(self, name: str) -> bool:
        return _clean(name) in self.members

    def open(self, name: str) -> BinaryIO:
        m = self._resolve(name)
        return io.BufferedReader(_Range(self._f, m.offset, m.size), 1 << 20)

    def size(self, name: str) -> int:
        return self._resolve(name).size

    def close(self) -> None:
        self._f.close()


class _DirSource:
    """An OCI layout directory."""

    def __init__(self, path: str) -> None:
        self.root = os.path.realpath(path)

    def _path(self, name: str) -> str:
        full = os.path.realpath(os.path.join(self.root, _clean(name)))
        if not full.startswith(self.root + os.sep):
            raise InvalidImage(f"layout entry {name!r} points outside the layout")
        return full

    def exists(self, name: str) -> bool:
        return os.path.exists(self._path(name))

    def open(self, name: str) -> BinaryIO:
        try:
            return open(self._path(name), "rb")
        except (FileNotFoundError, IsADirectoryError):
            raise InvalidImage(f"layout has no file {name!r}") from None

    def size(self, name: str) -> int:
        try:
            return os.path.getsize(self._path(name))
        except FileNotFoundError:
            raise InvalidImage(f"layout has no file {name!r}") from None

    def close(self) -> None:
        pass


_Source = _TarSource | _DirSource


def _read(src: _Source, name: str, limit: int = oci.MAX_DOCUMENT) -> bytes:
    if src.size(name) > limit:
        raise InvalidImage(f"archive entry {name!r} is larger than {limit} bytes")
    with src.open(name) as f:
        return f.read()


def _blob_path(digest: Digest) -> str:
    algo, _, hexpart = digest.partition(":")
    return f"blobs/{algo}/{hexpart}"


def _read_blob(src: _Source, desc: oci.Descriptor) -> bytes:
    if desc.size > oci.MAX_DOCUMENT:
        raise InvalidImage(f"{desc.digest} is larger than {oci.MAX_DOCUMENT} bytes")
    data = _read(src, _blob_path(desc.digest))
    h = Hasher(desc.digest.partition(":")[0])
    h.update(data)
    h.verify(desc.digest, desc.size, what=desc.media_type or "blob")
    return data


@dataclass(frozen=True)
class Loaded:
    image: Image
    tags: tuple[Reference, ...]


@contextlib.contextmanager
def _open_source(store: Store, source: str | BinaryIO) -> Iterator[_Source]:
    """The archive ``source`` (a path, a directory, or a stream) as a ``_Source``; a
    compressed archive or a stream is spooled, decompressed, into tmp/ first."""
    if isinstance(source, str) and os.path.isdir(source):
        yield _DirSource(source)
        return
    spooled: str | None = None
    try:
        stream = source if not isinstance(source, str) else open_input(source)
        try:
            head = stream.read(8)
            reader = DecompressReader(stream, head=head, limit=store.max_layer_size)
            if reader.kind == NONE and isinstance(source, str):
                tar_path = source
            else:
                fd, spooled = tempfile.mkstemp(dir=store.blobs.tmp_dir, prefix="load-")
                with disk_full_guard("the archive"), os.fdopen(fd, "wb") as out:
                    shutil.copyfileobj(reader, out, 1 << 20)
                tar_path = spooled
        finally:
            if isinstance(source, str):
                stream.close()
        src = _TarSource(tar_path)
        try:
            yield src
        finally:
            src.close()
    finally:
        if spooled:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(spooled)


def open_input(path: str) -> BinaryIO:
    """A file argument as a binary stream; ``InvalidImage`` when it cannot be read."""
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise InvalidImage(f"open {path}: no such file or directory") from None
    except IsADirectoryError:
        raise InvalidImage(f"{path} is a directory") from None
    except OSError as exc:
        raise InvalidImage(f"open {path}: {(exc.strerror or str(exc)).lower()}") from None


def load(store: Store, source: str | BinaryIO, platform: oci.Platform | None = None,
         progress: ProgressFactory | None = None) -> list[Loaded]:
    """``docker load``: every image in the archive ``source`` (a path or a stream)."""
    with gc.ingesting(store), _open_source(store, source) as src:
        if src.exists("manifest.json"):
            return _load_docker(store, src, progress)
        if src.exists("index.json"):
            return _load_oci(store, src, platform or oci.host_platform(), progress)
        if src.exists("repositories"):
            raise Unsupported("pre-1.10 docker-archive (no manifest.json) is not supported")
        raise InvalidImage("not an image archive: it has neither manifest.json nor index.json")


def _ingest_layer(store: Store, src: _Source, name: str, diff_id: Digest,
                  desc: oci.Descriptor | None, typed: bool,
                  progress: ProgressFactory | None) -> oci.Descriptor:
    """Store one layer; ``desc`` checks the blob (``typed``: its media type is authoritative,
    else the type follows the compression found)."""
    if desc is not None and store.layers.has(diff_id) and store.blobs.has(desc.digest):
        if typed:
            return desc
        with store.blobs.open(desc.digest) as f:
            kind = sniff(f.read(8))
        return oci.Descriptor(oci.layer_media_type(kind), desc.digest, desc.size)
    cb = progress(diff_id, src.size(name)) if progress else None
    with src.open(name) as f:
        got = store.layers.ingest(f, digest=desc.digest if desc else None,
                                  size=desc.size if desc else None, diff_id=diff_id,
                                  progress=cb)
    media = desc.media_type if desc and typed else oci.layer_media_type(got.compression)
    return oci.Descriptor(media, got.digest, got.size)


def _oci_manifests(src: _Source) -> dict[str, tuple[bytes, str]]:
    """Manifests of an OCI layout in the archive, by config digest (for Docker 25+ archives)."""
    out: dict[str, tuple[bytes, str]] = {}
    if not src.exists("index.json"):
        return out
    with contextlib.suppress(StoreError):
        index = oci.parse_document(_read(src, "index.json"), what="index.json")
        todo = list(index.manifests) if isinstance(index, oci.Index) else []
        while todo:
            desc = todo.pop()
            with contextlib.suppress(StoreError):
                doc = oci.parse_document(_read_blob(src, desc), desc.media_type)
                if isinstance(doc, oci.Index):
                    todo.extend(doc.manifests)
                else:
                    out[doc.config.digest] = (doc.raw, doc.media_type)
    return out


def _load_docker(store: Store, src: _Source,
                 progress: ProgressFactory | None) -> list[Loaded]:
    doc = oci.loads(_read(src, "manifest.json"), "manifest.json")
    if not isinstance(doc, list) or not all(isinstance(e, dict) for e in doc):
        raise InvalidImage("manifest.json must be a list of objects")
    known = _oci_manifests(src)
    out = []
    for entry in doc:
        cfg_path, layer_paths = entry.get("Config"), entry.get("Layers")
        if not isinstance(cfg_path, str) or not isinstance(layer_paths, list) or not all(
                isinstance(p, str) for p in layer_paths):
            raise InvalidImage("manifest.json entry needs Config and Layers paths")
        config_raw = _read(src, cfg_path)
        cdigest = sha256_bytes(config_raw)
        stem = posixpath.basename(cfg_path).removesuffix(".json")
        if len(stem) == 64 and all(c in "0123456789abcdef" for c in stem) and \
                stem != cdigest.partition(":")[2]:
            raise DigestMismatch(f"config {cfg_path} hashes to {cdigest}")
        config = oci.ImageConfig.parse(config_raw, cdigest)
        if len(layer_paths) != len(config.diff_ids):
            raise InvalidImage(f"manifest.json lists {len(layer_paths)} layers but the config "
                               f"has {len(config.diff_ids)} diff_ids")
        reuse = known.get(cdigest)
        reuse_layers = oci.parse_manifest(reuse[0], reuse[1]).layers if reuse else None
        descs = []
        for i, (path, diff_id) in enumerate(zip(layer_paths, config.diff_ids, strict=True)):
            hint = _named_blob(path, src)
            typed = False
            if reuse_layers is not None and i < len(reuse_layers) and hint is not None \
                    and reuse_layers[i].digest == hint.digest:
                hint, typed = reuse_layers[i], True
            descs.append(_ingest_layer(store, src, path, diff_id, hint, typed, progress))
        store.blobs.put(config_raw)
        if reuse and [d.digest for d in oci.parse_manifest(*reuse).layers] == \
                [d.digest for d in descs]:
            manifest_raw, media = reuse
        else:
            manifest_raw = oci.manifest_bytes(
                oci.Descriptor(oci.OCI_CONFIG, cdigest, len(config_raw)), descs)
            media = oci.OCI_MANIFEST
        raw_tags = entry.get("RepoTags") or []
        if not isinstance(raw_tags, list) or not all(isinstance(t, str) for t in raw_tags):
            raise InvalidImage("manifest.json RepoTags must be a list of strings")
        tags = tuple(reference.parse_repo_tag(t) for t in raw_tags)
        image = images.record(store, manifest_raw, media, tags=tags)
        out.append(Loaded(image, tags))
    return out


def _named_blob(path: str, src: _Source) -> oci.Descriptor | None:
    """A layer at ``blobs/sha256/<hex>`` is named by its digest: a descriptor lets an already
    stored layer be skipped and the blob be verified against the name."""
    parts = _clean(path).split("/")
    if len(parts) == 3 and parts[0] == "blobs":
        try:
            digest = parse_digest(f"{parts[1]}:{parts[2]}")
        except InvalidReference:
            return None
        return oci.Descriptor(oci.OCI_LAYER, digest, src.size(path))
    return None


def _oci_name(desc: oci.Descriptor) -> Reference | None:
    name = desc.annotations.get(oci.CONTAINERD_NAME)
    if not name:
        name = desc.annotations.get(oci.REF_NAME, "")
        if "/" not in name and ":" not in name:
            return None  # a bare tag names no repository
    try:
        return reference.parse_repo_tag(name)
    except InvalidReference:
        return None


def _load_oci(store: Store, src: _Source, want: oci.Platform,
              progress: ProgressFactory | None) -> list[Loaded]:
    index = oci.parse_document(_read(src, "index.json"), what="index.json")
    if not isinstance(index, oci.Index):
        raise InvalidImage("index.json is not an image index")
    out = []
    for top in index.manifests:
        desc = top
        for _ in range(4):
            if desc.media_type not in oci.INDEX_TYPES:
                break
            nested = oci.parse_document(_read_blob(src, desc), desc.media_type)
            assert isinstance(nested, oci.Index)
            chosen = oci.select_platform(nested.manifests, want)
            if chosen is None:
                have = ", ".join(str(m.platform) for m in nested.manifests if m.platform)
                raise Unsupported(f"no image for platform {want} (the index has: {have})")
            desc = chosen
        if desc.media_type not in oci.MANIFEST_TYPES:
            continue  # artifacts and attestations are not images
        manifest = oci.parse_manifest(_read_blob(src, desc), desc.media_type)
        config_raw = _read_blob(src, manifest.config)
        config = oci.ImageConfig.parse(config_raw, manifest.config.digest)
        if len(manifest.layers) != len(config.diff_ids):
            raise InvalidImage(f"manifest has {len(manifest.layers)} layers but the config "
                               f"lists {len(config.diff_ids)} diff_ids")
        for ldesc, diff_id in zip(manifest.layers, config.diff_ids, strict=True):
            _ingest_layer(store, src, _blob_path(ldesc.digest), diff_id, ldesc, True, progress)
        store.blobs.put(config_raw)
        name = _oci_name(top)
        tags = (name,) if name else ()
        image = images.record(store, manifest.raw, manifest.media_type, tags=tags)
        out.append(Loaded(image, tags))
    return out


def save_targets(store: Store, names: Sequence[str | Image]
                 ) -> list[tuple[Image, list[Reference]]]:
    """What ``docker save`` writes for ``names``: a tag saves that tag, a bare repository every
    tag of it, an ID the image without tags, an ``Image`` the image with all its tags."""
    out: dict[str, tuple[Image, list[Reference]]] = {}

    def add(image: Image, ref: Reference | None) -> None:
        entry = out.setdefault(image.id, (image, []))
        if ref is not None and ref not in entry[1]:
            entry[1].append(ref)

    for name in names:
        if isinstance(name, Image):
            for t in name.tags or (None,):
                add(name, t)
            continue
        try:
            ref: Reference | None = reference.parse(name, default_tag=False)
        except InvalidReference:
            ref = None
        if ref is not None and ref.digest is None and ref.tag is None:
            tagged = [(i, t) for i in store.images() for t in i.tags if t.name == ref.name]
            for image, t in tagged:
                add(image, t)
            if tagged:
                continue
        image = store.resolve(name)
        named = ref is not None and ref.digest is None and ref.with_tag(
            ref.tag or "latest") in image.tags
        add(image, ref.with_tag(ref.tag or "latest") if named and ref else None)
    return list(out.values())


# -- save ----------------------------------------------------------------------------------------


def _dir(name: str) -> TarEntry:
    return TarEntry(name=name, typeflag=DIR, mode=0o755)


def _file(w: TarWriter, name: str, data: bytes) -> None:
    w.add(TarEntry(name=name, typeflag=REG, mode=0o644, size=len(data)), [data])


def _stream(f: BinaryIO) -> Iterator[bytes]:
    while chunk := f.read(1 << 20):
        yield chunk


def _copy_blob(w: TarWriter, store: Store, digest: Digest, path: str | None = None) -> None:
    with store.blobs.open(digest) as f:
        size = os.fstat(f.fileno()).st_size
        w.add(TarEntry(name=path or _blob_path(digest), typeflag=REG, mode=0o644, size=size),
              _stream(f))


def save_docker(store: Store, images: Sequence[tuple[Image, Sequence[Reference]]],
                sink: Sink) -> None:
    """Docker 25+'s docker-archive: uncompressed layers, manifest.json and an OCI layout."""
    w = TarWriter(sink)
    w.add(_dir("blobs"))
    w.add(_dir("blobs/sha256"))
    written: set[str] = set()
    manifest_json: list[dict[str, Any]] = []
    index_entries: list[oci.Descriptor] = []
    repositories: dict[str, dict[str, str]] = {}
    for image, tags in images:
        layer_descs = []
        for diff_id in image.diff_ids:
            info = store.layers.info(diff_id)
            layer_descs.append(oci.Descriptor(oci.OCI_LAYER, diff_id, info.size))
            if diff_id not in written:
                with open(store.layers.tar_path(diff_id), "rb") as f:
                    w.add(TarEntry(name=_blob_path(diff_id), typeflag=REG, mode=0o644,
                                   size=info.size), _stream(f))
                written.add(diff_id)
        cfg_desc = oci.Descriptor(oci.OCI_CONFIG, image.id, len(image.config.raw))
        if image.id not in written:
            _file(w, _blob_path(image.id), image.config.raw)
            written.add(image.id)
        mraw = oci.manifest_bytes(cfg_desc, layer_descs)
        mdigest = sha256_bytes(mraw)
        if mdigest not in written:
            _file(w, _blob_path(mdigest), mraw)
            written.add(mdigest)
        plat = image.config.platform
        named: list[Reference | None] = list(tags) or [None]
        for t in named:
            ann = {}
            if t is not None:
                ann = {oci.CONTAINERD_NAME: str(t), oci.REF_NAME: t.tag or "latest"}
                repositories.setdefault(t.familiar_name, {})[t.tag or "latest"] = \
                    image.diff_ids[-1].partition(":")[2] if image.diff_ids else ""
            index_entries.append(oci.Descriptor(oci.OCI_MANIFEST, mdigest, len(mraw), ann,
                                                plat if plat.os else None))
        manifest_json.append({
            "Config": _blob_path(image.id),
            "RepoTags": [t.familiar for t in tags] or None,
            "Layers": [_blob_path(d) for d in image.diff_ids],
        })
    _file(w, "index.json", oci.index_bytes(index_entries))
    _file(w, "manifest.json", oci.dumps(manifest_json))
    _file(w, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
    _file(w, "repositories", oci.dumps(repositories))
    w.close()


_TO_OCI = {
    oci.DOCKER_LAYER: oci.OCI_LAYER, oci.DOCKER_LAYER_GZIP: oci.OCI_LAYER_GZIP,
    oci.DOCKER_LAYER_ZSTD: oci.OCI_LAYER_ZSTD, oci.DOCKER_FOREIGN_GZIP: oci.OCI_LAYER_ND + "+gzip",
}


def as_oci_manifest(image: Image) -> tuple[bytes, oci.Descriptor]:
    """The image's manifest in OCI media types (the stored bytes when already OCI)."""
    m = image.manifest
    if m.is_oci:
        return m.raw, oci.Descriptor(oci.OCI_MANIFEST, image.manifest_desc.digest, len(m.raw))
    cfg = oci.Descriptor(oci.OCI_CONFIG, m.config.digest, m.config.size)
    layers = [oci.Descriptor(_TO_OCI.get(x.media_type, x.media_type), x.digest, x.size,
                             x.annotations, None, x.urls) for x in m.layers]
    raw = oci.manifest_bytes(cfg, layers, annotations=m.annotations)
    return raw, oci.Descriptor(oci.OCI_MANIFEST, sha256_bytes(raw), len(raw))


def save_oci(store: Store, images: Sequence[tuple[Image, Sequence[Reference]]],
             sink: Sink) -> None:
    """An OCI image layout archive with the stored blobs as they are."""
    w = TarWriter(sink)
    _file(w, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
    w.add(_dir("blobs"))
    w.add(_dir("blobs/sha256"))
    written: set[str] = set()
    entries = []
    for image, tags in images:
        mraw, mdesc = as_oci_manifest(image)
        for d in [*(x.digest for x in image.manifest.layers), image.id]:
            if d not in written:
                _copy_blob(w, store, d)
                written.add(d)
        if mdesc.digest not in written:
            _file(w, _blob_path(mdesc.digest), mraw)
            written.add(mdesc.digest)
        plat = image.config.platform
        named: list[Reference | None] = list(tags) or [None]
        for t in named:
            ann = {oci.REF_NAME: t.tag or "latest", oci.CONTAINERD_NAME: str(t)} if t else {}
            entries.append(oci.Descriptor(oci.OCI_MANIFEST, mdesc.digest, mdesc.size, ann,
                                          plat if plat.os else None))
    _file(w, "index.json", oci.index_bytes(entries))
    w.close()
