"""The worker's event recording (attempts when the pool dispatches, progress at most 5 per second), and
its handling of leases: a job taken over after its lease ran out, and a lease lost to another worker."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from comfy_orchestrator.client import ComfyClient
from comfy_orchestrator.errors import JobCancelled
from comfy_orchestrator.graph import Graph
from comfy_orchestrator.pool import BackendConfig, EventKind, Pool, PoolEvent
from comfy_orchestrator.service.backends import BackendClients
from comfy_orchestrator.service.notifier import Notifier
from comfy_orchestrator.service.worker import PROGRESS_INTERVAL_S, Worker
from comfy_orchestrator.store import AttemptState, Claim, JobRecord, JobState, SQLiteJobStore
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


# -- a job whose lease ran out, taken over from a dead worker ----------------------------------------

_GRAPH = ops_graph(color=0x336699, width=8, height=8, scale_by=1.0, blur_radius=1)


async def _until_final(store: SQLiteJobStore, job_id: str, timeout: float = 15.0) -> JobRecord:
    async with asyncio.timeout(timeout):
        while True:
            job = await store.get_job("acme", job_id)
            assert job is not None
            if job.state.final:
                return job
            await asyncio.sleep(0.02)


async def _until_attempted(store: SQLiteJobStore, job_id: str) -> None:
    async with asyncio.timeout(10):
        for _ in itertools.count():
            if await store.list_attempts(job_id):
                return
            await asyncio.sleep(0.01)


@asynccontextmanager
async def _running_worker(store: SQLiteJobStore, fake: FakeComfyUI,
                          adopted: dict[str, asyncio.Task[None]] | None = None) -> AsyncIterator[None]:
    """A worker over ``fake`` (backend ``gpu-0``) claiming from ``store`` while the block runs."""
    config = BackendConfig("gpu-0", fake.url)
    clients = BackendClients([config])
    async with Pool([config]) as pool:
        worker = Worker(store, pool, clients, {}, Notifier(), worker_id="heir", lease_s=30, adopted=adopted)
        stopping = asyncio.Event()
        task = asyncio.create_task(worker.run(stopping))
        try:
            yield
        finally:
            stopping.set()
            await asyncio.wait_for(task, 10)
            await clients.close()


async def _claimed_by_a_dead_worker(store: SQLiteJobStore) -> JobRecord:
    """A job claimed by a worker that then died: its lease (0.2 s) has run out on return."""
    await store.create_job("acme", "graph", _GRAPH)
    job = await store.claim_next("dead", lease_s=0.2)
    assert job is not None
    assert job.planned_prompt_id is not None
    await asyncio.sleep(0.25)
    return job


async def _submitted_by_a_dead_worker(store: SQLiteJobStore, fake: FakeComfyUI) -> JobRecord:
    """As ``_claimed_by_a_dead_worker``, which had submitted its planned prompt to ``fake`` and
    died before recording it."""
    job = await _claimed_by_a_dead_worker(store)
    async with ComfyClient(fake.url) as client:
        await client.submit(_GRAPH, prompt_id=job.planned_prompt_id)
    return job


def _successes(fake: FakeComfyUI) -> list[str]:
    return [p for p, e in fake.history.items() if e["status"]["status_str"] == "success"]


async def test_a_reclaimed_job_follows_the_prompt_its_dead_holder_submitted_under_its_plan(tmp_path: Path) -> None:
    """The dead worker submitted its planned prompt and died before recording it: the worker that
    takes the job over finds that prompt on the backend and follows it instead of running it again."""
    async with SQLiteJobStore(tmp_path / "jobs.db", tmp_path / "out") as store, \
            FakeComfyUI(name="fake-0", node_delay=1.0) as fake:  # outlasts the takeover
        job = await _submitted_by_a_dead_worker(store, fake)
        async with _running_worker(store, fake):
            done = await _until_final(store, job.id)
        assert done.state is JobState.SUCCEEDED, done.error
        assert done.result is not None
        assert (done.result["prompt_id"], done.result["adopted"]) == (job.planned_prompt_id, True)
        assert _successes(fake) == [job.planned_prompt_id]  # ran once
        assert [(a.prompt_id, a.state) for a in await store.list_attempts(job.id)] == [
            (job.planned_prompt_id, AttemptState.SUCCEEDED)]
        assert [o.name for o in await store.list_outputs("acme", job.id)] == done.result["outputs"] != []


async def test_a_reclaimed_job_collects_what_its_dead_holders_prompt_left(tmp_path: Path) -> None:
    """The dead worker recorded its attempt, and the prompt finished after it died: the outputs are
    collected from the backend's history, nothing runs again."""
    async with SQLiteJobStore(tmp_path / "jobs.db", tmp_path / "out") as store, FakeComfyUI(name="fake-0") as fake:
        job = await _claimed_by_a_dead_worker(store)
        await store.start_attempt(job.id, "gpu-0", "recorded-prompt")
        async with ComfyClient(fake.url) as client:
            await client.run(_GRAPH, prompt_id="recorded-prompt", timeout=10)
        async with _running_worker(store, fake):
            done = await _until_final(store, job.id)
        assert done.state is JobState.SUCCEEDED, done.error
        assert done.result is not None
        assert done.result["prompt_id"] == "recorded-prompt"
        assert _successes(fake) == ["recorded-prompt"]
        assert len(await store.list_outputs("acme", job.id)) == 1


async def test_a_reclaimed_job_whose_plan_reached_no_backend_runs_afresh(tmp_path: Path) -> None:
    async with SQLiteJobStore(tmp_path / "jobs.db", tmp_path / "out") as store, FakeComfyUI(name="fake-0") as fake:
        job = await _claimed_by_a_dead_worker(store)
        async with _running_worker(store, fake):
            done = await _until_final(store, job.id)
        assert done.state is JobState.SUCCEEDED, done.error
        [ran] = _successes(fake)
        assert ran != job.planned_prompt_id  # back in the queue, claimed again: a new plan
        events = [e.type for e in await store.events_since("acme", 0)]
        assert events == ["job.queued", "job.running", "job.running", "job.queued", "job.running", "job.attempt",
                          "job.succeeded"]


async def test_a_followed_prompt_interrupted_by_someone_else_sends_the_job_back_to_the_queue(tmp_path: Path) -> None:
    """A worker that wakes after its lease ran out takes its prompt off as it gives the job up; the
    worker that took the job over and followed that prompt runs the job again (it was not the
    tenant's cancel) rather than failing it."""
    async with SQLiteJobStore(tmp_path / "jobs.db", tmp_path / "out") as store, \
            FakeComfyUI(name="fake-0", node_delay=1.0) as fake:  # outlasts the takeover
        job = await _submitted_by_a_dead_worker(store, fake)
        assert job.planned_prompt_id is not None
        async with ComfyClient(fake.url) as client, _running_worker(store, fake):
            await _until_attempted(store, job.id)  # followed by the heir
            await client.cancel(job.planned_prompt_id)
            done = await _until_final(store, job.id)
        assert done.state is JobState.SUCCEEDED, done.error
        attempts = await store.list_attempts(job.id)
        assert [(a.prompt_id == job.planned_prompt_id, a.state) for a in attempts] == [
            (True, AttemptState.LOST), (False, AttemptState.SUCCEEDED)]


async def test_a_worker_that_lost_its_lease_to_another_leaves_the_job_alone(tmp_path: Path) -> None:
    """The lease ran out while the worker was stalled and another worker took the job: the first
    stops its prompt but records nothing (before, it failed a job that was no longer its own)."""
    async with SQLiteJobStore(tmp_path / "jobs.db", tmp_path / "out") as store, \
            FakeComfyUI(name="fake-0", node_delay=0.5) as fake:
        await store.create_job("acme", "graph", _GRAPH)
        job = await store.claim_next("w", lease_s=0.3)
        assert job is not None
        config = BackendConfig("gpu-0", fake.url)
        async with Pool([config]) as pool:
            worker = Worker(store, pool, BackendClients([config]), {}, Notifier(), worker_id="w", lease_s=0.3)
            processing = asyncio.create_task(worker.process(job))
            await _until_attempted(store, job.id)
            assert await store.take_over(job.id, "heir", lease_s=60)  # as a reclaim does
            await asyncio.wait_for(processing, 10)
        now = await store.get_job("acme", job.id)
        assert now is not None
        assert (now.state, now.lease_owner, now.error) == (JobState.RUNNING, "heir", None)
        assert not _successes(fake)  # its prompt was taken off


async def test_a_reclaimed_job_whose_prompt_was_interrupted_runs_again(tmp_path: Path) -> None:
    """The prompt is in /history as interrupted, and the job is still running (its tenant did not
    cancel it): it runs again, as when the interruption comes while the prompt is followed."""
    async with SQLiteJobStore(tmp_path / "jobs.db", tmp_path / "out") as store, \
            FakeComfyUI(name="fake-0", node_delay=1.0) as fake:
        job = await _claimed_by_a_dead_worker(store)
        assert job.planned_prompt_id is not None
        async with ComfyClient(fake.url) as client:
            await client.submit(_GRAPH, prompt_id=job.planned_prompt_id)
            await client.cancel(job.planned_prompt_id)
        await fake.wait_idle(10)
        assert job.planned_prompt_id in fake.history
        async with _running_worker(store, fake):
            done = await _until_final(store, job.id, timeout=20)
        assert done.state is JobState.SUCCEEDED, done.error
        attempts = await store.list_attempts(job.id)
        assert [(a.prompt_id == job.planned_prompt_id, a.state) for a in attempts] == [
            (True, AttemptState.LOST), (False, AttemptState.SUCCEEDED)]


async def test_a_tenants_cancel_stops_a_prompt_followed_after_a_takeover_at_once(tmp_path: Path) -> None:
    """The followed prompt is registered where the API's cancel finds it (``interrupt`` cancels the
    task): the prompt stops within seconds, not at the next lease renewal, and the worker goes on."""
    async with SQLiteJobStore(tmp_path / "jobs.db", tmp_path / "out") as store, \
            FakeComfyUI(name="fake-0", node_delay=1.0) as fake:
        job = await _submitted_by_a_dead_worker(store, fake)
        assert job.planned_prompt_id is not None
        adopted: dict[str, asyncio.Task[None]] = {}
        async with _running_worker(store, fake, adopted):
            await _until_attempted(store, job.id)
            assert await store.cancel_job("acme", job.id)
            adopted[job.id].cancel()  # what POST /v1/jobs/{id}/cancel does here
            await fake.wait_idle(5)
            assert fake.history[job.planned_prompt_id]["status"]["status_str"] != "success"
            assert adopted == {}
            later, _ = await store.create_job("acme", "graph", ops_graph(color=0x010203, width=8, height=8,
                                                                          scale_by=1.0, blur_radius=1))
            done = await _until_final(store, later.id)  # the worker lives on
        assert done.state is JobState.SUCCEEDED, done.error
        cancelled = await store.get_job("acme", job.id)
        assert cancelled is not None
        assert cancelled.state is JobState.CANCELLED
