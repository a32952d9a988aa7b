"""The service's wake-up calls: a queued job wakes one idle worker, never the whole herd, and no
wake-up is lost to a worker that was still claiming; event readers are all woken."""

from __future__ import annotations

import asyncio

from comfy_orchestrator.service.notifier import Notifier


async def test_a_queued_job_wakes_one_idle_worker_the_longest_idle_first() -> None:
    notifier = Notifier()
    waiters = [notifier.next_job(notifier.generation) for _ in range(8)]
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
    assert notifier.next_job(seen).done()  # so the worker claims again at once
    assert not notifier.next_job(notifier.generation).done()


async def test_a_forgotten_waiter_takes_no_wake_up() -> None:
    notifier = Notifier()
    timed_out = notifier.next_job(notifier.generation)
    waiting = notifier.next_job(notifier.generation)
    notifier.forget(timed_out)
    notifier.job_queued()
    assert waiting.done()
    assert timed_out.cancelled()


async def test_event_readers_are_all_woken_and_workers_are_not() -> None:
    notifier = Notifier()
    worker = notifier.next_job(notifier.generation)
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
