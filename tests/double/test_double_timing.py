"""The double is fast, and honours node_delay / step_delay precisely without blocking the loop."""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path

import aiohttp

from comfy_orchestrator.testing import FakeComfyUI
from tests.double.conftest import MODELS, WsClient, chain_prompt, sampler_prompt, submit, tiny_prompt


async def _timed(session: aiohttp.ClientSession, server: FakeComfyUI, client: WsClient,
                 prompt: dict[str, object]) -> float:
    start = time.perf_counter()
    await client.until_done(await submit(session, server, prompt, client.client_id))
    return time.perf_counter() - start


async def test_a_trivial_prompt_takes_a_few_milliseconds(session: aiohttp.ClientSession, server: FakeComfyUI,
                                                         client: WsClient) -> None:
    times = [await _timed(session, server, client, tiny_prompt()) for _ in range(15)]
    assert statistics.median(times) < 0.03


async def test_node_delay_is_honoured(session: aiohttp.ClientSession, tmp_path: Path) -> None:
    async with FakeComfyUI(base_dir=tmp_path, node_delay=0.04) as server:
        client = await WsClient(session, server, "t").connect()
        elapsed = await _timed(session, server, client, chain_prompt(3))  # 5 nodes
        assert 0.2 <= elapsed < 0.4
        await client.close()


async def test_step_delay_is_honoured(session: aiohttp.ClientSession, tmp_path: Path) -> None:
    async with FakeComfyUI(base_dir=tmp_path, models=MODELS, step_delay=0.02) as server:
        client = await WsClient(session, server, "t").connect()
        elapsed = await _timed(session, server, client, sampler_prompt("a red circle", 1, steps=10))
        assert 0.2 <= elapsed < 0.4
        await client.close()


async def test_doubles_run_in_parallel(session: aiohttp.ClientSession,
                                                                   tmp_path: Path) -> None:
    servers = [FakeComfyUI(base_dir=tmp_path / str(i), node_delay=0.02, name=f"pool-{i}") for i in range(8)]
    for server in servers:
        await server.start()
    try:
        start = time.perf_counter()
        ids = await asyncio.gather(*(asyncio.gather(*(submit(session, server, tiny_prompt()) for _ in range(5)))
                                     for server in servers))
        await asyncio.gather(*(server.wait_idle(10) for server in servers))
        elapsed = time.perf_counter() - start
        assert elapsed < 1.0  # 5 prompts x 2 nodes x 20 ms = 0.2 s per double; one after another: 1.6 s
        for server, prompt_ids in zip(servers, ids, strict=True):
            assert set(server.history) == set(prompt_ids)
    finally:
        for server in servers:
            await server.stop()


async def test_big_images_leave_the_loop_responsive(session: aiohttp.ClientSession, server: FakeComfyUI) -> None:
    prompt = tiny_prompt()
    prompt["1"]["inputs"].update(width=2048, height=2048)
    prompt["2"] = {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 8, "sigma": 4.0}}
    prompt["9"]["inputs"]["images"] = ["2", 0]
    await submit(session, server, prompt)
    worst = 0.0
    while server.queue_remaining:
        start = time.perf_counter()
        async with session.get(f"{server.url}/queue") as response:
            await response.read()
        worst = max(worst, time.perf_counter() - start)
        await asyncio.sleep(0.005)
    assert worst < 0.2
