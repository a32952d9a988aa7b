"""Start-up reconciliation: settle every job the store says is running with the backend it ran on.

The orchestrator chose each prompt id and stored it (``start_attempt``), so it can ask the backend
what became of the prompt:

    in the backend's queue (pending or running)  → follow: resubscribe to it (lease taken over)
    in the backend's /history, succeeded         → collect its outputs, complete the job
    in the backend's /history, error           → fail the job
    in the backend's /history, interrupted     → resubmit: the job is still running, so not its
                                                   tenant's cancel (a worker that lost its lease
                                                   took its prompt off, or someone on ComfyUI)
    unknown (restarted), unreachable, or its
    backend is no longer configured              → resubmit (by default: back in the queue,
                                                   the attempt marked ``lost``)
    the claim's planned prompt, not yet recorded  → looked for on every backend; where one knows it,
                                                    its attempt is recorded and settled as above;
                                                    found nowhere while a backend did not answer
                                                    → resubmit
    no prompt in flight (claimed, not submitted)  → back in the queue
    a pipeline job                                → its prompt taken off its backend, back in the
                                                    queue: it runs again from the top, and its disk
                                                    cache turns every graph that finished into a hit

Every attempt is stored before its prompt is submitted, except the first under a claim: that one
goes out under the job's ``planned_prompt_id`` (drawn by the claim) while it is stored, so a job
whose plan is still open may have a prompt on a backend that no attempt names. The queue is asked
before /history: ComfyUI writes the history entry and drops the prompt from its queue in one step,
so a prompt found in neither has not run to completion. Completion goes through ``complete_job``,
which ends a job once: a worker racing the reconciler cannot complete it twice.
"""

from __future__ import annotations

import enum
import logging
import mimetypes
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from comfy_orchestrator.errors import BackendError, ComfyTimeout
from comfy_orchestrator.protocol import FileRef, HistoryEntry, NodeOutput, QueueState
from comfy_orchestrator.store.base import JobStore
from comfy_orchestrator.store.errors import JobNotRunning
from comfy_orchestrator.store.types import AttemptRecord, AttemptState, JobKind, JobRecord, OutputRecord

__all__ = [
    "BackendClient",
    "FileSource",
    "Outcome",
    "ReconcileReport",
    "Reconciled",
    "Resubmit",
    "collect_outputs",
    "discard_outputs",
    "output_files",
    "reconcile_job",
    "reconcile_running",
    "requeue_lost",
    "stage_file",
]

log = logging.getLogger(__name__)


class FileSource(Protocol):
    """Where output files are fetched from (``ComfyClient`` fits)."""

    def iter_download(self, ref: FileRef, *, chunk_size: int = ...) -> AsyncIterator[bytes]: ...


class BackendClient(FileSource, Protocol):
    """What reconciliation asks of a backend (``ComfyClient`` fits)."""

    async def history(self, prompt_id: str) -> HistoryEntry | None: ...

    async def queue(self) -> QueueState: ...

    async def cancel(self, prompt_id: str) -> None: ...


Resubmit = Callable[[JobRecord, AttemptRecord | None, str], Awaitable[bool | None]]
"""Called with the job, its lost attempt and why; puts the job back in line (see ``requeue_lost``).
False: it changed nothing (the job ended, or another worker holds it now)."""


class Outcome(enum.StrEnum):
    """What reconciliation did with one running job."""

    FOLLOW = "follow"  # still queued or running on its backend: resubscribe (the lease is ours now)
    COMPLETED = "completed"  # it had finished: outputs collected, job succeeded
    FAILED = "failed"  # it had ended with an error: job failed
    RESUBMITTED = "resubmitted"  # unknown to its backend (or the backend is gone): handed to ``resubmit``
    REQUEUED = "requeued"  # no prompt was in flight: back in the queue
    ALREADY_ENDED = "already_ended"  # the job ended meanwhile (another worker finished it): nothing changed


@dataclass(frozen=True, slots=True)
class Reconciled:
    job: JobRecord
    attempt: AttemptRecord | None
    outcome: Outcome
    reason: str = ""


@dataclass(frozen=True, slots=True)
class ReconcileReport:
    """One entry per running job found, in the store's order (oldest first)."""

    items: tuple[Reconciled, ...] = ()

    def of(self, outcome: Outcome) -> tuple[Reconciled, ...]:
        return tuple(item for item in self.items if item.outcome is outcome)

    @property
    def follow(self) -> tuple[Reconciled, ...]:
        """The jobs to resubscribe to: ``(item.job, item.attempt)`` names backend and prompt id."""
        return self.of(Outcome.FOLLOW)

    def counts(self) -> dict[str, int]:
        return {outcome.value: len(self.of(outcome)) for outcome in Outcome if self.of(outcome)}


def requeue_lost(store: JobStore, *, worker_id: str | None = None) -> Resubmit:
    """The default ``resubmit``: the job goes back to the queue and its attempt is marked lost
    (only while ``worker_id`` holds it, when given)."""

    async def resubmit(job: JobRecord, attempt: AttemptRecord | None, reason: str) -> bool:
        error = {"type": "PromptLost", "message": reason}
        if attempt is not None:
            error.update(backend=attempt.backend, prompt_id=attempt.prompt_id)
        return await store.release(job.id, worker_id=worker_id, attempt_state=AttemptState.LOST, error=error,
                                   reason=f"resubmitted: {reason}")

    return resubmit


async def reconcile_running(
    store: JobStore,
    clients: Mapping[str, BackendClient],
    *,
    resubmit: Resubmit | None = None,
    worker_id: str = "reconciler",
    lease_s: float = 60.0,
    lease_expired: bool = False,
) -> ReconcileReport:
    """Settle every running job (see the module docstring). ``clients`` maps backend names, as
    stored in attempts, to clients; followed jobs are leased to ``worker_id`` for ``lease_s``.
    ``lease_expired`` limits it to jobs whose lease ran out (other live workers share the store)."""
    queues: dict[str, QueueState | BackendError | ComfyTimeout] = {}
    items = []
    for job, attempt in await store.running_jobs(lease_expired=lease_expired):
        items.append(await reconcile_job(store, job, attempt, clients, resubmit=resubmit, worker_id=worker_id,
                                         lease_s=lease_s, queues=queues))
    report = ReconcileReport(tuple(items))
    if items:
        log.info("reconciled %d running jobs: %s", len(items), report.counts())
    return report


async def reconcile_job(
    store: JobStore,
    job: JobRecord,
    attempt: AttemptRecord | None,
    clients: Mapping[str, BackendClient],
    *,
    resubmit: Resubmit | None = None,
    worker_id: str = "reconciler",
    lease_s: float = 60.0,
    queues: dict[str, QueueState | BackendError | ComfyTimeout] | None = None,
    holding: bool = False,
) -> Reconciled:
    """Settle one running job with its latest attempt (also what a worker does with a job it
    reclaimed after a lease ran out). ``queues`` caches each backend's /queue across calls, or the
    error it gave: a dead backend is asked once, not once per job it had. ``holding``: ``worker_id``
    already holds the job's lease (a reclaim), and nothing is changed once it no longer does (it
    stalled past the lease and another worker took the job over)."""
    holder = worker_id if holding else None
    resubmit = resubmit or requeue_lost(store, worker_id=holder)
    queues = {} if queues is None else queues
    entry: HistoryEntry | None = None  # the planned prompt's, when that is where it was found
    if job.planned_prompt_id is not None and job.kind is not JobKind.PIPELINE:
        try:
            planned, entry, silent = await _find_planned(store, job, clients, queues)
        except JobNotRunning:
            return _done(job, attempt, Outcome.ALREADY_ENDED, "ended while being reconciled")
        gone = attempt is None or not _in_flight(attempt)
        if planned is None and silent and gone:  # it may be on a backend that did not answer
            reason = f"planned prompt {job.planned_prompt_id} not found; {', '.join(silent)} did not answer"
            return _done(job, None, _resubmitted(await resubmit(job, None, reason)), reason)
        attempt = planned or attempt
    if attempt is None or not _in_flight(attempt):
        released = await store.release(job.id, worker_id=holder, reason="no prompt in flight")
        return _done(job, attempt, Outcome.REQUEUED if released else Outcome.ALREADY_ENDED, "no prompt in flight")
    client = clients.get(attempt.backend)
    if job.kind is JobKind.PIPELINE:
        return await _requeue_pipeline(store, job, attempt, client, holder)
    if client is None:
        reason = f"backend {attempt.backend} is not configured"
        return _done(job, attempt, _resubmitted(await resubmit(job, attempt, reason)), reason)
    try:
        queue = await _queue(attempt.backend, client, queues)
        if isinstance(queue, BackendError | ComfyTimeout):
            reason = f"backend {attempt.backend} unreachable: {queue}"
            return _done(job, attempt, _resubmitted(await resubmit(job, attempt, reason)), reason)
        if attempt.prompt_id in queue:
            keep = store.renew_lease if holding else store.take_over
            taken = await keep(job.id, worker_id, lease_s=lease_s)
            return _done(job, attempt, Outcome.FOLLOW if taken else Outcome.ALREADY_ENDED, "in the backend's queue")
        entry = entry or await client.history(attempt.prompt_id)
        if entry is None:
            reason = f"prompt {attempt.prompt_id} is unknown to {attempt.backend}"
        elif entry.interrupted is not None:
            reason = f"prompt {attempt.prompt_id} was interrupted on {attempt.backend}, not by its tenant"
        else:
            return await _settle(store, job, attempt, client, entry, worker_id, lease_s)
    except JobNotRunning:  # cancelled or finished by someone else while we collected
        return _done(job, attempt, Outcome.ALREADY_ENDED, "ended while being reconciled")
    except (BackendError, ComfyTimeout) as exc:
        reason = f"backend {attempt.backend} unreachable: {exc}"
    return _done(job, attempt, _resubmitted(await resubmit(job, attempt, reason)), reason)


async def _queue(
    name: str, client: BackendClient, queues: dict[str, QueueState | BackendError | ComfyTimeout]
) -> QueueState | BackendError | ComfyTimeout:
    """The backend's /queue, or the error it gave, asked once per reconciliation (``queues``)."""
    queue = queues.get(name)
    if queue is None:
        try:
            queue = await client.queue()
        except (BackendError, ComfyTimeout) as exc:
            queue = exc
        queues[name] = queue
    return queue


async def _find_planned(
    store: JobStore,
    job: JobRecord,
    clients: Mapping[str, BackendClient],
    queues: dict[str, QueueState | BackendError | ComfyTimeout],
) -> tuple[AttemptRecord | None, HistoryEntry | None, list[str]]:
    """The attempt of the job's planned prompt, recorded now, when a backend knows that prompt
    (queued, running, or in its history: then that entry too), else None; and the backends that
    did not answer."""
    prompt_id = job.planned_prompt_id
    assert prompt_id is not None
    silent = []
    for name, client in clients.items():
        queue = await _queue(name, client, queues)
        if isinstance(queue, BackendError | ComfyTimeout):
            silent.append(name)
            continue
        try:
            entry = None if prompt_id in queue else await client.history(prompt_id)
        except (BackendError, ComfyTimeout):
            silent.append(name)
            continue
        if prompt_id in queue or entry is not None:
            log.info("job %s: its planned prompt %s is on %s", job.id, prompt_id, name)
            return await store.start_attempt(job.id, name, prompt_id), entry, silent
    return None, None, silent


def _resubmitted(changed: bool | None) -> Outcome:
    return Outcome.ALREADY_ENDED if changed is False else Outcome.RESUBMITTED


def _in_flight(attempt: AttemptRecord) -> bool:
    """Whether ``attempt`` may still have its prompt on its backend (or its outputs to collect)."""
    return attempt.state in (AttemptState.RUNNING, AttemptState.SUCCEEDED)


async def _settle(
    store: JobStore,
    job: JobRecord,
    attempt: AttemptRecord,
    client: BackendClient,
    entry: HistoryEntry,
    worker_id: str,
    lease_s: float,
) -> Reconciled:
    """The prompt ended on its backend while nobody watched: record how."""
    error = _history_error(entry)
    if error is not None:
        changed = await store.fail_job(job.id, error)
        return _done(job, attempt, Outcome.FAILED if changed else Outcome.ALREADY_ENDED, error["message"])
    outputs = await collect_outputs(store, client, job.id, entry.outputs)
    result = {"backend": attempt.backend, "prompt_id": attempt.prompt_id, "outputs": [o.name for o in outputs],
              "text": {node: list(out.text) for node, out in entry.outputs.items() if out.text}}
    changed = await store.complete_job(job.id, result, outputs)
    return _done(job, attempt, Outcome.COMPLETED if changed else Outcome.ALREADY_ENDED, "finished on the backend")


async def _requeue_pipeline(
    store: JobStore, job: JobRecord, attempt: AttemptRecord, client: BackendClient | None, holder: str | None
) -> Reconciled:
    """A pipeline's prompt is one of many, and its result would not reach the pipeline's cache: take
    it off its backend (harmless when it already ended) and run the pipeline again from the top."""
    if client is not None:
        try:
            await client.cancel(attempt.prompt_id)
        except (BackendError, ComfyTimeout) as exc:
            log.info("job %s: could not take prompt %s off %s: %s", job.id, attempt.prompt_id, attempt.backend, exc)
    released = await store.release(job.id, worker_id=holder, reason="restarted: the pipeline resumes from its cache")
    return _done(job, attempt, Outcome.REQUEUED if released else Outcome.ALREADY_ENDED, "a pipeline job")


async def collect_outputs(
    store: JobStore, client: FileSource, job_id: str, outputs: Mapping[str, NodeOutput]
) -> list[OutputRecord]:
    """Stream each output file of a finished prompt (its history entry's or ``RunResult``'s
    ``outputs``) from the backend into the store (``stage_file``), for ``complete_job`` to record.
    When one fails, those staged before it are discarded."""
    saved: list[OutputRecord] = []
    try:
        for node_id, ref in output_files(outputs):
            saved.append(await stage_file(store, client, job_id, node_id, ref))
    except BaseException:
        await discard_outputs(store, saved)
        raise
    return saved


async def discard_outputs(store: JobStore, outputs: Iterable[OutputRecord]) -> None:
    """``discard_output`` each of ``outputs``; one the disk refuses is logged and left for the next
    process's sweep."""
    for output in outputs:
        try:
            await store.discard_output(output)
        except OSError as exc:
            log.warning("job %s: could not discard staged output %s: %s", output.job_id, output.name, exc)


def output_files(outputs: Mapping[str, NodeOutput]) -> Iterator[tuple[str, FileRef]]:
    """(node id, file) for each file of ``outputs`` that is a result (``type == "output"``; previews
    and temporary files are not)."""
    for node_id, output in outputs.items():
        for ref in output.files:
            if ref.type == "output":
                yield node_id, ref


async def stage_file(store: JobStore, client: FileSource, job_id: str, node_id: str, ref: FileRef) -> OutputRecord:
    """One output file streamed from its backend into the store, staged as ``<node id>/<file name>``."""
    content_type = mimetypes.guess_type(ref.filename)[0] or "application/octet-stream"
    return await store.stage_output(job_id, f"{node_id}/{ref.filename}", client.iter_download(ref), content_type)


def _history_error(entry: HistoryEntry) -> dict[str, Any] | None:
    if entry.error is not None:
        e = entry.error
        return {"type": "ExecutionFailed", "message": f"node {e.node_id} ({e.node_type}) raised {e.exception_type}: "
                f"{e.exception_message.strip()}", "node_id": e.node_id, "node_type": e.node_type,
                "exception_type": e.exception_type, "prompt_id": entry.prompt_id}
    if entry.status != "success":
        return {"type": "ExecutionFailed", "message": f"prompt {entry.prompt_id} ended with status {entry.status!r}",
                "prompt_id": entry.prompt_id}
    return None


def _done(job: JobRecord, attempt: AttemptRecord | None, outcome: Outcome, reason: str) -> Reconciled:
    log.info("job %s (%s): %s — %s", job.id, f"prompt {attempt.prompt_id} on {attempt.backend}" if attempt
             else "no attempt", outcome.value, reason)
    return Reconciled(job, attempt, outcome, reason)
