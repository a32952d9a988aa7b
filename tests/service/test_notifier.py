"""The service's wake-up calls: a queued job wakes one idle worker, never the whole herd, and no
wake-up is lost to a worker that was still claiming; event readers are all woken; a job created for
an idle worker reaches that worker, and a reserved worker is neither woken nor forgotten."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from comfy_orchestrator.service.notifier import Notifier
from comfy_orchestrator.store import Claim, JobKind, JobRecord, JobState

CLAIM = Claim("w-1", 60.0)


def idle_worker(
    notifier: Notifier, generation: int | None = None, claim: Claim = CLAIM
) -> asyncio.Future[JobRecord | None]:
    return notifier.next_job(notifier.generation if generation is None else generation, claim)


async def test_a_queued_job_wakes_one_idle_worker_the_longest_idle_first() -> None:
    notifier = Notifier()
    waiters = [idle_worker(notifier) for _ in range(8)]
    notifier.job_queued()
    assert [w.done() for w in waiters] == [True] + [False] * 7
    notifier.job_queued()
    notifier.job_queued()
    assert sum(w.done() for w in waiters) == 3
    assert waiters[1].done()
    assert waiters[2].done()
    for waiter in waiters:
        notifier.forget(waiter)


async def test_a_job_queued_while_the_worker_was_claiming_is_not_missed() -> None:
    notifier = Notifier()
    seen = notifier.generation  # read before the claim, which found the queue empty…
    notifier.job_queued()  # …while a job came in: nobody was waiting yet
    assert idle_worker(notifier, seen).done()  # so the worker claims again at once
    assert not idle_worker(notifier).done()


async def test_a_forgotten_waiter_takes_no_wake_up() -> None:
    notifier = Notifier()
    timed_out = idle_worker(notifier)
    waiting = idle_worker(notifier)
    notifier.forget(timed_out)
    notifier.job_queued()
    assert waiting.done()
    assert timed_out.cancelled()


async def test_event_readers_are_all_woken_and_workers_are_not() -> None:
    notifier = Notifier()
    worker = idle_worker(notifier)
    readers = [asyncio.create_task(notifier.wait(30)) for _ in range(5)]
    await asyncio.sleep(0)
    notifier.notify()
    async with asyncio.timeout(10):
        await asyncio.gather(*readers)
    assert not worker.done()
    readers = [asyncio.create_task(notifier.wait(30)) for _ in range(2)]
    await asyncio.sleep(0)
    notifier.job_queued()  # a queued job comes with an event: readers wake too
    async with asyncio.timeout(10):
        await asyncio.gather(*readers)
    assert worker.done()


async def test_wait_returns_after_its_timeout_without_a_notify() -> None:
    notifier = Notifier()
    async with asyncio.timeout(10):
        await notifier.wait(0.01)


def _job(job_id: str) -> JobRecord:
    now = datetime.now(UTC)
    return JobRecord(id=job_id, tenant="t", kind=JobKind.GRAPH, spec={}, state=JobState.RUNNING, created=now,
                     updated=now, body_hash="h")


async def test_a_reservation_takes_the_longest_idle_worker_and_delivers_the_job_to_it() -> None:
    notifier = Notifier()
    first = idle_worker(notifier, claim=Claim("w-1", 60.0))
    second = idle_worker(notifier, claim=Claim("w-2", 60.0))
    reserved = notifier.reserve()
    assert reserved is not None
    assert reserved.claim == Claim("w-1", 60.0)
    notifier.job_queued()  # the next queued job wakes the other worker: the reserved one is not idle
    assert second.done()
    assert second.result() is None
    assert not notifier.forget(first)  # its poll timed out: it must still wait for the answer
    assert not first.cancelled()
    job = _job("j-1")
    reserved.deliver(job)
    assert first.result() is job
    assert notifier.forget(first)
    assert notifier.reserve() is None  # nobody is idle any more


async def test_a_declined_reservation_sends_the_worker_back_to_claiming() -> None:
    notifier = Notifier()
    idle = idle_worker(notifier)
    reserved = notifier.reserve()
    assert reserved is not None
    reserved.decline()
    assert idle.result() is None
    reserved.deliver(_job("late"))  # answered once: a second answer changes nothing
    assert idle.result() is None


async def test_forgotten_and_woken_workers_are_not_reserved() -> None:
    notifier = Notifier()
    gone = idle_worker(notifier)
    notifier.forget(gone)
    woken = idle_worker(notifier)
    notifier.job_queued()
    assert woken.done()
    assert notifier.reserve() is None
