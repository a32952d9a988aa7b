"""The quality-gated loop: generate, score, and escalate until the score reaches the threshold.

Each attempt is one job (with the step's retry, timeout and cache policies); its best image is
scored, and below the threshold the :class:`~comfy_orchestrator.pipelines.EscalationPolicy` says
what to try next. The loop stops at the threshold, when the plan runs out, or when the budget
(``max_attempts``, ``max_seconds``) is spent, and keeps the ``keep`` best images of all attempts.
With several ``prompts`` (or ``variations``) each gets its own loop, all running at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

from comfy_orchestrator.graph import Template
from comfy_orchestrator.pipelines.events import EventKind, PipelineEvent
from comfy_orchestrator.pipelines.jobs import Job, RunContext, run_job
from comfy_orchestrator.pipelines.results import Artifact, JobOutcome, LoopAttempt, StepResult, StepStatus
from comfy_orchestrator.pipelines.spec import QualityLoopStep
from comfy_orchestrator.pipelines.steps import Binding, binding_of, bindings, policy_of, score_images

__all__ = ["run_quality_loop"]


async def run_quality_loop(ctx: RunContext, step: QualityLoopStep, template: Template) -> StepResult:
    started = time.monotonic()
    bases = bindings(step, template, with_models=False)  # one loop per prompt × variation
    loops = await asyncio.gather(*(_one_loop(ctx, step, template, base) for base in bases))
    history = tuple(a for loop in loops for a in loop.history)
    outcomes = tuple(o for loop in loops for o in loop.outcomes)
    kept = tuple(a for loop in loops for a in loop.best)
    reached = [any(_passes(step, a.score) for a in loop.history) for loop in loops]
    failure = next((loop.failure for loop in loops if loop.failure is not None), None)
    if failure is not None:  # like a failed score step: the step's on_error and fallbacks decide
        status, reason = StepStatus.FAILED, failure
    elif not kept:
        status, reason = StepStatus.FAILED, f"no attempt produced an image ({len(history)} attempts)"
    else:
        status = StepStatus.DONE
        best = max(a.score or 0.0 for a in kept)
        reason = (f"threshold {step.threshold:g} reached by {sum(reached)} of {len(reached)} loop(s); "
                  f"best {best:.3g} after {len(history)} attempts")
    return StepResult(step.name, step.kind, status, kept, outcomes, reason, passed=all(reached), history=history,
                      elapsed=time.monotonic() - started)


@dataclass(frozen=True, slots=True)
class _Loop:
    """One prompt's loop: its attempts, their jobs, the images it keeps."""

    history: list[LoopAttempt]
    outcomes: list[JobOutcome]
    best: list[Artifact]
    failure: str | None = None  # why the loop stopped short of its budget (its evaluator raised)


def _passes(step: QualityLoopStep, score: float | None) -> bool:
    return score is not None and score >= step.threshold


async def _one_loop(ctx: RunContext, step: QualityLoopStep, template: Template,
                    base: Binding) -> _Loop:
    steps = step.steps if step.steps is not None else template.defaults.get(step.steps_slot)
    if not isinstance(steps, int):
        raise ValueError(f"step {step.name!r}: set 'steps' (template slot {step.steps_slot!r} holds no int)")
    models: list[str | None] = [*step.models] or [base.model]
    policy = policy_of(step)
    started = time.monotonic()
    history: list[LoopAttempt] = []
    outcomes: list[JobOutcome] = []
    scored: list[Artifact] = []
    for number, candidate in enumerate(step.escalation.plan(models=models, seed=step.seed, steps=steps), 1):
        if number > step.max_attempts or (
            step.max_seconds is not None and time.monotonic() - started >= step.max_seconds
        ):
            break
        if number > 1:
            ctx.emitter.emit(PipelineEvent(EventKind.ESCALATED, step.name, model=candidate.model,
                                           reason=f"attempt {number}: {candidate.reason}"))
        params = {**base.params, step.seed_slot: candidate.seed, step.steps_slot: candidate.steps}
        if candidate.model is not None:
            params[step.model_slot] = candidate.model
        b = binding_of(step, template, params)
        job = Job(step.name, template.bind(params), b.model, b.seed, b.prompt, b.negative, params,
                  backends=tuple(step.backends) if step.backends is not None else None)
        outcome = await run_job(ctx, job, policy)
        outcomes.append(outcome)
        images: Sequence[Artifact] = ()
        failure = None
        if outcome.status.ok:
            try:
                images = await score_images(ctx, outcome.artifacts)
            except Exception as exc:  # a user's evaluator may raise anything; the step's on_error decides
                failure = f"scoring failed: {type(exc).__name__}: {exc}"
            scored.extend(images)
        values = [v for a in images if (v := a.metric(step.part)) is not None]
        value = max(values) if values else None
        history.append(LoopAttempt(
            number=number, model=candidate.model, seed=candidate.seed, steps=candidate.steps,
            reason=candidate.reason, status=outcome.status, prompt=b.prompt, score=value,
            artifact=max(images, key=lambda a: a.metric(step.part) or 0.0) if images else None,
            job_id=outcome.job_id, backend=outcome.backend, error=failure or outcome.error,
        ))
        if failure is not None:  # the next attempt would meet the same evaluator: stop here
            return _Loop(history, outcomes, [], failure)
        if _passes(step, value):
            break
    best = sorted(scored, key=lambda a: -(a.metric(step.part) or 0.0))[: step.keep]
    return _Loop(history, outcomes, best)

