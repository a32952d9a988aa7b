"""The job store contract: what every implementation (``open_store`` params) must do, on real files."""

from __future__ import annotations

import asyncio
import hashlib
import os
import tracemalloc
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from comfy_orchestrator.store import (
    AttemptState,
    Claim,
    EventType,
    IdempotencyConflict,
    InvalidCursor,
    JobKind,
    JobNotEnded,
    JobNotFound,
    JobNotRunning,
    JobRecord,
    JobState,
    JobStore,
    OutputNotFound,
    Page,
    QueueFull,
    StepState,
    StoreClosed,
)
from tests.store.conftest import FakeClock, OpenStore, graph

# -- creating jobs, idempotency -------------------------------------------------------------------


async def test_create_commits_a_queued_job_and_its_event(store: JobStore) -> None:
    job, created = await store.create_job("acme", "graph", graph(), labels={"project": "fox"})
    assert created
    assert (job.tenant, job.kind, job.state, job.attempts) == ("acme", JobKind.GRAPH, JobState.QUEUED, 0)
    assert job.spec == graph()
    assert job.labels == {"project": "fox"}
    assert job.created.tzinfo is not None
    assert await store.get_job("acme", job.id) == job
    [event] = await store.events_since("acme", 0)
    assert (event.type, event.job_id, event.data) == (EventType.QUEUED, job.id, {"kind": "graph"})


async def test_same_key_and_body_is_the_same_job(store: JobStore) -> None:
    first, created = await store.create_job("acme", "graph", graph(1), idempotency_key="k", labels={"a": "1"})
    # the same body with its keys in another order is the same body
    reordered = dict(reversed(list(graph(1).items())))
    again, created_again = await store.create_job("acme", JobKind.GRAPH, reordered, idempotency_key="k",
                                                  labels={"a": "1"})
    assert created
    assert not created_again
    assert again == first
    assert len((await store.list_jobs("acme")).items) == 1


@pytest.mark.parametrize(
    ("kind", "spec", "labels"),
    [("graph", graph(2), {"a": "1"}), ("template", graph(1), {"a": "1"}), ("graph", graph(1), {"a": "2"})],
    ids=["other-spec", "other-kind", "other-labels"],
)
async def test_same_key_with_another_body_conflicts(
    store: JobStore, kind: str, spec: dict[str, object], labels: dict[str, str]
) -> None:
    first, _ = await store.create_job("acme", "graph", graph(1), idempotency_key="k", labels={"a": "1"})
    with pytest.raises(IdempotencyConflict) as caught:
        await store.create_job("acme", kind, spec, idempotency_key="k", labels=labels)
    assert caught.value.job_id == first.id
    assert caught.value.key == "k"
    assert len((await store.list_jobs("acme")).items) == 1


async def test_idempotency_keys_belong_to_their_tenant(store: JobStore) -> None:
    a, _ = await store.create_job("acme", "graph", graph(1), idempotency_key="k")
    b, created = await store.create_job("umbrella", "graph", graph(2), idempotency_key="k")
    assert created
    assert a.id != b.id


async def test_twenty_concurrent_duplicates_make_one_job(open_store: OpenStore) -> None:
    stores = [await open_store() for _ in range(4)]  # four handles race, as four processes would
    results = await asyncio.gather(
        *(stores[i % 4].create_job("acme", "graph", graph(7), idempotency_key="dup") for i in range(20)))
    assert sum(created for _, created in results) == 1
    assert len({job.id for job, _ in results}) == 1
    assert len((await stores[0].list_jobs("acme")).items) == 1


async def test_queue_bound_per_tenant(store: JobStore) -> None:
    results = await asyncio.gather(
        *(store.create_job("acme", "graph", graph(i), max_active=5) for i in range(12)), return_exceptions=True)
    made = [r for r in results if isinstance(r, tuple)]
    assert len(made) == 5
    assert all(isinstance(r, QueueFull) for r in results if not isinstance(r, tuple))
    assert await store.count_active("acme") == 5
    # the bound is the tenant's own; and an idempotent replay is answered even when full
    await store.create_job("umbrella", "graph", graph(), max_active=5)
    keyed = await store.create_job("acme", "graph", graph(99), idempotency_key="x")
    assert (await store.create_job("acme", "graph", graph(99), idempotency_key="x", max_active=1))[0] == keyed[0]
    await store.cancel_job("acme", made[0][0].id)
    await store.cancel_job("acme", made[1][0].id)
    await store.create_job("acme", "graph", graph(), max_active=6)


# -- tenants, listing -----------------------------------------------------------------------------


async def test_jobs_are_counted_by_state_over_all_tenants(store: JobStore) -> None:
    ids = [(await store.create_job(tenant, "graph", graph(i)))[0].id for i, tenant in enumerate("aabbc")]
    await store.claim_next("w1", lease_s=30)
    await store.claim_next("w2", lease_s=30)
    assert await store.cancel_job("c", ids[4])
    counts = await store.count_by_state([JobState.QUEUED, JobState.RUNNING, JobState.SUCCEEDED])
    assert counts == {JobState.QUEUED: 2, JobState.RUNNING: 2, JobState.SUCCEEDED: 0}
    assert await store.count_by_state([JobState.CANCELLED]) == {JobState.CANCELLED: 1}
    assert await store.count_by_state([]) == {}


async def test_tenants_see_only_their_own_jobs(store: JobStore) -> None:
    mine, _ = await store.create_job("acme", "graph", graph())
    theirs, _ = await store.create_job("umbrella", "graph", graph())
    assert await store.get_job("umbrella", mine.id) is None
    assert [j.id for j in (await store.list_jobs("umbrella")).items] == [theirs.id]
    assert {e.job_id for e in await store.events_since("umbrella", 0)} == {theirs.id}
    assert await store.events_since("umbrella", 0, job_ids=[mine.id]) == []
    with pytest.raises(JobNotFound):
        await store.cancel_job("umbrella", mine.id)
    assert (await store.get_job("acme", mine.id)) == mine
    await store.save_output(mine.id, "a.png", b"png", "image/png")
    assert await store.get_output("umbrella", mine.id, "a.png") is None
    assert await store.list_outputs("umbrella", mine.id) == []
    with pytest.raises(OutputNotFound):
        await store.open_output("umbrella", mine.id, "a.png")


async def test_list_filters_by_state_and_labels(store: JobStore) -> None:
    a, _ = await store.create_job("acme", "graph", graph(1), labels={"project": "fox", "size": "s"})
    b, _ = await store.create_job("acme", "graph", graph(2), labels={"project": "fox", "size": "l"})
    c, _ = await store.create_job("acme", "graph", graph(3), labels={"project": "owl"})
    await store.cancel_job("acme", b.id)

    def ids(page: Page[JobRecord]) -> set[str]:
        return {j.id for j in page.items}

    assert ids(await store.list_jobs("acme", labels={"project": "fox"})) == {a.id, b.id}
    assert ids(await store.list_jobs("acme", labels={"project": "fox", "size": "l"})) == {b.id}
    assert ids(await store.list_jobs("acme", states=[JobState.QUEUED])) == {a.id, c.id}
    assert ids(await store.list_jobs("acme", states=[JobState.CANCELLED], labels={"project": "owl"})) == set()


async def test_pages_neither_repeat_nor_skip_while_jobs_are_created(open_store: OpenStore) -> None:
    clock = FakeClock(step=0.0)  # frozen: many jobs share a timestamp and the id breaks the tie
    store = await open_store(clock=clock)
    existing = set()
    for i in range(30):
        existing.add((await store.create_job("acme", "graph", graph(i)))[0].id)
        if i % 4 == 3:
            clock.advance(0.001)
    seen: list[str] = []
    keys = []
    cursor = None
    while True:
        page = await store.list_jobs("acme", limit=7, cursor=cursor)
        seen += [j.id for j in page.items]
        keys += [(j.created, j.id) for j in page.items]
        for i in range(2):  # new jobs arrive between pages, some at the very same instant
            await store.create_job("acme", "graph", graph(1000 + i))
        clock.advance(0.0005)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert len(seen) == len(set(seen)) == 30
    assert set(seen) == existing
    assert keys == sorted(keys, reverse=True)


async def test_bad_cursor_and_limit_are_refused(store: JobStore) -> None:
    with pytest.raises(InvalidCursor):
        await store.list_jobs("acme", cursor="not-a-cursor")
    with pytest.raises(InvalidCursor):
        await store.list_jobs("acme", cursor="c1.bm9wZQ")
    with pytest.raises(ValueError, match="limit"):
        await store.list_jobs("acme", limit=0)


# -- workers: claims, leases, attempts ------------------------------------------------------------


async def test_claims_are_first_in_first_out(store: JobStore) -> None:
    ids = [(await store.create_job("acme", "graph", graph(i)))[0].id for i in range(3)]
    claimed = [await store.claim_next("w", lease_s=30) for _ in range(4)]
    assert [j.id for j in claimed if j] == ids
    assert claimed[-1] is None
    assert all(j.state is JobState.RUNNING and j.lease_owner == "w" for j in claimed if j)


async def test_a_job_created_with_a_claim_is_running_under_that_lease(
    clocked_store: JobStore, clock: FakeClock
) -> None:
    store = clocked_store
    older, _ = await store.create_job("acme", "graph", graph(0))
    job, created = await store.create_job("acme", "graph", graph(1), idempotency_key="k", claim=Claim("w1", 10))
    assert created
    assert (job.state, job.lease_owner) == (JobState.RUNNING, "w1")
    assert job.lease_until == job.created + timedelta(seconds=10)
    assert await store.get_job("acme", job.id) == job
    assert [(e.type, e.data) for e in await store.events_since("acme", 0) if e.job_id == job.id] == [
        (EventType.QUEUED, {"kind": "graph"}), (EventType.RUNNING, {"reclaimed": False})]
    # the queue still holds the older job only; the same key again gets the job as it is, unclaimed
    claimed = await store.claim_next("w2", lease_s=10)
    assert claimed is not None
    assert claimed.id == older.id
    again, created_again = await store.create_job("acme", "graph", graph(1), idempotency_key="k",
                                                  claim=Claim("w3", 10))
    assert not created_again
    assert again.lease_owner == "w1"
    # a lease taken at creation runs out like any other
    assert await store.complete_job(older.id, {})
    assert await store.start_attempt(job.id, "gpu-a", "p1")
    clock.advance(11)
    reclaimed = await store.claim_next("w2", lease_s=10)
    assert reclaimed is not None
    assert reclaimed.id == job.id


async def test_a_claim_counts_against_the_queue_bound(store: JobStore) -> None:
    await store.create_job("acme", "graph", graph(0), max_active=1, claim=Claim("w1", 30))
    with pytest.raises(QueueFull):
        await store.create_job("acme", "graph", graph(1), max_active=1, claim=Claim("w2", 30))


async def test_concurrent_workers_never_claim_the_same_job(open_store: OpenStore) -> None:
    stores = [await open_store() for _ in range(3)]  # three handles: three processes to the store
    ids = {(await stores[0].create_job("acme", "graph", graph(i)))[0].id for i in range(30)}
    got: dict[str, list[str]] = {}

    async def worker(name: str, store: JobStore) -> None:
        while (job := await store.claim_next(name, lease_s=30)) is not None:
            got.setdefault(job.id, []).append(name)

    await asyncio.gather(*(worker(f"w{i}", stores[i % 3]) for i in range(9)))
    assert set(got) == ids
    assert all(len(holders) == 1 for holders in got.values())


async def test_an_expired_lease_makes_the_job_claimable_again(clocked_store: JobStore, clock: FakeClock) -> None:
    store = clocked_store
    job, _ = await store.create_job("acme", "graph", graph())
    first = await store.claim_next("w1", lease_s=10)
    assert first is not None
    attempt = await store.start_attempt(job.id, "gpu-a", "prompt-1")
    clock.advance(5)
    assert await store.claim_next("w2", lease_s=10) is None
    assert await store.renew_lease(job.id, "w1", lease_s=10)  # now good until +15
    clock.advance(9)
    assert await store.claim_next("w2", lease_s=10) is None
    assert [j.id for j, _ in await store.running_jobs(lease_expired=True)] == []
    clock.advance(6)
    assert [j.id for j, _ in await store.running_jobs(lease_expired=True)] == [job.id]
    reclaimed = await store.claim_next("w2", lease_s=10)
    assert reclaimed is not None
    assert reclaimed.id == job.id
    assert reclaimed.lease_owner == "w2"
    # the old holder is told it lost the job, and cannot give it back; the open attempt is left
    # for the new holder to reconcile
    assert not await store.renew_lease(job.id, "w1", lease_s=10)
    assert not await store.release(job.id, worker_id="w1")
    assert (await store.list_attempts(job.id)) == [attempt]
    [event] = [e for e in await store.events_since("acme", 0) if e.data.get("reclaimed")]
    assert event.type == EventType.RUNNING
    assert event.data == {"reclaimed": True}
    # w1 recorded no attempt under its plan, which it may have submitted: the new holder gets the
    # plan with the open attempt, to reconcile both; a claim from the queue would plan anew
    assert reclaimed.reclaimed
    assert not first.reclaimed
    assert first.planned_prompt_id is not None
    assert reclaimed.planned_prompt_id == first.planned_prompt_id
    stored = await store.get_job("acme", job.id)
    assert stored is not None
    assert not stored.reclaimed  # the claim's word, not stored


async def test_release_requeues_and_ends_the_open_attempt(store: JobStore) -> None:
    job, _ = await store.create_job("acme", "graph", graph())
    await store.claim_next("w", lease_s=30)
    await store.start_attempt(job.id, "gpu-a", "p1")
    assert await store.release(job.id, worker_id="w", reason="shutdown")
    assert not await store.release(job.id)
    queued = await store.get_job("acme", job.id)
    assert queued is not None
    assert queued.state is JobState.QUEUED
    assert queued.lease_owner is None
    [first] = await store.list_attempts(job.id)
    assert first.state is AttemptState.ABANDONED
    assert first.ended is not None
    await store.claim_next("w", lease_s=30)
    second = await store.start_attempt(job.id, "gpu-b", "p2", step="draft")
    assert (second.n, second.step, second.state) == (2, "draft", AttemptState.RUNNING)
    assert await store.finish_attempt(job.id, 2, AttemptState.FAILED, error={"type": "X", "message": "m"})
    assert not await store.finish_attempt(job.id, 2, AttemptState.SUCCEEDED)
    assert (await store.list_attempts(job.id))[1].error == {"type": "X", "message": "m"}


async def test_attempts_only_on_running_jobs(store: JobStore) -> None:
    job, _ = await store.create_job("acme", "graph", graph())
    with pytest.raises(JobNotRunning):
        await store.start_attempt(job.id, "gpu-a", "p1")
    await store.claim_next("w", lease_s=30)
    await store.cancel_job("acme", job.id)
    with pytest.raises(JobNotRunning):
        await store.start_attempt(job.id, "gpu-a", "p1")
    with pytest.raises(JobNotFound):
        await store.start_attempt("nope", "gpu-a", "p1")


async def test_each_claim_plans_a_prompt_id_until_an_attempt_uses_it(store: JobStore) -> None:
    async def plan(job_id: str) -> str | None:
        job = await store.get_job("acme", job_id)
        assert job is not None
        return job.planned_prompt_id

    queued, _ = await store.create_job("acme", "graph", graph(1))
    assert queued.planned_prompt_id is None
    claimed = await store.claim_next("w", lease_s=30)
    assert claimed is not None
    assert claimed.planned_prompt_id is not None
    await store.start_attempt(queued.id, "gpu-a", "another-id")  # not the plan: it stays open
    assert await plan(queued.id) == claimed.planned_prompt_id
    await store.start_attempt(queued.id, "gpu-b", claimed.planned_prompt_id)
    assert await plan(queued.id) is None
    # released and claimed again: a new plan, dropped when the job ends
    assert await store.release(queued.id, reason="shutdown")
    assert await plan(queued.id) is None
    again = await store.claim_next("w", lease_s=30)
    assert again is not None
    assert again.planned_prompt_id not in (None, claimed.planned_prompt_id)
    assert await store.complete_job(queued.id, {})
    assert await plan(queued.id) is None
    # a job created with a claim has its plan from the start; a cancelled one drops it
    handed, _ = await store.create_job("acme", "graph", graph(2), claim=Claim("w", 30))
    assert handed.planned_prompt_id is not None
    [(running, _)] = await store.running_jobs()
    assert running.planned_prompt_id == handed.planned_prompt_id
    assert await store.cancel_job("acme", handed.id)
    assert await plan(handed.id) is None


async def test_running_attempts_are_counted_per_backend(store: JobStore) -> None:
    ids = [(await store.create_job("acme", "graph", graph(i)))[0].id for i in range(4)]
    for _ in ids:
        await store.claim_next("w", lease_s=30)
    for job_id, backend in zip(ids, ("gpu-a", "gpu-a", "gpu-b", "gpu-b"), strict=True):
        await store.start_attempt(job_id, backend, f"p-{job_id}")
    assert await store.running_attempts() == {"gpu-a": 2, "gpu-b": 2}
    assert await store.complete_job(ids[0], {})
    assert await store.cancel_job("acme", ids[2])
    await store.release(ids[3], reason="shutting down")
    assert await store.running_attempts() == {"gpu-a": 1}


async def test_running_jobs_come_with_their_latest_attempt(store: JobStore) -> None:
    a, _ = await store.create_job("acme", "graph", graph(1))
    b, _ = await store.create_job("acme", "graph", graph(2))
    await store.create_job("acme", "graph", graph(3))
    await store.claim_next("w", lease_s=30)
    await store.claim_next("w", lease_s=30)
    await store.start_attempt(a.id, "gpu-a", "pa1")
    await store.finish_attempt(a.id, 1, AttemptState.FAILED)
    await store.start_attempt(a.id, "gpu-b", "pa2")
    running = await store.running_jobs()
    assert [(j.id, att.prompt_id if att else None) for j, att in running] == [(a.id, "pa2"), (b.id, None)]


# -- ending jobs: once ----------------------------------------------------------------------------


async def test_completing_twice_changes_nothing(store: JobStore) -> None:
    job, _ = await store.create_job("acme", "graph", graph())
    await store.claim_next("w", lease_s=30)
    await store.start_attempt(job.id, "gpu-a", "p1")
    out = await store.save_output(job.id, "9/a.png", b"image", "image/png")
    assert await store.complete_job(job.id, {"n": 1}, [out])
    done = await store.get_job("acme", job.id)
    assert done is not None
    assert done.state is JobState.SUCCEEDED
    assert done.result == {"n": 1}
    assert not await store.complete_job(job.id, {"n": 2})
    assert not await store.fail_job(job.id, {"type": "X", "message": "late"})
    assert not await store.cancel_job("acme", job.id)
    assert await store.get_job("acme", job.id) == done
    with pytest.raises(JobNotRunning):
        await store.save_output(job.id, "late.png", b"late")
    [attempt] = await store.list_attempts(job.id)
    assert attempt.state is AttemptState.SUCCEEDED
    ends = [e for e in await store.events_since("acme", 0) if e.type == EventType.SUCCEEDED]
    assert len(ends) == 1
    assert ends[0].data["outputs"][0]["name"] == "9/a.png"


async def test_staged_outputs_are_recorded_only_by_completing(store: JobStore) -> None:
    job, _ = await store.create_job("acme", "graph", graph(), claim=Claim("w", 30))
    staged = [await store.stage_output(job.id, "9/a.png", b"image", "image/png"),
              await store.stage_output(job.id, "9/b.png", b"other", "image/png")]
    assert staged[0].staged is not None
    assert staged[0].staged.read_bytes() == b"image"  # durable, unnamed
    assert not staged[0].path.exists()  # and at no address yet
    assert await store.list_outputs("acme", job.id) == []  # nothing named yet
    assert await store.complete_job(job.id, {}, staged)
    assert await store.list_outputs("acme", job.id) == staged
    assert staged[0].path.read_bytes() == b"image"
    assert not staged[0].staged.exists()
    assert b"".join([c async for c in await store.open_output("acme", job.id, "9/b.png")]) == b"other"
    # a job that ended otherwise names none of what was staged for it, and its bytes go
    other, _ = await store.create_job("acme", "graph", graph(1), claim=Claim("w", 30))
    late = await store.stage_output(other.id, "9/a.png", b"late", "image/png")
    assert await store.cancel_job("acme", other.id)
    assert not await store.complete_job(other.id, {}, [late])
    assert await store.list_outputs("acme", other.id) == []
    assert late.staged is not None
    assert not late.staged.exists()
    assert not late.path.exists()
    # bytes staged for an attempt given up on are dropped by discard_output
    dropped = await store.stage_output(other.id, "9/c.png", b"dropped", "image/png")
    await store.discard_output(dropped)
    assert dropped.staged is not None
    assert not dropped.staged.exists()
    assert not dropped.path.exists()


async def test_racing_completions_complete_once(store: JobStore) -> None:
    job, _ = await store.create_job("acme", "graph", graph())
    await store.claim_next("w", lease_s=30)
    calls = [store.complete_job(job.id, {"by": i}) for i in range(8)] + [store.fail_job(job.id, {"m": "x"})]
    assert sum(await asyncio.gather(*calls)) == 1
    finals = [e for e in await store.events_since("acme", 0) if e.type in (EventType.SUCCEEDED, EventType.FAILED)]
    assert len(finals) == 1


async def test_cancelling(store: JobStore) -> None:
    queued, _ = await store.create_job("acme", "graph", graph(1))
    running, _ = await store.create_job("acme", "graph", graph(2))
    assert await store.cancel_job("acme", queued.id)
    claimed = await store.claim_next("w", lease_s=30)
    assert claimed is not None
    assert claimed.id == running.id
    await store.start_attempt(running.id, "gpu-a", "p")
    assert await store.cancel_job("acme", running.id)
    assert not await store.renew_lease(running.id, "w", lease_s=30)  # how the worker learns
    [attempt] = await store.list_attempts(running.id)
    assert attempt.state is AttemptState.CANCELLED
    assert await store.count_active("acme") == 0


# -- events ---------------------------------------------------------------------------------------


async def test_events_since_replays_exactly_what_was_missed(store: JobStore) -> None:
    a, _ = await store.create_job("acme", "graph", graph(1))
    b, _ = await store.create_job("acme", "graph", graph(2))
    other, _ = await store.create_job("umbrella", "graph", graph(3))
    for i in range(5):
        await store.append_event(a.id, "progress", {"value": i})
        await store.append_event(other.id, "progress", {"value": i})
    seen = await store.events_since("acme", 0)
    last = seen[-1].seq
    assert await store.latest_seq("acme") == last
    missed = [await store.append_event(b.id, "progress", {"value": i}) for i in range(3)]
    await store.append_event(other.id, "progress", {"value": 99})
    assert await store.events_since("acme", last) == missed
    assert await store.events_since("acme", last, job_ids=[a.id]) == []
    of_a = await store.events_since("acme", 0, job_ids=[a.id])
    assert [e.type for e in of_a] == [EventType.QUEUED] + ["progress"] * 5
    assert [e.data for e in of_a[1:]] == [{"value": i} for i in range(5)]
    assert await store.events_since("acme", 0, limit=3) == seen[:3]
    with pytest.raises(JobNotFound):
        await store.append_event("nope", "progress")


async def test_a_watcher_gets_what_its_handle_commits_before_the_writer_hears(open_store: OpenStore) -> None:
    mine, theirs = await open_store(), await open_store()  # theirs: another process, as far as the store can tell
    watched: list[int] = []
    mine.watch_events(lambda events: watched.extend(e.seq for e in events))
    job, _ = await mine.create_job("acme", "graph", graph(0))
    other, _ = await theirs.create_job("acme", "graph", graph(1))
    appended = await asyncio.gather(*(store.append_event(j.id, "job.progress", {"i": i})
                                      for i in range(10) for store, j in ((mine, job), (theirs, other))))
    assert [e.seq for e in appended if e.job_id == job.id and e.seq not in watched] == []  # before the answer
    every = await mine.events_since("acme", 0)
    assert watched == [e.seq for e in every if e.job_id == job.id]
    mine.watch_events(None)
    await mine.append_event(job.id, "job.progress")
    assert len(watched) == 11


async def test_a_reader_following_writers_misses_nothing(open_store: OpenStore) -> None:
    writer_store, reader_store = await open_store(), await open_store()
    jobs = [(await writer_store.create_job("acme", "graph", graph(i)))[0] for i in range(4)]
    start = await reader_store.latest_seq("acme")
    written: list[int] = []

    async def write(job_id: str) -> None:
        for i in range(40):
            written.append((await writer_store.append_event(job_id, "progress", {"i": i})).seq)

    async def read() -> list[int]:
        got: list[int] = []
        last = start
        while len(got) < 160:
            batch = await reader_store.events_since("acme", last, limit=17)
            got += [e.seq for e in batch]
            last = batch[-1].seq if batch else last
            await asyncio.sleep(0)
        return got

    reader = asyncio.create_task(read())
    await asyncio.gather(*(write(j.id) for j in jobs))
    got = await asyncio.wait_for(reader, 30)
    assert got == sorted(written)
    assert len(set(got)) == 160


# -- outputs and steps ----------------------------------------------------------------------------


def _stored_files(path: Path) -> list[Path]:
    root = path.parent.parent
    return [p for p in root.rglob("*") if p.is_file() and ".tmp" not in p.parts]


async def test_outputs_are_content_addressed_and_stored_once(store: JobStore) -> None:
    a, _ = await store.create_job("acme", "graph", graph(1))
    b, _ = await store.create_job("acme", "graph", graph(2))
    data = os.urandom(100_000)

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(data), 7_000):
            yield data[i:i + 7_000]

    first = await store.save_output(a.id, "9/a.png", data, "image/png")
    second = await store.save_output(b.id, "9/b.png", chunks(), "image/png")
    sha = hashlib.sha256(data).hexdigest()
    assert first.sha256 == second.sha256 == sha
    assert first.size == len(data)
    assert first.path == second.path
    assert first.path.parts[-2:] == (sha[:2], sha)
    assert _stored_files(first.path) == [first.path]
    assert b"".join([c async for c in await store.open_output("acme", b.id, "9/b.png")]) == data
    assert await store.get_output("acme", a.id, "9/a.png") == first
    await store.save_output(a.id, "9/c.png", b"other")
    assert [o.name for o in await store.list_outputs("acme", a.id)] == ["9/a.png", "9/c.png"]
    assert len(_stored_files(first.path)) == 2
    with pytest.raises(OutputNotFound):
        await store.open_output("acme", a.id, "missing.png")


async def test_fifty_megabytes_stream_through_in_bounded_memory(store: JobStore) -> None:
    job, _ = await store.create_job("acme", "graph", graph())
    block = os.urandom(1 << 20)
    total = 50

    async def produce() -> AsyncIterator[bytes]:
        for i in range(total):
            yield i.to_bytes(4, "big") + block[4:]

    expected = hashlib.sha256()
    for i in range(total):
        expected.update(i.to_bytes(4, "big") + block[4:])
    tracemalloc.start()
    try:
        record = await store.save_output(job.id, "big.bin", produce())
        _, peak_write = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        digest, size = hashlib.sha256(), 0
        async for chunk in await store.open_output("acme", job.id, "big.bin"):
            digest.update(chunk)
            size += len(chunk)
        _, peak_read = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert record.size == size == total << 20
    assert record.sha256 == digest.hexdigest() == expected.hexdigest()
    assert peak_write < 10 << 20, peak_write
    assert peak_read < 10 << 20, peak_read


async def test_steps_are_upserted_in_order(store: JobStore) -> None:
    job, _ = await store.create_job("acme", "pipeline", {"steps": ["draft", "upscale"]})
    await store.upsert_step(job.id, "draft", StepState.RUNNING)
    await store.upsert_step(job.id, "upscale", StepState.PENDING)
    await store.upsert_step(job.id, "draft", StepState.SUCCEEDED, outputs=["9/d.png"], data={"score": 0.8})
    steps = await store.list_steps(job.id)
    assert [(s.name, s.state, s.outputs) for s in steps] == [
        ("draft", StepState.SUCCEEDED, ("9/d.png",)), ("upscale", StepState.PENDING, ())]
    assert steps[0].data == {"score": 0.8}
    with pytest.raises(JobNotFound):
        await store.upsert_step("nope", "draft", StepState.RUNNING)


async def test_calls_cancelled_midway_leave_the_store_consistent(open_store: OpenStore) -> None:
    store, other = await open_store(), await open_store()
    for delay in (0, 0.0005, 0.001, 0.002, 0.005):
        tasks = [asyncio.create_task(store.create_job("acme", "graph", graph(i), idempotency_key=f"c{delay}-{i}"))
                 for i in range(10)]
        tasks.append(asyncio.create_task(other.claim_next("w", lease_s=30)))
        await asyncio.sleep(delay)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    # every job is whole (with its queued event), and both handles still work
    _, created = await store.create_job("acme", "graph", graph(), idempotency_key="after")
    assert created
    assert await other.claim_next("w", lease_s=30) is not None
    jobs = (await store.list_jobs("acme", limit=1000)).items
    queued_events = {e.job_id for e in await store.events_since("acme", 0) if e.type == EventType.QUEUED}
    assert {j.id for j in jobs} == queued_events


async def test_a_closed_store_refuses_calls(store: JobStore) -> None:
    await store.close()
    await store.close()
    with pytest.raises(StoreClosed):
        await store.get_job("acme", "x")


# -- deleting and pruning ---------------------------------------------------------------------------


async def _read(store: JobStore, tenant: str, job_id: str, name: str) -> bytes:
    return b"".join([c async for c in await store.open_output(tenant, job_id, name)])


async def test_deleting_an_ended_job_takes_its_rows_and_the_content_no_other_job_names(store: JobStore) -> None:
    keep, _ = await store.create_job("acme", "graph", graph(1), claim=Claim("w", 30))
    gone, _ = await store.create_job("acme", "graph", graph(2), claim=Claim("w", 30))
    assert await store.complete_job(keep.id, {}, [await store.stage_output(keep.id, "9/a.png", b"shared")])
    await store.start_attempt(gone.id, "gpu-a", "p-1")
    await store.upsert_step(gone.id, "generate", StepState.SUCCEEDED)
    named = [await store.stage_output(gone.id, "9/a.png", b"shared"),
             await store.stage_output(gone.id, "9/b.png", b"own")]
    assert await store.complete_job(gone.id, {}, named)
    own = named[1].path
    assert own.read_bytes() == b"own"
    with pytest.raises(JobNotFound):
        await store.delete_job("other-tenant", gone.id)
    await store.delete_job("acme", gone.id)
    assert await store.get_job("acme", gone.id) is None
    assert await store.list_outputs("acme", gone.id) == []
    assert await store.list_attempts(gone.id) == []
    assert await store.list_steps(gone.id) == []
    assert [e for e in await store.events_since("acme", 0) if e.job_id == gone.id] == []
    assert not own.exists()  # no other job named that content
    assert await _read(store, "acme", keep.id, "9/a.png") == b"shared"  # another job names this one
    with pytest.raises(JobNotFound):
        await store.delete_job("acme", gone.id)
    # an active job is refused, queued or running
    queued, _ = await store.create_job("acme", "graph", graph(3))
    running, _ = await store.create_job("acme", "graph", graph(4), claim=Claim("w", 30))
    for active in (queued, running):
        with pytest.raises(JobNotEnded):
            await store.delete_job("acme", active.id)
        assert await store.get_job("acme", active.id) is not None


async def test_a_worker_finishing_a_job_deleted_meanwhile_changes_nothing(store: JobStore) -> None:
    """Cancelled, then deleted by its tenant while its worker was still collecting: the worker's
    completion, failure or release finds nothing to change (False), as for a job that ended."""
    job, _ = await store.create_job("acme", "graph", graph(), claim=Claim("w", 30))
    staged = await store.stage_output(job.id, "9/a.png", b"collected too late")
    assert await store.cancel_job("acme", job.id)
    await store.delete_job("acme", job.id)
    assert not await store.complete_job(job.id, {}, [staged])
    assert not await store.fail_job(job.id, {"message": "late"})
    assert not await store.release(job.id, worker_id="w")
    assert staged.staged is not None
    assert not staged.staged.exists()
    assert not staged.path.exists()
    with pytest.raises(JobNotFound):  # a tenant's call still tells a missing job
        await store.cancel_job("acme", job.id)


async def test_content_deleted_then_produced_again_is_stored_again(store: JobStore) -> None:
    """A job staged bytes whose content another job named; that job is deleted before the first
    completes: its completion puts its own copy at the address."""
    first, _ = await store.create_job("acme", "graph", graph(1), claim=Claim("w", 30))
    assert await store.complete_job(first.id, {}, [await store.stage_output(first.id, "9/a.png", b"again")])
    second, _ = await store.create_job("acme", "graph", graph(2), claim=Claim("w", 30))
    staged = await store.stage_output(second.id, "9/a.png", b"again")  # the content is at its address now
    await store.delete_job("acme", first.id)
    assert not staged.path.exists()
    assert await store.complete_job(second.id, {}, [staged])
    assert await _read(store, "acme", second.id, "9/a.png") == b"again"


async def test_pruning_deletes_ended_jobs_created_before_the_cutoff(clocked_store: JobStore, clock: FakeClock) -> None:
    store = clocked_store
    old, files = [], []
    for n in range(5):
        job, _ = await store.create_job("acme" if n % 2 else "other", "graph", graph(n), claim=Claim("w", 30))
        output = await store.stage_output(job.id, "9/a.png", b"%d" % n)
        assert await store.complete_job(job.id, {}, [output])
        old.append(job)
        files.append(output.path)
    old_running, _ = await store.create_job("acme", "graph", graph(10), claim=Claim("w", 3600))
    clock.advance(3 * 86400)
    recent, _ = await store.create_job("acme", "graph", graph(11), claim=Claim("w", 30))
    assert await store.cancel_job("acme", recent.id)
    cutoff = datetime.fromtimestamp(clock.now - 86400, UTC)
    assert await store.prune(cutoff, limit=3) == 3
    assert await store.prune(cutoff, limit=3) == 2
    assert await store.prune(cutoff, limit=3) == 0
    for job in old:
        assert await store.get_job(job.tenant, job.id) is None
    assert [o for job in old for o in await store.list_outputs(job.tenant, job.id)] == []
    assert [f for f in files if f.exists()] == []
    assert await store.get_job("acme", old_running.id) is not None  # still running: kept, however old
    assert await store.get_job("acme", recent.id) is not None  # ended, but newer than the cutoff
