"""Running pipelines on a real Pool of test doubles: DAG, uploads, cache, skip-existing, retry,
timeouts, fallbacks, gates, continue-on-error vs abort, events and statistics."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from PIL import Image

from comfy_orchestrator.graph import Graph, Template
from comfy_orchestrator.pipelines import (
    Backoff,
    CacheEntry,
    Condition,
    DiskCache,
    EventKind,
    GateStep,
    GenerateStep,
    JobStatus,
    OnError,
    Pipeline,
    PipelineAborted,
    PipelineEvent,
    PoolLike,
    RetryPolicy,
    ScoreStep,
    StepStatus,
    TransformStep,
    job_key,
)
from comfy_orchestrator.testing import ShapeSpec
from tests.pipelines.conftest import (
    DREAM,
    SD15,
    SMALL,
    UPSCALER,
    Cluster,
    StartCluster,
    broken_node,
    seeds_where,
)
from tests.pipelines.judge import ShapeJudge, look


def draw(name: str = "draw", **fields: object) -> GenerateStep:
    params = {**SMALL, "prompt": "a red circle", "steps": 20}
    params.update(fields.pop("params", {}))  # type: ignore[call-overload]
    return GenerateStep(name=name, template="sd15_txt2img", params=params, **fields)  # type: ignore[arg-type]


def test_the_real_pool_is_what_pipelines_expect(cluster: Cluster) -> None:
    pool: PoolLike = cluster.pool  # checked by mypy on this file
    assert pool is cluster.pool


async def test_a_chain_uploads_each_image_to_whichever_backend_runs_the_next_step(
    cluster: Cluster, templates: dict[str, Template], tmp_path: Path
) -> None:
    pipeline = Pipeline([
        draw(models=[DREAM], seeds=[3]),  # only b holds dreamshaper
        TransformStep(name="edit", template="sd15_img2img", depends_on=["draw"], models=[SD15],  # only a
                      params={"denoise": 0.3, "steps": 20}),
        TransformStep(name="big", template="model_upscale", depends_on=["edit"], params={"upscale_model": UPSCALER}),
    ], templates=templates)
    result = await pipeline.run(cluster.pool, out_dir=tmp_path)

    assert result.ok
    (drawn,), (edited,), (big,) = (result[s].artifacts for s in ("draw", "edit", "big"))
    assert (drawn.backend, edited.backend) == ("b", "a")
    assert result.lineage(big) == [big, edited, drawn]
    assert big.parents == (edited.id,)
    assert edited.parents == (drawn.id,)
    assert edited.prompt == "a red circle"  # an edit that names no prompt keeps its input's
    with Image.open(big.path) as image:
        assert image.size == (256, 256)  # the x4 upscaler
    assert big.path.parent == tmp_path / "big"
    assert big.path.is_file()
    assert result.stats.completed == 3
    assert result.stats.by_model.keys() == {DREAM, SD15, UPSCALER}


async def test_cache_hits_do_no_gpu_work(cluster: Cluster, templates: dict[str, Template], tmp_path: Path) -> None:
    pipeline = Pipeline([draw(models=[SD15, DREAM], seeds=[1, 2], cache=True),
                         TransformStep(name="big", template="model_upscale", depends_on=["draw"], cache=True)],
                        templates=templates)
    cache = DiskCache(tmp_path / "cache")
    first = await pipeline.run(cluster.pool, out_dir=tmp_path / "one", cache=cache)
    assert first.stats.completed == 8
    assert cluster.prompts_run() == 8
    assert len(cache) == 8

    events: list[PipelineEvent] = []
    second = await pipeline.run(cluster.pool, out_dir=tmp_path / "two", cache=cache, on_event=events.append)
    assert cluster.prompts_run() == 8  # nothing was submitted
    assert (second.stats.cached, second.stats.completed) == (8, 0)
    assert sum(e.kind is EventKind.CACHED for e in events) == 8
    assert not any(e.kind in (EventKind.QUEUED, EventKind.DISPATCHED) for e in events)
    for a, b in zip(first.artifacts("big"), second.artifacts("big"), strict=True):
        assert a.read_bytes() == b.read_bytes()
        assert b.cached
        assert b.path.parent == tmp_path / "two" / "big"


async def test_an_entry_pruned_after_it_was_found_is_a_miss(
    cluster: Cluster, templates: dict[str, Template], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retention removed the entry between the lookup and the read: the graph runs again."""
    pipeline = Pipeline([draw(models=[SD15], seeds=[1], cache=True)], templates=templates)
    cache = DiskCache(tmp_path / "cache")
    await pipeline.run(cluster.pool, out_dir=tmp_path / "one", cache=cache)
    assert cluster.prompts_run() == 1
    found = DiskCache.get

    def found_then_pruned(self: DiskCache, key: str) -> CacheEntry | None:
        entry = found(self, key)
        shutil.rmtree(self.path_for(key), ignore_errors=True)
        return entry

    monkeypatch.setattr(DiskCache, "get", found_then_pruned)
    again = await pipeline.run(cluster.pool, out_dir=tmp_path / "two", cache=cache)
    assert (again.stats.cached, again.stats.completed) == (0, 1)
    assert cluster.prompts_run() == 2


def test_the_cache_key_is_the_canonical_graph_and_its_models(templates: dict[str, Template]) -> None:
    graph = templates["sd15_txt2img"].bind(prompt="a red circle", seed=1)
    renumbered = Graph({str(int(k) + 100): {**node, "inputs": {
        name: [str(int(v[0]) + 100), v[1]] if isinstance(v, list) else v for name, v in node["inputs"].items()}}
        for k, node in graph.to_dict().items()})
    assert job_key(renumbered) == job_key(graph)
    assert job_key(templates["sd15_txt2img"].bind(prompt="a red circle", seed=1, checkpoint=DREAM)) != job_key(graph)
    assert job_key(graph, {"in.png": b"1"}) != job_key(graph, {"in.png": b"2"})


async def test_skip_existing_runs_only_what_is_not_in_out_dir(
    cluster: Cluster, templates: dict[str, Template], tmp_path: Path
) -> None:
    pipeline = Pipeline([draw(seeds=[1, 2, 3], models=[SD15], skip_existing=True)], templates=templates)
    await pipeline.run(cluster.pool, out_dir=tmp_path)
    gone = (await pipeline.run(cluster.pool, out_dir=tmp_path)).artifacts("draw")[1]
    assert cluster.prompts_run() == 3
    gone.path.unlink()
    third = await pipeline.run(cluster.pool, out_dir=tmp_path)
    assert (third.stats.skipped, third.stats.completed) == (2, 1)
    assert cluster.prompts_run() == 4
    assert gone.path.is_file()


async def test_abort_cancels_the_run_and_keeps_what_finished(
    start_cluster: StartCluster, templates: dict[str, Template], tmp_path: Path, judge: ShapeJudge
) -> None:
    cluster = await start_cluster({"a": [SD15]}, step_delay=0.01)
    cluster.servers["a"].faults.execution_error = broken_node()
    pipeline = Pipeline([draw(models=[SD15], seeds=[1, 2, 3]), ScoreStep(name="rate", depends_on=["draw"])],
                        templates=templates)
    with pytest.raises(PipelineAborted) as caught:
        await pipeline.run(cluster.pool, out_dir=tmp_path, evaluator=judge)

    aborted = caught.value
    assert aborted.step == "draw"
    assert "ValueError: sigma out of range" in aborted.reason
    assert aborted.result["draw"].status is StepStatus.FAILED
    assert aborted.result["rate"].status is StepStatus.CANCELLED
    statuses = sorted(job.status for job in aborted.result["draw"].jobs)
    assert statuses.count(JobStatus.FAILED) == 1
    assert JobStatus.CANCELLED in statuses
    assert not aborted.result.ok
    assert judge.calls == 0


async def test_continue_on_error_goes_on_with_what_succeeded(
    start_cluster: StartCluster, templates: dict[str, Template], tmp_path: Path, judge: ShapeJudge
) -> None:
    cluster = await start_cluster({"a": [SD15]})
    cluster.servers["a"].faults.execution_error = broken_node()
    pipeline = Pipeline([draw(models=[SD15], seeds=[1, 2, 3], on_error=OnError.CONTINUE),
                         ScoreStep(name="rate", depends_on=["draw"])], templates=templates)
    result = await pipeline.run(cluster.pool, out_dir=tmp_path, evaluator=judge)

    assert result["draw"].status is StepStatus.PARTIAL
    assert len(result["draw"].artifacts) == 2
    assert result["draw"].reason is not None
    assert result["draw"].reason.startswith("1 of 3 jobs failed")
    assert result["rate"].status is StepStatus.DONE
    assert len(result["rate"].artifacts) == 2
    assert (result.stats.completed, result.stats.failed) == (2, 1)
    assert not result.ok


async def test_retry_waits_per_the_policy_then_succeeds(
    start_cluster: StartCluster, templates: dict[str, Template], tmp_path: Path
) -> None:
    cluster = await start_cluster({"a": [SD15]})
    cluster.servers["a"].faults.execution_error = broken_node(times=2)
    policy = RetryPolicy(max_attempts=3, initial_interval=0.1, coefficient=3, max_interval=0.25)
    events: list[PipelineEvent] = []
    started = time.monotonic()
    result = await Pipeline([draw(models=[SD15], retry=policy)], templates=templates).run(
        cluster.pool, out_dir=tmp_path, on_event=events.append)
    elapsed = time.monotonic() - started

    (job,) = result["draw"].jobs
    assert job.status is JobStatus.DONE
    assert len(job.attempts) == 3
    assert [a.wait for a in job.attempts] == [0.1, 0.25, None]  # 0.1, then 0.3 capped at 0.25
    assert all(a.error_type == "ExecutionFailed" for a in job.attempts[:2])
    assert elapsed >= 0.35
    retried = [e for e in events if e.kind is EventKind.RETRIED and e.step == "draw"]
    assert len(retried) == 2
    assert "attempt 1 failed (ExecutionFailed" in (retried[0].reason or "")
    assert result.stats.retries == 2
    assert result.stats.by_backend["a"].attempts == 3
    assert result.stats.by_backend["a"].success_rate == pytest.approx(1 / 3)


async def test_retries_run_out_and_never_retry_what_cannot_be_fixed(
    start_cluster: StartCluster, templates: dict[str, Template], tmp_path: Path
) -> None:
    cluster = await start_cluster({"a": [SD15]})
    cluster.servers["a"].faults.execution_error = broken_node(times=None)
    linear = RetryPolicy(backoff=Backoff.LINEAR, max_attempts=3, initial_interval=0.02, coefficient=1)
    custom = RetryPolicy.custom(lambda n, exc: 0.01 * n, max_attempts=2)
    pipeline = Pipeline([
        draw("linear", models=[SD15], retry=linear, on_error=OnError.CONTINUE),
        draw("custom", models=[SD15], seeds=[9], retry=custom, on_error=OnError.CONTINUE),
        draw("rejected", models=["missing.safetensors"], retry=linear, on_error=OnError.CONTINUE),
    ], templates=templates)
    result = await pipeline.run(cluster.pool, out_dir=tmp_path)

    assert [a.wait for a in result["linear"].jobs[0].attempts] == [0.02, 0.04, None]
    assert [a.wait for a in result["custom"].jobs[0].attempts] == [0.01, None]
    (rejected,) = result["rejected"].jobs[0].attempts  # NoCapableBackend: no retry
    assert rejected.error_type == "NoCapableBackend"
    assert "missing.safetensors" in (rejected.error or "")
    assert all(result[s].status is StepStatus.FAILED for s in ("linear", "custom", "rejected"))


async def test_a_step_timeout_ends_a_slow_job(
    start_cluster: StartCluster, templates: dict[str, Template], tmp_path: Path
) -> None:
    cluster = await start_cluster({"a": [SD15]}, step_delay=0.2)  # 20 steps: 4 s
    started = time.monotonic()
    result = await Pipeline([draw(models=[SD15], timeout=0.5, on_error=OnError.CONTINUE)], templates=templates).run(
        cluster.pool, out_dir=tmp_path)
    assert time.monotonic() - started < 3
    (attempt,) = result["draw"].jobs[0].attempts
    assert attempt.error_type == "DeadlineExceeded"


async def test_fallbacks_take_over_in_turn(cluster: Cluster, templates: dict[str, Template], tmp_path: Path) -> None:
    pipeline = Pipeline([draw(models=["flux.safetensors"], fallback=[
        draw("plan_b", models=["sd3.safetensors"]),
        draw("plan_c", models=[DREAM]),
    ]), TransformStep(name="big", template="model_upscale", depends_on=["draw"])], templates=templates)
    events: list[PipelineEvent] = []
    result = await pipeline.run(cluster.pool, out_dir=tmp_path, on_event=events.append)

    step = result["draw"]
    assert step.status is StepStatus.DONE
    assert step.fallback == "plan_c"
    assert [t.name for t in step.tried] == ["draw", "plan_b"]
    assert all(t.status is StepStatus.FAILED for t in step.tried)
    assert step.artifacts[0].model == DREAM
    assert step.artifacts[0].step == "plan_c"
    assert [e.reason.split(";")[-1].strip() for e in events if e.kind is EventKind.FALLBACK and e.reason] == [
        "trying 'plan_b'", "trying 'plan_c'"]
    assert result["big"].status is StepStatus.DONE
    assert result.ok
    assert result.stats.failed == 2
    assert result.stats.completed == 2


@pytest.mark.parametrize("good", [True, False])
async def test_a_gate_picks_a_branch(
    cluster: Cluster, templates: dict[str, Template], tmp_path: Path, judge: ShapeJudge, good: bool
) -> None:
    (seed,) = seeds_where(good, model=SD15, steps=20)
    pipeline = Pipeline([
        draw(models=[SD15], seeds=[seed]),
        ScoreStep(name="rate", depends_on=["draw"]),
        GateStep(name="good", depends_on=["rate"], condition=Condition(threshold=1.0), on_fail=["again"]),
        TransformStep(name="big", template="model_upscale", depends_on=["good"]),
        draw("again", depends_on=["good"], models=[SD15], seeds=seeds_where(True, steps=40), params={"steps": 40}),
    ], templates=templates)
    result = await pipeline.run(cluster.pool, out_dir=tmp_path, evaluator=judge)

    assert result["good"].passed is good
    assert result["rate"].artifacts[0].score == (1.0 if good else 0.0)
    taken, gated = ("big", "again") if good else ("again", "big")
    assert result[taken].status is StepStatus.DONE
    assert result[gated].status is StepStatus.GATED
    assert "gate 'good'" in (result[gated].reason or "")
    assert result.ok
    if not good:
        assert look(result["again"].artifacts[0].read_bytes()) == ShapeSpec("red", "circle")


async def test_events_say_where_each_job_ran_and_how_far_it_got(
    cluster: Cluster, templates: dict[str, Template], tmp_path: Path
) -> None:
    events: list[PipelineEvent] = []

    async def on_event(event: PipelineEvent) -> None:  # async callbacks are awaited too
        events.append(event)

    await Pipeline([draw(models=[SD15, DREAM], params={"steps": 4})], templates=templates).run(
        cluster.pool, out_dir=tmp_path, on_event=on_event)
    kinds = [e.kind for e in events]
    assert kinds[0] is EventKind.STEP_STARTED
    assert kinds[-1] is EventKind.STEP_FINISHED
    dispatched = {e.model: e.backend for e in events if e.kind is EventKind.DISPATCHED}
    assert dispatched == {SD15: "a", DREAM: "b"}
    fractions = [e.fraction for e in events if e.kind is EventKind.PROGRESS and e.model == SD15]
    assert fractions
    assert fractions[-1] == 1.0
    assert sum(e.kind is EventKind.QUEUED for e in events) == 2
    assert sum(e.kind is EventKind.DONE for e in events) == 2
    assert all(e.step == "draw" for e in events)


async def test_a_yaml_pipeline_runs_as_declared(
    cluster: Cluster, templates: dict[str, Template], tmp_path: Path, judge: ShapeJudge
) -> None:
    spec = tmp_path / "shapes.yaml"
    spec.write_text(f"""
name: shapes
steps:
  - name: draw
    kind: generate
    template: sd15_txt2img
    params: {{prompt: a green star, width: 64, height: 64, steps: 20}}
    models: [{SD15}, {DREAM}]
    seeds: [1, 2]
  - {{name: rate, kind: score, depends_on: [draw]}}
  - {{name: best, kind: select, depends_on: [rate], k: 1, group_by: model}}
""")
    result = await Pipeline.load(spec, templates=templates).run(cluster.pool, out_dir=tmp_path / "out",
                                                                evaluator=judge)
    best = result["best"].artifacts
    assert sorted(a.model or "" for a in best) == sorted([SD15, DREAM])
    for artifact in best:
        same_model = [a for a in result["rate"].artifacts if a.model == artifact.model]
        assert artifact.score == max(a.score or 0.0 for a in same_model)


async def test_a_failing_event_callback_does_not_end_the_run(
    cluster: Cluster, templates: dict[str, Template], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(event: PipelineEvent) -> None:
        raise RuntimeError("listener bug")

    async def broken_async(event: PipelineEvent) -> None:
        raise RuntimeError("async listener bug")

    for callback in (broken, broken_async):
        result = await Pipeline([draw(models=[SD15], params={"steps": 2})], templates=templates).run(
            cluster.pool, out_dir=tmp_path / callback.__name__, on_event=callback)
        assert result.ok
    assert "listener bug" in caplog.text
    assert "async listener bug" in caplog.text
