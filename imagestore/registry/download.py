"""The two halves of a layer download (``pull``): ``BlobStream``, the async side, reads the
blob from any offset and reopens the request with ``Range`` after a cut connection;
``PartialReader``, what ``LayerStore.ingest`` reads on its own thread, serves the bytes
already in the partial file and then those the pump fetches, appends and queues.
``open_partial`` opens and locks a blob's partial file, the unit of resumption."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import queue
import threading
from collections.abc import AsyncGenerator, Callable

import httpx
import trio

from .. import oci
from ..cas import BlobStore
from ..digest import Digest, new_hasher
from ..errors import DigestMismatch, StoreError
from ..fsutil import disk_full_guard
from ..layerstore import CHUNK
from ..progress import ProgressEvent, ProgressFn, short
from .client import Registry, RetryPolicy
from .errors import RegistryError

log = logging.getLogger("imagestore.registry.pulling")

BATCH = 1 << 20
PROGRESS_INTERVAL = 0.1

__all__ = ["BlobStream", "PartialReader", "open_partial"]


class BlobStream:
    """The async half of a layer download: the bytes of the blob from any offset, reopening
    the request with ``Range`` after a cut connection (the worker thread calls ``chunk``)."""

    def __init__(self, reg: Registry, path: str, desc: oci.Descriptor,
                 scopes: tuple[str, ...], retry: RetryPolicy, emit: ProgressFn) -> None:
        self.reg, self.path, self.desc, self.scopes = reg, path, desc, scopes
        self.retry = retry
        self.emit = emit
        self.sid = short(desc.digest)
        self._resp: httpx.Response | None = None
        self._iter: AsyncGenerator[bytes, None] | None = None
        self._skip = 0
        self._last = -1.0
        self.fetched = 0  # bytes received over the network
        self.requests = 0

    async def _open(self, offset: int) -> bool:
        """Start a request at ``offset``; False when there is nothing left to fetch."""
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        self.requests += 1
        resp = await self.reg.request("GET", f"/v2/{self.path}/blobs/{self.desc.digest}",
                                      scopes=self.scopes, headers=headers, stream=True)
        self._skip = 0
        if resp.status_code == 206:
            start = resp.headers.get("content-range", "").removeprefix("bytes ").split("-")[0]
            if start != str(offset):
                await resp.aclose()
                raise RegistryError(f"blob {self.desc.digest}: asked for bytes from {offset}, "
                                    f"got Content-Range {resp.headers.get('content-range')!r}")
        elif resp.status_code == 200:
            self._skip = offset  # Range ignored: the whole blob again, drop what we have
        elif resp.status_code == 416 and offset >= self.desc.size:
            await resp.aclose()
            return False
        else:
            raise await self.reg.fail(resp, f"blob {self.desc.digest}")
        self._resp = resp
        self._iter = resp.aiter_raw()  # type: ignore[assignment]
        return True

    async def aclose(self) -> None:
        resp, it, self._resp, self._iter = self._resp, self._iter, None, None
        with trio.CancelScope(shield=True):
            if it is not None:
                with contextlib.suppress(httpx.HTTPError):
                    await it.aclose()
            if resp is not None:
                await resp.aclose()

    def _progress(self, current: int, done: bool = False) -> None:
        now = trio.current_time()
        if done or now - self._last >= PROGRESS_INTERVAL:
            self._last = now
            self.emit(ProgressEvent("pull", self.sid, "Downloading", current, self.desc.size))

    async def _exhaust(self) -> bytes:
        """Read the response to its end (bytes past the blob's size are returned, for the
        reader to refuse); an exhausted stream leaves no half-consumed generators behind."""
        extra = b""
        assert self._iter is not None
        with contextlib.suppress(StopAsyncIteration, httpx.TransportError):
            while len(extra) <= 1 << 16:
                extra += await self._iter.__anext__()
        return extra

    async def _read(self, offset: int) -> bytes:
        """The next bytes of the open response, batched up to ``BATCH`` (a worker thread
        round trip per network read would cost more than the read).  A failure after some
        bytes returns those and closes the response; the next call reconnects."""
        assert self._iter is not None
        parts: list[bytes] = []
        got = 0
        while got < BATCH:
            try:
                data = await self._iter.__anext__()
            except (StopAsyncIteration, httpx.TransportError):
                if not got:
                    raise
                await self.aclose()
                break
            if self._skip:
                drop = min(self._skip, len(data))
                self._skip -= drop
                data = data[drop:]
            parts.append(data)
            got += len(data)
            if offset + got >= self.desc.size:
                parts.append(await self._exhaust())
                break
        out = b"".join(parts)
        self.fetched += len(out)
        self._progress(offset + len(out), done=offset + len(out) >= self.desc.size)
        return out

    async def chunk(self, offset: int) -> bytes:
        """The bytes from ``offset`` on (some of them); b"" at the end of the blob."""
        failures = 0
        if offset >= self.desc.size:
            await self.aclose()
            return b""
        if self._last < 0:
            self._progress(offset, done=True)
        while True:
            err: object
            try:
                if self._iter is None and not await self._open(offset):
                    return b""
                assert self._iter is not None
                data = await self._read(offset)
            except StopAsyncIteration:
                await self.aclose()
                err = "the connection closed early"
            except httpx.TransportError as exc:
                await self.aclose()
                err = exc
            except RegistryError as exc:
                await self.aclose()
                if exc.status and exc.status < 500 and exc.status != 429:
                    raise
                err = exc
            else:
                if data:
                    return data
                continue
            failures += 1
            if failures > self.retry.attempts:
                raise RegistryError(f"downloading blob {self.desc.digest}: {err} (gave up after "
                                    f"{self.retry.attempts} retries at byte {offset})")
            delay = self.retry.delay(failures - 1)
            log.info("blob %s: %s at byte %d of %d; resuming in %.1fs", self.sid, err, offset,
                     self.desc.size, delay)
            await trio.sleep(delay)


class PartialReader:
    """What ``ingest`` reads: the bytes already in the partial file, then new ones that
    ``pump`` fetches, appends to the file and queues.

    ``pump`` runs in the worker thread trio started (so a cancelled pull cancels its fetch)
    while ``ingest`` reads on a thread of its own, at most ``AHEAD`` chunks behind: the
    network (the trio thread), the partial file and the reader's hashing, inflating and
    writing overlap instead of taking turns.  At the end of the blob ``pump`` syncs the
    partial file while the reader finishes the layer.  ``finish`` (the reader is done) stops
    the pump; ``fail`` hands the reader the pump's exception."""

    AHEAD = 8

    def __init__(self, fd: int, desc: oci.Descriptor, fetch: Callable[[int], bytes]) -> None:
        self.fd, self.desc, self.fetch = fd, desc, fetch
        self.resumed = os.fstat(fd).st_size  # bytes from an earlier attempt
        if self.resumed > desc.size:
            os.ftruncate(fd, 0)
            self.resumed = 0
        self.pos = 0  # bytes handed to the reader
        self.buf = b""
        self.eof = False  # the pump's end was handed out: nothing more will come
        self._ahead: queue.Queue[bytes | BaseException] = queue.Queue(self.AHEAD)
        self._done = threading.Event()

    def pump(self) -> None:
        """Fetch from the end of the partial file on, append, queue, until the end of the
        blob (then b"") or until the reader is done."""
        off = self.resumed
        while not self._done.is_set():
            data = self.fetch(off)
            if data and off + len(data) > self.desc.size:
                raise DigestMismatch(f"blob {self.desc.digest} is larger than the "
                                     f"{self.desc.size} bytes expected")
            if data:
                with disk_full_guard("a download"):
                    os.pwrite(self.fd, data, off)
                off += len(data)
            else:
                with disk_full_guard("a blob"):
                    os.fsync(self.fd)  # while the reader finishes; publish needs it
            self._put(data)
            if not data:
                return

    def _put(self, item: bytes | BaseException) -> None:
        while not self._done.is_set():
            with contextlib.suppress(queue.Full):
                self._ahead.put(item, timeout=0.1)
                return

    def fail(self, exc: BaseException) -> None:
        self._put(exc)

    def finish(self) -> None:
        self._done.set()

    def _next(self, n: int) -> bytes:
        if self.pos < self.resumed:
            data = os.pread(self.fd, min(n, self.resumed - self.pos), self.pos)
            if not data:
                raise StoreError(f"partial download of {self.desc.digest} shrank while read")
        elif self.eof:
            return b""  # (a reader that drains after the end must not wait for more)
        else:
            item = self._ahead.get()
            if isinstance(item, BaseException):
                self._ahead.put(item)  # again, for a reader that reads on
                raise item
            data = item
            self.eof = not data
        self.pos += len(data)
        return data

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = CHUNK
        if not self.buf:
            self.buf = self._next(max(n, CHUNK))
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def drain(self) -> None:
        while self.read(CHUNK):
            pass

    def digest(self) -> Digest:
        """What the partial file hashes to (after ``drain``: the whole blob as received)."""
        h = new_hasher(self.desc.digest)
        off = 0
        while data := os.pread(self.fd, CHUNK, off):
            h.update(data)
            off += len(data)
        return h.digest


def open_partial(path: str, blobs: BlobStore, digest: Digest) -> int | None:
    """The partial file of ``digest``, opened and locked; None when another command stored
    the blob while we waited for the lock."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        except BaseException:
            os.close(fd)
            raise
        if not same:
            os.close(fd)
            continue
        if blobs.has(digest):
            os.unlink(path)
            os.close(fd)
            return None
        return fd
