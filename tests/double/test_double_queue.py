"""Queue routes, interrupts, prompt ids and numbers, history routes, validation answers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest

from comfy_orchestrator.testing import FakeComfyUI, HangMode
from tests.double.conftest import (
    MODELS,
    WsClient,
    chain_prompt,
    colour,
    history,
    recorded,
    sampler_prompt,
    submit,
    tiny_prompt,
    transcript,
)


async def _get(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as response:
        assert response.status == 200
        return await response.json()


async def _post(session: aiohttp.ClientSession, url: str, body: Any) -> int:
    async with session.post(url, json=body) as response:
        await response.read()
        return response.status


async def test_queue_lists_delete_and_clear_leave_the_running_prompt(
    session: aiohttp.ClientSession, server: FakeComfyUI, client: WsClient
) -> None:
    server.faults.hang = HangMode.MID_RUN
    running = await submit(session, server, tiny_prompt(), "client-a")
    await client.wait_for(lambda m: m.type == "executing" and m.prompt_id == running)
    pending = [await submit(session, server, tiny_prompt(), "client-a") for _ in range(4)]
    queue = await _get(session, f"{server.url}/api/queue")
    ((number, prompt_id, prompt, extra, outputs),) = queue["queue_running"]
    assert (number, prompt_id, outputs) == (0, running, ["9"])
    assert prompt["9"]["class_type"] == "SaveImage"
    assert extra["client_id"] == "client-a"
    assert isinstance(extra["create_time"], int)
    assert [entry[1] for entry in queue["queue_pending"]] == pending
    assert [len(entry) for entry in queue["queue_pending"]] == [5] * 4
    shape = recorded("interrupt_queue.json")["queue_while_running"]["running"][0]
    assert [type(v) for v in queue["queue_running"][0]] == [type(v) if v != "<graph>" else dict for v in shape]

    assert await _post(session, f"{server.url}/queue", {"delete": [pending[1], "no-such-id"]}) == 200
    queue = await _get(session, f"{server.url}/queue")
    assert [entry[1] for entry in queue["queue_pending"]] == [pending[0], pending[2], pending[3]]
    assert await _post(session, f"{server.url}/queue", {"clear": True}) == 200
    queue = await _get(session, f"{server.url}/queue")
    assert queue["queue_pending"] == []
    assert queue["queue_running"][0][1] == running
    server.faults.hang = None
    await client.until_done(running)
    assert await _get(session, f"{server.url}/queue") == {"queue_running": [], "queue_pending": []}
    for prompt_id in pending:
        assert await history(session, server, prompt_id) == {}


async def test_interrupt_acts_at_the_next_node_boundary(
    session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    async with FakeComfyUI(base_dir=tmp_path, node_delay=0.05) as server:
        client = await WsClient(session, server, "q").connect()
        prompt_id = await submit(session, server, chain_prompt(6), "q")
        await client.wait_for(lambda m: m.type == "executing" and m.data["node"] == "11")
        assert await _post(session, f"{server.url}/interrupt", {"prompt_id": "not-running"}) == 200
        assert await _post(session, f"{server.url}/api/interrupt", {"prompt_id": prompt_id}) == 200
        messages = await client.until_done(prompt_id)
        tail = [(m.type, m.data.get("node")) for m in messages[-5:]]
        assert tail == [("progress_state", None), ("executing", "12"), ("execution_interrupted", None),
                        ("status", None), ("executing", None)]
        recorded_tail = [m.type for m in transcript("interrupt_queue_ws.jsonl")][-5:]
        assert [t for t, _ in tail] == recorded_tail
        interrupted = messages[-3].data
        assert (interrupted["node_id"], interrupted["node_type"]) == ("12", "ImageInvert")
        assert interrupted["executed"] == ["1", "10", "11"]
        assert isinstance(interrupted["timestamp"], int)
        status = (await history(session, server, prompt_id))[prompt_id]["status"]
        assert (status["status_str"], status["completed"]) == ("error", False)
        assert [m[0] for m in status["messages"]] == [m[0] for m in recorded("interrupt_queue.json")[
            "interrupted_history_status"]["messages"]]
        await client.close()


async def test_interrupt_between_sampler_steps(session: aiohttp.ClientSession, tmp_path: Path) -> None:
    async with FakeComfyUI(base_dir=tmp_path, models=MODELS, step_delay=0.03) as server:
        client = await WsClient(session, server, "s").connect()
        prompt_id = await submit(session, server, sampler_prompt("a blue star", 7, steps=30), "s")
        await client.wait_for(lambda m: m.type == "progress" and m.data["value"] == 3)
        assert await _post(session, f"{server.url}/interrupt", {}) == 200
        messages = await client.until_done(prompt_id)
        (interrupted,) = [m.data for m in messages if m.type == "execution_interrupted"]
        assert (interrupted["node_id"], interrupted["node_type"]) == ("5", "KSampler")
        assert max(m.data["value"] for m in messages if m.type == "progress") < 30
        await client.close()


async def test_a_stale_interrupt_does_not_touch_the_next_prompt(
    session: aiohttp.ClientSession, server: FakeComfyUI, client: WsClient
) -> None:
    async with session.post(f"{server.url}/interrupt", data=b"not json") as response:
        assert response.status == 200
    prompt_id = await submit(session, server, tiny_prompt(), "client-a")
    messages = await client.until_done(prompt_id)
    assert "execution_success" in [m.type for m in messages]


async def test_front_number_and_client_prompt_ids(session: aiohttp.ClientSession, server: FakeComfyUI) -> None:
    server.faults.hang = HangMode.START
    answers = []
    for extra in ({}, {"front": True}, {"number": 12345.5}, {"prompt_id": "my-own-id"}, {"prompt_id": "my-own-id"}):
        async with session.post(f"{server.url}/prompt", json={"prompt": tiny_prompt(), **extra}) as response:
            answers.append(await response.json())
    assert [a["number"] for a in answers] == [0, -1, 12345.5, 2, 3]
    assert answers[3]["prompt_id"] == answers[4]["prompt_id"] == "my-own-id"
    assert all(a["node_errors"] == {} for a in answers)
    queue = await _get(session, f"{server.url}/queue")
    assert queue["queue_pending"][0][0] == -1
    server.faults.hang = None
    await server.wait_idle(5)
    entries = await _get(session, f"{server.url}/history")
    assert list(entries).count("my-own-id") == 1
    assert len(entries) == 4


async def test_history_routes(session: aiohttp.ClientSession, server: FakeComfyUI) -> None:
    ids = [await submit(session, server, tiny_prompt()) for _ in range(4)]
    await server.wait_idle(5)
    assert list(await _get(session, f"{server.url}/history")) == ids
    assert list(await _get(session, f"{server.url}/history?max_items=2")) == ids[2:]
    assert list(await _get(session, f"{server.url}/api/history?max_items=2&offset=1")) == ids[1:3]
    assert await _get(session, f"{server.url}/history/unknown") == {}
    assert await _post(session, f"{server.url}/history", {"delete": [ids[0]]}) == 200
    assert list(await _get(session, f"{server.url}/history")) == ids[1:]
    assert await _post(session, f"{server.url}/history", {"clear": True}) == 200
    assert await _get(session, f"{server.url}/history") == {}
    assert await _get(session, f"{server.url}/prompt") == {"exec_info": {"queue_remaining": 0}}


INVALID_CASES = ["unknown_class", "missing_input", "value_below_min", "bad_combo", "no_output_node",
                 "empty_prompt", "missing_class_type"]


def _invalid(case: str) -> dict[str, Any]:
    good = tiny_prompt(colour())
    if case == "unknown_class":
        return {**good, "5": {"class_type": "NoSuchNode", "inputs": {}}}
    if case == "missing_input":
        del good["1"]["inputs"]["width"]
    elif case == "value_below_min":
        good["1"]["inputs"]["width"] = 0
    elif case == "bad_combo":
        good["2"] = {"class_type": "ImageScaleBy", "inputs": {"image": ["1", 0], "upscale_method": "foo",
                                                              "scale_by": 2.0}}
        good["9"]["inputs"]["images"] = ["2", 0]
    elif case == "no_output_node":
        del good["9"]
    elif case == "empty_prompt":
        return {}
    elif case == "missing_class_type":
        return {"0": {"inputs": {}}, **good}
    return good


@pytest.mark.parametrize("case", INVALID_CASES)
async def test_invalid_prompts_get_the_recorded_400(session: aiohttp.ClientSession, server: FakeComfyUI,
                                                    case: str) -> None:
    want = recorded("invalid.json")[case]["body"]
    async with session.post(f"{server.url}/prompt", json={"prompt": _invalid(case)}) as response:
        assert response.status == 400
        body = await response.json()
    assert body["error"]["type"] == want["error"]["type"]
    if case == "missing_class_type":
        assert body["error"]["details"] == "Node ID '#0'"
    assert body["error"]["message"] == want["error"]["message"]
    assert set(body["node_errors"]) == set(want["node_errors"])
    for node_id, errors in want["node_errors"].items():
        assert [e["type"] for e in body["node_errors"][node_id]["errors"]] == [e["type"] for e in errors["errors"]]


async def test_malformed_bodies(session: aiohttp.ClientSession, server: FakeComfyUI) -> None:
    async with session.post(f"{server.url}/prompt", data=b"{not json") as response:
        assert response.status == 500
        assert response.content_type == "text/plain"
        assert await response.text() == recorded("invalid.json")["malformed_json"]["body"]
    async with session.post(f"{server.url}/prompt", json={"client_id": "x"}) as response:
        assert response.status == 400
        assert await response.json() == recorded("invalid.json")["no_prompt_key"]["body"]


async def test_free_memory_forgets_the_cache(session: aiohttp.ClientSession, server: FakeComfyUI,
                                             client: WsClient) -> None:
    prompt = tiny_prompt()
    await client.until_done(await submit(session, server, prompt, "client-a"))
    assert await _post(session, f"{server.url}/free", {"unload_models": True, "free_memory": True}) == 200
    messages = await client.until_done(await submit(session, server, prompt, "client-a"))
    assert [m.data["nodes"] for m in messages if m.type == "execution_cached"] == [[]]
