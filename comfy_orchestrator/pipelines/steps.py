"""What each kind of step does with its inputs: generate, transform, score, gate, select.

(The quality-gated loop lives in ``loop``; the DAG, fallbacks and ``on_error`` in ``pipeline``.)
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from comfy_orchestrator.graph import Graph, Template
from comfy_orchestrator.pipelines.events import EventKind, PipelineEvent
from comfy_orchestrator.pipelines.jobs import Job, JobPolicy, RunContext, run_job
from comfy_orchestrator.pipelines.results import Artifact, JobOutcome, JobStatus, StepResult, StepStatus
from comfy_orchestrator.pipelines.spec import GateStep, ScoreStep, SelectStep, TransformStep, _GraphStep

__all__ = ["Binding", "bindings", "gate", "policy_of", "run_graph_step", "run_jobs", "score_images", "select"]


@dataclass(frozen=True, slots=True)
class Binding:
    """The slot values of one job, and the model / seed / prompt they amount to."""

    params: dict[str, Any]
    model: str | None
    seed: int | None
    prompt: str | None
    negative: str | None
    explicit_prompt: bool


def bindings(step: _GraphStep, template: Template, *, with_models: bool = True) -> Iterator[Binding]:
    """Every combination of ``models × prompts × seeds × variations`` (an empty list binds nothing;
    without ``with_models``, the models are left out, as the quality loop escalates over them)."""
    models: list[str | None] = ([*step.models] or [None]) if with_models else [None]
    prompts: list[str | None] = [*step.prompts] or [None]
    seeds: list[int | None] = [*step.seeds] or [None]
    for model, prompt, seed, variation in itertools.product(models, prompts, seeds, step.variations or [{}]):
        params = {**step.params, **variation}
        for slot, value in ((step.model_slot, model), (step.prompt_slot, prompt), (step.seed_slot, seed)):
            if value is not None:
                params[slot] = value
        yield binding_of(step, template, params)


def binding_of(step: _GraphStep, template: Template, params: dict[str, Any]) -> Binding:
    def value(slot: str) -> Any:
        return params.get(slot, template.defaults.get(slot))

    model = value(step.model_slot) if step.model_slot in template.slots else _main_model(template.bind(params))
    return Binding(params, model, value(step.seed_slot), value(step.prompt_slot), value(step.negative_slot),
                   step.prompt_slot in params)


_MODEL_FOLDERS = ("checkpoints", "diffusion_models", "upscale_models")


def _main_model(graph: Graph) -> str | None:
    """The model a graph is about when its template has no model slot: its checkpoint, UNet or upscaler."""
    found = graph.model_references()
    for folder in _MODEL_FOLDERS:
        if found.get(folder):
            return sorted(found[folder])[0]
    return None


def policy_of(step: _GraphStep) -> JobPolicy:
    return JobPolicy(retry=step.retry, timeout=step.timeout, cache=step.cache, skip_existing=step.skip_existing)


def build_jobs(step: _GraphStep, template: Template, inputs: Sequence[Artifact]) -> list[Job]:
    """The jobs of a generate or transform step (reads the input images: run it in a thread)."""
    backends = tuple(step.backends) if step.backends is not None else None
    if not isinstance(step, TransformStep):
        return [Job(step.name, template.bind(b.params), b.model, b.seed, b.prompt, b.negative, b.params,
                    backends=backends) for b in bindings(step, template)]
    jobs = []
    for artifact in inputs:
        data = artifact.path.read_bytes()
        upload = f"pipe-{hashlib.sha256(data).hexdigest()[:24]}{artifact.path.suffix or '.png'}"
        for b in bindings(step, template):
            params = {**b.params, step.image_slot: upload}
            jobs.append(Job(
                step.name, template.bind(params), b.model,
                b.seed if step.seed_slot in template.slots else artifact.seed,
                b.prompt if b.explicit_prompt else artifact.prompt,
                b.negative if step.negative_slot in b.params else artifact.negative,
                params, uploads={upload: data}, parents=(artifact.id,), backends=backends,
            ))
    return jobs


class _FailFast(Exception):
    """A job failed and the step aborts: cancel its siblings."""


async def run_jobs(ctx: RunContext, jobs: Sequence[Job], policy: JobPolicy, *, fail_fast: bool) -> list[JobOutcome]:
    """Run ``jobs`` concurrently (the pool queues them); with ``fail_fast`` the first failure cancels
    the others, which are reported as cancelled."""
    outcomes: dict[int, JobOutcome] = {}

    async def one(index: int, job: Job) -> None:
        outcomes[index] = outcome = await run_job(ctx, job, policy)
        if fail_fast and outcome.status is JobStatus.FAILED:
            raise _FailFast

    try:
        async with asyncio.TaskGroup() as group:
            for index, job in enumerate(jobs):
                group.create_task(one(index, job))
    except* _FailFast:
        pass
    return [outcomes.get(i) or JobOutcome(job.step, job.key, JobStatus.CANCELLED, job.model, job.seed,
                                          error="cancelled: another job of the step failed")
            for i, job in enumerate(jobs)]


def outcome_result(name: str, kind: str, outcomes: Sequence[JobOutcome], started: float) -> StepResult:
    ok = [o for o in outcomes if o.status.ok]
    status = StepStatus.DONE if len(ok) == len(outcomes) else StepStatus.PARTIAL if ok else StepStatus.FAILED
    failure = next((o.error for o in outcomes if o.status is JobStatus.FAILED), None)
    reason = None
    if status is not StepStatus.DONE:
        reason = f"{len(outcomes) - len(ok)} of {len(outcomes)} jobs failed: {failure}"
    return StepResult(name, kind, status, tuple(a for o in ok for a in o.artifacts), tuple(outcomes), reason,
                      elapsed=time.monotonic() - started)


async def run_graph_step(ctx: RunContext, step: _GraphStep, template: Template, inputs: Sequence[Artifact],
                         *, fail_fast: bool) -> StepResult:
    started = time.monotonic()
    jobs = await asyncio.to_thread(build_jobs, step, template, inputs)
    outcomes = await run_jobs(ctx, jobs, policy_of(step), fail_fast=fail_fast)
    return outcome_result(step.name, "transform" if isinstance(step, TransformStep) else "generate", outcomes, started)


async def score_images(ctx: RunContext, artifacts: Sequence[Artifact], *, prompt: str | None = None,
                       negative: str | None = None) -> list[Artifact]:
    """``artifacts`` with their scores, one evaluator call per (prompt, negative)."""
    if ctx.evaluator is None:
        raise ValueError("scoring needs an evaluator: pass evaluator= to run()")
    groups: dict[tuple[str, str | None], list[int]] = {}
    for index, artifact in enumerate(artifacts):
        text = prompt if prompt is not None else artifact.prompt
        if text is None:
            raise ValueError(f"image {artifact.id} has no prompt to be scored against; set the score step's prompt")
        groups.setdefault((text, negative if negative is not None else artifact.negative), []).append(index)
    scored = list(artifacts)
    for (text, neg), indices in groups.items():
        images = await asyncio.to_thread(_read_all, [artifacts[i].path for i in indices])
        scores = await ctx.evaluator.score(images, text, negative=neg)
        if len(scores) != len(images):
            raise ValueError(f"the evaluator returned {len(scores)} scores for {len(images)} images")
        for i, score in zip(indices, scores, strict=True):
            scored[i] = artifacts[i].with_score(score)
    return scored


def _read_all(paths: Sequence[Path]) -> list[bytes]:
    return [path.read_bytes() for path in paths]


async def run_score_step(ctx: RunContext, step: ScoreStep, inputs: Sequence[Artifact]) -> StepResult:
    started = time.monotonic()
    try:
        async with asyncio.timeout(step.timeout):
            scored = await score_images(ctx, inputs, prompt=step.prompt, negative=step.negative)
    except Exception as exc:  # a user's evaluator may raise anything; the step's on_error decides
        return StepResult(step.name, step.kind, StepStatus.FAILED, elapsed=time.monotonic() - started,
                          reason=f"scoring failed: {type(exc).__name__}: {exc}")
    return StepResult(step.name, step.kind, StepStatus.DONE, tuple(scored), elapsed=time.monotonic() - started)


def gate(ctx: RunContext, step: GateStep, inputs: Sequence[Artifact]) -> StepResult:
    condition = step.condition
    values = [v for a in inputs if (v := a.metric(condition.part)) is not None]
    passed = condition.holds(values)
    kept = inputs if step.keep == "all" else [a for a in inputs if condition.passes(a.metric(condition.part) or 0.0)]
    shown = ", ".join(f"{v:.3g}" for v in values[:8]) + (" …" if len(values) > 8 else "")
    reason = f"{'passed' if passed else 'failed'}: {condition.describe()} over [{shown}]"
    ctx.emitter.emit(PipelineEvent(EventKind.GATE, step.name, reason=reason))
    return StepResult(step.name, step.kind, StepStatus.DONE, tuple(kept), reason=reason, passed=passed)


def select(step: SelectStep, inputs: Sequence[Artifact]) -> StepResult:
    groups: dict[Any, list[Artifact]] = {}
    for artifact in inputs:
        key = None if step.group_by is None else (
            artifact.parents[:1] if step.group_by == "parent" else getattr(artifact, step.group_by))
        groups.setdefault(key, []).append(artifact)
    kept: list[Artifact] = []
    for members in groups.values():
        ranked = sorted(members, key=lambda a: _rank(a.metric(step.by)))
        kept.extend(ranked[: step.k])
    return StepResult(step.name, step.kind, StepStatus.DONE, tuple(kept),
                      reason=f"kept {len(kept)} of {len(inputs)} by {step.by or 'score'}")


def _rank(value: float | None) -> float:
    """Sort key: best first, unscored last."""
    return -value if value is not None else float("inf")
