"""Failover: a backend that dies, refuses, answers 5xx or hangs mid-job costs a retry elsewhere; a
rejected graph or a node error is never retried; out of memory frees and retries once; the breaker."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from comfy_orchestrator.errors import BackendUnavailable, ExecutionFailed, GraphValidationError
from comfy_orchestrator.pool import BreakerState, EventKind, FailureKind, Pool, PoolEvent, PoolResult, PoolSettings
from comfy_orchestrator.testing import FakeComfyUI, HangMode, NodeFailure
from comfy_orchestrator.testing.execution import Engine
from tests.pool.conftest import QUICK, SD15, StartDouble, configs, sampler_graph


async def _pair(start_double: StartDouble, **first: Any) -> tuple[FakeComfyUI, FakeComfyUI]:
    a = await start_double("a", step_delay=0.02, **first)
    b = await start_double("b", step_delay=0.02)
    return a, b


async def _run_on_a_first(
    pool: Pool, graph: dict[str, Any], events: list[PoolEvent], on_dispatch: Callable[[], None] | None = None
) -> PoolResult:
    """Run ``graph`` so that its first attempt goes to ``a``: ``b`` is drained until ``a`` took the job.
    ``on_dispatch`` runs when ``a`` took it, before anything was sent to ``a``."""
    await pool.drain("b")

    def record(event: PoolEvent) -> None:
        events.append(event)
        if event.kind is EventKind.DISPATCHED and event.attempt == 1 and on_dispatch is not None:
            on_dispatch()

    dispatched = asyncio.Event()
    remove = pool.add_listener(lambda e: dispatched.set() if e.kind is EventKind.DISPATCHED else None)
    task = asyncio.create_task(pool.run(graph, on_event=record))
    await dispatched.wait()
    remove()
    await pool.resume("b")
    return await task


@pytest.mark.parametrize("fault", ["die_mid_job", "refuse", "http_500", "hang"])
async def test_job_moves_to_another_backend(start_double: StartDouble, fault: str) -> None:
    a, b = await _pair(start_double)
    events: list[PoolEvent] = []

    def break_a() -> None:
        if fault == "die_mid_job":
            a.faults.die_mid_job = True
        elif fault == "refuse":
            a.faults.refuse = True  # the submit is refused
        elif fault == "http_500":
            a.faults.http_500 = 100
        else:
            a.faults.hang = HangMode.MID_RUN  # silent after its first node: the stall watchdog fires

    async with Pool(configs(a, b), QUICK) as pool:
        result = await _run_on_a_first(pool, sampler_graph(SD15, steps=10), events, break_a)
        a.faults.clear()
    assert result.backend == "b"
    assert [x.backend for x in result.attempts] == ["a", "b"]
    first = result.attempts[0]
    assert first.reason is (FailureKind.STALLED if fault == "hang" else FailureKind.UNAVAILABLE)
    assert first.error is not None
    assert result.attempts[1].error is None
    kinds = [e.kind for e in events]
    assert kinds[0] is EventKind.QUEUED
    assert kinds[-1] is EventKind.DONE
    retried = [e for e in events if e.kind is EventKind.RETRIED]
    assert len(retried) == 1
    assert retried[0].backend == "a"
    assert retried[0].reason
    assert retried[0].delay is not None
    assert 0 < retried[0].delay <= QUICK.backoff_max * 1.2


async def test_attempts_are_bounded(start_double: StartDouble) -> None:
    a = await start_double("a")
    b = await start_double("b")
    settings = PoolSettings(health_interval=5.0, fail_threshold=50, max_attempts=2, backoff_initial=0.01,
                            backoff_max=0.02)
    async with Pool(configs(a, b), settings) as pool:
        a.faults.http_500 = 1000
        b.faults.http_500 = 1000
        with pytest.raises(BackendUnavailable) as info:
            await pool.run(sampler_graph(SD15))
        a.faults.clear()
        b.faults.clear()
    assert "2 attempts" in str(info.value)
    assert pool.stats().retries == 1
    assert pool.stats().jobs_failed == 1


async def test_a_rejected_graph_is_not_retried(start_double: StartDouble) -> None:
    a, b = await _pair(start_double)
    graph = sampler_graph(SD15)
    graph["5"]["inputs"]["sampler_name"] = "no_such_sampler"
    events: list[PoolEvent] = []
    async with Pool(configs(a, b), QUICK) as pool:
        with pytest.raises(GraphValidationError):
            await pool.run(graph, on_event=events.append)
    assert [e.kind for e in events] == [EventKind.QUEUED, EventKind.DISPATCHED, EventKind.FAILED]
    assert "GraphValidationError" in (events[-1].reason or "")


async def test_a_node_error_is_not_retried(start_double: StartDouble) -> None:
    a, b = await _pair(start_double)
    a.faults.execution_error = NodeFailure("ValueError", "bad input", node_class="KSampler", times=None)
    b.faults.execution_error = NodeFailure("ValueError", "bad input", node_class="KSampler", times=None)
    async with Pool(configs(a, b), QUICK) as pool:
        with pytest.raises(ExecutionFailed) as info:
            await pool.run(sampler_graph(SD15))
        stats = pool.stats()
    assert info.value.exception_message.startswith("bad input")
    assert stats.retries == 0
    assert stats.jobs_failed == 1
    assert sum(s.failed for s in stats.backends.values()) == 1


@pytest.mark.parametrize("oom", [NodeFailure.cpu_oom, NodeFailure.cuda_oom])
async def test_out_of_memory_frees_that_backend_and_retries_elsewhere(
    start_double: StartDouble, monkeypatch: pytest.MonkeyPatch, oom: Any
) -> None:
    freed: list[str] = []
    original = Engine.free

    def observed_free(engine: Engine, free_memory: bool) -> None:
        freed.append(engine.name)
        original(engine, free_memory)

    monkeypatch.setattr(Engine, "free", observed_free)
    a, b = await _pair(start_double)
    a.faults.execution_error = oom(node_class="KSampler")
    events: list[PoolEvent] = []
    async with Pool(configs(a, b), QUICK) as pool:
        result = await _run_on_a_first(pool, sampler_graph(SD15), events)
    assert freed == ["a"]
    assert [x.backend for x in result.attempts] == ["a", "b"]
    assert result.attempts[0].reason is FailureKind.OUT_OF_MEMORY
    assert any(e.kind is EventKind.RETRIED and "out_of_memory" in (e.reason or "") for e in events)


async def test_out_of_memory_twice_is_raised(start_double: StartDouble) -> None:
    a, b = await _pair(start_double)
    for server in (a, b):
        server.faults.execution_error = NodeFailure.cuda_oom(node_class="KSampler")
        server.faults.execution_error.times = None
    async with Pool(configs(a, b), QUICK) as pool:
        with pytest.raises(ExecutionFailed) as info:
            await pool.run(sampler_graph(SD15))
    assert info.value.out_of_memory


async def test_breaker_opens_after_repeated_failures_and_half_opens(start_double: StartDouble) -> None:
    a = await start_double("a", step_delay=0.01)
    b = await start_double("b", step_delay=0.01)
    settings = PoolSettings(health_interval=0.05, fail_threshold=100, max_attempts=3, backoff_initial=0.005,
                            backoff_max=0.01, breaker_failures=2, breaker_reset=0.4)

    def fail_a() -> None:
        a.faults.http_500 = 10_000  # every request, health checks included (fail_threshold is high)

    async with Pool(configs(a, b), settings) as pool:
        for _ in range(2):
            result = await _run_on_a_first(pool, sampler_graph(SD15), [], fail_a)
            assert [x.backend for x in result.attempts] == ["a", "b"]
        status = {s.name: s for s in pool.backends()}
        assert status["a"].breaker is BreakerState.OPEN
        # While open, nothing goes to a, even when a is the only one idle.
        results = await asyncio.gather(*(pool.run(sampler_graph(SD15)) for _ in range(4)))
        assert {r.backend for r in results} == {"b"}
        assert all(len(r.attempts) == 1 for r in results)
        a.faults.clear()
        await asyncio.sleep(0.45)
        assert {s.name: s for s in pool.backends()}["a"].breaker is BreakerState.HALF_OPEN
        await pool.run(sampler_graph(SD15), backends=["a"])  # the trial succeeds
        assert {s.name: s for s in pool.backends()}["a"].breaker is BreakerState.CLOSED
