"""Deleting jobs: ``DELETE /v1/jobs/{id}`` for a tenant's ended job, and ``[store] keep_days``
retention, through a running service over real sockets."""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from pathlib import Path

from comfy_orchestrator.pipelines import DiskCache
from comfy_orchestrator.service.keys import STORE
from comfy_orchestrator.store import Claim, SQLiteJobStore
from tests.service.conftest import Service, auth, ops_graph, running_service
from tests.store.conftest import FakeClock


async def _status(service: Service, method: str, path: str, tenant: str = "acme") -> int:
    async with service.session.request(method, f"{service.url}{path}", headers=auth(tenant)) as resp:
        await resp.read()
        return resp.status


async def test_a_deleted_job_is_gone_with_its_outputs_and_an_active_one_is_refused(tmp_path: Path) -> None:
    async with running_service(tmp_path, node_delay=0.5) as service:
        async with await service.submit({"graph": ops_graph(color=0x102030, width=8, height=8, scale_by=1.0,
                                                            blur_radius=1)}) as resp:
            assert resp.status == 202
            job_id = (await resp.json())["id"]
        await service.wait_state(job_id, "running")
        assert await _status(service, "DELETE", f"/v1/jobs/{job_id}") == 409  # running: cancel it first
        done = await service.wait_state(job_id, "succeeded")
        [name] = done["outputs"]
        [output] = await service.app[STORE].list_outputs("acme", job_id)
        assert output.path.exists()
        assert await _status(service, "DELETE", f"/v1/jobs/{job_id}", tenant="other") == 404  # not theirs
        assert await _status(service, "DELETE", f"/v1/jobs/{job_id}") == 204
        assert await _status(service, "GET", f"/v1/jobs/{job_id}") == 404
        assert await _status(service, "GET", f"/v1/jobs/{job_id}/outputs/{name}") == 404
        assert await _status(service, "DELETE", f"/v1/jobs/{job_id}") == 404
        assert not output.path.exists()  # no other job named that content
        assert [e for e in await service.app[STORE].events_since("acme", 0) if e.job_id == job_id] == []


async def test_keep_days_deletes_ended_jobs_older_than_that_at_start_up(tmp_path: Path) -> None:
    ten_days_ago = FakeClock(time.time() - 10 * 86400)
    async with SQLiteJobStore(tmp_path / "jobs.db", tmp_path / "outputs", clock=ten_days_ago) as store:
        old, _ = await store.create_job("acme", "graph", ops_graph(color=1), claim=Claim("w", 30))
        output = await store.stage_output(old.id, "9/a.png", b"ten days old")
        assert await store.complete_job(old.id, {}, [output])
        unfinished, _ = await store.create_job("acme", "graph", ops_graph(color=2))  # queued: it runs, it stays
    stale = await asyncio.to_thread(_stale_cache_entry, tmp_path / "pipeline-cache")
    store_section = {"path": str(tmp_path / "jobs.db"), "outputs_dir": str(tmp_path / "outputs"), "keep_days": 7}
    async with running_service(tmp_path, extra={"store": store_section}) as service:
        async with asyncio.timeout(10):
            for _ in itertools.count():
                if await service.app[STORE].get_job("acme", old.id) is None:
                    break
                await asyncio.sleep(0.05)
        assert not output.path.exists()
        assert not await asyncio.to_thread(stale.exists)  # a pipeline cache entry unused for ten days went too
        assert (await service.wait_state(unfinished.id, "succeeded"))["id"] == unfinished.id
        async with await service.submit({"graph": ops_graph(color=3)}) as resp:
            fresh = (await resp.json())["id"]
        await service.wait_state(fresh, "succeeded")
        assert await service.app[STORE].get_job("acme", fresh) is not None  # new: kept


def _stale_cache_entry(directory: Path) -> Path:
    cache = DiskCache(directory)
    key = "ab" * 32
    cache.put(key, {}, [("x.png", b"cached")])
    ten_days_ago = time.time() - 10 * 86400
    os.utime(cache.path_for(key) / "record.json", (ten_days_ago, ten_days_ago))
    return cache.path_for(key)
