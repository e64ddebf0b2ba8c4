"""The registry client's runtimes (``imagestore.registry.runtime``): a coroutine run without
an event loop, the blocking runtime's lock and deadline, and the client's retries under a
deadline (an httpx mock transport, no network)."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import trio

from imagestore.registry.client import Registry, RetryPolicy, Transport
from imagestore.registry.config import Endpoint, RegistriesConfig
from imagestore.registry.errors import RegistryError
from imagestore.registry.runtime import BLOCKING, deadline, remaining, run_sync


def test_run_sync_returns_raises_and_refuses_a_coroutine_that_suspends() -> None:
    async def value() -> int:
        async with BLOCKING.lock():
            await BLOCKING.sleep(0)
        return 7

    async def fails() -> None:
        raise KeyError("x")

    assert run_sync(value()) == 7
    with pytest.raises(KeyError):
        run_sync(fails())
    with pytest.raises(RuntimeError, match="suspended"):
        run_sync(trio.sleep(0))


def test_the_blocking_lock_is_reusable_and_excludes_other_threads() -> None:
    lock = BLOCKING.lock()
    order: list[str] = []

    async def hold(name: str, seconds: float) -> None:
        async with lock:
            order.append(f"{name}+")
            time.sleep(seconds)
            order.append(f"{name}-")

    t = threading.Thread(target=lambda: run_sync(hold("a", 0.2)))
    t.start()
    time.sleep(0.05)
    run_sync(hold("b", 0))
    t.join()
    run_sync(hold("c", 0))  # the same lock again
    assert order == ["a+", "a-", "b+", "b-", "c+", "c-"]


def test_a_deadline_bounds_sleeps_and_nests_to_the_nearer() -> None:
    assert remaining() is None
    with deadline(5):
        with deadline(0.1):
            left = remaining()
            assert left is not None and left <= 0.1
            with pytest.raises(TimeoutError):
                run_sync(BLOCKING.sleep(0.5))  # would pass it: at once, not after 0.5 s
        left = remaining()
        assert left is not None and left > 4
    assert remaining() is None


def test_retries_stop_at_the_deadline() -> None:
    """A registry answering 503 for ever: the client's retries (0.2 s apart) end when the
    deadline passes, not after all of them."""
    calls: list[float] = []

    def answer(request: httpx.Request) -> httpx.Response:
        calls.append(time.monotonic())
        return httpx.Response(503)

    t = Transport(RegistriesConfig(), RetryPolicy(attempts=20, base=0.2, cap=0.2),
                  http=httpx.MockTransport(answer), blocking=True)
    reg = Registry(t, Endpoint("registry.test", ("https",)))
    start = time.monotonic()
    with pytest.raises(TimeoutError), deadline(0.7):
        run_sync(reg.ping())
    assert time.monotonic() - start < 0.7
    assert 2 <= len(calls) <= 5
    t2 = Transport(RegistriesConfig(), RetryPolicy(attempts=2, base=0.01, cap=0.01),
                   http=httpx.MockTransport(answer), blocking=True)
    with pytest.raises(RegistryError, match="does not look like a registry|503"):
        run_sync(Registry(t2, Endpoint("registry.test", ("https",))).ping())
