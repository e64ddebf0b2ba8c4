"""Retry timing of the registry client, with a fake transport and trio's autojump clock (the
one place the house style allows a fake: real waits would make these tests slow)."""

from __future__ import annotations

import email.utils
import logging
import time
from typing import Any

import httpx
import pytest
import trio
from trio.testing import MockClock

from imagestore.registry import RegistryError, RetryPolicy, open_transport
from imagestore.registry.client import Registry
from imagestore.registry.config import RegistriesConfig


class Script:
    """Answers requests from a list (an int is a status, an exception is raised) and records
    when each request came."""

    def __init__(self, answers: list[Any]) -> None:
        self.answers = answers
        self.times: list[float] = []
        self.requests: list[httpx.Request] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.times.append(trio.current_time())
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        if isinstance(answer, tuple):
            return httpx.Response(answer[0], headers=answer[1])
        return httpx.Response(answer)


def _transport(script: Script, retry: RetryPolicy | None = None) -> Any:
    return open_transport(config=RegistriesConfig(), retry=retry,
                          http=httpx.MockTransport(script))


def _retries(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]


async def test_5xx_is_retried_with_exponential_backoff(autojump_clock: MockClock,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "imagestore.registry")
    script = Script([500, 502, 503, 200])
    async with _transport(script) as t:
        start = trio.current_time()
        resp = await t.send(httpx.Request("GET", "https://registry.example/v2/"))
    assert resp.status_code == 200
    assert [round(x - start, 3) for x in script.times] == [0, 0.5, 1.5, 3.5]
    assert len(_retries(caplog)) == 3


async def test_429_honours_retry_after_seconds_and_dates(autojump_clock: MockClock,
                                                         caplog: pytest.LogCaptureFixture
                                                         ) -> None:
    caplog.set_level(logging.INFO, "imagestore.registry")
    script = Script([(429, {"Retry-After": "7"}), 200])
    async with _transport(script) as t:
        start = trio.current_time()
        await t.send(httpx.Request("GET", "https://registry.example/v2/x/blobs/y"))
    assert [round(x - start, 3) for x in script.times] == [0, 7]
    assert "status 429" in _retries(caplog)[0] and "in 7.0s" in _retries(caplog)[0]
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    script = Script([(503, {"Retry-After": when}), 200])
    async with _transport(script) as t:
        start = trio.current_time()
        await t.send(httpx.Request("GET", "https://registry.example/v2/"))
    assert 28 <= script.times[1] - start <= 31


async def test_retry_after_beyond_the_limit_is_not_waited_for(autojump_clock: MockClock) -> None:
    script = Script([(429, {"Retry-After": "3600"}), 200])
    async with _transport(script) as t:
        resp = await t.send(httpx.Request("GET", "https://registry.example/v2/"))
    assert resp.status_code == 429 and len(script.times) == 1


async def test_resets_are_retried_then_reported(autojump_clock: MockClock,
                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "imagestore.registry")
    script = Script([httpx.ReadError("connection reset by peer")])
    async with _transport(script, RetryPolicy(attempts=5, base=0.5, cap=2.0)) as t:
        start = trio.current_time()
        with pytest.raises(RegistryError, match="connection reset by peer"):
            await t.send(httpx.Request("GET", "https://registry.example/v2/"))
    assert [round(x - start, 3) for x in script.times] == [0, 0.5, 1.5, 3.5, 5.5, 7.5]
    assert len(_retries(caplog)) == 5


async def test_requests_that_must_not_repeat_are_sent_once(autojump_clock: MockClock) -> None:
    script = Script([500, 200])
    async with _transport(script) as t:
        resp = await t.send(httpx.Request("PATCH", "https://registry.example/v2/x/blobs/uploads/"
                                          "u", content=b"chunk"), retry=False)
    assert resp.status_code == 500 and len(script.times) == 1


async def test_redirect_to_another_origin_carries_no_credentials(
        autojump_clock: MockClock) -> None:
    seen: list[tuple[str, str | None]] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append((str(request.url), request.headers.get("authorization")))
        if request.url.path == "/v2/":
            return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="r"'})
        if request.url.host == "registry.example":
            return httpx.Response(307, headers={"Location": "https://cdn.example/blob?sig=1"})
        return httpx.Response(200, content=b"data")

    async with open_transport(config=RegistriesConfig(), http=httpx.MockTransport(handler)) as t:
        from imagestore.registry import Credentials
        from imagestore.registry.config import Endpoint

        reg = Registry(t, Endpoint("registry.example"), Credentials("u", "p"))
        resp = await reg.request("GET", "/v2/x/blobs/sha256:aa")
        assert resp.content == b"data"
    assert seen[1][1] is not None and seen[1][1].startswith("Basic ")
    assert seen[2] == ("https://cdn.example/blob?sig=1", None)


async def test_insecure_registries_fall_back_to_http(autojump_clock: MockClock) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.scheme == "https":
            raise httpx.ConnectError("wrong version number")
        return httpx.Response(200)

    async with open_transport(config=RegistriesConfig(insecure=("10.0.0.0/8",)),
                              http=httpx.MockTransport(handler)) as t:
        for host in ("127.0.0.1:5000", "localhost:5000", "10.1.2.3:5000"):
            reg = Registry(t, t.config.endpoint(host))
            await reg.ping()
            assert reg.base == f"http://{host}"
        reg = Registry(t, t.config.endpoint("registry.example"))
        with pytest.raises(RegistryError, match="wrong version number"):
            await reg.ping()
