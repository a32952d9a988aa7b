"""Every fault knob, observed through real sockets."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest

from comfy_orchestrator.testing import FakeComfyUI, Faults, HangMode, NodeFailure
from tests.double.conftest import WsClient, basic_prompt, chain_prompt, history, submit, tiny_prompt


async def _status(session: aiohttp.ClientSession, url: str) -> int:
    async with session.get(url) as response:
        await response.read()
        return response.status


async def test_latency_is_added_to_every_request(session: aiohttp.ClientSession, server: FakeComfyUI) -> None:
    server.faults.latency = 0.1
    start = time.perf_counter()
    assert await _status(session, f"{server.url}/queue") == 200
    assert time.perf_counter() - start >= 0.1
    server.faults.latency = 0.0


async def test_http_500_answers_the_next_n_requests(session: aiohttp.ClientSession, server: FakeComfyUI) -> None:
    server.faults.http_500 = 2
    for _ in range(2):
        async with session.get(f"{server.url}/system_stats") as response:
            assert response.status == 500
            assert await response.text() == "500 Internal Server Error\n\nServer got itself in trouble"
    assert server.faults.http_500 == 0
    assert await _status(session, f"{server.url}/system_stats") == 200


async def test_refuse_closes_the_port_and_reopens_it(session: aiohttp.ClientSession, server: FakeComfyUI,
                                                     client: WsClient) -> None:
    port = server.port
    server.faults.refuse = True
    await asyncio.wait_for(client.closed.wait(), 5)
    async with aiohttp.ClientSession() as fresh:
        with pytest.raises(aiohttp.ClientConnectionError):
            await fresh.get(f"{server.url}/queue")
    server.faults.refuse = False
    assert server.port == port
    async with aiohttp.ClientSession() as fresh:
        assert await _status(fresh, f"{server.url}/queue") == 200


async def test_refused_server_keeps_its_state(session: aiohttp.ClientSession, server: FakeComfyUI) -> None:
    prompt_id = await submit(session, server, tiny_prompt())
    await server.wait_idle(5)
    server.faults.refuse = True
    server.faults.refuse = False
    async with aiohttp.ClientSession() as fresh:
        assert prompt_id in await history(fresh, server, prompt_id)


async def test_ws_drop_after_n_messages_of_a_prompt(session: aiohttp.ClientSession, server: FakeComfyUI,
                                                    client: WsClient) -> None:
    server.faults.ws_drop_after = 5
    prompt_id = await submit(session, server, basic_prompt(), "client-a")
    await asyncio.wait_for(client.closed.wait(), 5)
    start = next(i for i, m in enumerate(client.messages) if m.type == "execution_start")
    assert [m.type for m in client.messages[start:]] == [
        "execution_start", "execution_cached", "progress_state", "executing", "progress_state"]
    assert not any(m.type == "execution_success" for m in client.messages)
    await server.wait_idle(5)
    assert (await history(session, server, prompt_id))[prompt_id]["status"]["status_str"] == "success"


async def test_hang_before_start_keeps_the_prompt_pending(session: aiohttp.ClientSession, server: FakeComfyUI,
                                                          client: WsClient) -> None:
    server.faults.hang = HangMode.START
    prompt_id = await submit(session, server, tiny_prompt(), "client-a")
    await asyncio.sleep(0.1)
    assert server.queue_remaining == 1
    assert server.running_prompt_id is None
    assert not any(m.prompt_id == prompt_id for m in client.messages)
    server.faults.hang = None
    assert "execution_success" in [m.type for m in await client.until_done(prompt_id)]


async def test_hang_mid_run_goes_silent(session: aiohttp.ClientSession, server: FakeComfyUI,
                                        client: WsClient) -> None:
    server.faults.hang = HangMode.MID_RUN
    prompt_id = await submit(session, server, chain_prompt(3), "client-a")
    await client.wait_for(lambda m: m.type == "executing" and m.prompt_id == prompt_id)
    count = len(client.messages)
    await asyncio.sleep(0.15)
    assert len(client.messages) == count
    assert server.running_prompt_id == prompt_id
    server.faults.hang = None
    await client.until_done(prompt_id)


async def test_execution_error_for_a_node_class(session: aiohttp.ClientSession, server: FakeComfyUI,
                                                client: WsClient) -> None:
    server.faults.execution_error = NodeFailure.cuda_oom(node_class="ImageInvert")
    prompt_id = await submit(session, server, basic_prompt(), "client-a")
    messages = await client.until_done(prompt_id)
    (error,) = [m.data for m in messages if m.type == "execution_error"]
    assert (error["node_id"], error["node_type"], error["exception_type"]) == ("3", "ImageInvert",
                                                                               "torch.OutOfMemoryError")
    assert error["exception_message"].startswith("CUDA out of memory.")
    assert "TIPS:" in error["exception_message"]
    assert error["executed"] == ["1", "2"]
    assert set(error["current_inputs"]) == {"image"}
    assert sorted(error["current_outputs"]) == sorted(basic_prompt())
    assert getattr(server.faults, "execution_error") is None  # noqa: B009  (one prompt only: times=1)
    entry = (await history(session, server, prompt_id))[prompt_id]
    assert entry["status"]["status_str"] == "error"
    assert entry["status"]["messages"][-1][0] == "execution_error"
    again = await client.until_done(await submit(session, server, basic_prompt(), "client-a"))
    assert "execution_success" in [m.type for m in again]


async def test_execution_error_for_every_prompt_until_cleared(
    session: aiohttp.ClientSession, server: FakeComfyUI, client: WsClient
) -> None:
    server.faults.execution_error = NodeFailure("ValueError", "boom", times=None)
    for _ in range(2):
        messages = await client.until_done(await submit(session, server, tiny_prompt(), "client-a"))
        (error,) = [m.data for m in messages if m.type == "execution_error"]
        assert (error["node_id"], error["exception_type"], error["exception_message"]) == ("1", "ValueError", "boom\n")
    server.faults.execution_error = None


async def test_die_mid_job_forgets_everything_until_restart(session: aiohttp.ClientSession,
                                                            server: FakeComfyUI, client: WsClient) -> None:
    done = await submit(session, server, tiny_prompt(), "client-a")
    await client.until_done(done)
    server.faults.die_mid_job = True
    dying = await submit(session, server, chain_prompt(3), "client-a")
    await asyncio.wait_for(client.closed.wait(), 5)
    assert any(m.type == "executing" and m.prompt_id == dying for m in client.messages)
    assert not _alive(server)
    async with aiohttp.ClientSession() as fresh:
        with pytest.raises(aiohttp.ClientConnectionError):
            await fresh.get(f"{server.url}/queue")
    port = server.port
    await server.restart()
    assert server.port == port
    assert _alive(server)
    async with aiohttp.ClientSession() as fresh:
        assert await history(fresh, server, done) == {}
        assert await history(fresh, server, dying) == {}
        async with fresh.get(f"{server.url}/queue") as response:
            assert await response.json() == {"queue_running": [], "queue_pending": []}
        async with fresh.post(f"{server.url}/prompt", json={"prompt": tiny_prompt()}) as response:
            assert (await response.json())["number"] == 0


async def test_restart_after_revives_on_its_own(tmp_path: Path) -> None:
    async with FakeComfyUI(base_dir=tmp_path, faults=Faults(restart_after=0.2)) as server, \
            aiohttp.ClientSession() as session:
        client = await WsClient(session, server, "r").connect()
        server.faults.die_mid_job = True
        await submit(session, server, chain_prompt(2), "r")
        await asyncio.wait_for(client.closed.wait(), 5)
        died = time.perf_counter()
        async with asyncio.timeout(5), aiohttp.ClientSession() as fresh:
            while True:
                try:
                    assert await _status(fresh, f"{server.url}/system_stats") == 200
                    break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.02)
        assert time.perf_counter() - died >= 0.15
        assert _alive(server)


def _alive(server: FakeComfyUI) -> bool:
    return server.alive


async def test_restart_loses_or_keeps_the_queue(session: aiohttp.ClientSession, server: FakeComfyUI) -> None:
    server.faults.hang = HangMode.START
    kept = await submit(session, server, tiny_prompt())
    await server.restart(lose_queue=False)
    assert server.queue_remaining == 1
    await server.restart()
    assert server.queue_remaining == 0
    server.faults.hang = None
    async with aiohttp.ClientSession() as fresh:
        assert await history(fresh, server, kept) == {}


async def test_kill_then_restart(session: aiohttp.ClientSession, server: FakeComfyUI, client: WsClient) -> None:
    await server.kill()
    await asyncio.wait_for(client.closed.wait(), 5)
    assert not _alive(server)
    assert server.queue_remaining == 0
    await server.restart()
    async with aiohttp.ClientSession() as fresh:
        assert await _status(fresh, f"{server.url}/api/features") == 200


def test_faults_clear_turns_everything_off() -> None:
    faults = Faults(latency=1, http_500=3, refuse=True, ws_drop_after=2, hang=HangMode.START, history_delay=1,
                    execution_error=NodeFailure(), die_mid_job=True, restart_after=1)
    seen: list[str] = []
    faults.subscribe(seen.append)
    faults.clear()
    assert faults == Faults()
    assert "refuse" in seen
    assert "hang" in seen
