"""The worker's event recording: attempts when the pool dispatches, progress at most 5 per second."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from comfy_orchestrator.errors import JobCancelled
from comfy_orchestrator.graph import Graph
from comfy_orchestrator.pool import BackendConfig, EventKind, Pool, PoolEvent
from comfy_orchestrator.service.backends import BackendClients
from comfy_orchestrator.service.notifier import Notifier
from comfy_orchestrator.service.worker import PROGRESS_INTERVAL_S, Worker
from comfy_orchestrator.store import Claim, SQLiteJobStore
from comfy_orchestrator.testing import FakeComfyUI
from tests.service.conftest import ops_graph


async def test_progress_is_coalesced_and_dispatch_records_an_attempt(tmp_path: Path) -> None:
    async with SQLiteJobStore(tmp_path / "jobs.db", tmp_path / "out") as store:
        created, _ = await store.create_job("acme", "graph", {"1": {"class_type": "X", "inputs": {}}})
        job = await store.claim_next("w", lease_s=10)
        assert job is not None
        assert job.id == created.id
        worker = Worker(store, Pool(), BackendClients([]), {}, Notifier(), worker_id="w", lease_s=10)
        record = worker.recorder(job)
        after = await store.latest_seq("acme")
        await record(PoolEvent(job.id, EventKind.DISPATCHED, backend="gpu", attempt=1, prompt_id="p-1"))
        for n in range(20):
            await record(PoolEvent(job.id, EventKind.PROGRESS, backend="gpu", attempt=1, fraction=n / 20, node="3"))
        await asyncio.sleep(PROGRESS_INTERVAL_S * 1.2)
        await record(PoolEvent(job.id, EventKind.PROGRESS, backend="gpu", attempt=1, fraction=1.0, node="3"))
        events = await store.events_since("acme", after)
        assert [e.type for e in events] == ["job.attempt", "job.progress", "job.progress"]
        assert [e.data["fraction"] for e in events[1:]] == [0.0, 1.0]
        [attempt] = await store.list_attempts(job.id)
        assert (attempt.backend, attempt.prompt_id) == ("gpu", "p-1")


async def test_an_attempt_recorded_beside_its_submission_comes_before_its_events(tmp_path: Path) -> None:
    async with SQLiteJobStore(tmp_path / "jobs.db", tmp_path / "out") as store:
        created, _ = await store.create_job("acme", "graph", {"1": {"class_type": "X", "inputs": {}}},
                                            claim=Claim("w", 10))
        worker = Worker(store, Pool(), BackendClients([]), {}, Notifier(), worker_id="w", lease_s=10)
        record = worker.recorder(created)
        after = await store.latest_seq("acme")
        dispatched = asyncio.ensure_future(record(PoolEvent(
            created.id, EventKind.DISPATCHED, backend="gpu", attempt=1, prompt_id=created.planned_prompt_id)))
        await asyncio.sleep(0)  # the pool goes on with the submission; the server reports progress at once
        await record(PoolEvent(created.id, EventKind.PROGRESS, backend="gpu", attempt=1, fraction=0.5, node="3"))
        await dispatched
        events = await store.events_since("acme", after)
        assert [e.type for e in events] == ["job.attempt", "job.progress"]


@pytest.mark.parametrize("planned", [False, True], ids=["drawn", "planned"])
async def test_a_job_cancelled_before_its_attempt_is_recorded_never_runs_its_prompt(
    tmp_path: Path, planned: bool
) -> None:
    """The tenant's cancel lands between the claim and the dispatch (in this process or another):
    recording the attempt fails, so the pool never submits the prompt (under a drawn id), or takes
    it back off (under the claim's planned id, submitted meanwhile); nothing waits for a lease."""
    async with SQLiteJobStore(tmp_path / "jobs.db", tmp_path / "out") as store, \
            FakeComfyUI(name="fake-0", node_delay=0.2) as fake:  # a prompt lasts long enough to interrupt
        graph = ops_graph(color=0x123456, width=8, height=8, scale_by=1.0, blur_radius=1)
        await store.create_job("acme", "graph", graph)
        job = await store.claim_next("w", lease_s=60)
        assert job is not None
        assert await store.cancel_job("acme", job.id)
        async with Pool([BackendConfig("gpu-0", fake.url)]) as pool:
            worker = Worker(store, pool, BackendClients([]), {}, Notifier(), worker_id="w", lease_s=60)
            with pytest.raises(JobCancelled, match="not run"):
                await pool.run(Graph.from_dict(graph), job_id=job.id, on_event=worker.recorder(job),
                               prompt_id=job.planned_prompt_id if planned else None)
            await fake.wait_idle(5)
        assert not [e for e in fake.history.values() if e["status"]["status_str"] == "success"]
        assert fake.queue_remaining == 0
        assert await store.list_attempts(job.id) == []
