"""``ComfyClient.follow``: waiting for a prompt another client (a previous process) submitted."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from comfy_orchestrator.client import ComfyClient
from comfy_orchestrator.config import Timeouts
from comfy_orchestrator.errors import BackendUnavailable, ExecutionFailed, PromptLost
from comfy_orchestrator.testing import FakeComfyUI, NodeFailure
from tests.contract import graphs
from tests.contract.conftest import DOUBLE_MODELS

# A stall watchdog far shorter than the prompt: following a foreign prompt must not trip it.
FAST = Timeouts(connect=2, request=5, stall=0.3, poll=0.1, unreachable=1.0)


@pytest.fixture
async def server() -> AsyncIterator[FakeComfyUI]:
    async with FakeComfyUI(models=DOUBLE_MODELS, step_delay=0.02, name="follow") as srv:
        yield srv


def _slow(seed: int) -> dict:
    return graphs.tiny_unet("tiny_sd2_unet.safetensors", "taesd", steps=50, seed=seed)


async def test_follows_a_foreign_prompt_to_its_result_without_tripping_the_watchdog(server: FakeComfyUI) -> None:
    async with ComfyClient(server.url, timeouts=FAST) as owner, ComfyClient(server.url, timeouts=FAST) as heir:
        prompt_id = await owner.submit(_slow(graphs.fresh_colour()))
        result = await heir.follow(prompt_id)  # ≈1 s of steps, no event reaches heir
        assert result.prompt_id == prompt_id
        assert result.output_images
        png = await heir.download(result.output_images[0])
        assert png[:4] == b"\x89PNG"
    assert list(server.history) == [prompt_id]  # followed, never resubmitted


async def test_a_prompt_that_already_finished_is_collected_at_once(server: FakeComfyUI) -> None:
    async with ComfyClient(server.url, timeouts=FAST) as owner:
        done = await owner.run(graphs.model_free(), timeout=10)
    async with ComfyClient(server.url, timeouts=FAST) as heir:
        again = await heir.follow(done.prompt_id)
    assert again.outputs.keys() == done.outputs.keys()


async def test_an_unknown_prompt_is_lost_not_done(server: FakeComfyUI) -> None:
    async with ComfyClient(server.url, timeouts=FAST) as heir:
        with pytest.raises(PromptLost):
            await heir.follow("0b7c0d6e-0000-4000-8000-000000000000")


async def test_a_restart_that_loses_the_queue_mid_follow_is_prompt_lost(server: FakeComfyUI) -> None:
    async with ComfyClient(server.url, timeouts=FAST) as owner, ComfyClient(server.url, timeouts=FAST) as heir:
        prompt_id = await owner.submit(_slow(graphs.fresh_colour()))
        following = asyncio.create_task(heir.follow(prompt_id))
        await asyncio.sleep(0.3)
        await server.restart(lose_queue=True)
        with pytest.raises(PromptLost):
            await following


async def test_a_failing_foreign_prompt_raises_what_run_would(server: FakeComfyUI) -> None:
    server.faults.execution_error = NodeFailure(node_class="SaveImage", message="disk full")
    async with ComfyClient(server.url, timeouts=FAST) as owner, ComfyClient(server.url, timeouts=FAST) as heir:
        prompt_id = await owner.submit(graphs.model_free())
        with pytest.raises(ExecutionFailed, match="disk full"):
            await heir.follow(prompt_id)


async def test_following_its_own_prompt_is_refused(server: FakeComfyUI) -> None:
    async with ComfyClient(server.url, timeouts=FAST) as owner:
        prompt_id = await owner.submit(_slow(graphs.fresh_colour()))
        with pytest.raises(ValueError, match="run"):
            await owner.follow(prompt_id)
        await owner.cancel(prompt_id)


async def test_a_failed_connect_leaves_no_open_session() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = ComfyClient(f"http://127.0.0.1:{port}", timeouts=FAST)
    with pytest.raises(BackendUnavailable, match=str(port)):  # refused: nothing listens there
        async with client:
            pass
    assert client.closed  # closed, so no "Unclosed client session" at collection (warnings are errors)
