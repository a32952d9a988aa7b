"""ComfyClient against the test double's fault knobs: the failures a real server only shows sometimes."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator

import pytest

from comfy_orchestrator.client import ComfyClient
from comfy_orchestrator.config import Timeouts
from comfy_orchestrator.errors import (
    BackendUnavailable,
    ClientClosed,
    ComfyTimeout,
    DeadlineExceeded,
    JobCancelled,
    PromptLost,
    RequestTimeout,
    StalledTimeout,
)
from comfy_orchestrator.testing import FakeComfyUI, HangMode
from tests.contract import graphs
from tests.contract.conftest import DOUBLE_MODELS

FAST = Timeouts(connect=2, request=5, stall=1.0, poll=0.1, unreachable=1.0)


@pytest.fixture
async def server() -> AsyncIterator[FakeComfyUI]:
    async with FakeComfyUI(models=DOUBLE_MODELS, step_delay=0.02, name="faulty") as srv:
        yield srv


def _slow() -> dict:
    return graphs.tiny_unet("tiny_sd2_unet.safetensors", "taesd", steps=50, seed=graphs.fresh_colour())


async def test_history_written_late_is_waited_for(server: FakeComfyUI) -> None:
    server.faults.history_delay = 0.4
    async with ComfyClient(server.url, timeouts=FAST) as client:
        start = time.monotonic()
        result = await client.run(graphs.model_free(), timeout=10)
    assert time.monotonic() - start >= 0.4
    assert result.output_images  # never "done" without the record


async def test_socket_dropped_mid_run_reconnects_and_reconciles(server: FakeComfyUI) -> None:
    server.faults.ws_drop_after = 4
    async with ComfyClient(server.url, timeouts=FAST) as client:
        result = await client.run(graphs.model_free(), timeout=10)
        assert client.reconnects >= 1
        server.faults.ws_drop_after = None
        assert (await client.run(graphs.model_free(), timeout=10)).output_images
    assert result.output_images


async def test_silent_running_prompt_trips_the_watchdog(server: FakeComfyUI) -> None:
    server.faults.hang = HangMode.MID_RUN
    async with ComfyClient(server.url, timeouts=Timeouts(connect=2, request=5, stall=0.5, poll=0.1)) as client:
        with pytest.raises(StalledTimeout) as info:
            await client.run(graphs.model_free(), timeout=10)
    assert isinstance(info.value, TimeoutError)


async def test_deadline_interrupts_and_dequeues(server: FakeComfyUI) -> None:
    server.faults.hang = HangMode.START
    async with ComfyClient(server.url, timeouts=FAST) as client:
        with pytest.raises(DeadlineExceeded):
            await client.run(graphs.model_free(), timeout=0.5)
        assert (await client.queue()).pending == ()  # the client took its prompt back


async def test_waiting_in_the_queue_is_not_a_stall(server: FakeComfyUI) -> None:
    async with ComfyClient(server.url, timeouts=Timeouts(connect=2, request=5, stall=0.3, poll=0.05)) as client:
        first = asyncio.create_task(client.run(_slow(), timeout=20))  # 50 steps × 20 ms, events all along
        second = await client.run(graphs.model_free(), timeout=20)  # silent ~1 s while queued
        assert second.output_images
        assert (await first).output_images


async def test_server_death_mid_job_is_backend_unavailable(server: FakeComfyUI) -> None:
    server.faults.die_mid_job = True
    async with ComfyClient(server.url, timeouts=FAST) as client:
        start = time.monotonic()
        with pytest.raises(BackendUnavailable):
            await client.run(_slow(), timeout=30)
    assert time.monotonic() - start < 5


async def test_restart_that_loses_the_queue_is_never_reported_done(server: FakeComfyUI) -> None:
    server.faults.die_mid_job = True
    server.faults.restart_after = 0.2
    async with ComfyClient(server.url, timeouts=FAST) as client:
        with pytest.raises(PromptLost):
            await client.run(_slow(), timeout=30)
        # The same client goes on working once the server is back.
        assert (await client.run(graphs.model_free(), timeout=10)).output_images


async def test_http_500_is_backend_unavailable_with_status(server: FakeComfyUI) -> None:
    async with ComfyClient(server.url, timeouts=FAST) as client:
        server.faults.http_500 = 1
        with pytest.raises(BackendUnavailable) as info:
            await client.submit(graphs.model_free())
        assert info.value.status == 500
        assert (await client.run(graphs.model_free(), timeout=10)).output_images


async def test_refused_connection(server: FakeComfyUI) -> None:
    server.faults.refuse = True
    client = ComfyClient(server.url, timeouts=FAST)
    with pytest.raises(BackendUnavailable):
        await client.connect()
    await client.close()


async def test_nothing_listening() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = ComfyClient(f"http://127.0.0.1:{port}", timeouts=FAST)
    with pytest.raises(BackendUnavailable, match="unreachable"):
        await client.connect()
    await client.close()


async def test_slow_answers_time_out_as_timeout_errors(server: FakeComfyUI) -> None:
    async with ComfyClient(server.url, timeouts=FAST) as client:
        server.faults.latency = 1.0
        slow_client = ComfyClient(server.url, timeouts=Timeouts(connect=2, request=0.2))
        with pytest.raises(RequestTimeout) as info:
            await slow_client.queue()
        assert isinstance(info.value, TimeoutError)
        assert isinstance(info.value, ComfyTimeout)
        await slow_client.close()
        server.faults.latency = 0.0
        assert (await client.queue()).running == ()


async def test_cancelling_run_interrupts_only_that_prompt(server: FakeComfyUI) -> None:
    async with ComfyClient(server.url, timeouts=FAST) as client:
        started = asyncio.Event()
        victim = asyncio.create_task(client.run(_slow(), timeout=30, on_progress=lambda e: started.set()))
        await asyncio.wait_for(started.wait(), 10)
        other = asyncio.create_task(client.run(graphs.model_free(), timeout=30))
        await asyncio.sleep(0.05)
        victim.cancel()
        with pytest.raises(asyncio.CancelledError):
            await victim
        assert (await other).output_images
        queue = await client.queue()
        assert queue.running == ()
        assert queue.pending == ()


async def test_cancelling_run_while_the_prompt_is_queued_but_unanswered_takes_it_off(server: FakeComfyUI) -> None:
    """The server queued the prompt, its answer is still on the way: the prompt is not left running."""
    async with ComfyClient(server.url, timeouts=FAST) as client:
        server.faults.response_delay = 1.0
        run = asyncio.create_task(client.run(_slow(), timeout=30, prompt_id="late-answer"))
        async with asyncio.timeout(10):
            while True:
                if server.running_prompt_id == "late-answer":
                    break
                await asyncio.sleep(0.01)
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
        server.faults.response_delay = 0.0
        assert server.history["late-answer"]["status"]["status_str"] != "success"
        queue = await client.queue()
        assert queue.running == ()
        assert queue.pending == ()


async def test_interrupted_prompt_raises_job_cancelled(server: FakeComfyUI) -> None:
    async with ComfyClient(server.url, timeouts=FAST) as client:
        started = asyncio.Event()
        run = asyncio.create_task(client.run(_slow(), timeout=30, on_progress=lambda e: started.set()))
        await asyncio.wait_for(started.wait(), 10)
        (running,) = (await client.queue()).running
        await client.interrupt(running)
        with pytest.raises(JobCancelled):
            await run


async def test_closed_client_refuses_reuse(server: FakeComfyUI) -> None:
    client = ComfyClient(server.url)
    async with client:
        await client.queue()
    with pytest.raises(ClientClosed):
        await client.queue()
    with pytest.raises(ClientClosed):
        await client.run(graphs.model_free())
    with pytest.raises(ClientClosed):
        await client.connect()


async def test_events_stream_of_a_submitted_prompt(server: FakeComfyUI) -> None:
    async with ComfyClient(server.url) as client:
        prompt_id = await client.submit(graphs.model_free())
        kinds = [type(e).__name__ async for e in client.events(prompt_id)]
        assert kinds[0] == "ExecutionStart"
        assert kinds[-1] == "ExecutionSuccess"
        with pytest.raises(KeyError):
            [e async for e in client.events("unknown")]
