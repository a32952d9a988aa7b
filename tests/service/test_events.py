"""The event socket replays what a reader missed (``after=SEQ``), then follows new events: this
process's from its feed, anyone else's from the store."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from comfy_orchestrator.service.keys import NOTIFIER, STORE
from comfy_orchestrator.store import EventRecord, SQLiteJobStore
from tests.service.conftest import TOKENS, Service, auth, ops_graph


async def _read_until(ws: aiohttp.ClientWebSocketResponse, job_id: str, final: str) -> list[dict[str, Any]]:
    seen = []
    async with asyncio.timeout(15):
        while True:
            event = await ws.receive_json()
            seen.append(event)
            if event["job_id"] == job_id and event["type"] == final:
                return seen


async def test_replay_after_a_disconnect_gives_exactly_the_missed_events(service: Service) -> None:
    url = f"{service.url}/v1/events"
    async with service.session.ws_connect(url, headers=auth()) as ws:
        async with await service.submit({"graph": ops_graph(color=1)}) as resp:
            first = (await resp.json())["id"]
        seen = await _read_until(ws, first, "job.succeeded")
    last = seen[-1]["seq"]
    assert [e["seq"] for e in seen] == sorted({e["seq"] for e in seen})
    assert {"job.queued", "job.running", "job.attempt", "job.succeeded"} <= {e["type"] for e in seen}

    async with await service.submit({"graph": ops_graph(color=2)}) as resp:  # while disconnected
        second = (await resp.json())["id"]
    await service.wait_state(second, "succeeded")

    async with service.session.ws_connect(url, params={"after": str(last), "token": TOKENS["acme"]}) as ws:
        missed = await _read_until(ws, second, "job.succeeded")
    assert all(e["job_id"] == second for e in missed)
    async with service.session.ws_connect(url, params={"after": "0"}, headers=auth()) as ws:
        everything = await _read_until(ws, second, "job.succeeded")
    assert missed == [e for e in everything if e["seq"] > last]
    assert seen == [e for e in everything if e["seq"] <= last and e["seq"] >= seen[0]["seq"]]
    async with service.session.ws_connect(url, params={"after": "0", "job": first}, headers=auth()) as ws:
        replay = await _read_until(ws, first, "job.succeeded")
    assert replay == [e for e in everything if e["job_id"] == first]


async def test_events_are_per_tenant(service: Service) -> None:
    async with service.session.ws_connect(f"{service.url}/v1/events", params={"after": "0"},
                                          headers=auth("other")) as ws:
        async with await service.submit({"graph": ops_graph(color=3)}) as resp:
            job_id = (await resp.json())["id"]
        await service.wait_state(job_id, "succeeded")
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.7):
                await ws.receive_json()


async def test_bad_after_is_400(service: Service) -> None:
    async with service.session.get(f"{service.url}/v1/events", params={"after": "-1"}, headers=auth()) as resp:
        assert resp.status == 400


async def test_live_events_come_from_the_feed_and_a_siblings_from_the_store(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = service.app[STORE]
    reads: list[int] = []
    read = store.events_since

    async def counted(tenant: str, seq: int, **kwargs: Any) -> list[EventRecord]:
        reads.append(seq)
        return await read(tenant, seq, **kwargs)

    monkeypatch.setattr(store, "events_since", counted)
    async with service.session.ws_connect(f"{service.url}/v1/events", headers=auth()) as ws:
        seen: list[dict[str, Any]] = []
        for color in range(4):
            async with await service.submit({"graph": ops_graph(color=color)}) as resp:
                job_id = (await resp.json())["id"]
            seen += await _read_until(ws, job_id, "job.succeeded")
        assert len(seen) >= 16
        assert [e["seq"] for e in seen] == list(range(seen[0]["seq"], seen[-1]["seq"] + 1))
        assert len(reads) < len(seen) // 2  # the first read and the odd poll, not one per wake-up

        # another process's event is not in this process's feed: its wake-up reads the store
        async with SQLiteJobStore(store.path, store.blobs.root) as sibling:
            theirs = await sibling.append_event(job_id, "job.progress", {"from": "sibling"})
        before = len(reads)
        service.app[NOTIFIER].notify(relay=False)
        event = await _read_until(ws, job_id, "job.progress")
        assert event[-1]["seq"] == theirs.seq
        assert len(reads) > before
