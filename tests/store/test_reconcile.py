"""Start-up reconciliation against test doubles on real sockets, through real ``ComfyClient``s.

Each test leaves the store as a killed service would: a job running under an old worker's lease,
its attempt recorded with the prompt id chosen before submitting (or, for ``planned_job``, its
prompt submitted under the claim's planned id with no attempt recorded yet); the prompt then
finished, is still queued or running, or was lost in a backend restart.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from comfy_orchestrator import ComfyClient, Timeouts
from comfy_orchestrator.store import (
    AttemptRecord,
    AttemptState,
    Claim,
    EventType,
    JobRecord,
    JobState,
    JobStore,
    Outcome,
    reconcile_job,
    reconcile_running,
)
from comfy_orchestrator.testing import FakeComfyUI, HangMode, NodeFailure

FAST = Timeouts(connect=1.0, request=3.0, stall=0.6, poll=0.1, unreachable=0.6)
_colours = iter(range(1, 1 << 24, 7919))


def invert_graph() -> dict[str, Any]:
    """EmptyImage → ImageInvert → SaveImage, in a colour no other prompt used (no cache answers)."""
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 1,
                                                     "color": next(_colours)}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "reconcile"}},
    }


@pytest.fixture
async def server() -> AsyncIterator[FakeComfyUI]:
    async with FakeComfyUI(name="gpu-a") as server:
        yield server


@pytest.fixture
async def client(server: FakeComfyUI) -> AsyncIterator[ComfyClient]:
    """The restarted service's client of ``gpu-a`` (HTTP only: nothing is followed yet)."""
    client = ComfyClient(server.url, timeouts=FAST)
    try:
        yield client
    finally:
        await client.close()


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll the double's state (it has no event to wait on) until ``condition`` holds."""
    async with asyncio.timeout(timeout):
        for _ in itertools.count():
            if condition():
                return
            await asyncio.sleep(0.01)


async def submitted_job(
    store: JobStore, server: FakeComfyUI, *, backend: str = "gpu-a", step: str | None = None, wait: str = "done"
) -> tuple[JobRecord, AttemptRecord]:
    """A job as the killed service left it: claimed, attempt recorded, prompt submitted by a client
    that is gone. ``wait``: "done" (finished on the server), "running", "pending" or "none"."""
    graph = invert_graph()
    job, _ = await store.create_job("acme", "graph", graph)
    await store.claim_next("old-worker", lease_s=600)
    attempt = await store.start_attempt(job.id, backend, str(uuid.uuid4()), step=step)
    async with ComfyClient(server.url, timeouts=FAST) as old:
        await old.submit(graph, prompt_id=attempt.prompt_id)
    if wait == "done":
        await until(lambda: attempt.prompt_id in server.history)
    elif wait == "running":
        await until(lambda: server.running_prompt_id == attempt.prompt_id)
    job = await store.get_job("acme", job.id) or job
    return job, attempt


async def test_a_finished_prompt_is_collected_and_the_job_completed(
    store: JobStore, server: FakeComfyUI, client: ComfyClient
) -> None:
    job, attempt = await submitted_job(store, server)
    report = await reconcile_running(store, {"gpu-a": client})
    assert [(i.job.id, i.outcome) for i in report.items] == [(job.id, Outcome.COMPLETED)]
    done = await store.get_job("acme", job.id)
    assert done is not None
    assert done.state is JobState.SUCCEEDED
    assert done.result is not None
    assert done.result["prompt_id"] == attempt.prompt_id
    [output] = await store.list_outputs("acme", job.id)
    assert output.name.startswith("3/reconcile")
    assert output.content_type == "image/png"
    on_server = (server.output_dir / output.name.split("/", 1)[1]).read_bytes()
    assert b"".join([c async for c in await store.open_output("acme", job.id, output.name)]) == on_server
    assert [a.state for a in await store.list_attempts(job.id)] == [AttemptState.SUCCEEDED]
    assert (await reconcile_running(store, {"gpu-a": client})).items == ()


async def test_a_failed_prompt_fails_the_job(store: JobStore, server: FakeComfyUI, client: ComfyClient) -> None:
    server.faults.execution_error = NodeFailure(node_class="ImageInvert", message="boom")
    job, _ = await submitted_job(store, server)
    [item] = (await reconcile_running(store, {"gpu-a": client})).items
    assert item.outcome is Outcome.FAILED
    failed = await store.get_job("acme", job.id)
    assert failed is not None
    assert failed.state is JobState.FAILED
    assert failed.error is not None
    assert (failed.error["node_type"], failed.error["exception_type"]) == ("ImageInvert", "RuntimeError")


async def test_queued_and_running_prompts_are_followed(
    store: JobStore, server: FakeComfyUI, client: ComfyClient
) -> None:
    server.faults.hang = HangMode.MID_RUN
    running, _ = await submitted_job(store, server, wait="running")
    pending, _ = await submitted_job(store, server, wait="none")
    report = await reconcile_running(store, {"gpu-a": client}, worker_id="svc-2", lease_s=30)
    assert [i.job.id for i in report.follow] == [running.id, pending.id]
    for job in (running, pending):
        now = await store.get_job("acme", job.id)
        assert now is not None
        assert now.state is JobState.RUNNING
        assert now.lease_owner == "svc-2"
    assert [a.state for a in await store.list_attempts(running.id)] == [AttemptState.RUNNING]
    server.faults.hang = None


async def test_a_prompt_lost_in_a_restart_is_resubmitted(
    store: JobStore, server: FakeComfyUI, client: ComfyClient
) -> None:
    server.faults.hang = HangMode.MID_RUN
    job, attempt = await submitted_job(store, server, wait="running")
    await server.restart(lose_queue=True)
    server.faults.hang = None
    [item] = (await reconcile_running(store, {"gpu-a": client})).items
    assert item.outcome is Outcome.RESUBMITTED
    assert attempt.prompt_id in item.reason
    queued = await store.get_job("acme", job.id)
    assert queued is not None
    assert queued.state is JobState.QUEUED
    [lost] = await store.list_attempts(job.id)
    assert lost.state is AttemptState.LOST
    assert lost.error is not None
    assert lost.error["type"] == "PromptLost"
    again = await store.claim_next("svc-2", lease_s=30)
    assert again is not None
    assert again.id == job.id
    assert (await store.start_attempt(job.id, "gpu-a", str(uuid.uuid4()))).n == 2


async def test_a_custom_resubmit_is_called_for_unknown_backends(store: JobStore, server: FakeComfyUI) -> None:
    job, _ = await submitted_job(store, server, backend="gpu-gone", wait="none")
    calls: list[tuple[str, str | None, str]] = []

    async def resubmit(job: JobRecord, attempt: AttemptRecord | None, reason: str) -> None:
        calls.append((job.id, attempt.backend if attempt else None, reason))
        await store.release(job.id, attempt_state=AttemptState.LOST, reason=reason)

    [item] = (await reconcile_running(store, {}, resubmit=resubmit)).items
    assert item.outcome is Outcome.RESUBMITTED
    assert calls == [(job.id, "gpu-gone", "backend gpu-gone is not configured")]


async def test_an_unreachable_backend_counts_as_unknown(
    store: JobStore, server: FakeComfyUI, client: ComfyClient
) -> None:
    _job, _ = await submitted_job(store, server)
    server.faults.refuse = True
    [item] = (await reconcile_running(store, {"gpu-a": client})).items
    assert item.outcome is Outcome.RESUBMITTED
    assert "unreachable" in item.reason
    server.faults.refuse = False


async def test_a_planned_prompt_possibly_on_an_unreachable_backend_is_resubmitted(
    store: JobStore, server: FakeComfyUI, client: ComfyClient
) -> None:
    job = await planned_job(store, None)
    server.faults.refuse = True
    [item] = (await reconcile_running(store, {"gpu-a": client})).items
    server.faults.refuse = False
    assert (item.outcome, item.attempt) == (Outcome.RESUBMITTED, None)
    assert item.reason == f"planned prompt {job.planned_prompt_id} not found; gpu-a did not answer"
    queued = await store.get_job("acme", job.id)
    assert queued is not None
    assert (queued.state, queued.planned_prompt_id) == (JobState.QUEUED, None)
    [requeued] = [e for e in await store.events_since("acme", 0) if e.job_id == job.id][-1:]
    assert requeued.data["reason"] == f"resubmitted: {item.reason}"


async def test_an_unreachable_backend_is_asked_once_not_once_per_job(
    store: JobStore, server: FakeComfyUI, client: ComfyClient
) -> None:
    for _ in range(3):
        await submitted_job(store, server, wait="none")
    server.faults.refuse = True
    asked = 0
    real_queue = client.queue

    async def queue() -> Any:
        nonlocal asked
        asked += 1
        return await real_queue()

    client.queue = queue  # type: ignore[method-assign]
    report = await reconcile_running(store, {"gpu-a": client})
    server.faults.refuse = False
    assert [item.outcome for item in report.items] == [Outcome.RESUBMITTED] * 3
    assert all("unreachable" in item.reason for item in report.items)
    assert asked == 1


async def test_a_job_claimed_but_never_submitted_goes_back_to_the_queue(store: JobStore) -> None:
    job, _ = await store.create_job("acme", "graph", invert_graph())
    await store.claim_next("old-worker", lease_s=600)
    [item] = (await reconcile_running(store, {})).items
    assert (item.outcome, item.attempt) == (Outcome.REQUEUED, None)
    queued = await store.get_job("acme", job.id)
    assert queued is not None
    assert queued.state is JobState.QUEUED


async def planned_job(store: JobStore, server: FakeComfyUI | None, *, wait: str = "done") -> JobRecord:
    """A job as a service killed mid-dispatch left it: created claimed, its first prompt submitted to
    ``server`` (None: not yet) under the job's planned prompt id, no attempt recorded."""
    graph = invert_graph()
    job, _ = await store.create_job("acme", "graph", graph, claim=Claim("old-worker", 600))
    prompt_id = job.planned_prompt_id
    assert prompt_id is not None
    if server is not None:
        async with ComfyClient(server.url, timeouts=FAST) as old:
            await old.submit(graph, prompt_id=prompt_id)
        if wait == "done":
            await until(lambda: prompt_id in server.history)
        else:
            await until(lambda: server.running_prompt_id == prompt_id)
    return job


async def test_a_planned_prompt_no_attempt_names_is_found_on_the_backend_that_has_it(
    store: JobStore, server: FakeComfyUI, client: ComfyClient
) -> None:
    async with FakeComfyUI(name="gpu-b") as other, ComfyClient(other.url, timeouts=FAST) as other_client:
        done = await planned_job(store, other)
        other.faults.hang = HangMode.MID_RUN
        running = await planned_job(store, other, wait="running")
        never = await planned_job(store, None)
        asked: list[str] = []
        history = other_client.history

        async def counted(prompt_id: str) -> Any:
            asked.append(prompt_id)
            return await history(prompt_id)

        other_client.history = counted  # type: ignore[method-assign]
        report = await reconcile_running(store, {"gpu-a": client, "gpu-b": other_client}, worker_id="svc-2")
        other.faults.hang = None
    found = {item.job.id: (item.outcome, item.attempt and (item.attempt.backend, item.attempt.prompt_id))
             for item in report.items}
    assert found == {done.id: (Outcome.COMPLETED, ("gpu-b", done.planned_prompt_id)),
                     running.id: (Outcome.FOLLOW, ("gpu-b", running.planned_prompt_id)),
                     never.id: (Outcome.REQUEUED, None)}
    assert server.history == {}  # gpu-a was asked, and ran nothing
    assert asked.count(done.planned_prompt_id) == 1  # the entry that found it is the one settled
    for job, state in ((done, AttemptState.SUCCEEDED), (running, AttemptState.RUNNING)):
        [attempt] = await store.list_attempts(job.id)
        assert (attempt.backend, attempt.prompt_id, attempt.state) == ("gpu-b", job.planned_prompt_id, state)
        now = await store.get_job("acme", job.id)
        assert now is not None
        assert now.planned_prompt_id is None
    [output] = await store.list_outputs("acme", done.id)
    assert output.name.startswith("3/reconcile")
    followed = await store.get_job("acme", running.id)
    assert followed is not None
    assert followed.lease_owner == "svc-2"


async def test_racing_reconcilers_complete_a_job_once(
    store: JobStore, server: FakeComfyUI, client: ComfyClient
) -> None:
    job, attempt = await submitted_job(store, server)
    outcomes = await asyncio.gather(*(reconcile_job(store, job, attempt, {"gpu-a": client}) for _ in range(3)))
    assert sorted(o.outcome for o in outcomes) == [Outcome.ALREADY_ENDED] * 2 + [Outcome.COMPLETED]
    ends = [e for e in await store.events_since("acme", 0) if e.type == EventType.SUCCEEDED]
    assert len(ends) == 1


async def test_a_pipeline_job_goes_back_to_the_queue_with_its_prompt_taken_off(
    store: JobStore, server: FakeComfyUI, client: ComfyClient
) -> None:
    job, _ = await store.create_job("acme", "pipeline", {"steps": []})
    await store.claim_next("old-worker", lease_s=600)
    attempt = await store.start_attempt(job.id, "gpu-a", str(uuid.uuid4()), step="draft")
    server.faults.hang = HangMode.START  # queued on the backend, never started
    try:
        async with ComfyClient(server.url, timeouts=FAST) as old:
            await old.submit(invert_graph(), prompt_id=attempt.prompt_id)
        await until(lambda: server.queue_remaining == 1)
        [item] = (await reconcile_running(store, {"gpu-a": client}, worker_id="svc-2")).items
    finally:
        server.faults.hang = None
    assert item.outcome is Outcome.REQUEUED
    requeued = await store.get_job("acme", job.id)
    assert requeued is not None
    assert requeued.state is JobState.QUEUED  # the pipeline runs again, its cache holding what finished
    assert (await store.list_attempts(job.id))[0].state is AttemptState.ABANDONED
    await until(lambda: server.queue_remaining == 0)  # the old prompt was taken off its backend
    assert attempt.prompt_id not in server.history or \
        server.history[attempt.prompt_id]["status"]["status_str"] != "success"

@pytest.mark.parametrize("wait", ["running", "none", "lost"])
async def test_a_holder_that_lost_the_job_to_another_changes_nothing(
    store: JobStore, server: FakeComfyUI, client: ComfyClient, wait: str
) -> None:
    """``holding``: a worker reconciling a job it reclaimed stalled past that lease, and another
    worker took the job over: it neither takes the lease back (a prompt to follow) nor requeues the
    job (nothing in flight, or a prompt the backend does not know)."""
    if wait == "running":
        server.faults.hang = HangMode.MID_RUN
        job, attempt = await submitted_job(store, server, wait="running")
    else:
        job, _ = await store.create_job("acme", "graph", invert_graph())
        await store.claim_next("old-worker", lease_s=600)
        attempt = await store.start_attempt(job.id, "gpu-a", "never-submitted")  # the backend does not know it
        if wait == "none":
            await store.finish_attempt(job.id, attempt.n, AttemptState.FAILED)  # nothing in flight
            [attempt] = await store.list_attempts(job.id)
    assert await store.take_over(job.id, "other", lease_s=600)
    item = await reconcile_job(store, job, attempt, {"gpu-a": client}, worker_id="stalled", holding=True)
    server.faults.hang = None
    assert item.outcome is Outcome.ALREADY_ENDED
    now = await store.get_job("acme", job.id)
    assert now is not None
    assert (now.state, now.lease_owner) == (JobState.RUNNING, "other")
