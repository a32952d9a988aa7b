"""Start-up and shutdown: readiness, draining, and running jobs handed back to the queue."""

from __future__ import annotations

import asyncio
from pathlib import Path

from comfy_orchestrator.store import JobState, SQLiteJobStore
from tests.service.conftest import ops_graph, running_service


async def test_readyz_is_503_while_draining_and_running_jobs_are_released(tmp_path: Path) -> None:
    async with running_service(tmp_path, node_delay=2.0, server={"drain_timeout": 0.2}) as svc:
        async with await svc.submit({"graph": ops_graph()}) as resp:
            job_id = (await resp.json())["id"]
        await svc.wait_state(job_id, "running")
        await svc.app.shutdown()  # what the runner does first on SIGTERM, while the socket still answers
        async with svc.session.get(f"{svc.url}/readyz") as resp:
            assert resp.status == 503
            assert (await resp.json())["status"] == "draining"
        async with svc.session.get(f"{svc.url}/healthz") as resp:
            assert resp.status == 200
        await asyncio.wait_for(svc.stop(), 15)
    async with SQLiteJobStore(tmp_path / "jobs.db", tmp_path / "outputs") as store:
        job = await store.get_job("acme", job_id)
        assert job is not None
        assert job.state is JobState.QUEUED
        [attempt] = await store.list_attempts(job_id)
        assert attempt.state == "abandoned"


async def test_a_restarted_service_runs_what_was_left_queued(tmp_path: Path) -> None:
    async with running_service(tmp_path, node_delay=2.0, server={"drain_timeout": 0.1}) as svc:
        async with await svc.submit({"graph": ops_graph()}) as resp:
            job_id = (await resp.json())["id"]
        await svc.wait_state(job_id, "running")
    async with running_service(tmp_path) as svc:
        job = await svc.wait_state(job_id, "succeeded")
        assert job["outputs"]
