"""What the registry client awaits besides HTTP: sleeping, worker threads, locks, the clock.

The client's coroutines (``client``, ``auth``, ``fetches``) await HTTP through httpx and the
rest through a ``Runtime``: ``TRIO`` inside ``trio.run`` (pull, push, the lazy layers' range
fetcher), or ``BLOCKING``, whose every await completes at once — sleeping, looking up
credentials and taking a lock block the calling thread.  With a transport that blocks too
(``blocking.BlockingHTTP``), such a coroutine never suspends and ``run_sync`` runs it to its
end in the calling thread, with no event loop: the one-request-at-a-time commands (``pull
--lazy``) skip importing trio and httpcore (~60 ms), and still go through the one client with
its rules (mirrors, auth, redirects, retries).

``deadline`` bounds what runs under it in this thread, as ``trio.fail_after`` does under trio:
``BLOCKING.sleep`` and ``blocking.BlockingHTTP`` raise TimeoutError once it has passed (or
would pass while they wait), retries included.

Caveats:
* ``run_sync`` raises RuntimeError for a coroutine that does suspend (an await of a real
  event loop): a bug, never a fallback.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class Runtime(Protocol):
    async def sleep(self, seconds: float) -> None: ...

    async def to_thread(self, fn: Callable[[], T]) -> T: ...

    def lock(self) -> contextlib.AbstractAsyncContextManager[None]: ...

    def now(self) -> float: ...


class _Trio:
    """The trio event loop's."""

    async def sleep(self, seconds: float) -> None:
        import trio

        await trio.sleep(seconds)

    async def to_thread(self, fn: Callable[[], T]) -> T:
        import trio

        return await trio.to_thread.run_sync(fn)

    def lock(self) -> contextlib.AbstractAsyncContextManager[None]:
        import trio

        return trio.Lock()

    def now(self) -> float:
        import trio

        return trio.current_time()


class _Blocking:
    """Every await completes at once, in the calling thread."""

    async def sleep(self, seconds: float) -> None:
        left = remaining()
        if left is not None and seconds >= left:
            raise TimeoutError("the deadline passes before the retry")
        time.sleep(seconds)

    async def to_thread(self, fn: Callable[[], T]) -> T:
        return fn()

    def lock(self) -> contextlib.AbstractAsyncContextManager[None]:
        return _ThreadLock()

    def now(self) -> float:
        return time.monotonic()


class _ThreadLock(contextlib.AbstractAsyncContextManager[None]):
    """A ``threading.Lock`` to hold with ``async with`` (reusable, unlike a generator's)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    async def __aenter__(self) -> None:
        self._lock.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self._lock.release()


_local = threading.local()


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """What runs in this thread under the block must be done within ``seconds`` (a deadline
    already set and nearer stays)."""
    before: float | None = getattr(_local, "deadline", None)
    at = time.monotonic() + seconds
    _local.deadline = at if before is None else min(before, at)
    try:
        yield
    finally:
        _local.deadline = before


def remaining() -> float | None:
    """Seconds left to this thread's deadline (None: there is none; it may be negative)."""
    at: float | None = getattr(_local, "deadline", None)
    return None if at is None else at - time.monotonic()


TRIO: Runtime = _Trio()
BLOCKING: Runtime = _Blocking()


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro``, which must never suspend (``BLOCKING`` and a blocking transport), to its
    end in this thread; its result or its exception."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coro.close()
    raise RuntimeError("a coroutine run without an event loop suspended")
