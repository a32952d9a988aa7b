"""The ready pipelines of ``patterns``, each on a real Pool of test doubles."""

from __future__ import annotations

import json
from pathlib import Path

from comfy_orchestrator.graph import Template
from comfy_orchestrator.pipelines import (
    EscalationPolicy,
    EventKind,
    JobStatus,
    PipelineEvent,
    StepStatus,
    best_of_variations,
    model_comparison,
    prompt_batch,
    quality_gated,
    text_to_upscaled,
)
from comfy_orchestrator.testing import ShapeSpec, parse_shape_prompt, sampler_succeeds
from tests.pipelines.conftest import DREAM, SD15, SDXL, SMALL, UPSCALER, Cluster, StartCluster, broken_node
from tests.pipelines.judge import ShapeJudge, look


async def test_text_to_image_to_style_edit_to_upscale(
    cluster: Cluster, templates: dict[str, Template], tmp_path: Path
) -> None:
    pipeline = text_to_upscaled("a blue star", model=SD15, seed=4, upscale_model=UPSCALER,
                                params={**SMALL, "steps": 20}, templates=templates)
    result = await pipeline.run(cluster.pool, out_dir=tmp_path)

    assert [s.name for s in pipeline.spec.steps] == ["draw", "stylise", "upscale"]
    assert result.ok
    (final,) = result.outputs
    assert [a.step for a in result.lineage(final)] == ["upscale", "stylise", "draw"]
    assert final.model == UPSCALER
    assert result.lineage(final)[-1].prompt == "a blue star"
    assert final.open().size == (256, 256)
    summary = json.loads(json.dumps(result.as_dict()))
    assert summary["steps"]["upscale"]["images"][0]["parents"] == [result.lineage(final)[1].id]
    assert summary["stats"]["completed"] == 3


async def test_the_same_prompt_and_seed_on_every_model_in_parallel(
    cluster: Cluster, templates: dict[str, Template], tmp_path: Path, judge: ShapeJudge
) -> None:
    models = [SD15, DREAM, SDXL]
    pipeline = model_comparison("a green square", models, seed=11, params={**SMALL, "steps": 10},
                                templates=templates)
    result = await pipeline.run(cluster.pool, out_dir=tmp_path, evaluator=judge)

    scored = {a.model: a for a in result["score"].artifacts}
    assert scored.keys() == set(models)
    assert {a.model: a.backend for a in scored.values()} == {SD15: "a", DREAM: "b", SDXL: "b"}
    assert {a.seed for a in scored.values()} == {11}
    for model, artifact in scored.items():  # the judge saw what the double's sampler drew
        assert artifact.score == (1.0 if sampler_succeeds(11, model or "", 10) else 0.0)
    assert result.stats.by_model.keys() == set(models)
    assert result.stats.by_backend["a"].success_rate == result.stats.by_backend["b"].success_rate == 1.0


def first_success(seed: int, steps: int, models: list[str], policy: EscalationPolicy) -> int:
    """The attempt (1-based) on which the plan first reaches a seed the sampler gets right."""
    plan = policy.plan(models=models, seed=seed, steps=steps)
    return next(n for n, c in enumerate(plan, 1) if sampler_succeeds(c.seed, c.model or "", c.steps))


async def test_the_quality_gated_loop_escalates_until_the_sampler_gets_it_right(
    cluster: Cluster, templates: dict[str, Template], tmp_path: Path, judge: ShapeJudge
) -> None:
    models, policy = [SD15, DREAM], EscalationPolicy()  # new seed ×2, more steps, next model
    seed = next(s for s in range(1000) if 5 <= first_success(s, 5, models, policy) <= 7)
    expected = first_success(seed, 5, models, policy)
    events: list[PipelineEvent] = []
    pipeline = quality_gated("a purple triangle", models, threshold=1.0, seed=seed, steps=5, escalation=policy,
                             params=SMALL, templates=templates)
    result = await pipeline.run(cluster.pool, out_dir=tmp_path, evaluator=judge, on_event=events.append)

    step = result["refine"]
    assert step.passed is True
    assert step.status is StepStatus.DONE
    history = step.history
    assert len(history) == expected
    assert cluster.prompts_run() == expected
    assert [h.score for h in history] == [0.0] * (expected - 1) + [1.0]
    assert [h.reason.split(" ")[0] for h in history[:5]] == ["first", "new", "new", "more", "next"]
    assert (history[3].steps, history[4].model, history[4].steps) == (10, DREAM, 5)
    assert len({(h.model, h.seed, h.steps) for h in history}) == expected  # never the same attempt twice
    (best,) = step.artifacts
    assert best.score == 1.0
    assert look(best.read_bytes()) == ShapeSpec("purple", "triangle")
    assert sum(e.kind is EventKind.ESCALATED for e in events) == expected - 1


async def test_the_loop_keeps_the_best_when_the_budget_runs_out(
    cluster: Cluster, templates: dict[str, Template], tmp_path: Path, judge: ShapeJudge
) -> None:
    pipeline = quality_gated("an orange circle", [SD15], threshold=1.5, max_attempts=4, keep=2, steps=5,
                             params=SMALL, templates=templates)
    result = await pipeline.run(cluster.pool, out_dir=tmp_path, evaluator=judge)
    step = result["refine"]
    assert len(step.history) == 4
    assert step.passed is False
    assert step.status is StepStatus.DONE
    best_scores = sorted((h.score or 0.0 for h in step.history), reverse=True)[:2]
    assert [a.score for a in step.artifacts] == best_scores
    assert step.reason is not None
    assert "reached by 0 of 1" in step.reason


async def test_styles_times_models_then_the_best(
    cluster: Cluster, templates: dict[str, Template], tmp_path: Path, judge: ShapeJudge
) -> None:
    styles = ["watercolour", "pencil sketch", "pixel art"]
    pipeline = best_of_variations("a yellow star", styles, [SD15, DREAM], k=2, seed=2, threshold=1.0,
                                  params={**SMALL, "steps": 10}, templates=templates)
    result = await pipeline.run(cluster.pool, out_dir=tmp_path, evaluator=judge)

    scored = result["score"].artifacts
    assert len(scored) == 6
    assert {a.prompt for a in scored} == {f"a yellow star, {s}" for s in styles}
    kept = result["select"].artifacts
    assert len(kept) == 2
    assert [a.score for a in kept] == sorted((a.score or 0.0 for a in scored), reverse=True)[:2]
    assert result["good_enough"].passed is (max(a.score or 0.0 for a in scored) >= 1.0)


async def test_a_batch_of_prompts_skips_what_exists_and_counts_everything(
    start_cluster: StartCluster, templates: dict[str, Template], tmp_path: Path
) -> None:
    cluster = await start_cluster({"a": [SD15], "b": [SD15]})
    prompts = [f"a {colour} {shape}" for colour, shape in
               [("red", "star"), ("blue", "circle"), ("green", "square"), ("yellow", "triangle"), ("purple", "star")]]
    pipeline = prompt_batch(prompts, model=SD15, seed=5, params={**SMALL, "steps": 4}, templates=templates)
    cluster.servers["a"].faults.execution_error = broken_node()
    cluster.servers["b"].faults.execution_error = broken_node()
    first = await pipeline.run(cluster.pool, out_dir=tmp_path)
    assert (first.stats.completed, first.stats.failed, first.stats.skipped) == (3, 2, 0)
    assert first["batch"].status is StepStatus.PARTIAL

    second = await pipeline.run(cluster.pool, out_dir=tmp_path)
    assert (second.stats.completed, second.stats.failed, second.stats.skipped) == (2, 0, 3)
    assert cluster.prompts_run() == 7
    assert second.stats.summary().startswith("5 jobs: 2 completed, 3 skipped, 0 cached, 0 failed in ")
    assert second["batch"].status is StepStatus.DONE
    assert {parse_shape_prompt(a.prompt or "") for a in second.artifacts("batch")} == {
        parse_shape_prompt(p) for p in prompts}
    assert all(j.status in (JobStatus.DONE, JobStatus.SKIPPED) for j in second["batch"].jobs)
