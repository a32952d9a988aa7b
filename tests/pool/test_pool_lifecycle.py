"""Health with hysteresis, backends added / drained / removed while running, cancellation, timeouts."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from comfy_orchestrator.client import ComfyClient
from comfy_orchestrator.errors import DeadlineExceeded, JobCancelled
from comfy_orchestrator.pool import EventKind, NoCapableBackend, Pool, PoolClosed, PoolEvent
from comfy_orchestrator.pool.health import BreakerState, CircuitBreaker, Health
from comfy_orchestrator.testing import FakeComfyUI, HangMode, NodeFailure
from tests.pool.conftest import FAST, QUICK, SD15, SDXL, StartDouble, config, configs, sampler_graph


async def _until(condition: object, timeout: float = 3.0) -> float:
    """Wait until ``condition()`` is true; returns the seconds it took."""
    assert callable(condition)
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, "condition not met in time"
        await asyncio.sleep(0.01)
    return time.monotonic() - start


def _healthy(pool: Pool, name: str) -> bool:
    return {s.name: s.healthy for s in pool.backends()}[name]


def test_health_has_hysteresis() -> None:
    health = Health(fail_threshold=3, recover_threshold=2)

    def step(outcome: str) -> tuple[bool, bool]:
        """(whether the state flipped, up afterwards)"""
        flipped = health.success() if outcome == "ok" else health.failure(outcome)
        return flipped, health.up

    assert [step(o) for o in ["ok", "x", "x", "ok"]] == [(True, True), (False, True), (False, True), (False, True)]
    assert [step(o) for o in ["x", "x", "x"]] == [(False, True), (False, True), (True, False)]
    # Down: one pass is not enough, a failure in between restarts the count, two in a row bring it up.
    assert [step(o) for o in ["ok", "y", "ok", "ok"]] == [(False, False), (False, False), (False, False), (True, True)]


def test_breaker_states() -> None:
    now = [0.0]
    breaker = CircuitBreaker(failures=2, reset=10.0, clock=lambda: now[0])

    def state() -> tuple[BreakerState, bool]:
        return breaker.state, breaker.allows()

    breaker.started()
    assert breaker.failed() is False
    assert state() == (BreakerState.CLOSED, True)
    assert breaker.failed() is True
    assert state() == (BreakerState.OPEN, False)
    now[0] = 10.0
    assert state() == (BreakerState.HALF_OPEN, True)
    breaker.started()
    assert state() == (BreakerState.HALF_OPEN, False)  # one trial at a time
    assert breaker.failed() is True  # the trial failed
    assert state() == (BreakerState.OPEN, False)
    now[0] = 25.0
    breaker.started()
    breaker.succeeded()
    assert state() == (BreakerState.CLOSED, True)


async def test_down_after_failed_checks_and_up_after_recovery(start_double: StartDouble) -> None:
    a = await start_double("a")
    b = await start_double("b")
    async with Pool(configs(a, b), QUICK) as pool:
        assert _healthy(pool, "a")
        assert _healthy(pool, "b")
        a.faults.refuse = True
        await _until(lambda: not _healthy(pool, "a"))
        assert pool.backends()[0].last_error
        results = await asyncio.gather(*(pool.run(sampler_graph(SD15)) for _ in range(3)))
        assert {r.backend for r in results} == {"b"}
        # A job only `a` may run waits for it instead of failing.
        waiting = asyncio.create_task(pool.run(sampler_graph(SD15), backends=["a"]))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        a.faults.refuse = False
        assert (await waiting).backend == "a"
        assert _healthy(pool, "a")


async def test_one_failed_check_does_not_take_a_backend_down(start_double: StartDouble) -> None:
    a = await start_double("a")
    async with Pool(configs(a), QUICK) as pool:
        a.faults.http_500 = 1  # one failed check, then fine
        await asyncio.sleep(0.3)
        assert _healthy(pool, "a")


async def test_backends_added_drained_and_removed_while_running(start_double: StartDouble) -> None:
    a = await start_double("a", models={"checkpoints": [SD15, SDXL]}, step_delay=0.05)
    b = await start_double("b", models={"checkpoints": [SDXL]})
    async with Pool(configs(a), QUICK) as pool:
        with pytest.raises(NoCapableBackend):
            await pool.run(sampler_graph(SDXL), backends=["b"])
        await pool.add_backend(config(b))
        assert (await pool.run(sampler_graph(SDXL), backends=["b"])).backend == "b"
        with pytest.raises(ValueError, match="already has"):
            await pool.add_backend(config(b))

        running = asyncio.create_task(pool.run(sampler_graph(SD15, steps=8)))  # only a has SD15
        await _until(lambda: a.running_prompt_id is not None)
        drained = asyncio.create_task(pool.drain("a"))
        await asyncio.sleep(0.05)
        assert not drained.done()  # waits for the running job
        assert {s.name: s.draining for s in pool.backends()} == {"a": True, "b": False}
        # New SD15 jobs: no backend that is not draining has SD15.
        with pytest.raises(NoCapableBackend):
            await pool.run(sampler_graph(SD15))
        assert (await pool.run(sampler_graph(SDXL))).backend == "b"
        await drained
        assert running.done()
        assert (await running).backend == "a"

        await pool.remove_backend("a")
        assert [s.name for s in pool.backends()] == ["b"]
        with pytest.raises(NoCapableBackend) as info:
            await pool.run(sampler_graph(SDXL), backends=["a"])
        assert info.value.missing == {"a": ["not in the pool"]}


async def test_a_queued_job_fails_when_its_only_backend_is_drained(start_double: StartDouble) -> None:
    a = await start_double("a", models={"checkpoints": [SD15, SDXL]}, step_delay=0.05)
    b = await start_double("b", models={"checkpoints": [SDXL]})
    async with Pool(configs(a, b), QUICK) as pool:
        first = asyncio.create_task(pool.run(sampler_graph(SD15, steps=6)))
        queued = asyncio.create_task(pool.run(sampler_graph(SD15)))
        await _until(lambda: a.running_prompt_id is not None)
        await pool.drain("a")
        with pytest.raises(NoCapableBackend):
            await queued
        assert (await first).backend == "a"


async def test_cancel_interrupts_only_its_own_prompt_within_two_seconds(start_double: StartDouble) -> None:
    a = await start_double("a", step_delay=0.05)
    async with Pool(configs(a), QUICK) as pool, ComfyClient(a.url, timeouts=FAST) as other:
        # 1. Our job runs; another user's prompt waits behind it on the same server.
        progress = asyncio.Event()
        job = await pool.submit(sampler_graph(SD15, steps=100),
                                on_event=lambda e: progress.set() if e.kind is EventKind.PROGRESS else None)
        await asyncio.wait_for(progress.wait(), 5)
        ours = a.running_prompt_id
        theirs = asyncio.create_task(other.run(sampler_graph(SD15, steps=4)))
        await _until(lambda: a.queue_remaining == 2)
        started = time.monotonic()
        await pool.cancel(job)
        took = await _until(lambda: a.running_prompt_id != ours) + (time.monotonic() - started)
        assert took < 2.0
        with pytest.raises(JobCancelled):
            await pool.result(job)
        assert (await theirs).output_images  # the other user's prompt ran to the end

        # 2. Another user's prompt runs; our job waits behind it on the server, and is cancelled there.
        theirs = asyncio.create_task(other.run(sampler_graph(SD15, steps=30)))
        await _until(lambda: a.running_prompt_id is not None)
        running = a.running_prompt_id
        job = await pool.submit(sampler_graph(SD15))
        await _until(lambda: a.queue_remaining == 2)
        started = time.monotonic()
        await pool.cancel(job)
        assert time.monotonic() - started < 2.0
        assert a.queue_remaining == 1
        assert a.running_prompt_id == running
        assert (await theirs).output_images


async def test_cancel_a_job_still_in_the_pool_queue(start_double: StartDouble) -> None:
    a = await start_double("a", step_delay=0.05)
    events: list[PoolEvent] = []
    async with Pool(configs(a), QUICK) as pool:
        busy = await pool.submit(sampler_graph(SD15, steps=6))
        job = await pool.submit(sampler_graph(SD15), on_event=events.append)
        await asyncio.sleep(0.05)
        assert pool.jobs() == [busy, job]
        await pool.cancel(job)
        await pool.cancel(job)  # a no-op once finished
        assert (await pool.result(busy)).backend == "a"
    assert [e.kind for e in events] == [EventKind.QUEUED, EventKind.CANCELLED]
    assert len(a.history) == 1  # the cancelled job never reached the server


async def test_cancel_all_by_labels(start_double: StartDouble) -> None:
    a = await start_double("a", step_delay=0.05)
    async with Pool(configs(a), QUICK) as pool:
        mine = [await pool.submit(sampler_graph(SD15, steps=10), labels={"user": "u1"}) for _ in range(3)]
        other = await pool.submit(sampler_graph(SD15), labels={"user": "u2", "batch": "7"})
        await asyncio.sleep(0.05)
        assert await pool.cancel_all({"user": "u1"}) == 3
        for job_id in mine:
            with pytest.raises(JobCancelled):
                await pool.result(job_id)
        result = await pool.result(other)
        assert result.labels == {"user": "u2", "batch": "7"}
        assert pool.stats().jobs_cancelled == 3


async def test_cancelling_the_caller_of_run_cancels_the_job(start_double: StartDouble) -> None:
    a = await start_double("a", step_delay=0.05)
    async with Pool(configs(a), QUICK) as pool:
        task = asyncio.create_task(pool.run(sampler_graph(SD15, steps=100)))
        await _until(lambda: a.running_prompt_id is not None)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert pool.jobs() == []
        await _until(lambda: a.running_prompt_id is None, timeout=2.0)


async def test_job_timeout_covers_queueing_and_running(start_double: StartDouble) -> None:
    a = await start_double("a")
    async with Pool(configs(a), QUICK) as pool:
        a.faults.hang = HangMode.START  # accepted, never started
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            await pool.run(sampler_graph(SD15), timeout=0.4)
        assert time.monotonic() - started < 1.5
        assert a.queue_remaining == 0  # taken back off the server
        a.faults.clear()


async def test_close_cancels_unfinished_jobs_and_refuses_new_ones(start_double: StartDouble) -> None:
    a = await start_double("a", step_delay=0.05)
    pool = Pool(configs(a), QUICK)
    with pytest.raises(PoolClosed):
        await pool.submit(sampler_graph(SD15))
    async with pool:
        job = await pool.submit(sampler_graph(SD15, steps=100))
        await _until(lambda: a.running_prompt_id is not None)
    with pytest.raises(JobCancelled):
        await pool.result(job)
    with pytest.raises(PoolClosed):
        await pool.run(sampler_graph(SD15))
    await _until(lambda: a.running_prompt_id is None, timeout=2.0)


async def test_a_backend_down_at_start_joins_when_it_comes_up(start_double: StartDouble) -> None:
    a: FakeComfyUI = await start_double("a")
    a.faults.refuse = True
    async with Pool(configs(a), QUICK) as pool:
        assert not _healthy(pool, "a")
        job = await pool.submit(sampler_graph(SD15))  # capabilities unknown: it waits
        await asyncio.sleep(0.1)
        a.faults.refuse = False
        assert (await pool.result(job)).backend == "a"


async def test_jobs_awaited_by_run_are_not_kept_after_they_end() -> None:
    from comfy_orchestrator.pool import BackendConfig, Pool
    from comfy_orchestrator.testing import FakeComfyUI
    from tests.contract import graphs

    async with FakeComfyUI(name="keep") as server, Pool([BackendConfig("a", server.url)]) as pool:
        ran = [(await pool.run(graphs.model_free(), timeout=10)).job_id for _ in range(3)]
        submitted = await pool.submit(graphs.model_free())
        await pool.result(submitted)
        await asyncio.sleep(0.05)  # the job tasks' done callbacks run
        assert await pool.result(submitted)  # a submit()'s result stays readable after it ended
        assert submitted in pool._finished
        assert not set(ran) & set(pool._finished)  # the run() jobs left nothing behind


async def test_a_chosen_prompt_id_is_submitted_while_its_dispatch_is_heard(start_double: StartDouble) -> None:
    """With ``prompt_id`` the caller already knows the first prompt's id: the ``dispatched`` listener
    runs beside the submission (the prompt reaches the server before the listener returns), and a
    retry draws an id of its own."""
    a = await start_double("a", step_delay=0.05)
    a.faults.execution_error = NodeFailure.cpu_oom("KSampler")  # the first attempt fails; retried once
    heard: list[tuple[int, str | None]] = []
    reached: list[bool] = []  # whether the server had the prompt while the listener still ran

    def on_server() -> bool:
        return a.running_prompt_id == "planned-1" or "planned-1" in a.history

    async def on_event(event: PoolEvent) -> None:
        if event.kind is EventKind.DISPATCHED:
            heard.append((event.attempt, event.prompt_id))
            if event.attempt == 1:
                with contextlib.suppress(AssertionError):
                    await _until(on_server, timeout=1.0)
                reached.append(on_server())

    async with Pool(configs(a), QUICK) as pool:
        result = await pool.run(sampler_graph(SD15, steps=4), on_event=on_event, prompt_id="planned-1")
    assert reached == [True]
    assert heard[0] == (1, "planned-1")
    assert [attempt for attempt, _ in heard] == [1, 2]
    assert heard[1][1] not in (None, "planned-1")
    assert result.result.prompt_id == heard[1][1]


async def test_a_chosen_prompt_id_is_taken_back_off_when_its_dispatch_is_refused(start_double: StartDouble) -> None:
    """A listener that raises JobCancelled (its job is gone) while the prompt is already on the
    server: the job ends cancelled and the prompt is interrupted there."""
    a = await start_double("a", step_delay=0.05)

    async def on_event(event: PoolEvent) -> None:
        if event.kind is EventKind.DISPATCHED:
            await _until(lambda: a.running_prompt_id == "planned-2")
            raise JobCancelled("the job was cancelled meanwhile")

    started = time.monotonic()
    async with Pool(configs(a), QUICK) as pool:
        with pytest.raises(JobCancelled):
            await pool.run(sampler_graph(SD15, steps=100), on_event=on_event, prompt_id="planned-2")
        assert time.monotonic() - started < 2.0  # 100 steps would take 5 s
        await _until(lambda: a.running_prompt_id is None, timeout=2.0)
        assert a.queue_remaining == 0



async def test_cancelling_a_job_while_its_chosen_prompt_and_its_dispatch_run_stops_both(
    start_double: StartDouble,
) -> None:
    a = await start_double("a", step_delay=0.05)
    listener_cancelled = asyncio.Event()

    async def on_event(event: PoolEvent) -> None:
        if event.kind is EventKind.DISPATCHED:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                listener_cancelled.set()
                raise

    async with Pool(configs(a), QUICK) as pool:
        job = await pool.submit(sampler_graph(SD15, steps=100), on_event=on_event, prompt_id="planned-4")
        await _until(lambda: a.running_prompt_id == "planned-4")
        await pool.cancel(job)
        with pytest.raises(JobCancelled):
            await pool.result(job)
        assert listener_cancelled.is_set()
        await _until(lambda: a.running_prompt_id is None, timeout=2.0)
        assert a.queue_remaining == 0
