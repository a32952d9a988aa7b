"""Policies and small parts, without a server: retry intervals, the escalation plan, gate conditions,
the disk cache, statistics, and the promise that library code never starts its own event loop."""

from __future__ import annotations

import ast
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

import comfy_orchestrator.pipelines as pipelines
from comfy_orchestrator.errors import ExecutionFailed, GraphValidationError, JobCancelled, StalledTimeout
from comfy_orchestrator.pipelines import (
    Backoff,
    Condition,
    DiskCache,
    EscalationAction,
    EscalationPolicy,
    EscalationStage,
    JobOutcome,
    JobStatus,
    RetryPolicy,
    RunStats,
)
from comfy_orchestrator.pipelines.results import AttemptRecord, BackendTry

if TYPE_CHECKING:
    import quality.types


def as_pipeline_evaluator(evaluator: quality.types.Evaluator) -> pipelines.Evaluator:
    """mypy checks that the quality package's evaluator protocol fits the pipelines' one."""
    return evaluator


def failure() -> ExecutionFailed:
    return ExecutionFailed(prompt_id="p", node_id="5", node_type="KSampler", exception_type="ValueError",
                           exception_message="boom")


def test_exponential_linear_and_custom_intervals_are_capped() -> None:
    exponential = RetryPolicy(max_attempts=6, initial_interval=1, coefficient=2, max_interval=5)
    assert [exponential.interval(n, failure()) for n in range(1, 6)] == [1, 2, 4, 5, 5]
    linear = RetryPolicy(backoff=Backoff.LINEAR, initial_interval=0.5, coefficient=1, max_interval=1.6)
    assert [linear.interval(n, failure()) for n in range(1, 5)] == [0.5, 1.0, 1.5, 1.6]
    custom = RetryPolicy.custom(lambda n, exc: 10.0 if isinstance(exc, ExecutionFailed) else 0.1, max_interval=3)
    assert custom.interval(1, failure()) == 3
    assert custom.interval(1, StalledTimeout("slow")) == 0.1


def test_next_interval_stops_at_max_attempts_and_on_unfixable_errors() -> None:
    policy = RetryPolicy(max_attempts=3, initial_interval=0.1)
    assert policy.next_interval(1, failure()) == 0.1
    assert policy.next_interval(3, failure()) is None
    assert policy.next_interval(1, GraphValidationError({"message": "bad"})) is None
    assert policy.next_interval(1, JobCancelled("stop")) is None
    assert RetryPolicy(non_retryable=("ExecutionFailed",)).next_interval(1, failure()) is None
    assert RetryPolicy.none().next_interval(1, failure()) is None


def test_custom_backoff_needs_its_callable() -> None:
    with pytest.raises(ValueError, match="backoff 'custom' goes with a delay callable"):
        RetryPolicy(backoff=Backoff.CUSTOM)
    assert "delay" not in RetryPolicy.custom(lambda n, exc: 1.0).model_dump()


def test_the_default_escalation_plan() -> None:
    plan = list(EscalationPolicy().plan(models=["a", "b"], seed=10, steps=20))
    assert [(c.model, c.seed, c.steps) for c in plan] == [
        ("a", 10, 20), ("a", 11, 20), ("a", 12, 20), ("a", 12, 40),
        ("b", 10, 20), ("b", 13, 20), ("b", 14, 20), ("b", 14, 40),
    ]
    assert [c.reason for c in plan[:5]] == ["first attempt", "new seed 11", "new seed 12", "more steps (40)",
                                            "next model b"]


def test_more_steps_stop_at_the_ceiling_and_plans_without_models_end() -> None:
    policy = EscalationPolicy(stages=[EscalationStage(action=EscalationAction.MORE_STEPS, times=5,
                                                      steps_factor=1.5, steps_add=1)], max_steps=40)
    assert [c.steps for c in policy.plan(models=[], seed=0, steps=10)] == [10, 16, 25, 39, 40]
    seeds_only = EscalationPolicy(stages=[EscalationStage(action=EscalationAction.NEW_SEED)], repeat=True)
    endless = seeds_only.plan(models=[None], seed=0, steps=1)
    assert [next(endless).seed for _ in range(50)] == list(range(50))  # the loop's budget ends it


@pytest.mark.parametrize(("of", "threshold", "holds"), [
    ("best", 0.9, True), ("worst", 0.2, False), ("mean", 0.5, True), ("all", 0.1, True), ("any", 0.95, False),
])
def test_conditions_over_scores(of: str, threshold: float, holds: bool) -> None:
    assert Condition.model_validate({"of": of, "threshold": threshold}).holds([0.1, 0.5, 0.9]) is holds
    assert Condition(threshold=0).holds([]) is False


def test_disk_cache_entries_are_whole_or_absent(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path)
    key = "ab" * 32
    assert cache.get(key) is None
    entry = cache.put(key, {"model": "m"}, [("x.png", b"one"), ("y.png", b"two")])
    assert [p.read_bytes() for p in entry.images] == [b"one", b"two"]
    assert entry.record["model"] == "m"
    cache.put(key, {"model": "other"}, [("x.png", b"three")])  # a second writer loses
    again = cache.get(key)
    assert again is not None
    assert again.record["model"] == "m"
    entry.images[1].unlink()
    assert key not in cache  # incomplete: a miss
    assert list(cache.keys()) == [key]
    assert len(cache) == 1
    with pytest.raises(ValueError, match="not a cache key"):
        cache.get("../../etc")


def test_disk_cache_prunes_entries_unused_since_a_time(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path)
    stale, hit, fresh = "aa" * 32, "bb" * 32, "cc" * 32
    for key in (stale, hit, fresh):
        cache.put(key, {}, [("x.png", key.encode())])
    long_ago = time.time() - 10 * 86400
    for key in (stale, hit):
        os.utime(cache.path_for(key) / "record.json", (long_ago, long_ago))
    dead_writer = tmp_path / "dd" / ".dddddddddddd-x"  # a writer's temporary folder, left by a crash
    dead_writer.mkdir(parents=True)
    os.utime(dead_writer, (long_ago, long_ago))
    assert cache.get(hit) is not None  # a hit marks it used now
    assert cache.prune(time.time() - 86400) == 1
    assert sorted(cache.keys()) == [hit, fresh]
    assert not dead_writer.exists()
    assert cache.prune(time.time() - 86400) == 0


def test_run_stats_count_outcomes_models_and_backends() -> None:
    def outcome(status: JobStatus, model: str, tries: tuple[BackendTry, ...] = ()) -> JobOutcome:
        attempts = (AttemptRecord(1, 0.0, 1.0, tries=tries),) if tries else ()
        return JobOutcome("s", "k", status, model, elapsed=2.0, attempts=attempts)

    stats = RunStats.from_outcomes([
        outcome(JobStatus.DONE, "m1", (BackendTry("a", False), BackendTry("b", True))),
        outcome(JobStatus.DONE, "m1", (BackendTry("a", True),)),
        outcome(JobStatus.FAILED, "m2", (BackendTry("b", False),)),
        outcome(JobStatus.CACHED, "m2"), outcome(JobStatus.SKIPPED, "m2"),
    ], elapsed=3.5)
    assert (stats.completed, stats.failed, stats.cached, stats.skipped, stats.total) == (2, 1, 1, 1, 5)
    assert stats.by_model["m1"].jobs == 2
    assert stats.by_model["m1"].mean_seconds == 2.0
    assert "m2" not in stats.by_model
    assert stats.by_backend["a"].success_rate == 0.5
    assert stats.by_backend["b"].success_rate == 0.5
    assert stats.summary() == "5 jobs: 2 completed, 1 skipped, 1 cached, 1 failed in 3.5s"
    assert stats.as_dict()["by_backend"]["a"] == {"attempts": 2, "succeeded": 1, "success_rate": 0.5}


def test_library_code_never_runs_its_own_event_loop() -> None:
    """Notebooks already run a loop: every entry point is a coroutine, none calls asyncio.run."""
    package = Path(pipelines.__file__).parent
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("run_until_complete", "new_event_loop"):
                pytest.fail(f"{path.name} starts an event loop")
            if isinstance(node, ast.Attribute) and node.attr == "run" and getattr(node.value, "id", "") == "asyncio":
                pytest.fail(f"{path.name} calls asyncio.run")
