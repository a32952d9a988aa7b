"""Pipeline-kind jobs: a ``PipelineSpec`` submitted to ``POST /v1/jobs`` and run by a worker.

    submit   the spec is checked (structure, templates, an evaluator when a step scores) → 400 with
             every problem; graph steps get ``cache: true`` unless the request says otherwise
    run      ``Pipeline.run`` on the service's pool, through a proxy that records each attempt
             (backend, prompt id, step) before its prompt is submitted; pipeline events become job
             events (``pipeline.step_started``, ``pipeline.gate``…), step states go to the store
    finish   every image becomes an output ``<step>/<file>``, plus ``grid.png`` (a contact sheet with
             the scores); the result lists each image with its model, prompt, seed and score

A job that is interrupted (the service killed or drained) runs again from the top, and the
content-addressed disk cache shared by all pipeline jobs turns every graph that already finished
into a hit with no GPU work: a job killed between generating and scoring resumes at scoring.
"""

from __future__ import annotations

import asyncio
import io
import logging
import shutil
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from comfy_orchestrator.graph import Graph, Template
from comfy_orchestrator.pipelines import (
    Artifact,
    DiskCache,
    Evaluator,
    Pipeline,
    PipelineEvent,
    PipelineResult,
    PipelineSpecError,
    PoolLike,
    Score,
    StepStatus,
)
from comfy_orchestrator.pipelines import EventKind as PipelineEventKind
from comfy_orchestrator.pipelines.checks import evaluator_problems
from comfy_orchestrator.pipelines.contact_sheet import SheetCell, render_sheet
from comfy_orchestrator.pool import EventKind as PoolEventKind
from comfy_orchestrator.pool import Pool, PoolEvent, PoolResult
from comfy_orchestrator.service.attempts import record_dispatch
from comfy_orchestrator.service.errors import ApiError
from comfy_orchestrator.service.settings import QualitySettings
from comfy_orchestrator.store import AttemptState, JobRecord, JobStore, OutputRecord, StepState

__all__ = ["GRID_OUTPUT", "EvaluatorSource", "PipelineJobs", "check_pipeline", "with_default_cache"]

log = logging.getLogger(__name__)

GRID_OUTPUT = "grid.png"
_GRAPH_KINDS = frozenset({"generate", "transform", "quality_loop"})

PoolEventHook = Callable[[PoolEvent], Awaitable[None]]


class EvaluatorSource:
    """The service's one evaluator, made from ``[quality]`` on first use (loading weights takes seconds
    and the ``quality`` extra may not be installed); None when no model is configured."""

    def __init__(self, settings: QualitySettings, *, on_score: Callable[[float], None] | None = None) -> None:
        self.settings = settings
        self.on_score = on_score  # every score given (the service's metrics)
        self._evaluator: Evaluator | None = None
        self._lock = asyncio.Lock()

    @property
    def configured(self) -> bool:
        return self.settings.model is not None

    async def get(self) -> Evaluator | None:
        if self.settings.model is None:
            return None
        async with self._lock:
            if self._evaluator is None:
                # Importing torch and loading the weights take seconds: off the event loop, so that
                # leases are renewed and requests answered meanwhile.
                self._evaluator = await asyncio.to_thread(self._load)
                log.info("evaluator ready: %s", self.settings.model)
            return self._evaluator

    def _load(self) -> Evaluator:
        try:
            from quality import ClipEvaluator
        except ImportError as exc:  # the extra is missing: say which
            raise RuntimeError(f"[quality] model = {self.settings.model!r} needs the quality extra: "
                               f"pip install 'comfy-orchestrator[quality]' ({exc})") from None
        assert self.settings.model is not None
        evaluator = ClipEvaluator(self.settings.model, device=self.settings.device,
                                  max_batch=self.settings.max_batch, max_wait_ms=self.settings.max_wait_ms)
        evaluator.load()  # blocking: the weights
        return evaluator

    async def score(self, images: Sequence[bytes | Image.Image], prompt: str, *,
                    negative: str | None = None) -> Sequence[Score]:
        """The configured evaluator's scores (an ``Evaluator`` itself: the model loads on first use)."""
        evaluator = await self.get()
        if evaluator is None:
            raise RuntimeError("no [quality] model is configured")  # check_pipeline refuses such jobs first
        scores = await evaluator.score(images, prompt, negative=negative)
        if self.on_score is not None:
            for score in scores:
                self.on_score(float(score.value))
        return scores

    async def close(self) -> None:
        evaluator, self._evaluator = self._evaluator, None
        closer = getattr(evaluator, "aclose", None)
        if closer is not None:
            await closer()


def with_default_cache(spec: Mapping[str, Any]) -> dict[str, Any]:
    """``spec`` with ``cache: true`` on every graph step (fallbacks included) that does not say."""

    def step(data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        out = dict(data)
        if out.get("kind") in _GRAPH_KINDS:
            out.setdefault("cache", True)
        if isinstance(out.get("fallback"), list):
            out["fallback"] = [step(s) for s in out["fallback"]]
        return out

    result = dict(spec)
    if isinstance(result.get("steps"), list):
        result["steps"] = [step(s) for s in result["steps"]]
    return result


def check_pipeline(spec: Mapping[str, Any], templates: Mapping[str, Template], *, has_evaluator: bool) -> Pipeline:
    """The pipeline a request describes, or ApiError 400 listing every problem."""
    try:
        pipeline = Pipeline(spec, templates=templates)
    except PipelineSpecError as exc:
        raise ApiError(400, "PipelineSpecError", str(exc), extra={"problems": list(exc.problems)}) from None
    if not has_evaluator and (problems := evaluator_problems(pipeline.spec)):
        scoring = [line.split(":", 1)[0] for line in problems]
        raise ApiError(400, "NoEvaluator", f"{', '.join(scoring)} score images, and this service has no evaluator: "
                       "set [quality] model in its settings", extra={"problems": scoring})
    return pipeline


class _RecordingPool:
    """The pool as a pipeline sees it, with ``hook`` awaited on each of its events first (the pool
    awaits ``dispatched`` before it submits, so the attempt is stored before the prompt exists)."""

    def __init__(self, pool: Pool, hook: PoolEventHook) -> None:
        self._pool, self._hook = pool, hook

    async def run(self, graph: Graph, *, on_event: Callable[[Any], Any] | None = None,
                  **kwargs: Any) -> PoolResult:
        async def both(event: PoolEvent) -> None:
            await self._hook(event)
            if on_event is not None:
                result = on_event(event)
                if asyncio.iscoroutine(result):
                    await result

        return await self._pool.run(graph, on_event=both, **kwargs)

    async def download(self, result: Any, ref: Any) -> bytes:
        return await self._pool.download(result, ref)


_ATTEMPT_ENDS = {PoolEventKind.DONE: AttemptState.SUCCEEDED, PoolEventKind.RETRIED: AttemptState.FAILED,
                 PoolEventKind.FAILED: AttemptState.FAILED, PoolEventKind.CANCELLED: AttemptState.CANCELLED}
_STEP_STATES = {StepStatus.DONE: StepState.SUCCEEDED, StepStatus.PARTIAL: StepState.SUCCEEDED,
                StepStatus.FAILED: StepState.FAILED, StepStatus.SKIPPED: StepState.SKIPPED,
                StepStatus.GATED: StepState.SKIPPED, StepStatus.CANCELLED: StepState.FAILED}


class PipelineJobs:
    """Runs pipeline-kind jobs for the workers. ``work_dir`` holds each running job's images (removed
    once they are outputs); ``cache_dir`` is the disk cache all pipeline jobs share."""

    def __init__(self, store: JobStore, pool: Pool, templates: Mapping[str, Template], evaluators: EvaluatorSource,
                 *, work_dir: Path, cache_dir: Path) -> None:
        self.store, self.pool, self.templates, self.evaluators = store, pool, templates, evaluators
        self.work_dir = work_dir
        self.cache = DiskCache(cache_dir)

    async def run(self, job: JobRecord, on_pool_event: PoolEventHook,
                  notify: Callable[[], None]) -> tuple[dict[str, Any], list[OutputRecord]]:
        """Run ``job``'s pipeline; its result summary and outputs (the caller completes the job).
        Raises ApiError (a spec that no longer checks), PipelineAborted, or what the pool raises."""
        pipeline = check_pipeline(job.spec, self.templates, has_evaluator=self.evaluators.configured)
        evaluator = self.evaluators if self.evaluators.configured else None  # loads when a step first scores
        out_dir = self.work_dir / job.id
        pool: PoolLike = _RecordingPool(self.pool, self._attempts(job, on_pool_event))
        try:
            result = await pipeline.run(pool, out_dir=out_dir, evaluator=evaluator, cache=self.cache,
                                        on_event=self._recorder(job, notify), labels={"job": job.id})
            await self._record_steps(job, result)
            outputs, images = await self._save(job, result)
        finally:
            await asyncio.to_thread(shutil.rmtree, out_dir, True)
        summary = {"pipeline": result.name, "ok": result.ok, "images": images,
                   "steps": {name: {"status": r.status.value, "reason": r.reason, "passed": r.passed,
                                    "elapsed_s": round(r.elapsed, 3), "images": len(r.artifacts)}
                             for name, r in result.steps.items()},
                   "stats": result.stats.as_dict()}
        return summary, outputs

    def _attempts(self, job: JobRecord, on_pool_event: PoolEventHook) -> PoolEventHook:
        """Each prompt of the pipeline as an attempt of the job, stored (with its step) before it is
        submitted and ended when the pool says how it went; other events go on to ``on_pool_event``."""
        open_attempts: dict[str, int] = {}  # pool job id -> attempt number

        async def hook(event: PoolEvent) -> None:
            if event.kind is PoolEventKind.DISPATCHED:
                attempt = await record_dispatch(self.store, job.id, event, step=event.labels.get("step"))
                if attempt is not None:  # JobCancelled (raised): never submitted
                    open_attempts[event.job_id] = attempt.n
                return
            ended = _ATTEMPT_ENDS.get(event.kind)
            if ended is not None and (n := open_attempts.pop(event.job_id, None)) is not None:
                error = {"type": event.kind.value, "message": event.reason} if event.reason else None
                await self.store.finish_attempt(job.id, n, ended, error=error)
            await on_pool_event(event)

        return hook

    def _recorder(self, job: JobRecord, notify: Callable[[], None]) -> Callable[[PipelineEvent], Awaitable[None]]:
        async def record(event: PipelineEvent) -> None:
            if event.job_id is not None and event.kind is not PipelineEventKind.CACHED:
                return  # a prompt's own events: the pool hook records those
            data = {k: v for k, v in (("step", event.step), ("reason", event.reason), ("model", event.model),
                                      ("backend", event.backend)) if v is not None}
            if event.kind is PipelineEventKind.STEP_STARTED and event.step is not None:
                await self.store.upsert_step(job.id, event.step, StepState.RUNNING)
            await self.store.append_event(job.id, f"pipeline.{event.kind.value}", data)
            notify()

        return record

    async def _record_steps(self, job: JobRecord, result: PipelineResult) -> None:
        for name, step in result.steps.items():
            await self.store.upsert_step(job.id, name, _STEP_STATES[step.status],
                                         outputs=[_output_name(a) for a in step.artifacts],
                                         data={"reason": step.reason, "passed": step.passed})

    async def _save(self, job: JobRecord, result: PipelineResult) -> tuple[list[OutputRecord], list[dict[str, Any]]]:
        """Each image made once as an output; ``images`` lists, step by step, what each step passed on
        (a score step its scored images, a select step the chosen ones)."""
        outputs: dict[str, OutputRecord] = {}
        images: list[dict[str, Any]] = []
        rows: list[tuple[str, list[Artifact]]] = []
        for step_name in result.order or list(result.steps):
            artifacts = list(result.steps[step_name].artifacts) if step_name in result.steps else []
            for artifact in artifacts:
                name = _output_name(artifact)
                if name not in outputs:
                    data = await asyncio.to_thread(artifact.read_bytes)
                    outputs[name] = await self.store.save_output(job.id, name, data, "image/png")
                images.append({"output": name, "step": step_name, "made_by": artifact.step, "model": artifact.model,
                               "prompt": artifact.prompt, "seed": artifact.seed, "score": artifact.score,
                               "score_parts": dict(artifact.score_parts), "parents": list(artifact.parents),
                               "backend": artifact.backend, "cached": artifact.cached})
            if artifacts:
                rows.append((step_name, artifacts))
        saved = list(outputs.values())
        if rows:
            grid = await asyncio.to_thread(_grid_png, rows, result.name)
            saved.append(await self.store.save_output(job.id, GRID_OUTPUT, grid, "image/png"))
        return saved, images


def _output_name(artifact: Artifact) -> str:
    return f"{artifact.step}/{artifact.path.name}"


def _grid_png(rows: Sequence[tuple[str, Sequence[Artifact]]], title: str) -> bytes:
    """A row per step that passed images on (model, seed and score under each)."""
    width = max(len(artifacts) for _, artifacts in rows)
    cells = [[_cell(artifacts[i]) if i < len(artifacts) else SheetCell(None, "") for i in range(width)]
             for _, artifacts in rows]
    sheet = render_sheet([name for name, _ in rows], [str(i + 1) for i in range(width)], cells, title=title)
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()


def _cell(artifact: Artifact) -> SheetCell:
    lines = [artifact.model or "", f"seed {artifact.seed}" if artifact.seed is not None else ""]
    if artifact.score is not None:
        lines.append(f"score {artifact.score:.3f}")
    return SheetCell(artifact.path, "\n".join(line for line in lines if line))
