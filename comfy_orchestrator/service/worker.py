"""The workers: each claims a job from the store, runs it on the pool, stores its outputs and
records how it ended.

    claim_next → build the graph → pool.run (attempts recorded as the pool dispatches them; progress,
    retries and cached nodes appended as events, progress at most 5 per second per job; output files
    streamed into the store as their nodes report them) → the confirmed outputs collected →
    complete_job / fail_job

While a job runs its lease is renewed every third of ``lease_s``; a renewal that fails (the job was
cancelled, possibly by another process, or its lease ran out and another worker took it over) stops
the work on the pool, and this worker does not fail the job (it checks the lease again before it
would). Leases are checked at renewals: a worker that stalled past its lease may still append an
event or an attempt before it notices; the job still ends once. On shutdown a worker stops
claiming; a job still running when the drain timeout ends is cancelled on its backend and released
back to the queue, its attempt ``abandoned``.

A claim that took over a lease that ran out (a worker in another process died) is first reconciled
with the backends as start-up reconciliation does (``reconcile_job``): the previous holder's prompt,
recorded or only planned, is followed when it is still queued or running, collected when it
finished, and the job runs afresh only when nothing of it is in flight.

Each attempt is recorded when the pool reports ``dispatched``; the event carries the prompt id the
attempt will use. The first attempt under a claim uses the job's ``planned_prompt_id``, which the
claim already made durable and reconciliation looks for on every backend, so that attempt is
recorded while its prompt is submitted. Any other attempt is recorded before its prompt is
submitted (the pool awaits the event), so the backend and prompt id are durable before any GPU work
starts. A job cancelled meanwhile has its prompt not submitted, or taken back off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from comfy_orchestrator.client import ComfyClient
from comfy_orchestrator.errors import BackendError, ComfyOrchestratorError, ComfyTimeout, JobCancelled, PromptLost
from comfy_orchestrator.graph import Template
from comfy_orchestrator.pipelines import PipelineAborted
from comfy_orchestrator.pool import EventKind, Pool, PoolEvent
from comfy_orchestrator.service.attempts import record_dispatch
from comfy_orchestrator.service.backends import BackendClients
from comfy_orchestrator.service.errors import ApiError
from comfy_orchestrator.service.inputs import InputStore, load_uploads
from comfy_orchestrator.service.intake import build_graph
from comfy_orchestrator.service.notifier import Notifier
from comfy_orchestrator.service.pipeline_jobs import PipelineJobs
from comfy_orchestrator.service.prefetch import OutputPrefetch
from comfy_orchestrator.store import (
    AttemptRecord,
    AttemptState,
    Claim,
    JobKind,
    JobRecord,
    JobStore,
    Outcome,
    OutputRecord,
    collect_outputs,
    error_info,
    reconcile_job,
)

__all__ = ["PROGRESS_INTERVAL_S", "Worker"]

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 0.2  # at most 5 progress events per second per job
_IDLE_POLL_S = 0.2


class _Lease:
    """Whether the lease a ``_leased`` block keeps renewed was lost (the job cancelled, or taken
    over by another worker): then what the block ends with is not this worker's to record."""

    lost = False


class Worker:
    """One claiming task's loop (``run``); several share a store, a pool and the clients."""

    def __init__(
        self,
        store: JobStore,
        pool: Pool,
        clients: BackendClients,
        templates: dict[str, Template],
        notifier: Notifier,
        *,
        worker_id: str,
        lease_s: float,
        pipelines: PipelineJobs | None = None,
        inputs: InputStore | None = None,
        adopted: dict[str, asyncio.Task[None]] | None = None,
    ) -> None:
        self.store, self.pool, self.clients = store, pool, clients
        self.templates, self.notifier = templates, notifier
        self.pipelines, self.inputs = pipelines, inputs
        self.adopted = adopted  # job id -> the task following its prompt, for a tenant's cancel to stop
        self.worker_id = worker_id
        self.lease_s = lease_s

    async def run(self, stopping: asyncio.Event) -> None:
        stop = asyncio.ensure_future(stopping.wait())
        empty_at: int | None = None  # the generation at which a claim last found the queue empty
        try:
            while not stopping.is_set():
                generation = self.notifier.generation  # read before the claim: no wake-up is lost
                job = None
                if generation != empty_at:  # else nothing was queued here since: no claim to try
                    job = await self.store.claim_next(self.worker_id, lease_s=self.lease_s)
                    if job is not None:
                        self.notifier.notify()  # its `running` event
                    else:
                        empty_at = generation
                if job is None:
                    job = await self._idle(generation, stop)  # a job created for this worker, or None
                    if job is None:  # woken, or the poll: claim (leases run out, siblings queue)
                        empty_at = None
                        continue
                try:
                    await self.process(job)
                except asyncio.CancelledError:
                    if not job.reclaimed:  # adopt releases its own; one cut short while being
                        await asyncio.shield(self._release(job))  # reconciled waits for its lease to run out
                    raise
                except Exception as exc:  # a bug, not the job's fault: keep the worker, end the job visibly
                    log.exception("job %s: worker %s failed on it", job.id, self.worker_id)
                    await self._fail(job, error_info(exc))
        finally:
            stop.cancel()

    async def _idle(self, generation: int, stop: asyncio.Future[Any]) -> JobRecord | None:
        """Until a job is queued in this process (this worker picked to claim it), the service
        stops, or the next poll (jobs queued by other processes, leases that ran out). A job the
        API created already claimed for this worker (``Notifier.reserve``) comes back, to be run
        even when the service is stopping (the drain finishes or releases it like any other)."""
        waiter = self.notifier.next_job(generation, Claim(self.worker_id, self.lease_s))
        try:
            await asyncio.wait((waiter, stop), timeout=_IDLE_POLL_S, return_when=asyncio.FIRST_COMPLETED)
        finally:
            answered = self.notifier.forget(waiter)
        if not answered:  # reserved for a job being created: its answer comes within one commit
            return await waiter
        return None if waiter.cancelled() else waiter.result()

    async def _release(self, job: JobRecord) -> None:
        if await self.store.release(job.id, worker_id=self.worker_id, reason="service shutting down"):
            log.info("job %s: released back to the queue (shutdown)", job.id)
        self.notifier.job_queued()

    async def process(self, job: JobRecord) -> None:
        if job.reclaimed:
            await self._resume(job)
            return
        if job.kind is JobKind.PIPELINE:
            await self._process_pipeline(job)
            return
        try:
            graph = build_graph(job.kind, job.spec, self.templates)
        except ApiError as exc:
            await self._fail(job, {"type": exc.type, "message": exc.message})
            return
        prefetch = OutputPrefetch(self.store, self.clients, job.id)
        lease = _Lease()
        try:
            async with self._leased(job, lease):
                uploads = await load_uploads(self.inputs, job)  # InputNotFound fails the job
                result = await self.pool.run(graph, job_id=job.id, labels=job.labels, uploads=uploads,
                                             on_event=self.recorder(job, prefetch), prompt_id=job.planned_prompt_id)
                outputs = await prefetch.collect(result.backend, len(result.attempts), result.result.outputs)
        except (ComfyOrchestratorError, OSError) as exc:  # JobCancelled too
            await self._fail(job, error_info(exc), lease)
            return
        finally:
            await prefetch.close()
        summary = {"backend": result.backend, "prompt_id": result.result.prompt_id,
                   "outputs": [o.name for o in outputs], "attempts": len(result.attempts),
                   "execution_s": result.result.timings.execution_s}
        if await self._complete(job, summary, outputs, lease):
            log.info("job %s: succeeded on %s with %d outputs", job.id, result.backend, len(outputs))
        self.notifier.notify()

    async def _process_pipeline(self, job: JobRecord) -> None:
        if self.pipelines is None:
            await self._fail(job, {"type": "Unsupported", "message": "this worker runs no pipeline jobs"})
            return
        lease = _Lease()
        try:
            async with self._leased(job, lease):
                summary, outputs = await self.pipelines.run(job, self.recorder(job), self.notifier.notify)
        except ApiError as exc:
            await self._fail(job, {"type": exc.type, "message": exc.message}, lease)
            return
        except PipelineAborted as exc:
            await self._fail(job, {**error_info(exc), "step": exc.step}, lease)
            return
        except (ComfyOrchestratorError, OSError) as exc:
            await self._fail(job, error_info(exc), lease)
            return
        if await self._complete(job, summary, outputs, lease):
            log.info("job %s: pipeline %s finished with %d outputs", job.id, summary["pipeline"], len(outputs))
        self.notifier.notify()

    async def _complete(self, job: JobRecord, summary: dict[str, Any], outputs: Sequence[OutputRecord],
                        lease: _Lease) -> bool:
        """``complete_job``; a disk that refuses to move the outputs to their addresses fails the
        job instead, as a failed download does."""
        try:
            return await self.store.complete_job(job.id, summary, outputs)
        except OSError as exc:
            await self._fail(job, error_info(exc), lease)
            return False

    async def _fail(self, job: JobRecord, error: dict[str, Any], lease: _Lease | None = None) -> None:
        if lease is not None and (lease.lost or not await self.store.renew_lease(
                job.id, self.worker_id, lease_s=self.lease_s)):  # cancelled (final), or another worker's now
            log.info("job %s: lost its lease; leaving it as it is (%s)", job.id, error.get("message"))
            return
        if await self.store.fail_job(job.id, error):
            log.info("job %s: failed: %s", job.id, error.get("message"))
        self.notifier.notify()

    @contextlib.asynccontextmanager
    async def _leased(
        self, job: JobRecord, lease: _Lease, *, prompt: tuple[ComfyClient, str] | None = None
    ) -> AsyncIterator[None]:
        """Keep ``job``'s lease renewed while the body runs (see ``_keep_lease``); ``lease`` says
        whether it was lost."""
        keeper = asyncio.create_task(self._keep_lease(job, lease, prompt=prompt), name=f"lease:{job.id}")
        try:
            yield
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper

    async def _keep_lease(
        self, job: JobRecord, lease: _Lease, *, prompt: tuple[ComfyClient, str] | None = None
    ) -> None:
        """Renew ``job``'s lease; once it is lost, cancel the job on the pool (or, for an adopted
        job, its ``prompt`` on its backend)."""
        while True:
            await asyncio.sleep(self.lease_s / 3)
            if not await self.store.renew_lease(job.id, self.worker_id, lease_s=self.lease_s):
                lease.lost = True
                log.info("job %s: lease lost (cancelled or reclaimed); cancelling its prompt", job.id)
                if prompt is not None:
                    client, prompt_id = prompt
                    with contextlib.suppress(ComfyOrchestratorError, TimeoutError):
                        await client.cancel(prompt_id)
                elif job.id in self.pool.jobs():
                    await self.pool.cancel(job.id)
                else:  # a pipeline's prompts carry the job's id as a label
                    await self.pool.cancel_all({"job": job.id})
                return

    async def adopt(self, job: JobRecord, attempt: AttemptRecord) -> None:
        """Follow a prompt a previous process submitted and left running (start-up reconciliation
        found it in its backend's queue and gave this worker the lease): wait for it on that backend,
        then store its outputs and complete the job, as if this process had submitted it.

        A prompt the backend lost meanwhile, or a backend that stays unreachable, sends the job back
        to the queue (attempt ``lost``); a failed prompt fails the job; a cancel from the tenant
        interrupts the prompt. A prompt interrupted by anyone else while this worker still holds the
        job (a worker whose lease ran out taking its prompt off as it gives the job up) sends the job
        back to the queue too. Cancelled (shutdown): the prompt is taken off its backend and the job
        released, as for a job this process submitted."""
        client = self.clients.get(attempt.backend)
        if client is None:
            await self.store.release(job.id, worker_id=self.worker_id, attempt_state=AttemptState.LOST,
                                     reason=f"backend {attempt.backend} is no longer configured")
            self.notifier.job_queued()
            return
        log.info("job %s: following prompt %s left running on %s", job.id, attempt.prompt_id, attempt.backend)
        lease = _Lease()
        try:
            async with self._leased(job, lease, prompt=(client, attempt.prompt_id)):
                result = await client.follow(attempt.prompt_id)
                outputs = await collect_outputs(self.store, client, job.id, result.outputs)
        except asyncio.CancelledError:
            with contextlib.suppress(ComfyOrchestratorError, TimeoutError):
                async with asyncio.timeout(5):
                    await asyncio.shield(client.cancel(attempt.prompt_id))
            await asyncio.shield(self._release(job))
            raise
        except (PromptLost, BackendError, ComfyTimeout) as exc:
            await self.store.release(job.id, worker_id=self.worker_id, attempt_state=AttemptState.LOST,
                                     error=error_info(exc), reason=f"resubmitted: {exc}")
            self.notifier.job_queued()
            return
        except JobCancelled as exc:
            if await self.store.release(  # False once this worker no longer holds it (the tenant's cancel too)
                    job.id, worker_id=self.worker_id, attempt_state=AttemptState.LOST, error=error_info(exc),
                    reason=f"resubmitted: its prompt was interrupted on {attempt.backend}, not by its tenant"):
                self.notifier.job_queued()
            return
        except (ComfyOrchestratorError, OSError) as exc:
            await self._fail(job, error_info(exc), lease)
            return
        summary = {"backend": attempt.backend, "prompt_id": result.prompt_id, "outputs": [o.name for o in outputs],
                   "attempts": attempt.n, "adopted": True}
        if await self._complete(job, summary, outputs, lease):
            log.info("job %s: adopted prompt %s succeeded on %s", job.id, result.prompt_id, attempt.backend)
        self.notifier.notify()

    async def _resume(self, job: JobRecord) -> None:
        """A job whose lease ran out, claimed from its dead holder: settle what that holder left on
        the backends (its open attempt, or the plan it may have submitted unrecorded) as start-up
        reconciliation does. A prompt still queued or running is followed (``adopt``), one that
        ended is collected or fails the job, and a job with nothing in flight goes back to the
        queue, to run afresh under a new plan."""
        attempts = await self.store.list_attempts(job.id)
        async with self._leased(job, _Lease()):
            item = await reconcile_job(self.store, job, attempts[-1] if attempts else None, self.clients,
                                       worker_id=self.worker_id, lease_s=self.lease_s, holding=True)
        if item.outcome is Outcome.FOLLOW and item.attempt is not None:
            await self._follow(job, item.attempt)
            return
        if item.outcome in (Outcome.RESUBMITTED, Outcome.REQUEUED):
            self.notifier.job_queued()
            return
        self.notifier.notify()
        if item.outcome is Outcome.ALREADY_ENDED and item.attempt is not None:  # cancelled meanwhile?
            now = await self.store.get_job(job.tenant, job.id)
            client = self.clients.get(item.attempt.backend)
            if client is not None and now is not None and now.state.final:  # not another worker's now
                with contextlib.suppress(ComfyOrchestratorError, TimeoutError):
                    async with asyncio.timeout(5):
                        await client.cancel(item.attempt.prompt_id)  # prompt-scoped: a no-op once it ended

    def adoption(self, job: JobRecord, attempt: AttemptRecord) -> asyncio.Task[None]:
        """``adopt`` in a task of its own, registered in ``adopted`` while it runs, so that a
        tenant's cancel stops it at once (``service.jobs.interrupt``) and nothing else."""
        task = asyncio.create_task(self.adopt(job, attempt), name=f"adopt:{job.id}")
        if self.adopted is not None:
            adopted = self.adopted
            adopted[job.id] = task
            task.add_done_callback(lambda _: adopted.pop(job.id, None))
        return task

    async def _follow(self, job: JobRecord, attempt: AttemptRecord) -> None:
        """``adopt`` a prompt of a job this worker took over, in its own task (``adoption``): a
        tenant's cancel ends that task, not this worker."""
        task = self.adoption(job, attempt)
        try:
            await asyncio.wait((task,))
        except asyncio.CancelledError:
            task.cancel()
            await asyncio.wait((task,))
            raise
        if not task.cancelled():
            task.result()

    def recorder(
        self, job: JobRecord, prefetch: OutputPrefetch | None = None
    ) -> Callable[[PoolEvent], Awaitable[None]]:
        """The ``on_event`` of ``job``'s pool run: pool events into the store as the job's events,
        an attempt's after the attempt itself (which may be recorded while its prompt is submitted);
        the files of ``output`` events to ``prefetch``."""
        last_progress = 0.0
        dispatch: asyncio.Future[AttemptRecord | None] | None = None

        async def record(event: PoolEvent) -> None:
            nonlocal last_progress, dispatch
            data: dict[str, Any] = {"backend": event.backend, "attempt": event.attempt}
            if event.kind is EventKind.DISPATCHED:
                dispatch = asyncio.ensure_future(record_dispatch(self.store, job.id, event))
                await dispatch  # JobCancelled: the prompt is not run
                self.notifier.notify()
                return
            if event.kind is EventKind.OUTPUT:
                if prefetch is not None:
                    prefetch.start(event)
                return
            if event.kind is EventKind.PROGRESS:
                now = time.monotonic()
                if now - last_progress < PROGRESS_INTERVAL_S:
                    return
                last_progress = now
                data.update(fraction=event.fraction, node=event.node)
            elif event.kind is EventKind.RETRIED:
                if prefetch is not None:
                    prefetch.drop(event.attempt)  # the attempt that failed: its files are nobody's
                data.update(reason=event.reason, delay=event.delay)
            elif event.kind is EventKind.CACHED:
                data.update(nodes=list(event.nodes))
            else:
                return  # queued/done/failed/cancelled are the store's own events; previews are not kept
            if dispatch is not None and not dispatch.done():
                await asyncio.wait((dispatch,))
            await self.store.append_event(job.id, f"job.{event.kind.value}", data)
            self.notifier.notify()

        return record


