"""LayerStore: every layer as its uncompressed tar plus entry index, keyed by diff_id.

``layers/sha256/<hex>/`` holds ``layer.tar`` (whose sha256 is the diff_id), ``index`` (built
once by ``unionfs.tarlayer``) and ``meta.json`` (sizes).  The directory is assembled under
``tmp/`` and renamed into place, so a visible layer is always complete and verified.

``ingest`` takes a layer stream as received (compressed or not), and in one pass keeps the
compressed blob (verified against its digest and size) in the store's ``BlobStore``, which the
``LayerStore`` owns, decompresses, hashes the diff_id and writes the tar.  An uncompressed
layer is stored once: its blob is a hardlink of the tar.

The seam to the union: ``describe`` gives a stored layer as a layer description
(``unionfs.layerkinds``), which is what a mount spec lists, and ``open`` opens that description
as a ``LowerLayer``.  Whoever reads a layer — the mount daemon, export, diff, commit — sees the
protocol only, so a layer of another kind (fetched lazily, being built) can be described and
returned here without a change to any of them.

Caveats:
* Concurrent ingests of the same layer both do the work; the first rename wins and the loser
  discards its copy (content is identical by construction).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

from unionfs.layerindex import xattr_count
from unionfs.layerkinds import open_layer
from unionfs.layers import LowerLayer
from unionfs.tarlayer import LayerError, LayerIndex, build_index

from .cas import BlobStore, BlobWriter
from .compress import NONE, Compressor, DecompressReader
from .digest import Digest, Hasher, sha256_hex
from .errors import DigestMismatch, ImageNotFound, InvalidLayer, SeekableError, StoreError
from .fsutil import disk_full_guard, fsync_dir
from .lazystate import LazyStore

CHUNK = 1 << 20
Progress = Callable[[int], None]
Sink = Callable[[bytes], None]


@dataclass(frozen=True)
class LayerInfo:
    diff_id: Digest
    size: int  # bytes of the uncompressed tar
    content: int  # bytes of file data (hardlinks counted once)
    entries: int


@dataclass(frozen=True)
class Ingested:
    digest: Digest  # of the blob as received
    size: int  # of the blob as received
    compression: str
    layer: LayerInfo


class _Tee:
    """A reader that hands every chunk it reads to ``on_data`` (the blob writer, a progress
    callback)."""

    def __init__(self, src: BinaryIO, on_data: Callable[[bytes], None]) -> None:
        self._src = src
        self._on = on_data

    def read(self, n: int = -1) -> bytes:
        data = self._src.read(n)
        if data:
            self._on(data)
        return data


class LayerStore:
    """The layers of the store at ``root``, and its blobs (``blobs``: the layers' compressed
    blobs go there as they are ingested).  ``limit``: the most bytes a layer may decompress to
    (None: no limit)."""

    def __init__(self, root: str, limit: int | None = None) -> None:
        self.limit = limit
        self.blobs = BlobStore(root)
        self.lazy = LazyStore(root)  # layers pulled with --lazy, until complete (lazystate.py)
        self.dir = os.path.join(root, "layers", "sha256")
        self.tmp_dir = os.path.join(root, "tmp")
        os.makedirs(self.dir, exist_ok=True)
        os.makedirs(self.tmp_dir, exist_ok=True)

    def path(self, diff_id: Digest) -> str:
        return os.path.join(self.dir, sha256_hex(diff_id))

    def tar_path(self, diff_id: Digest) -> str:
        return os.path.join(self.path(diff_id), "layer.tar")

    def has(self, diff_id: Digest) -> bool:
        return os.path.exists(os.path.join(self.path(diff_id), "meta.json"))

    def info(self, diff_id: Digest) -> LayerInfo:
        try:
            with open(os.path.join(self.path(diff_id), "meta.json")) as f:
                d = json.load(f)
        except FileNotFoundError:
            raise ImageNotFound(f"layer {diff_id} is missing from the store") from None
        return LayerInfo(diff_id, int(d["size"]), int(d["content"]), int(d["entries"]))

    def describe(self, diff_id: Digest) -> dict[str, Any]:
        """The stored layer as a layer description (``unionfs.layerkinds``): what a mount spec
        lists and ``open`` opens.  A layer pulled lazily and not yet complete is described as
        ``{"kind": "lazy", ...}`` (``lazystate.LazyStore.describe``); one whose table of
        contents cannot serve is fetched whole first (``lazypull.fetch_whole``)."""
        if not self.has(diff_id):
            try:
                lazy = self.lazy.describe(diff_id)
            except SeekableError as exc:
                from .registry.lazypull import fetch_whole

                digest = self.lazy.for_diff_id(diff_id)
                if digest is not None:  # (None: promoted meanwhile, by another command)
                    try:
                        fetch_whole(self, digest, exc)
                    except OSError as err:
                        raise StoreError(f"layer {diff_id}: cannot download it whole: "
                                         f"{err.strerror or err}") from None
                if not self.has(diff_id):
                    raise ImageNotFound(f"layer {diff_id} is missing from the store") from None
                lazy = None
            if lazy is not None:
                return lazy
        d = self.path(diff_id)
        return {"kind": "tar", "tar": os.path.join(d, "layer.tar"),
                "index": os.path.join(d, "index"), "name": diff_id}

    def stack(self, diff_ids: Sequence[Digest]) -> list[dict[str, Any]]:
        """The descriptions of an image's layers (``diff_ids`` bottom first), top first: the
        order of a mount spec's layers."""
        return [self.describe(d) for d in reversed(diff_ids)]

    @staticmethod
    def for_mount(descs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """``descs`` as a mount spec lists them: a layer still arriving (pulled with
        ``--lazy``) is completed in the background by the daemon that serves it, and the next
        store command makes it an ordinary layer (``lazystate.promote_complete``)."""
        return [{**d, "complete": True} if d.get("kind") == "lazy" else d for d in descs]

    def open(self, desc: dict[str, Any]) -> LowerLayer:
        """The layer ``desc`` describes as a ``LowerLayer`` (keeps its files open until
        ``close``).  Raises ``ImageNotFound`` (not stored) and ``InvalidLayer``; the index of
        a stored layer in an older format is built again."""
        name = desc.get("name", "")
        try:
            try:
                return open_layer(desc)
            except LayerError:
                if desc.get("kind") != "tar" or not self.has(Digest(name)):
                    raise
                self.rebuild_index(Digest(name))  # an index of an older format
                return open_layer(desc)
        except FileNotFoundError:
            raise ImageNotFound(f"layer {name or desc} is missing from the store") from None
        except LayerError as exc:
            raise InvalidLayer(f"layer {name}: {exc}") from None

    @contextlib.contextmanager
    def opened(self, descs: Sequence[dict[str, Any]]) -> Iterator[list[LowerLayer]]:
        """The layers ``descs`` describe (``stack``: an image's), opened, in the same order,
        and closed when the block ends."""
        layers: list[LowerLayer] = []
        try:
            for desc in descs:
                layers.append(self.open(desc))
            yield layers
        finally:
            for layer in layers:
                layer.close()

    def diff_ids(self) -> list[Digest]:
        return [Digest("sha256:" + n) for n in sorted(os.listdir(self.dir)) if len(n) == 64]

    def delete(self, diff_id: Digest) -> None:
        path = self.path(diff_id)
        if not os.path.exists(path):
            return
        trash = tempfile.mkdtemp(dir=self.tmp_dir, prefix="gc-")
        os.rename(path, os.path.join(trash, "layer"))
        shutil.rmtree(trash, ignore_errors=True)

    def ingest(
        self,
        src: BinaryIO,
        *,
        digest: Digest | None = None,
        size: int | None = None,
        diff_id: Digest | None = None,
        keep_blob: bool = True,
        progress: Progress | None = None,
        limit: int | None = None,
    ) -> Ingested:
        """Store one layer from ``src`` as received.  ``digest``/``size`` check the blob,
        ``diff_id`` the uncompressed tar; any mismatch raises and leaves nothing behind.
        ``limit`` (default: the store's) bounds the uncompressed size."""
        work = tempfile.mkdtemp(dir=self.tmp_dir, prefix="layer-")
        writer: BlobWriter | None = None
        try:
            writer = self.blobs.writer(digest, size) if keep_blob else None
            blob_hash = Hasher()

            def on_data(data: bytes) -> None:
                blob_hash.update(data)
                if writer is not None:
                    writer.write(data)
                if progress is not None:
                    progress(len(data))

            reader = DecompressReader(_Tee(src, on_data),  # type: ignore[arg-type]
                                      limit=self.limit if limit is None else limit)
            tar_path = os.path.join(work, "layer.tar")
            diff_hash = Hasher()
            with disk_full_guard("a layer"), open(tar_path, "wb") as out:
                while chunk := reader.read(CHUNK):
                    diff_hash.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            if size is not None and blob_hash.size != size:
                raise DigestMismatch(f"layer {digest} has {blob_hash.size} bytes, expected {size}")
            if digest is not None and blob_hash.digest != digest:
                raise DigestMismatch(
                    f"layer digest mismatch: expected {digest}, got {blob_hash.digest}")
            diff_hash.verify(diff_id, None, what="layer diff_id")
            got_diff = diff_hash.digest
            info = self._install(work, got_diff)
            blob_digest = blob_hash.digest
            if writer is not None:
                if reader.kind == NONE:
                    writer.abort()
                    self.blobs.link(self.tar_path(got_diff), blob_digest)
                else:
                    writer.commit()
            return Ingested(blob_digest, blob_hash.size, reader.kind, info)
        finally:
            if writer is not None and writer.digest is None:
                writer.abort()
            shutil.rmtree(work, ignore_errors=True)

    def ingest_produced(self, produce: Callable[[Sink], object], compression: str) -> Ingested:
        """Store a layer that ``produce(sink)`` writes as an uncompressed tar: one pass hashes
        the diff_id and writes ``layer.tar`` while a second thread compresses and hashes the
        blob (zlib and zstd release the GIL, so both cores work); never the whole layer in
        memory."""
        work = tempfile.mkdtemp(dir=self.tmp_dir, prefix="layer-")
        writer = self.blobs.writer() if compression != NONE else None
        comp = Compressor(compression)
        try:
            diff_hash = Hasher()
            tar_path = os.path.join(work, "layer.tar")
            with disk_full_guard("a layer"), open(tar_path, "wb") as out:

                def sink(data: bytes) -> None:
                    diff_hash.update(data)
                    out.write(data)
                    if writer is not None:
                        packed = comp.compress(data)
                        if packed:
                            writer.write(packed)

                produce(sink)
                if writer is not None:
                    writer.write(comp.flush())
                out.flush()
                os.fsync(out.fileno())
            info = self._install(work, diff_hash.digest)
            if writer is None:
                self.blobs.link(self.tar_path(info.diff_id), info.diff_id)
                return Ingested(info.diff_id, info.size, NONE, info)
            digest = writer.commit()
            return Ingested(digest, writer.hasher.size, compression, info)
        finally:
            comp.close()
            if writer is not None and writer.digest is None:
                writer.abort()
            shutil.rmtree(work, ignore_errors=True)

    def _install(self, work: str, diff_id: Digest) -> LayerInfo:
        if self.has(diff_id):
            return self.info(diff_id)
        tar_path = os.path.join(work, "layer.tar")
        try:
            index = build_index(tar_path)
        except LayerError as exc:
            raise InvalidLayer(f"layer {diff_id}: {exc}") from None
        info = LayerInfo(diff_id, os.path.getsize(tar_path), index.content_size(), len(index))
        with disk_full_guard("a layer index"):
            index.dump(os.path.join(work, "index"))
            meta = {"size": info.size, "content": info.content, "entries": info.entries}
            with open(os.path.join(work, "meta.json"), "w") as f:
                json.dump(meta, f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(work, 0o755)
            fsync_dir(work)
            dst = self.path(diff_id)
            try:
                os.rename(work, dst)
            except OSError:
                if self.has(diff_id):  # a concurrent ingest won
                    return self.info(diff_id)
                raise
            fsync_dir(self.dir)
        return info

    def rebuild_index(self, diff_id: Digest) -> None:
        """Index a stored layer's tar again and replace its index and meta.json atomically
        (``strata check --repair`` of an index that disagrees with a sound tar)."""
        d = self.path(diff_id)
        try:
            index = build_index(self.tar_path(diff_id))
        except LayerError as exc:
            raise InvalidLayer(f"layer {diff_id}: {exc}") from None
        tmp = tempfile.mkdtemp(dir=self.tmp_dir, prefix="index-")
        try:
            with disk_full_guard("a layer index"):
                index.dump(os.path.join(tmp, "index"))
                meta = {"size": os.path.getsize(self.tar_path(diff_id)),
                        "content": index.content_size(), "entries": len(index)}
                with open(os.path.join(tmp, "meta.json"), "w") as f:
                    json.dump(meta, f)
                    f.flush()
                    os.fsync(f.fileno())
                os.rename(os.path.join(tmp, "index"), os.path.join(d, "index"))
                os.rename(os.path.join(tmp, "meta.json"), os.path.join(d, "meta.json"))
                fsync_dir(d)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def check(self, diff_id: Digest) -> list[str]:
        """Problems with one stored layer: diff_id, index and meta (empty when sound)."""
        problems = []
        h = Hasher()
        try:
            with open(self.tar_path(diff_id), "rb") as f:
                while chunk := f.read(CHUNK):
                    h.update(chunk)
        except FileNotFoundError:
            return [f"layer {diff_id}: layer.tar is missing"]
        if h.digest != diff_id:
            problems.append(f"layer {diff_id}: tar hashes to {h.digest}")
        try:
            index_path = os.path.join(self.path(diff_id), "index")
            stored = LayerIndex.load(index_path)
            fresh = build_index(self.tar_path(diff_id))
            if not stored.same_as(fresh):
                problems.append(f"layer {diff_id}: index does not match the tar")
            elif xattr_count(index_path) not in (None, len(fresh.xattrs)):
                # a count of 0 where there are some would hide them under the kernel engine
                problems.append(f"layer {diff_id}: index miscounts the entries with xattrs")
        except (LayerError, OSError) as exc:
            problems.append(f"layer {diff_id}: {exc}")
        try:
            self.info(diff_id)
        except (ImageNotFound, ValueError, KeyError) as exc:
            problems.append(f"layer {diff_id}: bad meta.json ({exc})")
        return problems

