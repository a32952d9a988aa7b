"""The life of one job: wait for a slot, run on that backend, and on failure decide — retry elsewhere
after a backoff, free memory and retry once, or give up — emitting events and keeping statistics."""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from comfy_orchestrator import protocol as p
from comfy_orchestrator.config import RunResult
from comfy_orchestrator.errors import BackendUnavailable, ComfyOrchestratorError, DeadlineExceeded, JobCancelled
from comfy_orchestrator.pool.backend import Backend
from comfy_orchestrator.pool.config import PoolSettings
from comfy_orchestrator.pool.dispatch import Dispatcher, Slot
from comfy_orchestrator.pool.events import EventHub, EventKind, PoolEvent
from comfy_orchestrator.pool.jobs import RETRYABLE, Attempt, FailureKind, Job, PoolResult, classify
from comfy_orchestrator.pool.stats import StatsRecorder
from comfy_orchestrator.pool.uploads import rewrite_inputs

__all__ = ["JobRunner"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_CLEANUP_TIMEOUT = 5.0  # for best-effort calls to a backend that just failed (cancel, free)
_LATE_TAKE_OFF_S = 2.0  # a prompt taken off while its POST was in flight is taken off again this much later


class _Retry(Exception):
    """Internal: the attempt failed in a way worth another try after ``delay`` seconds."""

    def __init__(self, backend: str, kind: FailureKind, error: BaseException, delay: float) -> None:
        super().__init__(f"{kind}: {error}")
        self.backend, self.kind, self.error, self.delay = backend, kind, error, delay


class JobRunner:
    """Runs jobs for a pool; ``spawn`` puts background work (best-effort cleanups) under the pool's care."""

    def __init__(
        self,
        settings: PoolSettings,
        dispatcher: Dispatcher,
        hub: EventHub,
        stats: StatsRecorder,
        spawn: Callable[[Coroutine[Any, Any, None]], None],
    ) -> None:
        self.settings = settings
        self.dispatcher = dispatcher
        self.hub = hub
        self.stats = stats
        self.spawn = spawn
        self._random = random.Random()

    async def run(self, job: Job) -> None:
        """The job's task: never raises; the outcome is left on the job (``job.finish``)."""
        await self.emit(job, EventKind.QUEUED)
        scope = asyncio.timeout(job.timeout)
        result: PoolResult | None = None
        error: BaseException | None = None
        try:
            async with scope:
                result = await self._attempts(job)
        except asyncio.CancelledError:
            error = JobCancelled(f"job {job.id} was cancelled")
        except Exception as exc:
            error = exc
            if scope.expired():
                error = DeadlineExceeded(f"job {job.id} did not finish within {job.timeout:g}s")
                error.__cause__ = exc
            elif not isinstance(exc, ComfyOrchestratorError):
                log.exception("job %s failed unexpectedly", job.id)
        if result is not None:
            await self.emit(job, EventKind.DONE, backend=result.backend, attempt=len(job.attempts))
        elif isinstance(error, JobCancelled):
            self.stats.jobs_cancelled += 1
            await self.emit(job, EventKind.CANCELLED, attempt=len(job.attempts), reason=str(error))
        else:
            self.stats.jobs_failed += 1
            await self.emit(job, EventKind.FAILED, attempt=len(job.attempts), reason=_why(error))
        job.finish(result, error)

    async def _attempts(self, job: Job) -> PoolResult:
        while True:
            slot = await self.dispatcher.acquire(job)
            try:
                return await self._attempt(job, slot)
            except _Retry as retry:
                again = retry
            finally:
                slot.end()
            await self.emit(job, EventKind.RETRIED, backend=again.backend, attempt=len(job.attempts),
                            reason=str(again), delay=again.delay)
            await asyncio.sleep(again.delay)

    async def _attempt(self, job: Job, slot: Slot) -> PoolResult:
        backend = slot.backend
        number = len(job.attempts) + 1
        started = time.time()
        planned = job.first_prompt_id if number == 1 else None
        prompt_id = planned or str(uuid.uuid4())
        log.info("job %s: attempt %d on %s (prompt %s)", job.id, number, backend.name, prompt_id)

        async def submit() -> RunResult:
            stored = await backend.put_uploads(job.uploads) if job.uploads else {}
            nodes = rewrite_inputs(job.nodes, stored) if stored else job.nodes

            async def forward(event: p.Event) -> None:
                if isinstance(event, p.ExecutionSuccess):
                    slot.free()  # the server is done with it; its /history entry is fetched next
                await self._forward(job, backend.name, number, event)

            return await backend.client.run(nodes, prompt_id=prompt_id, on_event=forward)

        try:
            dispatched = self.emit(job, EventKind.DISPATCHED, backend=backend.name, attempt=number, prompt_id=prompt_id)
            if planned:  # the caller chose the id and can find the prompt by it: no need to wait
                try:
                    result = await _beside(dispatched, submit())
                except JobCancelled:  # a POST still on its way may queue the prompt after it was taken off
                    self.spawn(self._forget(backend, prompt_id, after=_LATE_TAKE_OFF_S))
                    raise
            else:  # a listener can persist the prompt id first, or raise JobCancelled: never submitted
                await dispatched
                result = await submit()
        except asyncio.CancelledError:
            self._record(job, Attempt(backend.name, started, time.time(), "CancelledError()", FailureKind.CANCELLED))
            backend.breaker.neutral()
            raise
        except ComfyOrchestratorError as exc:
            kind = classify(exc)
            self._record(job, Attempt(backend.name, started, time.time(), repr(exc), kind))
            outcome = await self._after_failure(job, backend, prompt_id, exc, kind)
            if outcome is exc:
                raise
            raise outcome from exc
        except Exception as exc:  # not one of ours: a bug, or an error nobody mapped; not retried
            self._record(job, Attempt(backend.name, started, time.time(), repr(exc), FailureKind.EXECUTION))
            backend.breaker.neutral()
            raise
        ended = time.time()
        self._record(job, Attempt(backend.name, started, ended))
        backend.breaker.succeeded()
        backend.record_time(result.timings.execution_s)
        self.stats.job_done(job.model, ended - started)
        return PoolResult(job.id, backend.name, result, tuple(job.attempts), job.labels)

    async def _after_failure(
        self, job: Job, backend: Backend, prompt_id: str, exc: ComfyOrchestratorError, kind: FailureKind
    ) -> BaseException:
        """What the failed attempt leads to: a ``_Retry``, or the exception the job ends with."""
        log.warning("job %s: attempt %d on %s failed (%s): %s", job.id, len(job.attempts), backend.name, kind, exc)
        if kind in RETRYABLE:
            if backend.breaker.failed():
                log.warning("backend %s: circuit breaker open for %.0fs", backend.name, backend.breaker.reset)
                asyncio.get_running_loop().call_later(backend.breaker.reset, self.dispatcher.pump)
            if kind is FailureKind.UNAVAILABLE:
                backend.job_found_unavailable(f"{type(exc).__name__}: {exc}")
                self.spawn(self._forget(backend, prompt_id))  # a partitioned server may still run it
            retries = sum(1 for a in job.attempts if a.reason in RETRYABLE)
            if retries >= self.settings.max_attempts:
                return BackendUnavailable(
                    f"job {job.id} failed on {len(job.attempts)} attempts: "
                    + "; ".join(f"{a.backend}: {a.reason}" for a in job.attempts),
                    backend=backend.config.url,
                )
        elif kind is FailureKind.OUT_OF_MEMORY and not job.oom_retried:
            job.oom_retried = True
            backend.breaker.neutral()
            await self._free(backend)  # still holding the slot: nothing else lands there before it
        else:
            backend.breaker.neutral()
            return exc
        job.avoid.add(backend.name)
        delay = self.settings.backoff(len(job.attempts), self._random.random())
        self.stats.retries += 1
        return _Retry(backend.name, kind, exc, delay)

    async def _forward(self, job: Job, backend: str, attempt: int, event: p.Event) -> None:
        if isinstance(event, p.Progress):
            await self.emit(job, EventKind.PROGRESS, backend=backend, attempt=attempt, fraction=event.fraction,
                            node=event.node)
        elif isinstance(event, p.Preview):
            await self.emit(job, EventKind.PREVIEW, backend=backend, attempt=attempt, node=event.node_id,
                            image=event.image, mime=event.mime)
        elif isinstance(event, p.ExecutionCached) and event.nodes:
            await self.emit(job, EventKind.CACHED, backend=backend, attempt=attempt, nodes=event.nodes)
        elif isinstance(event, p.Executed) and event.output.files:
            await self.emit(job, EventKind.OUTPUT, backend=backend, attempt=attempt, node=event.node,
                            files=event.output.files)

    def _record(self, job: Job, attempt: Attempt) -> None:
        job.attempts.append(attempt)
        self.stats.attempt(attempt)

    async def _forget(self, backend: Backend, prompt_id: str, *, after: float = 0.0) -> None:
        await asyncio.sleep(after)
        try:
            async with asyncio.timeout(_CLEANUP_TIMEOUT):
                await backend.client.cancel(prompt_id)
        except (ComfyOrchestratorError, TimeoutError) as exc:
            log.debug("could not take prompt %s off %s: %s", prompt_id, backend.name, exc)

    async def _free(self, backend: Backend) -> None:
        try:
            async with asyncio.timeout(_CLEANUP_TIMEOUT):
                await backend.client.free()
            log.info("backend %s: POST /free after an out-of-memory error", backend.name)
        except (ComfyOrchestratorError, TimeoutError) as exc:
            log.warning("backend %s: POST /free failed: %s", backend.name, exc)

    async def emit(self, job: Job, kind: EventKind, **fields: Any) -> None:
        event = PoolEvent(job.id, kind, labels=job.labels, **fields)
        self.hub.emit(event)
        if job.on_event is None:
            return
        try:
            outcome = job.on_event(event)
            if inspect.isawaitable(outcome):
                await outcome
        except JobCancelled:
            if kind is EventKind.DISPATCHED:  # the listener found the job gone: its prompt is not run
                log.info("job %s: cancelled as its prompt %s was dispatched", job.id, fields.get("prompt_id"))
                raise
            log.exception("on_event of job %s failed on %s", job.id, kind)
        except Exception:
            log.exception("on_event of job %s failed on %s", job.id, kind)


async def _beside(listener: Coroutine[Any, Any, None], work: Coroutine[Any, Any, T]) -> T:
    """``work``'s result once ``listener`` has ended too. A listener that raises (JobCancelled: the
    job is gone) cancels ``work`` (a prompt being submitted is taken back off) and its error is
    raised; otherwise ``work``'s error is. Cancelled: both are, and both are waited for."""
    heard, working = asyncio.ensure_future(listener), asyncio.ensure_future(work)
    try:
        await asyncio.wait((heard, working), return_when=asyncio.FIRST_EXCEPTION)
        if heard.done() and heard.exception() is not None:
            working.cancel()
        await asyncio.wait((heard, working))
    except asyncio.CancelledError:
        heard.cancel()
        working.cancel()
        await asyncio.wait((heard, working))
        _retrieved(heard, working)
        raise
    _retrieved(working)  # when the listener's error is the one raised
    heard.result()
    return working.result()


def _retrieved(*tasks: asyncio.Future[Any]) -> None:
    """Mark ended tasks' errors as seen (one is raised instead): no "never retrieved" warning."""
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()


def _why(error: BaseException | None) -> str:
    return "unknown" if error is None else f"{type(error).__name__}: {error}"
