"""Lazily pulled layers: ``LazyLayer``, a ``LowerLayer`` whose bytes arrive by range, and its
background completion.

``LazyLayer`` answers ``entry``/``children``/``xattrs``/``hardlinks`` from the index built from
the layer's TOC (``TarLayer``'s code over the lazy state's index: never the network).  ``read``
and ``copy_data`` find the file's chunks; a chunk not yet present is fetched (``Fetcher``: the
registry client's auth, mirrors, redirects and retries, with a timeout), its bytes checked
against the TOC's chunk digest, written and logged in the lazy state (``lazystate``), and
decompressed; a second read is local.  A fetch takes the missing chunks after the wanted one
too, up to ``MIN_SPAN`` bytes (neighbouring files in one request), and readers wanting bytes of
a fetch under way wait for it instead of fetching again.  Bytes that cannot be had or do not
match their digest make that read fail with EIO; what a read fetches is stored only verified.

``complete`` fetches every byte still missing (the files before an eStargz prefetch landmark
first) and stores it unchecked (``RAW``: a read checks each chunk when it first decompresses
it, fetching wrong ones again), checks the whole blob against its digest (fetching it all
again once if that fails, then giving up) and marks the state complete.  The mount daemon does that
in a background thread for the layers of its spec (``"complete": true``,
``LayerStore.for_mount``), then decompresses the blob once into a tar and serves the rest of
the mount from it (``lazyunpack``); it never touches the store's locks, so the promotion to an
ordinary layer happens in the next command that holds the ingesting hold
(``lazystate.promote_complete``).  ``lazypull`` holds what ``pull``, ``push`` and ``save`` do
with lazy layers.

Threading: ``blocking = True`` tells the FUSE adapter to call ``read``/``copy_data`` from worker
threads, unless ``read_would_block`` says the bytes are here and checked (cached, in the tar,
or in a small checked chunk); every method is thread-safe.  ``open_layer`` is the
``strata.layers`` entry point for layer descriptions ``{"kind": "lazy", "root": STORE,
"digest": BLOB, "complete": bool}``.

Caveats:
* Decompressed chunks are cached in memory (``CACHE_BYTES``) so sequential reads of a large file
  decompress each chunk once; every decompression is verified against the chunk digest.  Reads
  from the completed layer's tar are not (the tar matched the diff_id when it was made).
* The in-flight table is per process: a mount and a ``strata pull`` may fetch the same range
  once each (both write the same verified bytes).
"""

from __future__ import annotations

import bisect
import concurrent.futures
import errno
import logging
import os
import stat
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from unionfs.layers import Entry, copy_range
from unionfs.tarlayer import TarLayer

from . import lazyunpack
from .errors import DigestMismatch, StoreError
from .lazystate import RAW, VERIFIED, LazyBlob, LazyInfo, LazyStore
from .seekable import (
    ESTARGZ,
    GZIP,
    ZSTD,
    Chunk,
    SeekableError,
    chunk_bytes,
    load_files,
)

if TYPE_CHECKING:
    from .registry.rangefetch import Fetcher

log = logging.getLogger(__name__)

MIN_SPAN = 256 << 10  # a fetch for one chunk takes missing neighbours up to this many bytes
MAX_GAP = 64 << 10  # ... across gaps of at most this many bytes
MAX_SPAN = 8 << 20
WINDOW = 4 << 20  # completion fetches this much at a time,
MERGE_GAP = 1 << 20  # over what reads fetched already when less than this lies between gaps
CACHE_BYTES = 64 << 20
INLINE_CHUNK = 128 << 10  # a stored chunk up to this size (and decompressing to at most
INLINE_DATA = 512 << 10  # this much) is read on the request loop
COMPLETE_DELAY = 3.0  # seconds a mount lets its first reads have the network alone
COMPLETERS = 3  # windows fetched at once while completing
BUSY_FETCHES = 16  # ... unless reads need this many fetches first: then it completes at once,
BUSY_SHARE = 8  # or fetch this share of the blob (a walk through the image, in growing spans)


@dataclass
class _Flight:
    start: int
    end: int
    done: threading.Event = field(default_factory=threading.Event)
    error: str = ""


class LazyLayer(TarLayer):
    """A ``LowerLayer`` over a lazy state (see the module docstring)."""

    blocking = True

    def __init__(self, root: str, digest: str, fetcher: Fetcher | None = None) -> None:
        lazy = LazyStore(root)
        self.info: LazyInfo = lazy.ready(digest)
        self.blob: LazyBlob = lazy.open(self.info)
        try:
            super().__init__(self.blob.blob_path, self.blob.index_path, name=self.info.diff_id)
            with open(os.path.join(self.blob.dir, "files"), "rb") as f:
                self.files = load_files(f.read())
            self.toc_file = self.info.toc_file
            self.toc_raw = b""
            if self.toc_file >= 0:
                with open(os.path.join(self.blob.dir, "toc"), "rb") as f:
                    self.toc_raw = f.read()
        except BaseException:
            self.blob.close()
            raise
        # the network client is imported on first use (or warm-up): the process's shared one,
        # unless the caller gave one, which is then the layer's own (closed with it)
        self._fetcher = fetcher
        self._owns_fetcher = fetcher is not None
        # once complete: the layer's tar and where each file's data lies in it (lazyunpack)
        self._tar: tuple[int, dict[int, int]] | None = None
        self.compression = GZIP if self.info.format == ESTARGZ else ZSTD
        seen: dict[tuple[int, int], Chunk] = {}
        for cs in self.files:
            for c in cs:
                if not c.zeros:
                    seen.setdefault((c.start, c.inner), c)
        self.sorted = sorted(seen.values(), key=lambda c: (c.start, c.inner))
        self.starts = [c.start for c in self.sorted]
        self._flights: dict[tuple[int, int], _Flight] = {}
        self._flight_lock = threading.Lock()
        self._cache: OrderedDict[tuple[int, int, int], bytes] = OrderedDict()
        self._cache_size = 0
        self._cache_lock = threading.Lock()
        self._windows_now: list[tuple[int, int]] = []  # while completing: its windows
        self._wstarts: list[int] = []
        self._last_end = -1 << 62  # where the last fetch ended, and the span it grew to
        self._span = MIN_SPAN
        self._stop = threading.Event()
        self._complete = False  # the whole blob matched its digest (in this process)
        self._busy = threading.Event()  # set after BUSY_FETCHES fetches: complete now
        self._fetches = 0
        self._fetched = 0  # bytes the reads fetched
        self._completer: threading.Thread | None = None

    @property
    def fetcher(self) -> Fetcher:
        if self._fetcher is None:
            from .registry.rangefetch import shared

            self._fetcher = shared()
        return self._fetcher

    def warm_up(self) -> None:
        """Start the network client now, in a thread, so the first read finds it ready, the
        registry's scheme known and its token in hand (the mount daemon calls this while it
        mounts)."""
        if os.path.exists(os.path.join(self.blob.dir, "complete")):
            return  # nothing to fetch
        threading.Thread(target=lambda: self.fetcher.prepare(self.info.source),
                         name="strata-warm-up", daemon=True).start()

    # -- reading -------------------------------------------------------------------------------

    def locate(self, path: str) -> tuple[int, int] | None:
        """(file number, size) of the regular file at ``path``, or None."""
        found = self._locate(path)
        if found is None:
            return None
        block, j = found
        if not stat.S_ISREG(block.cols["mode"][j]):
            return None
        return block.cols["offset"][j], block.cols["size"][j]

    def read(self, entry: Entry, offset: int, size: int) -> bytes:
        size = max(0, min(size, entry.size - offset))
        if size == 0:
            return b""
        file_no = self._data(entry)[0]
        tar = self._tar
        if tar is not None and file_no in tar[1]:
            return os.pread(tar[0], size, tar[1][file_no] + offset)
        if file_no == self.toc_file:
            return self.toc_raw[offset:offset + size]
        out = []
        for c in self.files[file_no]:
            if c.offset + c.size <= offset:
                continue
            if c.offset >= offset + size:
                break
            data = self.chunk_data(c)
            out.append(data[max(0, offset - c.offset):offset + size - c.offset])
        return b"".join(out)

    def read_would_block(self, entry: Entry, offset: int, size: int) -> bool:
        """False when the bytes of this read are here and checked (in the cache, in the tar,
        or in stored chunks checked against their digests, or the whole blob against its, and
        small enough to decompress on the request loop): the FUSE adapter then reads without
        a worker thread, and nothing sends it to the network."""
        file_no = self._data(entry)[0]
        tar = self._tar
        if file_no == self.toc_file or (tar is not None and file_no in tar[1]):
            return False
        for c in self.files[file_no]:
            if c.offset + c.size <= offset or c.zeros:
                continue
            if c.offset >= offset + size:
                break
            if (c.start, c.inner, c.size) in self._cache:
                continue
            if c.end - c.start > INLINE_CHUNK or c.inner + c.size > INLINE_DATA:
                return True
            with self.blob.lock:  # checked bytes cannot send the read to the network
                here = self.blob.verified.covers(c.start, c.end) or (
                    self._complete and self.blob.present.covers(c.start, c.end))
            if not here:
                return True
        return False

    def copy_data(self, entry: Entry, dst_fd: int) -> None:
        file_no = self._data(entry)[0]
        tar = self._tar
        if tar is not None and file_no in tar[1]:
            copy_range(tar[0], dst_fd, tar[1][file_no], entry.size)
            return
        if file_no == self.toc_file:
            _write_all(dst_fd, self.toc_raw)
            return
        for c in self.files[file_no]:
            _write_all(dst_fd, self.chunk_data(c))

    def chunk_data(self, c: Chunk) -> bytes:
        """The verified bytes of ``c``, fetched if need be; OSError(EIO) when not to be had."""
        if c.zeros:
            return bytes(c.size)
        key = (c.start, c.inner, c.size)
        with self._cache_lock:
            data = self._cache.get(key)
            if data is not None:
                self._cache.move_to_end(key)
                return data
        self.ensure(c)
        try:
            data = chunk_bytes(self.compression, c, self.blob.read(c.start, c.end))
        except SeekableError as exc:
            with self.blob.lock:
                verified = self.blob.verified.covers(c.start, c.end)
            if verified or self._complete:  # the blob matched its digest: a TOC that lies
                log.warning("layer %s: stored chunk is damaged (%s)", self.name, exc)
                raise OSError(errno.EIO, str(exc)) from None
            # bytes the completion fetched unchecked, and wrong: fetch the chunk again
            log.warning("layer %s: refused fetched bytes (%s); fetching them again",
                        self.name, exc)
            self._fetch([c], c)
            return self.chunk_data(c)
        self._remember(key, data)
        return data

    def _remember(self, key: tuple[int, int, int], data: bytes) -> None:
        with self._cache_lock:
            if key in self._cache:
                return
            self._cache[key] = data
            self._cache_size += len(data)
            while self._cache_size > CACHE_BYTES and len(self._cache) > 1:
                _, old = self._cache.popitem(last=False)
                self._cache_size -= len(old)

    def present(self, c: Chunk) -> bool:
        """Whether the bytes of ``c`` are here: checked against its digest, or fetched by the
        completion and checked when first decompressed (``chunk_data``)."""
        with self.blob.lock:
            return self.blob.present.covers(c.start, c.end)

    def ensure(self, c: Chunk) -> None:
        """Make the bytes of ``c`` present and verified (fetching them, or waiting for a fetch
        under way that holds them)."""
        refreshed = False
        while not self.present(c):
            if not refreshed:
                self.blob.refresh()  # another process may have fetched it
                refreshed = True
                continue
            span: list[Chunk] | None = None
            with self._flight_lock:
                flight = self._covering(c.start, c.end)
                mine = flight is None
                if flight is None:
                    # while the layer is being completed, a miss fetches the completion
                    # window that holds it (the completer then skips that window)
                    window = self._window_of(c)
                    if window is None:
                        span = self._plan(c)
                        window = (span[0].start, max(x.end for x in span))
                    flight = _Flight(*window)
                    self._flights[window] = flight
            if not mine:
                flight.done.wait(self.fetcher.timeout + 10)
                if flight.error:
                    raise OSError(errno.EIO, flight.error)
                continue
            try:
                if span is None:
                    self._fill_window(flight.start, flight.end)
                else:
                    self._fetch(span, c)
            except OSError as exc:
                flight.error = exc.strerror or str(exc)
                raise
            finally:
                with self._flight_lock:
                    self._flights.pop((flight.start, flight.end), None)
                flight.done.set()

    def _covering(self, start: int, end: int) -> _Flight | None:
        """A fetch under way that holds the bytes [start, end) (under the flight lock)."""
        return next((f for f in self._flights.values() if f.start <= start and end <= f.end),
                    None)

    def _window_of(self, c: Chunk) -> tuple[int, int] | None:
        """The completion window that holds ``c``, while completing (under the flight
        lock)."""
        i = bisect.bisect_right(self._wstarts, c.start) - 1
        if i < 0:
            return None
        w = self._windows_now[i]
        return w if w[0] <= c.start and c.end <= w[1] else None

    def _plan(self, c: Chunk) -> list[Chunk]:
        """``c`` and the missing chunks after it, within the span and ``MAX_GAP``.  The span
        starts at ``MIN_SPAN`` and doubles (up to ``MAX_SPAN``) while reads go on from where
        the last fetch ended, as the kernel's read-ahead does: a walk through the image reads
        in few large requests, a first read of one file stays small.  (Under the flight
        lock.)"""
        if 0 <= c.start - self._last_end <= MAX_GAP:
            self._span = min(self._span * 2, MAX_SPAN)
        else:
            self._span = MIN_SPAN
        i = bisect.bisect_left(self.starts, c.start)
        span = [x for x in self.sorted[i:i + 64] if x.start == c.start]
        end = max(x.end for x in span)
        j = i + len(span)
        while j < len(self.sorted) and end - c.start < self._span:
            x = self.sorted[j]
            if x.start - end > MAX_GAP or x.end - c.start > MAX_SPAN:
                break
            if not self.present(x):
                span.append(x)
                end = max(end, x.end)
            j += 1
        self._last_end = end
        return span

    def _fetch(self, span: list[Chunk], wanted: Chunk) -> None:
        start, end = span[0].start, max(x.end for x in span)
        self._fetches += 1
        self._fetched += end - start
        if self._fetches >= BUSY_FETCHES or self._fetched * BUSY_SHARE >= self.blob.size:
            self._busy.set()
        data = self.fetcher.fetch(self.info.source, self.info.digest, start, end)
        pieces: list[tuple[int, bytes]] = []
        bad = None
        for x in span:
            raw = data[x.start - start:x.end - start]
            try:
                self._remember((x.start, x.inner, x.size), chunk_bytes(self.compression, x, raw))
            except SeekableError as exc:
                log.warning("layer %s: refused fetched bytes (%s)", self.name, exc)
                if x is wanted:
                    bad = exc
                continue
            pieces.append((x.start, raw))
        try:
            self.blob.store(pieces, VERIFIED)
        except StoreError as exc:
            raise OSError(errno.EIO, str(exc)) from None
        if bad is not None:
            raise OSError(errno.EIO, f"refused: {bad}")

    # -- completion ----------------------------------------------------------------------------

    def complete(self) -> bool:
        """Fetch everything still missing, prioritised files first; then check the blob and
        mark the state complete.  True when complete; raises OSError when bytes cannot be
        had, DigestMismatch when the whole blob is wrong."""
        gaps: list[tuple[int, int]] = []
        for s, e in self.blob.missing():  # gaps close together in one request (what reads
            if gaps and s - gaps[-1][1] <= MERGE_GAP:  # fetched between them is skipped)
                gaps[-1] = (gaps[-1][0], e)
            else:
                gaps.append((s, e))
        prefetch = self.info.prefetch_end
        gaps.sort(key=lambda g: (g[0] >= prefetch, g[0]))
        windows = [w for s, e in gaps for w in self._windows(s, e)]
        with self._flight_lock:
            self._windows_now = sorted(windows)
            self._wstarts = [w[0] for w in self._windows_now]
        if windows:
            with concurrent.futures.ThreadPoolExecutor(
                    COMPLETERS, thread_name_prefix="strata-complete") as pool:
                done = pool.map(lambda w: self._stop.is_set() or self._fill(*w), windows)
                for _ in done:  # the first error is raised here; the rest are cancelled
                    pass
            if self._stop.is_set():
                return False
        if os.path.exists(os.path.join(self.blob.dir, "complete")):
            self._complete = True  # checked as a whole already
            return True
        for attempt in range(2):
            if self.blob.mark_complete(self.info.digest):
                log.info("layer %s is complete", self.name)
                self._complete = True
                return True
            if self.blob.missing():
                return False
            if attempt == 0 and not self._stop.is_set():  # bytes taken unchecked were wrong
                log.warning("layer %s: the completed blob does not match its digest; "
                            "fetching it again", self.name)
                self._repair()
        raise DigestMismatch(f"lazy layer {self.info.digest}: the completed blob does not "
                             "match its digest")

    def _repair(self) -> None:
        """Fetch the whole blob again, once (what the completion stored unchecked, but also a
        member's bytes past the data its chunk digest covers, which only the blob's digest
        checks, even in verified ranges)."""
        for s, e in self._windows(0, self.blob.size):
            if self._stop.is_set():
                return
            data = self.fetcher.fetch(self.info.source, self.info.digest, s, e)
            self.blob.store([(s, data)], RAW)

    def _windows(self, pos: int, end: int) -> list[tuple[int, int]]:
        """The gap [pos, end) cut into windows of about ``WINDOW`` bytes, never inside a
        chunk."""
        out = []
        while pos < end:
            wend = min(end, pos + WINDOW)
            i = bisect.bisect_right(self.starts, wend) - 1
            if 0 <= i < len(self.sorted):
                c = self.sorted[i]
                if c.start < wend < c.end <= end:
                    wend = c.end
            out.append((pos, wend))
            pos = wend
        return out

    def _fill(self, pos: int, wend: int) -> bool:
        """Fetch the window [pos, wend) (``_windows``) and store it: the chunks in it
        verified, the bytes between them as they came."""
        with self._flight_lock:
            under_way = self._covering(pos, wend)
            if under_way is None:
                with self.blob.lock:
                    if self.blob.present.covers(pos, wend):
                        return True  # a reader fetched this window already
                flight = _Flight(pos, wend)  # readers of these bytes wait for this fetch
                self._flights[(pos, wend)] = flight
        if under_way is not None:  # a reader is fetching it: wait (a failure is retried)
            under_way.done.wait(self.fetcher.timeout + 10)
            return True
        try:
            return self._fill_window(pos, wend)
        except OSError as exc:
            flight.error = exc.strerror or str(exc)
            raise
        finally:
            with self._flight_lock:
                self._flights.pop((pos, wend), None)
            flight.done.set()

    def _fill_window(self, pos: int, wend: int) -> bool:
        """Fetch [pos, wend) and store it unchecked (``RAW``): the whole blob is checked
        against its digest once complete, and each chunk when it is first decompressed for a
        read, so the completion spends no time decompressing what may never be read."""
        data = self.fetcher.fetch(self.info.source, self.info.digest, pos, wend)
        with self.blob.lock:
            gaps = list(self.blob.present.gaps(pos, wend))  # what readers fetched meanwhile
        self.blob.store([(s, data[s - pos:e - pos]) for s, e in gaps], RAW)
        return True

    def start_completing(self, delay: float | None = None, retry_delay: float = 5.0) -> None:
        """Complete the layer in a background thread (retrying after failures) until done
        or ``close``, starting after ``delay`` seconds (default ``complete_delay()``), so that
        what a container reads first has the network to itself."""
        wait = complete_delay() if delay is None else delay

        def run() -> None:
            self._busy.wait(wait)  # the delay, or until reads show the whole image is wanted
            if self._stop.is_set():
                return
            while not self._stop.is_set():
                try:
                    if self.complete():
                        self._unpack()
                        return
                except DigestMismatch as exc:  # fetched again once already: no use trying
                    log.error("layer %s: %s; reads go on from checked chunks", self.name, exc)
                    return
                except (OSError, StoreError) as exc:
                    log.info("layer %s: background completion paused: %s", self.name, exc)
                self._stop.wait(retry_delay)

        self._completer = threading.Thread(target=run, name="strata-complete", daemon=True)
        self._completer.start()

    def _unpack(self) -> None:
        """Serve the rest of this mount's reads from the layer's tar (``lazyunpack``)."""
        tar = lazyunpack.unpack(self, self._stop)
        if tar is None:
            return
        if self._stop.is_set():  # closed meanwhile (close waited for this thread, or gave up)
            os.close(tar[0])
            return
        self._tar = tar
        with self._cache_lock:
            self._cache.clear()
            self._cache_size = 0
        log.info("layer %s: reads are served from its tar now", self.name)

    def close(self) -> None:
        self._stop.set()
        self._busy.set()
        t = self._completer
        if t is not None and t is not threading.current_thread():
            t.join((self._fetcher.timeout if self._fetcher else 30.0) + 10)
        super().close()
        if self._tar is not None:
            os.close(self._tar[0])
            self._tar = None
        self.blob.close()
        if self._owns_fetcher and self._fetcher is not None:
            self._fetcher.close()


def complete_delay() -> float:
    """Seconds a mount waits before completing its lazy layers in the background
    (``STRATA_LAZY_COMPLETE_DELAY``, default ``COMPLETE_DELAY``)."""
    try:
        return max(0.0, float(os.environ.get("STRATA_LAZY_COMPLETE_DELAY", "")
                              or COMPLETE_DELAY))
    except ValueError:
        return COMPLETE_DELAY


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def open_layer(description: dict[str, Any]) -> LazyLayer:
    """The ``strata.layers`` entry point: ``{"kind": "lazy", "root": STORE_ROOT, "digest":
    BLOB_DIGEST, "complete": true}`` (``complete``: fetch the rest in the background)."""
    layer = LazyLayer(str(description["root"]), str(description["digest"]))
    if description.get("complete"):  # the mount daemon
        layer.warm_up()
        layer.start_completing()
    return layer
