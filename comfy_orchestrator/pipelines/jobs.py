"""One graph of a step, run under the step's policies: skip-existing, disk cache, retry, timeout.

The order of questions for each job: are its images already in ``out_dir`` (``skip_existing``)?
in the disk cache (``cache``)? If neither, the pool runs it, retried per the ``RetryPolicy``; the
images are saved to ``out_dir/<step>/`` next to a JSON record of where they came from.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from comfy_orchestrator._files import write_atomically
from comfy_orchestrator.config import Timings
from comfy_orchestrator.errors import ComfyOrchestratorError
from comfy_orchestrator.graph import Graph, content_hash
from comfy_orchestrator.pipelines.cache import DiskCache, job_key
from comfy_orchestrator.pipelines.errors import NoImages
from comfy_orchestrator.pipelines.events import Emitter, EventKind, PipelineEvent
from comfy_orchestrator.pipelines.policies import RetryPolicy
from comfy_orchestrator.pipelines.results import Artifact, AttemptRecord, BackendTry, JobOutcome, JobStatus
from comfy_orchestrator.pipelines.types import Evaluator, PoolLike, PoolResultLike

__all__ = ["Job", "JobPolicy", "RunContext", "run_job"]

_BACKSTOP = 1.5  # the pool enforces a job's timeout; this much longer, the pipeline stops waiting


@dataclass(frozen=True)
class Job:
    """One graph to run, and what its images will be recorded with."""

    step: str
    graph: Graph
    model: str | None = None
    seed: int | None = None
    prompt: str | None = None
    negative: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    uploads: Mapping[str, bytes] = field(default_factory=dict)
    parents: tuple[str, ...] = ()
    backends: tuple[str, ...] | None = None
    cell: str | None = None
    key: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", job_key(self.graph, self.uploads))


@dataclass(frozen=True)
class JobPolicy:
    retry: RetryPolicy = field(default_factory=RetryPolicy.none)
    timeout: float | None = None
    cache: bool = False
    skip_existing: bool = False


@dataclass
class RunContext:
    """What every job of a run shares."""

    pool: PoolLike
    out_dir: Path
    emitter: Emitter
    cache: DiskCache | None = None
    evaluator: Evaluator | None = None
    labels: Mapping[str, str] = field(default_factory=dict)


async def run_job(ctx: RunContext, job: Job, policy: JobPolicy, *, folder: str | None = None) -> JobOutcome:
    """Run ``job`` (or find its images) and save them under ``ctx.out_dir / (folder or job.step)``."""
    started = time.monotonic()
    target = ctx.out_dir / (folder or job.step)
    emit = ctx.emitter.emit
    if policy.skip_existing:
        found = await asyncio.to_thread(_existing, target, job)
        if found is not None:
            emit(PipelineEvent(EventKind.SKIPPED, job.step, found[0].job_id, model=job.model, cell=job.cell,
                               reason="its images are in out_dir already"))
            return _outcome(job, JobStatus.SKIPPED, found, (), started)
    if policy.cache and ctx.cache is not None:
        hit = await asyncio.to_thread(_from_cache, ctx.cache, target, job)
        if hit is not None:
            emit(PipelineEvent(EventKind.CACHED, job.step, hit[0].job_id, hit[0].backend, model=job.model,
                               cell=job.cell, reason=f"disk cache {job.key[:12]}"))
            return _outcome(job, JobStatus.CACHED, hit, (), started)
    attempts: list[AttemptRecord] = []
    while True:
        number = len(attempts) + 1
        job_id = f"{job.step}-{job.key[:10]}-{uuid.uuid4().hex[:6]}"
        at, t0 = time.time(), time.monotonic()
        dispatched: list[str] = []
        forward = ctx.emitter.pool_listener(job.step, job.model, job.cell)

        def listen(event: Any, dispatched: list[str] = dispatched, forward: Any = forward) -> None:
            if str(getattr(event, "kind", "")) == "dispatched" and getattr(event, "backend", None):
                dispatched.append(str(event.backend))
            forward(event)

        try:
            backstop = None if policy.timeout is None else policy.timeout * _BACKSTOP + 1.0
            async with asyncio.timeout(backstop):
                result = await ctx.pool.run(
                    job.graph, job_id=job_id, uploads=dict(job.uploads) or None, timeout=policy.timeout,
                    backends=job.backends, on_event=listen,
                    labels={**ctx.labels, "step": job.step},
                )
                refs = result.result.output_images
                if not refs:
                    raise NoImages(f"job {result.job_id} on {result.backend} saved no image")
                datas = await asyncio.gather(*(ctx.pool.download(result, ref) for ref in refs))
                images = [(ref.filename, data) for ref, data in zip(refs, datas, strict=True)]
        except (ComfyOrchestratorError, TimeoutError) as exc:
            wait = policy.retry.next_interval(number, exc)
            reason = f"{type(exc).__name__}: {exc}"
            backend = dispatched[-1] if dispatched else getattr(exc, "backend", None)
            attempts.append(AttemptRecord(number, at, time.monotonic() - t0, job_id, backend, reason,
                                          type(exc).__name__, wait, tuple(BackendTry(b, False) for b in dispatched)))
            if wait is None:
                emit(PipelineEvent(EventKind.FAILED, job.step, job_id, backend, reason=reason, model=job.model,
                                   cell=job.cell))
                return _outcome(job, JobStatus.FAILED, (), attempts, started, error=reason, exception=exc)
            emit(PipelineEvent(EventKind.RETRIED, job.step, job_id, backend, model=job.model, cell=job.cell,
                               reason=f"attempt {number} failed ({reason}); next in {wait:.3g}s"))
            await asyncio.sleep(wait)
            continue
        attempts.append(AttemptRecord(number, at, time.monotonic() - t0, result.job_id, result.backend,
                                      tries=_tries(result)))
        record = _record(job, result.job_id, result.backend, result.result.timings)
        artifacts = await asyncio.to_thread(_save, target, job, record, images)
        if policy.cache and ctx.cache is not None:
            await asyncio.to_thread(ctx.cache.put, job.key, record, images)
        emit(PipelineEvent(EventKind.DONE, job.step, result.job_id, result.backend, fraction=1.0, model=job.model,
                           cell=job.cell))
        return _outcome(job, JobStatus.DONE, artifacts, attempts, started, timings=result.result.timings)


def _tries(result: PoolResultLike) -> tuple[BackendTry, ...]:
    tries = tuple(
        BackendTry(str(getattr(a, "backend", result.backend)), getattr(a, "error", None) is None,
                   getattr(a, "seconds", None))
        for a in result.attempts
    )
    return tries or (BackendTry(result.backend, True),)


def _outcome(job: Job, status: JobStatus, artifacts: Sequence[Artifact], attempts: Sequence[AttemptRecord],
             started: float, *, error: str | None = None, exception: BaseException | None = None,
             timings: Timings | None = None) -> JobOutcome:
    last = attempts[-1] if attempts else None
    first = artifacts[0] if artifacts else None
    return JobOutcome(
        step=job.step, key=job.key, status=status, model=job.model, seed=job.seed, artifacts=tuple(artifacts),
        attempts=tuple(attempts), job_id=last.job_id if last else (first.job_id if first else None),
        backend=last.backend if last else (first.backend if first else None),
        elapsed=time.monotonic() - started, timings=timings, error=error, exception=exception,
    )


def _record(job: Job, job_id: str | None, backend: str | None, timings: Timings | None) -> dict[str, Any]:
    return {
        "key": job.key, "step": job.step, "graph_hash": content_hash(job.graph), "model": job.model,
        "seed": job.seed, "prompt": job.prompt, "negative": job.negative, "params": dict(job.params),
        "parents": list(job.parents), "job_id": job_id, "backend": backend, "created_at": time.time(),
        "timings": None if timings is None else {
            "queued_s": timings.queued_s, "execution_s": timings.execution_s, "total_s": timings.total_s},
    }


def _artifacts(target: Path, job: Job, record: Mapping[str, Any], names: Sequence[str], *,
               cached: bool) -> list[Artifact]:
    return [
        Artifact(
            id=f"{job.step}/{job.key[:16]}/{index}", step=job.step, path=target / name, key=job.key, index=index,
            model=job.model, seed=job.seed, prompt=job.prompt, negative=job.negative, params=dict(job.params),
            parents=job.parents, job_id=record.get("job_id"), backend=record.get("backend"), cached=cached,
        )
        for index, name in enumerate(names)
    ]


def _names(job: Job, sources: Sequence[str]) -> list[str]:
    return [f"{job.key[:16]}_{i}{Path(name).suffix or '.png'}" for i, name in enumerate(sources)]


def _save(target: Path, job: Job, record: Mapping[str, Any], images: Sequence[tuple[str, bytes]]) -> list[Artifact]:
    target.mkdir(parents=True, exist_ok=True)
    names = _names(job, [name for name, _ in images])
    for name, (_, data) in zip(names, images, strict=True):
        write_atomically(target / name, data)
    _write_record(target, job, {**record, "images": names})
    return _artifacts(target, job, record, names, cached=False)


def _write_record(target: Path, job: Job, record: Mapping[str, Any]) -> None:
    text = json.dumps(record, indent=2, sort_keys=True, default=str)
    write_atomically(target / f"{job.key[:16]}.json", text.encode())


def _existing(target: Path, job: Job) -> list[Artifact] | None:
    try:
        record = json.loads((target / f"{job.key[:16]}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    names = record.get("images") or []
    if record.get("key") != job.key or not names or not all((target / n).is_file() for n in names):
        return None
    return _artifacts(target, job, record, names, cached=False)


def _from_cache(cache: DiskCache, target: Path, job: Job) -> list[Artifact] | None:
    entry = cache.get(job.key)
    if entry is None:
        return None
    target.mkdir(parents=True, exist_ok=True)
    names = _names(job, [path.name for path in entry.images])
    try:
        for name, source in zip(names, entry.images, strict=True):
            write_atomically(target / name, source.read_bytes())
    except FileNotFoundError:  # the entry was pruned meanwhile: a miss (its record below is not written)
        return None
    record = {**_record(job, entry.record.get("job_id"), entry.record.get("backend"), None), "images": names,
              "cached_from": str(cache.path_for(job.key))}
    _write_record(target, job, record)
    return _artifacts(target, job, record, names, cached=True)
