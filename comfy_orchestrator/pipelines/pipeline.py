"""``Pipeline``: a validated spec bound to its templates, run as a DAG on a pool.

::

    pipeline = Pipeline.load("pipelines/chain.yaml")          # or Pipeline(PipelineSpec(...)) / Pipeline([steps])
    async with Pool(backends) as pool:
        result = await pipeline.run(pool, evaluator=evaluator, out_dir="out/chain", on_event=print)
    result["upscale"].artifacts[0].path

Each step starts as soon as the steps it needs are done; jobs within a step run at once (the pool
queues them). A failed step (after its retries) hands over to its fallbacks in turn; if they fail
too, ``on_error="abort"`` cancels the run and raises :class:`PipelineAborted` (with the partial
result), ``on_error="continue"`` records the failure and lets the steps that still have inputs run.
Everything is ``async``; it runs in a notebook's loop as it is (``await pipeline.run(...)``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from comfy_orchestrator.graph import Template, load_templates
from comfy_orchestrator.pipelines.cache import DiskCache
from comfy_orchestrator.pipelines.checks import evaluator_problems, template_problems
from comfy_orchestrator.pipelines.errors import PipelineAborted, PipelineSpecError, readable_problems
from comfy_orchestrator.pipelines.events import Emitter, EventCallback, EventKind, PipelineEvent
from comfy_orchestrator.pipelines.jobs import RunContext
from comfy_orchestrator.pipelines.loop import run_quality_loop
from comfy_orchestrator.pipelines.policies import OnError
from comfy_orchestrator.pipelines.results import Artifact, PipelineResult, StepResult, StepStatus
from comfy_orchestrator.pipelines.spec import GateStep, PipelineSpec, QualityLoopStep, ScoreStep, SelectStep, Step
from comfy_orchestrator.pipelines.stats import RunStats
from comfy_orchestrator.pipelines.steps import gate, run_graph_step, run_score_step, select
from comfy_orchestrator.pipelines.types import Evaluator, PoolLike

__all__ = ["Pipeline"]

log = logging.getLogger(__name__)

_STOPPED = (StepStatus.FAILED, StepStatus.SKIPPED, StepStatus.CANCELLED)


class _Abort(Exception):
    def __init__(self, step: str, reason: str) -> None:
        super().__init__(reason)
        self.step, self.reason = step, reason


class Pipeline:
    """A pipeline ready to run: its spec, checked against ``templates`` (default: ``load_templates()``)."""

    def __init__(
        self,
        spec: PipelineSpec | Sequence[Step] | Mapping[str, Any],
        *,
        templates: Mapping[str, Template] | None = None,
        name: str | None = None,
    ) -> None:
        self.spec = _as_spec(spec, name)
        self.templates: Mapping[str, Template] = templates if templates is not None else load_templates()
        problems = template_problems(self.spec, self.templates)
        if problems:
            raise PipelineSpecError(problems, source=f"pipeline {self.spec.name!r}")

    @classmethod
    def load(cls, path: str | Path, *, templates: Mapping[str, Template] | None = None) -> Pipeline:
        """A pipeline from a ``.json`` / ``.yaml`` spec file."""
        return cls(PipelineSpec.load(path), templates=templates)

    @property
    def name(self) -> str:
        return self.spec.name

    def __repr__(self) -> str:
        return f"<Pipeline {self.name!r}: {' → '.join(s.name for s in self.spec.steps)}>"

    async def run(
        self,
        pool: PoolLike,
        *,
        out_dir: str | Path,
        evaluator: Evaluator | None = None,
        on_event: EventCallback | None = None,
        cache: DiskCache | str | Path | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> PipelineResult:
        """Run every step on ``pool``; images go to ``out_dir/<step>/``. ``cache`` is the disk cache
        of the steps with ``cache: true`` (default ``out_dir/.cache``). Raises PipelineSpecError
        before any work when a step needs an evaluator and none is given, PipelineAborted when an
        ``on_error="abort"`` step fails."""
        if evaluator is None and (problems := evaluator_problems(self.spec)):
            raise PipelineSpecError(problems, source=f"pipeline {self.name!r}")
        out = Path(out_dir)
        await asyncio.to_thread(out.mkdir, parents=True, exist_ok=True)
        disk = cache if isinstance(cache, DiskCache) else DiskCache(cache if cache is not None else out / ".cache")
        emitter = Emitter(on_event)
        ctx = RunContext(pool, out, emitter, disk, evaluator, {"pipeline": self.name, **(labels or {})})
        results: dict[str, StepResult] = {}
        finished = {step.name: asyncio.Event() for step in self.spec.steps}
        started = time.monotonic()
        aborted: _Abort | None = None
        try:
            async with asyncio.TaskGroup() as group:
                for step in self.spec.steps:
                    group.create_task(self._step_task(ctx, step, results, finished), name=f"step:{step.name}")
        except* _Abort as caught:
            first = caught.exceptions[0]
            assert isinstance(first, _Abort)
            aborted = first
        await emitter.drain()
        result = self._result(results, out, time.monotonic() - started)
        if aborted is not None:
            raise PipelineAborted(aborted.step, aborted.reason, result)
        return result

    # -- one step --------------------------------------------------------------------------------------

    async def _step_task(self, ctx: RunContext, step: Step, results: dict[str, StepResult],
                         finished: Mapping[str, asyncio.Event]) -> None:
        for need in step.needs:
            await finished[need].wait()
        blocked = self._blocked(step, results)
        if blocked is not None:
            results[step.name] = blocked
            ctx.emitter.emit(PipelineEvent(EventKind.SKIPPED, step.name, reason=blocked.reason))
        else:
            inputs = [a for source in step.sources for a in results[source].artifacts]
            ctx.emitter.emit(PipelineEvent(EventKind.STEP_STARTED, step.name))
            result = results[step.name] = await self._with_fallbacks(ctx, step, inputs)
            ctx.emitter.emit(PipelineEvent(EventKind.STEP_FINISHED, step.name, reason=result.status.value))
            if result.status in (StepStatus.FAILED, StepStatus.PARTIAL) and step.on_error is OnError.ABORT:
                raise _Abort(step.name, result.reason or result.status.value)
        finished[step.name].set()

    def _blocked(self, step: Step, results: Mapping[str, StepResult]) -> StepResult | None:
        """A SKIPPED or GATED result when ``step`` must not run, else None."""
        for need in step.needs:
            done = results[need]
            if done.status is StepStatus.GATED:
                return StepResult(step.name, step.kind, StepStatus.GATED, reason=f"{need!r} was gated off")
            if done.status in _STOPPED:
                return StepResult(step.name, step.kind, StepStatus.SKIPPED, reason=f"{need!r} {done.status.value}")
            gate_step = self.spec.step(need)
            if isinstance(gate_step, GateStep):
                on_fail = step.name in gate_step.on_fail
                if done.passed == on_fail:
                    branch = "on_fail branch" if on_fail else "pass branch"
                    return StepResult(step.name, step.kind, StepStatus.GATED,
                                      reason=f"gate {need!r} {done.reason}; this step is on its {branch}")
        if step.kind in ("transform", "score", "gate", "select") and not any(
            results[s].artifacts for s in step.sources
        ):
            return StepResult(step.name, step.kind, StepStatus.SKIPPED,
                              reason=f"no image from {', '.join(map(repr, step.sources))}")
        return None

    async def _with_fallbacks(self, ctx: RunContext, step: Step, inputs: list[Artifact]) -> StepResult:
        fail_fast = step.on_error is OnError.ABORT and not step.fallback
        result = await self._execute(ctx, step, inputs, fail_fast=fail_fast)
        tried: list[StepResult] = []
        for fallback in step.fallback:
            if result.status is StepStatus.DONE:
                break
            tried.append(result)
            ctx.emitter.emit(PipelineEvent(EventKind.FALLBACK, step.name,
                                           reason=f"{result.name!r} {result.status.value} ({result.reason}); "
                                                  f"trying {fallback.name!r}"))
            result = await self._with_fallbacks(ctx, fallback, inputs)
        if not tried:
            return result
        return replace(result, name=step.name, fallback=result.fallback or result.name,
                       tried=(*tried, *result.tried))

    async def _execute(self, ctx: RunContext, step: Step, inputs: list[Artifact], *, fail_fast: bool) -> StepResult:
        if isinstance(step, ScoreStep):
            return await run_score_step(ctx, step, inputs)
        if isinstance(step, GateStep):
            return gate(ctx, step, inputs)
        if isinstance(step, SelectStep):
            return select(step, inputs)
        template = self.templates[step.template]
        if isinstance(step, QualityLoopStep):
            return await run_quality_loop(ctx, step, template)
        return await run_graph_step(ctx, step, template, inputs, fail_fast=fail_fast)

    def _result(self, results: Mapping[str, StepResult], out: Path, elapsed: float) -> PipelineResult:
        steps: dict[str, StepResult] = {}
        for step in self.spec.steps:
            steps[step.name] = results.get(step.name) or StepResult(
                step.name, step.kind, StepStatus.CANCELLED, reason="the run was aborted")
        outcomes = [job for r in steps.values() for attempt in (r, *r.tried) for job in attempt.jobs]
        return PipelineResult(self.name, steps, out, RunStats.from_outcomes(outcomes, elapsed),
                              order=[s.name for s in self.spec.steps])


def _as_spec(spec: PipelineSpec | Sequence[Step] | Mapping[str, Any], name: str | None) -> PipelineSpec:
    if isinstance(spec, PipelineSpec):
        return spec if name is None else spec.model_copy(update={"name": name})
    if isinstance(spec, Mapping):
        data = dict(spec) if name is None else {**spec, "name": name}
        return PipelineSpec.from_dict(data)
    steps = list(spec)
    try:
        return PipelineSpec(name=name or "pipeline", steps=steps)
    except ValidationError as exc:
        raise PipelineSpecError(readable_problems(exc, {"steps": [s.model_dump() for s in steps]})) from None
