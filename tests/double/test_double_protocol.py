"""The double's WebSocket traffic, message for message, against the recordings of real servers."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from comfy_orchestrator.testing import FakeComfyUI, HangMode
from tests.double.conftest import (
    Msg,
    WsClient,
    basic_prompt,
    colour,
    history,
    recorded,
    sampler_prompt,
    shape,
    submit,
    tiny_prompt,
    transcript,
)


def shapes(messages: list[Msg]) -> list[tuple[object, ...]]:
    return [shape(m) for m in messages]


@pytest.mark.parametrize("version", ["", "horde_0.3.75/"])
async def test_basic_graph_sends_what_a_real_server_sends(
    session: aiohttp.ClientSession, server: FakeComfyUI, client: WsClient, version: str
) -> None:
    prompt_id = await submit(session, server, basic_prompt(), "client-a")
    ours = await client.until_done(prompt_id)
    assert shapes(ours) == shapes(transcript(f"{version}basic_wsA.jsonl", "A"))
    text = next(m for m in ours if m.type == 3).raw
    assert text == bytes.fromhex("00000003" "00000001") + b"5width: 128, height: 128\n batch size: 1"
    executed = {m.data["node"]: m.data["output"] for m in ours if m.type == "executed"}
    assert executed["9"] == {"images": [{"filename": "orch_basic_00001_.png", "subfolder": "", "type": "output"}]}
    assert executed["6"] == {"text": ["128"]}
    (preview,) = executed["7"]["images"]
    assert preview["type"] == "temp"
    assert preview["filename"].startswith("ComfyUI_temp_")
    assert preview["filename"].endswith("_00001_.png")
    assert len(preview["filename"]) == len("ComfyUI_temp_xxxxx_00001_.png")


async def test_history_entry_has_the_recorded_shape(
    session: aiohttp.ClientSession, server: FakeComfyUI, client: WsClient
) -> None:
    prompt_id = await submit(session, server, basic_prompt(), "client-a", extra_data={"orch_tag": "basic"})
    await client.until_done(prompt_id)
    ((key, entry),) = (await history(session, server, prompt_id)).items()
    (_, want), = recorded("basic_history.json").items()
    assert key == prompt_id
    assert set(entry) == set(want)
    number, pid, graph, extra, outputs = entry["prompt"]
    assert (number, pid, graph) == (0, prompt_id, basic_prompt())
    assert extra["orch_tag"] == "basic"
    assert extra["client_id"] == "client-a"
    assert "create_time" in extra
    assert sorted(outputs) == sorted(want["prompt"][4])
    assert entry["outputs"]["9"] == want["outputs"]["9"]
    assert entry["outputs"]["6"] == want["outputs"]["6"]
    assert entry["meta"]["9"] == want["meta"]["9"]
    assert [m[0] for m in entry["status"]["messages"]] == [m[0] for m in want["status"]["messages"]]
    assert (entry["status"]["status_str"], entry["status"]["completed"]) == ("success", True)


async def test_other_clients_see_only_the_broadcasts(
    session: aiohttp.ClientSession, server: FakeComfyUI, client: WsClient
) -> None:
    other = await WsClient(session, server, "client-b", feature_flags=False).connect()
    prompt_id = await submit(session, server, basic_prompt(), "client-a")
    await client.until_done(prompt_id)
    await other.wait_for(lambda m: m.type == "status" and m.data["status"]["exec_info"]["queue_remaining"] == 0,
                         start=1)
    assert shapes(other.messages[1:]) == shapes(transcript("horde_0.3.75/basic_wsB_other_client.jsonl"))
    await other.close()


async def test_resubmitting_runs_nothing_and_reannounces_old_files(
    session: aiohttp.ClientSession, server: FakeComfyUI, client: WsClient
) -> None:
    first = await client.until_done(await submit(session, server, basic_prompt(), "client-a"))
    files = sorted(p.name for p in server.output_dir.iterdir())
    second = await client.until_done(await submit(session, server, basic_prompt(), "client-a"))
    assert shapes(second) == shapes(transcript("horde_0.3.75/cached_wsA.jsonl"))
    old = {m.data["node"]: m.data["output"] for m in first if m.type == "executed"}
    new = {m.data["node"]: m.data["output"] for m in second if m.type == "executed"}
    assert new == old
    assert sorted(p.name for p in server.output_dir.iterdir()) == files


async def test_partial_cache_runs_only_what_changed(
    session: aiohttp.ClientSession, server: FakeComfyUI, client: WsClient
) -> None:
    await client.until_done(await submit(session, server, basic_prompt(), "client-a"))
    changed = basic_prompt()
    changed["4"]["inputs"]["sigma"] = 2.0
    messages = await client.until_done(await submit(session, server, changed, "client-a"))
    (cached,) = [m.data["nodes"] for m in messages if m.type == "execution_cached"]
    assert cached == ["1", "2", "3", "7"]
    assert [m.data["node"] for m in messages if m.type == "executing"] == ["4", "9", "5", "6", None]
    assert [m.data["node"] for m in messages if m.type == "executed"] == ["7", "9", "6"]


async def test_a_prompt_without_client_id_talks_to_nobody(
    session: aiohttp.ClientSession, server: FakeComfyUI, client: WsClient
) -> None:
    other = await WsClient(session, server, "client-b", feature_flags=False).connect()
    prompt_id = await submit(session, server, tiny_prompt(colour()))
    await server.wait_idle(5)
    await client.wait_for(lambda m: m.type == "status" and m.data["status"]["exec_info"]["queue_remaining"] == 0,
                          start=2)
    await other.wait_for(lambda m: m.type == "status" and m.data["status"]["exec_info"]["queue_remaining"] == 0,
                         start=1)
    expected = shapes(transcript("horde_0.3.75/noclient_wsA.jsonl"))
    assert shapes(client.messages[2:]) == expected
    assert shapes(other.messages[1:]) == expected
    assert (await history(session, server, prompt_id))[prompt_id]["status"]["status_str"] == "success"
    await other.close()


async def test_execution_error_matches_the_recorded_oom(
    session: aiohttp.ClientSession, server: FakeComfyUI, client: WsClient
) -> None:
    (_, want), = recorded("exec_error_oom_history.json").items()
    prompt_id = await submit(session, server, want["prompt"][2], "client-a")
    messages = await client.until_done(prompt_id)
    assert shapes(messages) == shapes(transcript("horde_0.3.75/exec_error_oom_ws.jsonl"))
    (error,) = [m.data for m in messages if m.type == "execution_error"]
    want_error = want["status"]["messages"][-1][1]
    for key in ("node_id", "node_type", "executed", "exception_message", "exception_type", "current_inputs"):
        assert error[key] == want_error[key], key
    assert sorted(error["current_outputs"]) == sorted(want_error["current_outputs"])
    assert error["traceback"]
    assert all(isinstance(line, str) for line in error["traceback"])
    entry = (await history(session, server, prompt_id))[prompt_id]
    assert entry["outputs"] == {}
    assert entry["meta"] == {}
    assert {k: v for k, v in entry["status"].items() if k != "messages"} == {"status_str": "error", "completed": False}
    assert [m[0] for m in entry["status"]["messages"]] == [m[0] for m in want["status"]["messages"]]


async def test_sampler_progress_and_previews_follow_the_recording(
    session: aiohttp.ClientSession, server: FakeComfyUI, client: WsClient
) -> None:
    legacy = await WsClient(session, server, "legacy", feature_flags=False).connect()
    results = []
    for ws, name in ((client, "client-a"), (legacy, "legacy")):
        prompt_id = await submit(session, server, sampler_prompt("a red circle", colour(), 4), name)
        results.append(await ws.until_done(prompt_id))
    ours, legacy_ours = ([_local(m) for m in msgs if _in_node(m, "5")] for msgs in results)
    recorded_sample = [_local(m) for m in transcript("sample_ws.jsonl") if _in_node(m, "4")]
    recorded_legacy = [_local(m) for m in transcript("legacy_preview_ws.jsonl") if _in_node(m, "4")]
    assert len(ours) == 14
    assert ours == recorded_sample[: len(ours)]
    assert legacy_ours[:4] == [("progress_state", "running", 0.0, 1.0), ("progress_state", "running", 1, 4),
                               ("progress", 1, 4), ("bin", 1)]
    assert [m[:2] for m in recorded_legacy[1:4]] == [("progress_state", "running"), ("progress", 1), ("bin", 1)]
    frame = next(m for m in results[0] if m.type == 4).raw
    length = int.from_bytes(frame[4:8], "big")
    meta = json.loads(frame[8:8 + length])
    assert meta == {"node_id": "5", "prompt_id": results[0][2].prompt_id, "display_node_id": "5",
                    "parent_node_id": None, "real_node_id": "5", "image_type": "image/jpeg"}
    assert frame[8 + length:8 + length + 3] == b"\xff\xd8\xff"
    assert next(m for m in results[1] if m.type == 1).raw[4:8] == (1).to_bytes(4, "big")
    await legacy.close()


def _local(msg: Msg) -> tuple[object, ...]:
    if isinstance(msg.type, int):
        return ("bin", msg.type)
    if msg.type == "progress":
        return ("progress", msg.data["value"], msg.data["max"])
    state = list(msg.data["nodes"].values())[-1]
    return ("progress_state", state["state"], state["value"], state["max"])


def _in_node(msg: Msg, node: str) -> bool:
    """The KSampler stretch of a run: its progress, previews and its own progress_state."""
    if isinstance(msg.type, int):
        return msg.type in (1, 4)
    if msg.type == "progress":
        return True
    if msg.type == "progress_state":
        last: str = list(msg.data["nodes"])[-1]
        return last == node
    return False


async def test_parallel_clients_never_see_each_others_events(
    session: aiohttp.ClientSession, server: FakeComfyUI
) -> None:
    clients = [await WsClient(session, server, f"par-{i}").connect() for i in range(4)]
    owned: dict[str, set[str]] = {c.client_id: set() for c in clients}

    async def drive(ws: WsClient) -> None:
        for _ in range(5):
            prompt_id = await submit(session, server, tiny_prompt(), ws.client_id)
            owned[ws.client_id].add(prompt_id)
            await ws.until_done(prompt_id)

    await asyncio.gather(*(drive(ws) for ws in clients))
    for ws in clients:
        foreign = [m for m in ws.messages if m.prompt_id is not None and m.prompt_id not in owned[ws.client_id]]
        assert foreign == []
        done = {m.prompt_id for m in ws.messages if m.type == "execution_success"}
        assert done == owned[ws.client_id]
        await ws.close()


async def test_history_is_written_after_execution_success(
    session: aiohttp.ClientSession, server: FakeComfyUI, client: WsClient
) -> None:
    server.faults.history_delay = 0.3
    prompt_id = await submit(session, server, tiny_prompt(), "client-a")
    await client.wait_for(lambda m: m.type == "execution_success" and m.prompt_id == prompt_id)
    assert await history(session, server, prompt_id) == {}
    messages = await client.until_done(prompt_id)
    assert [m.type for m in messages[-3:]] == ["execution_success", "status", "executing"]
    assert prompt_id in await history(session, server, prompt_id)


async def test_reconnecting_client_is_told_the_running_node(session: aiohttp.ClientSession,
                                                            server: FakeComfyUI, client: WsClient) -> None:
    server.faults.hang = HangMode.MID_RUN
    prompt_id = await submit(session, server, tiny_prompt(), "client-a")
    await client.wait_for(lambda m: m.type == "executing" and m.prompt_id == prompt_id)
    again = await WsClient(session, server, "client-a", feature_flags=False).connect()
    await again.wait_for(lambda m: m.type == "executing")
    assert [m.type for m in again.messages[:2]] == ["status", "executing"]
    assert again.messages[1].data == {"node": "1"}
    server.faults.hang = None
    await again.until_done(prompt_id)
    await again.close()
