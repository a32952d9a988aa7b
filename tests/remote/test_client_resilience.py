"""``ServiceClient`` against small real aiohttp servers that misbehave: a disk as slow as a pipe's
reader, an event socket that is accepted and closed at once."""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from comfy_orchestrator.remote import ServiceClient, ServiceUnreachable

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def serving(routes: dict[str, Handler]) -> AsyncIterator[str]:
    """A real aiohttp server on a free port with ``routes`` (GET), its base URL."""
    app = web.Application()
    for path, handler in routes.items():
        app.router.add_get(path, handler)
    async with TestServer(app) as server:
        yield f"http://{server.host}:{server.port}"


class LoopWatch:
    """The longest the event loop went without running a task that wakes every 10 ms."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            self.longest = max(self.longest, now - last)
            last = now

    async def __aenter__(self) -> LoopWatch:
        self._task = asyncio.create_task(self._tick())
        await asyncio.sleep(0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self._task


async def test_save_writes_the_file_off_the_event_loop(tmp_path: Path) -> None:
    payload = os.urandom(1 << 20)

    async def output(request: web.Request) -> web.Response:
        return web.Response(body=payload)

    # The partial file is a FIFO: opening and writing it block until a slow reader takes the bytes,
    # as a stalled network disk would. Written from the loop, that would freeze every other task.
    target = tmp_path / "out.bin"
    os.mkfifo(target.with_name("out.bin.part"))
    received = bytearray()

    def slow_reader() -> None:
        time.sleep(0.5)
        with open(target.with_name("out.bin.part"), "rb") as pipe:
            while data := pipe.read(1 << 16):
                received.extend(data)
                time.sleep(0.01)

    reader = threading.Thread(target=slow_reader)
    reader.start()
    try:
        async with serving({"/v1/jobs/{job}/outputs/{name:.+}": output}) as url, \
                ServiceClient(url, "t", timeout=5.0) as remote, LoopWatch() as watch:
            saved = await remote.save("job-1", "1/out.png", target)
    finally:
        await asyncio.to_thread(reader.join, 10)
    assert saved == target
    assert bytes(received) == payload
    assert watch.longest < 0.25, f"the loop stalled for {watch.longest:.2f} s while the file was written"
    assert not target.with_name("out.bin.part").exists()


async def test_save_is_still_atomic_and_leaves_nothing_when_cut_off(tmp_path: Path) -> None:
    async def output(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": str(1 << 20)})
        await response.prepare(request)
        await response.write(b"x" * (1 << 17))
        request.transport.close()  # type: ignore[union-attr]  # the connection drops mid-body
        return response

    async with serving({"/v1/jobs/{job}/outputs/{name:.+}": output}) as url, \
            ServiceClient(url, "t", timeout=5.0) as remote:
        with pytest.raises(ServiceUnreachable, match="cut off"):
            await remote.save("job-1", "1/out.png", tmp_path / "out.bin")
    assert os.listdir(tmp_path) == []


async def test_events_give_up_on_a_socket_that_is_accepted_and_closed_at_once() -> None:
    opened: list[float] = []

    async def events(request: web.Request) -> web.WebSocketResponse:
        opened.append(time.monotonic())
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.close()
        return ws

    async with serving({"/v1/events": events}) as url, ServiceClient(url, "t", timeout=5.0) as remote:
        started = time.monotonic()
        with pytest.raises(ServiceUnreachable, match="4 times in a row") as caught:
            async with asyncio.timeout(10):
                await anext(remote.events(reconnects=3, backoff=0.05, max_backoff=0.2))
    elapsed = time.monotonic() - started
    assert len(opened) == 4  # the first try and 3 reconnects
    assert "without an event" in str(caught.value)
    gaps = [b - a for a, b in itertools.pairwise(opened)]
    # jittered exponential: each wait is 0.05 s doubled per try, times 0.5 to 1.5, capped at 0.2 s
    for gap, nominal in zip(gaps, (0.05, 0.1, 0.2), strict=True):
        assert gap >= nominal / 2
    assert elapsed >= sum((0.05, 0.1, 0.2)) / 2


async def test_a_quiet_socket_that_lived_a_while_is_not_a_failed_try() -> None:
    """A job that stays queued sends nothing; a proxy that closes connections after a while is not
    a service that is down."""
    opened = 0

    async def events(request: web.Request) -> web.WebSocketResponse:
        nonlocal opened
        opened += 1
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        if opened == 6:
            await ws.send_json({"seq": 1, "type": "job.succeeded", "job_id": "j", "data": {},
                                "at": "2024-01-01T00:00:00+00:00"})
        else:
            await asyncio.sleep(0.15)  # open longer than max_backoff, then closed without an event
        await ws.close()
        return ws

    async with serving({"/v1/events": events}) as url, ServiceClient(url, "t", timeout=5.0) as remote:
        async with asyncio.timeout(10):
            event = await anext(remote.events(reconnects=2, backoff=0.01, max_backoff=0.1))
    assert (event.seq, opened) == (1, 6)  # five quiet sockets in a row, more than `reconnects`


async def test_a_reconnect_that_delivers_an_event_resets_the_count() -> None:
    opened = 0

    async def events(request: web.Request) -> web.WebSocketResponse:
        # two empty sockets, then one with the next event, over and over
        nonlocal opened
        opened += 1
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        if opened % 3 == 0:
            seq = opened // 3
            await ws.send_json({"seq": seq, "type": "job.progress", "job_id": "j", "data": {},
                                "at": "2024-01-01T00:00:00+00:00"})
        await ws.close()
        return ws

    async with serving({"/v1/events": events}) as url, ServiceClient(url, "t", timeout=5.0) as remote:
        seen = []
        async with asyncio.timeout(10):
            async for event in remote.events(reconnects=2, backoff=0.01, max_backoff=0.02):
                seen.append(event.seq)
                if len(seen) == 4:
                    break
    assert seen == [1, 2, 3, 4]


async def test_event_reconnect_options_are_checked() -> None:
    async with ServiceClient("http://127.0.0.1:9", "t") as remote:
        with pytest.raises(ValueError, match="backoff"):
            await anext(remote.events(backoff=0))
        with pytest.raises(ValueError, match="max_backoff"):
            await anext(remote.events(backoff=1.0, max_backoff=0.5))
        with pytest.raises(ValueError, match="reconnects"):
            await anext(remote.events(reconnects=-1))
