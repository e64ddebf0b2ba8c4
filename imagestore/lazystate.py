"""The on-disk state of lazily pulled layers: ``<root>/lazy/<blob hex>/``.

A layer pulled with ``--lazy`` is kept, until it is complete, as::

    meta.json   the layer descriptor, diff_id, format, where to fetch it from; once built,
                the entry count and content size
    toc         the TOC JSON as verified at pull time (``toc.head``: eStargz's tar header)
    index       the entry index built from the TOC (unionfs.layerindex format)
    files       the chunk table: per regular file, where its chunks lie (seekable.dump_files)
    blob        a sparse file the size of the compressed blob; fetched bytes at their offsets
    ranges      an append-only log of the byte ranges of ``blob`` that are present
    complete    written once every byte is present and the blob matched its digest

and ``<root>/lazy/diff_ids/<diff_id hex>``, a symlink to it, so a layer is found by its
diff_id (``LayerStore.describe``), as the layers of an image are named.

A range is logged only after its bytes are written, fsynced and (for chunk data) verified
against the TOC's chunk digest, so a crash never leaves a partial chunk visible: a range that is
not logged is fetched again.  Each log record (24 bytes) carries a CRC; a torn last record is
dropped.  ``VERIFIED`` ranges hold chunk data checked against its digest; ``RAW`` ranges hold
what the background completion fetched unchecked (and the TOC region the pull fetched): a read
checks each chunk of them when it first decompresses it, and the complete blob is checked as a
whole.

The directory is assembled in ``tmp/`` and renamed into place, so a visible state is whole.
A pull stores the TOC checked but not parsed: ``ready`` — called where the layer is first used,
most often by the planning process of its first mount, which otherwise waits for its daemon's
imports — parses it and writes ``index`` and ``files``, then ``meta.json`` saying so.  A TOC
that the parser or the tar indexer's rules refuse is found there too (``SeekableError``): the
layer is then fetched whole (``lazypull.fetch_whole``).

Caveats:
* Several processes may fetch into the same state (a mount and a pull): writes of the same
  verified bytes to the same offsets are idempotent, and each process re-reads the log
  (``refresh``) before fetching what another may have fetched already.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile
import threading
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from unionfs.layerindex import _ROW, LayerIndex
from unionfs.tarheaders import LayerError

from . import oci
from .digest import Digest, sha256_hex
from .errors import DigestMismatch, ImageNotFound, InvalidImage, InvalidLayer, StoreError
from .fsutil import disk_full_guard, fsync_dir, fsync_path

if TYPE_CHECKING:
    from .layerstore import LayerStore

log = logging.getLogger(__name__)

VERIFIED, RAW = 1, 2
_REC = struct.Struct("<QQB3xI")


@dataclass(frozen=True)
class LazyInfo:
    digest: Digest  # the blob's
    diff_id: Digest
    size: int  # the blob's
    media_type: str
    format: str
    content: int  # bytes of file data (as LayerInfo.content); the TOC's count until built
    entries: int  # -1 until built (``LazyStore.ready``)
    source: dict[str, str]  # domain, api_host, path: where the blob is fetched from
    annotations: dict[str, str]
    toc_file: int = -1  # the file number of the TOC's own tar entry (eStargz), served locally
    prefetch_end: int = 0  # files whose data starts before this are fetched first

    @property
    def built(self) -> bool:
        return self.entries >= 0

    @property
    def descriptor(self) -> oci.Descriptor:
        return oci.Descriptor(self.media_type, self.digest, self.size,
                              annotations=self.annotations)


@dataclass(frozen=True)
class CheckedToc:
    """A TOC as ``pull --lazy`` stores it: checked against the layer's annotation, not parsed
    (``estargz.check_toc``, ``zstdchunked.check_toc``)."""

    format: str
    raw: bytes  # the TOC JSON
    offset: int  # where the TOC region starts in the blob (what ``parse_toc`` takes)
    head: bytes = b""  # eStargz: the tar header of the TOC's own entry
    content: int = 0  # the file data it lists (``seekable.content_size``), for the record


def _info_of(d: dict[str, Any]) -> LazyInfo:
    """A state's ``meta.json``, read."""
    return LazyInfo(Digest(d["digest"]), Digest(d["diff_id"]), int(d["size"]),
                    str(d["media_type"]), str(d["format"]), int(d.get("content", 0)),
                    int(d.get("entries", -1)), dict(d["source"]),
                    dict(d.get("annotations", {})), int(d.get("toc_file", -1)),
                    int(d.get("prefetch_end", 0)))


class Ranges:
    """Sorted, merged, disjoint half-open byte ranges."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    def add(self, start: int, end: int) -> None:
        if start >= end:
            return
        i = bisect.bisect_left(self.ends, start)
        j = bisect.bisect_right(self.starts, end)
        if i < j:
            start = min(start, self.starts[i])
            end = max(end, self.ends[j - 1])
        self.starts[i:j] = [start]
        self.ends[i:j] = [end]

    def covers(self, start: int, end: int) -> bool:
        i = bisect.bisect_right(self.starts, start) - 1
        return i >= 0 and self.ends[i] >= end

    def gaps(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        """The parts of [start, end) not covered."""
        pos = start
        i = max(0, bisect.bisect_right(self.starts, start) - 1)
        while pos < end and i < len(self.starts):
            s, e = self.starts[i], self.ends[i]
            if s > pos:
                yield pos, min(s, end)
            pos = max(pos, e)
            i += 1
        if pos < end:
            yield pos, end

    def total(self) -> int:
        return sum(e - s for s, e in zip(self.starts, self.ends, strict=True))


class LazyStore:
    """Every lazily pulled layer of one store."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.dir = os.path.join(root, "lazy", "sha256")
        self.by_diff_id = os.path.join(root, "lazy", "diff_ids")
        self.tmp_dir = os.path.join(root, "tmp")

    def path(self, digest: str) -> str:
        return os.path.join(self.dir, sha256_hex(Digest(digest)))

    def has(self, digest: str) -> bool:
        return os.path.exists(os.path.join(self.path(digest), "meta.json"))

    def digests(self) -> list[Digest]:
        try:
            names = sorted(os.listdir(self.dir))
        except FileNotFoundError:
            return []
        return [Digest("sha256:" + n) for n in names if len(n) == 64]

    def info(self, digest: str) -> LazyInfo:
        return _info_of(self._meta(digest))

    def _meta(self, digest: str) -> dict[str, Any]:
        try:
            with open(os.path.join(self.path(digest), "meta.json"), "rb") as f:
                d: dict[str, Any] = json.loads(f.read())
        except FileNotFoundError:
            raise ImageNotFound(f"lazy layer {digest} is missing from the store") from None
        except ValueError as exc:
            raise InvalidLayer(f"lazy layer {digest}: bad meta.json ({exc})") from None
        return d

    def ready(self, digest: str) -> LazyInfo:
        """The layer's info once its index and chunk table are built (built now from the
        stored TOC if they are not yet; raises SeekableError for a TOC that cannot serve,
        InvalidLayer for a damaged state).  Several processes may build at once: each writes
        the same files and renames them into place, ``meta.json`` (which says "built") only
        once the others are there for good."""
        meta = self._meta(digest)
        info = _info_of(meta)
        if info.built:
            return info
        from .seekable import ESTARGZ, dump_files, parse_toc

        path = self.path(digest)
        try:
            with open(os.path.join(path, "toc"), "rb") as f:
                raw = f.read()
            if info.format == ESTARGZ:
                from .estargz import TOC_ANNOTATION, toc_from

                with open(os.path.join(path, "toc.head"), "rb") as f:
                    toc = toc_from(raw, f.read(), int(meta["toc_offset"]),
                                   info.annotations[TOC_ANNOTATION])
            else:
                toc = parse_toc(raw, info.format, int(meta["toc_offset"]))
        except (OSError, ValueError, KeyError) as exc:
            raise InvalidLayer(f"lazy layer {digest}: its state is damaged ({exc}); pull "
                               "the image again") from None
        index = toc.index()
        meta.update(content=index.content_size(), entries=len(index), toc_file=toc.toc_file,
                    prefetch_end=toc.prefetch_end)
        tag = f".{os.getpid()}.{threading.get_ident()}.tmp"
        names = ("index", "files", "meta.json")
        try:
            with disk_full_guard("a lazy layer"):
                index.dump(os.path.join(path, "index" + tag), sync=False)
                _write(os.path.join(path, "files" + tag), dump_files(toc.files), sync=False)
                _write(os.path.join(path, "meta.json" + tag),
                       json.dumps(meta, indent=1).encode(), sync=False)
                for name in names:  # synced together: one journal commit
                    fsync_path(os.path.join(path, name + tag))
                for name in names[:2]:
                    os.rename(os.path.join(path, name + tag), os.path.join(path, name))
                fsync_dir(path)  # the index and the chunk table in place, for good: then
                os.rename(os.path.join(path, "meta.json" + tag), os.path.join(path,
                                                                              "meta.json"))
                fsync_dir(path)
        finally:
            for name in names:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(path, name + tag))
        return _info_of(meta)

    def _link(self, diff_id: str) -> str:
        return os.path.join(self.by_diff_id, sha256_hex(Digest(diff_id)))

    def for_diff_id(self, diff_id: str) -> Digest | None:
        """The blob digest of the lazy layer whose tar is ``diff_id``, if there is one."""
        try:
            target = os.readlink(self._link(diff_id))
        except OSError:
            return None
        digest = Digest("sha256:" + os.path.basename(target))
        return digest if self.has(digest) else None

    def describe(self, diff_id: str) -> dict[str, Any] | None:
        """The lazy layer of ``diff_id`` as a layer description (``unionfs.layerkinds``,
        opened by ``lazylayer.open_layer``), or None; built first (``ready``: SeekableError
        for a TOC that cannot serve)."""
        digest = self.for_diff_id(diff_id)
        if digest is None:
            return None
        self.ready(digest)
        return {"kind": "lazy", "opener": "imagestore.lazylayer:open_layer", "root": self.root,
                "digest": digest, "name": diff_id}

    def layer_for(self, digest: str, diff_id: str) -> LazyInfo | None:
        """The lazy layer holding blob ``digest`` with ``diff_id``, if there is one."""
        if not self.has(digest):
            return None
        info = self.info(digest)
        return info if info.diff_id == diff_id else None

    def is_complete(self, digest: str) -> bool:
        return os.path.exists(os.path.join(self.path(digest), "complete"))

    def create(self, desc: oci.Descriptor, diff_id: Digest, toc: CheckedToc,
               source: dict[str, str], extra: Sequence[tuple[int, bytes]] = ()) -> LazyInfo:
        """Record a lazily pulled layer by its checked TOC (idempotent; parsed by ``ready``).
        ``extra``: bytes of the blob already fetched (the TOC region), logged as RAW."""
        if self.has(desc.digest):
            return self.info(desc.digest)
        os.makedirs(self.dir, exist_ok=True)
        os.makedirs(self.by_diff_id, exist_ok=True)
        work = tempfile.mkdtemp(dir=self.tmp_dir, prefix="lazy-")
        try:
            with disk_full_guard("a lazy layer"):
                # written unsynced, then synced together: one journal commit, not one a file
                meta = {"digest": desc.digest, "diff_id": diff_id, "size": desc.size,
                        "media_type": desc.media_type, "format": toc.format,
                        "source": source, "annotations": dict(desc.annotations or {}),
                        "toc_offset": toc.offset, "content": toc.content}
                _write(os.path.join(work, "toc"), toc.raw, sync=False)
                if toc.head:
                    _write(os.path.join(work, "toc.head"), toc.head, sync=False)
                with open(os.path.join(work, "blob"), "wb") as f:
                    f.truncate(desc.size)
                _write(os.path.join(work, "ranges"), b"", sync=False)
                _write(os.path.join(work, "meta.json"), json.dumps(meta, indent=1).encode(),
                       sync=False)
                os.chmod(work, 0o755)
                for name in sorted(os.listdir(work)):
                    fsync_path(os.path.join(work, name))
                blob = LazyBlob(work, desc.size)
                try:
                    blob.store([(off, data) for off, data in extra], RAW)
                finally:
                    blob.close()
                fsync_dir(work)
                link = self._link(diff_id)  # first: a state is never there unnamed
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(link)
                os.symlink(os.path.join("..", "sha256", sha256_hex(desc.digest)), link)
                try:
                    os.rename(work, self.path(desc.digest))
                except OSError:
                    if not self.has(desc.digest):
                        raise
                fsync_dir(self.dir)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return self.info(desc.digest)

    def delete(self, digest: str) -> None:
        """Drop a lazy state (idempotent; two processes may drop the same one at once)."""
        path = self.path(digest)
        if not os.path.exists(path):
            return
        with contextlib.suppress(StoreError, OSError):
            diff_id = self.info(digest).diff_id
            if self.for_diff_id(diff_id) == digest:
                os.unlink(self._link(diff_id))
        trash = tempfile.mkdtemp(dir=self.tmp_dir, prefix="gc-")
        try:
            os.rename(path, os.path.join(trash, "lazy"))
        except FileNotFoundError:
            pass  # dropped by another process meanwhile
        finally:
            shutil.rmtree(trash, ignore_errors=True)

    def open(self, info: LazyInfo) -> LazyBlob:
        """The sparse blob and range log of the layer ``info`` describes."""
        return LazyBlob(self.path(info.digest), info.size)


def _write(path: str, data: bytes, sync: bool = True) -> None:
    with open(path, "wb") as f:
        f.write(data)
        if sync:
            f.flush()
            os.fsync(f.fileno())


class LazyBlob:
    """The sparse blob of one lazy layer and its log of present ranges; thread-safe."""

    def __init__(self, path: str, size: int) -> None:
        self.dir = path
        self.size = size
        self.blob_path = os.path.join(path, "blob")
        self.index_path = os.path.join(path, "index")
        self.lock = threading.Lock()
        self.verified = Ranges()
        self.present = Ranges()  # VERIFIED and RAW
        self._log_pos = 0
        self.fd = os.open(self.blob_path, os.O_RDWR | os.O_CLOEXEC)
        try:
            self.log_fd = os.open(os.path.join(path, "ranges"),
                                  os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        except BaseException:
            os.close(self.fd)
            raise
        self.refresh()

    def refresh(self) -> None:
        """Adopt the ranges logged since the last look (by this or another process)."""
        with self.lock:
            size = os.fstat(self.log_fd).st_size
            if size <= self._log_pos:
                return
            raw = os.pread(self.log_fd, size - self._log_pos, self._log_pos)
            for i in range(0, len(raw) - _REC.size + 1, _REC.size):
                rec = raw[i:i + _REC.size]
                start, end, kind, crc = _REC.unpack(rec)
                if zlib.crc32(rec[:20]) != crc or not 0 <= start < end <= self.size:
                    break  # a torn record (a crash while logging): everything after is unsure
                self.present.add(start, end)
                if kind == VERIFIED:
                    self.verified.add(start, end)
                self._log_pos += _REC.size

    def store(self, pieces: list[tuple[int, bytes]], kind: int) -> None:
        """Write ``pieces`` (offset, bytes) into the blob, fsync, then log them as ``kind``."""
        pieces = [(o, d) for o, d in pieces if d]
        if not pieces:
            return
        with disk_full_guard("a lazy layer"):
            for offset, data in pieces:
                if offset < 0 or offset + len(data) > self.size:
                    raise InvalidLayer(f"range {offset}+{len(data)} lies outside the blob")
                os.pwrite(self.fd, data, offset)
            os.fdatasync(self.fd)
            recs = b""
            for offset, data in pieces:
                head = struct.pack("<QQB3x", offset, offset + len(data), kind)
                recs += head + struct.pack("<I", zlib.crc32(head))
            # not synced: a record lost in a crash costs a fetch again; a record on disk is
            # never ahead of its bytes (they were synced before it was written)
            os.write(self.log_fd, recs)
        self.refresh()

    def read(self, start: int, end: int) -> bytes:
        return os.pread(self.fd, end - start, start)

    def missing(self) -> list[tuple[int, int]]:
        with self.lock:
            return list(self.present.gaps(0, self.size))

    def blob_digest(self) -> str:
        h = hashlib.sha256()
        pos = 0
        while pos < self.size:
            data = os.pread(self.fd, min(1 << 20, self.size - pos), pos)
            if not data:
                break
            h.update(data)
            pos += len(data)
        return "sha256:" + h.hexdigest()

    def mark_complete(self, digest: str) -> bool:
        """Check the whole blob against ``digest``; on success write ``complete``."""
        if self.missing() or self.blob_digest() != digest:
            return False
        _write(os.path.join(self.dir, "complete"), digest.encode())
        return True

    def close(self) -> None:
        for fd in (self.fd, self.log_fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.log_fd = -1


def promote(layers: LayerStore, digest: str) -> None:
    """Make the complete lazy layer of blob ``digest`` an ordinary stored layer, as a full
    pull stores it: the blob goes through ``LayerStore.ingest`` (checked against its digest and
    the diff_id, the tar indexed by the tar indexer, the blob kept), then the lazy state is
    dropped.  A blob that fails those checks is dropped too and the error raised (the next pull
    fetches the layer whole).  The caller holds the store's ingesting hold."""
    lazy = layers.lazy
    info = lazy.info(digest)
    try:
        if not layers.has(info.diff_id) or not layers.blobs.has(info.digest):
            with open(os.path.join(lazy.path(digest), "blob"), "rb") as f:
                layers.ingest(f, digest=info.digest, size=info.size, diff_id=info.diff_id,
                              keep_blob=True)
    except (DigestMismatch, InvalidImage):
        lazy.delete(digest)
        raise
    if not info.built:  # never served (a TOC that could not serve, fetched whole)
        lazy.delete(digest)
        return
    try:
        served = LayerIndex.load(os.path.join(lazy.path(digest), "index"))
        stored = LayerIndex.load(os.path.join(layers.path(info.diff_id), "index"))
        differ = index_differences(served, stored, info.format == "estargz")
    except (OSError, ValueError, LayerError) as exc:
        differ = [str(exc)]
    if differ:  # the tar is what every other tool sees: it is what is stored
        log.warning("lazy layer %s: its table of contents described %d entries otherwise "
                    "than its tar does (%s); mounts from now on show the tar's", digest,
                    len(differ), differ[0])
    lazy.delete(digest)


def index_differences(served: LayerIndex, stored: LayerIndex, whole_seconds: bool
                      ) -> list[str]:
    """Where the index a lazy layer was served from (its TOC's) and the index of its
    completed tar disagree, by path; empty when they agree.  The data offset is left out (a
    file number there, a byte offset here).  ``whole_seconds`` (eStargz, whose TOC holds
    whole-second times): a served mtime equal to the tar's truncated to the second agrees."""
    cols = list(_ROW)
    off, mtime = cols.index("offset"), cols.index("mtime")
    a, b = served.rows(), stored.rows()
    out = [f"{p}: only in the {'TOC' if p in a else 'tar'}" for p in sorted(set(a) ^ set(b))]
    for path in sorted(set(a) & set(b)):
        x, y = list(a[path]), list(b[path])
        x[off] = y[off] = 0
        if whole_seconds and x[mtime] == y[mtime] // 10**9 * 10**9:
            x[mtime] = y[mtime]
        if x != y:
            out.append(f"{path}: " + ", ".join(
                f"{cols[i] if i < len(cols) else 'target/xattrs/sparse'} {x[i]!r} != {y[i]!r}"
                for i in range(len(x)) if x[i] != y[i]))
    return out


def promote_complete(layers: LayerStore) -> list[Digest]:
    """Promote every lazy layer a mount daemon completed in the background (``promote``);
    returns their blob digests.  Cheap when there is none (one listing).  A layer that fails
    its checks is dropped with a warning (a later pull fetches it whole)."""
    done = []
    for digest in layers.lazy.digests():
        if not layers.lazy.is_complete(digest):
            continue
        try:
            promote(layers, digest)
        except (DigestMismatch, InvalidImage) as exc:
            log.warning("lazy layer %s was dropped: %s", digest, exc)
            continue
        done.append(digest)
    return done


def check(store_dir: LazyStore, digest: str) -> list[str]:
    """Problems of one lazy layer (empty when sound): its meta, index and chunk table read
    (built first for a layer never used, ``LazyStore.ready``: a TOC that cannot serve is a
    problem), every chunk it holds matches its digest, and a complete blob matches its
    digest.  No network."""
    from unionfs.layerindex import IndexFile

    from .seekable import GZIP, ZSTD, SeekableError, chunk_bytes, load_files

    what = f"lazy layer {digest}"
    try:
        info = store_dir.ready(digest)
        path = store_dir.path(digest)
        IndexFile(os.path.join(path, "index")).close()
        with open(os.path.join(path, "files"), "rb") as f:
            files = load_files(f.read())
        blob = store_dir.open(info)
    except (OSError, ValueError, KeyError, SeekableError, InvalidLayer, ImageNotFound) as exc:
        return [f"{what}: {exc}"]
    problems = []
    try:
        compression = GZIP if info.format == "estargz" else ZSTD
        seen = set()
        for cs in files:
            for c in cs:
                if c.zeros or (c.start, c.inner) in seen or \
                        not blob.present.covers(c.start, c.end):
                    continue
                seen.add((c.start, c.inner))
                try:
                    chunk_bytes(compression, c, blob.read(c.start, c.end))
                except SeekableError as exc:
                    problems.append(f"{what}: {exc}")
        if store_dir.is_complete(digest) and blob.blob_digest() != digest:
            problems.append(f"{what}: marked complete, but the blob does not match its digest")
    finally:
        blob.close()
    return problems
