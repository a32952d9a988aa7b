"""The durable job store, as a protocol every implementation satisfies (SQLite now, PostgreSQL later).

Two kinds of caller use it. The API answers a tenant: its calls take ``tenant`` and never show
another tenant's jobs (``get_job`` answers None, ``cancel_job`` and the output calls raise
``JobNotFound``/``OutputNotFound``). Workers and the start-up reconciler act on a job id they were
handed by ``claim_next`` or ``running_jobs``.

Guarantees an implementation must keep (``tests/store/test_contract.py`` checks each):

* ``create_job`` returns only after the job is durably committed: the API answers 202 after it.
  The same ``(tenant, idempotency_key)`` with the same canonical body is the same job, however many
  callers race; another body raises ``IdempotencyConflict``.
* ``claim_next`` hands each queued job to one worker; a lease that ran out makes the job claimable
  again (its open attempt is left for the new holder to reconcile).
* A job reaches a final state once: ``complete_job`` / ``fail_job`` / ``cancel_job`` on a job that
  already ended return False and change nothing (so do a worker's calls on a job deleted meanwhile).
* The store's own lifecycle events are written in the transaction of the change they report, and
  ``seq`` grows in commit order: ``events_since(tenant, seq)`` returns exactly what came after.
* Outputs are stored by content (``BlobStore``); the same bytes lie at one address, which holds them
  while some job names them: they reach it in the transaction that names them and leave it in the
  one that deletes their last name (``delete_job``, ``prune``), and a rollback of either loses
  nothing named. Deleting a job frees its idempotency key.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Callable, Collection, Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

from comfy_orchestrator.store.types import (
    AttemptRecord,
    AttemptState,
    Claim,
    EventRecord,
    JobKind,
    JobRecord,
    JobState,
    OutputRecord,
    Page,
    StepRecord,
    StepState,
)

__all__ = ["JobStore"]


class JobStore(Protocol):
    """Jobs, attempts, steps, events and outputs, durably. All methods but ``watch_events`` are coroutines."""

    async def close(self) -> None:
        """Release connections; further calls raise ``StoreClosed``. Idempotent."""

    def watch_events(self, listener: Callable[[Sequence[EventRecord]], None] | None) -> None:
        """Call ``listener`` (one at a time; None: stop) on the event loop with the events each
        write transaction of this handle commits, in ``seq`` order, once the commit is durable and
        before any caller of that transaction is answered. Only this handle's: other processes'
        events are seen by reading (``events_since``)."""

    # -- the API's side ------------------------------------------------------------------------

    async def create_job(
        self,
        tenant: str,
        kind: JobKind | str,
        spec: Mapping[str, Any],
        *,
        idempotency_key: str | None = None,
        labels: Mapping[str, str] | None = None,
        max_active: int | None = None,
        claim: Claim | None = None,
    ) -> tuple[JobRecord, bool]:
        """Queue a job, committed before this returns; ``(job, True)``. With a key the tenant used
        before: ``(that job, False)`` when the body is the same, ``IdempotencyConflict`` otherwise.
        With ``max_active``, raise ``QueueFull`` when the tenant already has that many queued or
        running jobs (checked in the same transaction, so racing callers cannot overshoot). With
        ``claim``, a new job is committed already ``running`` under that worker's lease (its
        ``job.queued`` and ``job.running`` events in the same transaction, a ``planned_prompt_id``
        drawn), as if the worker had claimed it; an existing job is returned as it is."""
        ...

    async def get_job(self, tenant: str, job_id: str) -> JobRecord | None:
        """The tenant's job, or None (unknown, or another tenant's)."""
        ...

    async def list_jobs(
        self,
        tenant: str,
        *,
        states: Collection[JobState] | None = None,
        labels: Mapping[str, str] | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> Page[JobRecord]:
        """The tenant's jobs, newest first, keyset-paged on (created, id): a page never repeats or
        skips a job that existed when the listing began, whatever is created meanwhile."""
        ...

    async def count_active(self, tenant: str) -> int:
        """How many of the tenant's jobs are queued or running."""
        ...

    async def count_by_state(self, states: Collection[JobState]) -> dict[JobState, int]:
        """How many jobs are in each of ``states``, all tenants together (0 for none): for metrics."""
        ...

    async def cancel_job(self, tenant: str, job_id: str) -> bool:
        """Cancel a queued or running job (its open attempt ends ``cancelled``; the worker sees it
        when ``renew_lease`` answers False). False when it had already ended."""
        ...

    async def events_since(
        self,
        tenant: str,
        seq: int,
        *,
        job_ids: Collection[str] | None = None,
        limit: int = 1000,
    ) -> list[EventRecord]:
        """The tenant's events with a sequence number above ``seq``, in order (at most ``limit``)."""
        ...

    async def latest_seq(self, tenant: str) -> int:
        """The tenant's last event's sequence number (0 before any): where a fresh subscriber starts."""
        ...

    async def get_output(self, tenant: str, job_id: str, name: str) -> OutputRecord | None: ...

    async def list_outputs(self, tenant: str, job_id: str) -> list[OutputRecord]: ...

    async def open_output(
        self, tenant: str, job_id: str, name: str, *, chunk_size: int | None = None
    ) -> AsyncIterator[bytes]:
        """The output's bytes, streamed; raises ``OutputNotFound`` before the first chunk."""
        ...

    def read_output(self, output: OutputRecord, *, chunk_size: int | None = None) -> AsyncIterator[bytes]:
        """The bytes of an output already looked up (``get_output``), streamed; FileNotFoundError
        at the first chunk when its file is gone."""
        ...

    # -- the workers' side ---------------------------------------------------------------------

    async def claim_next(self, worker_id: str, *, lease_s: float) -> JobRecord | None:
        """Move the oldest claimable job to ``running`` under a lease held by ``worker_id`` until now
        + ``lease_s``; None when there is none. Claimable: a queued job, or a running one whose
        lease ran out (its worker is presumed dead). No two callers ever get the same claim. A
        queued job's claim draws its ``planned_prompt_id``; a reclaimed job (``reclaimed`` set on
        the record returned) keeps its open attempt and the plan its previous holder left open,
        which may both be on a backend: the new holder reconciles them (``reconcile_job``)
        before it runs anything."""
        ...

    async def renew_lease(self, job_id: str, worker_id: str, *, lease_s: float) -> bool:
        """Extend the lease; False when the worker no longer holds the job (it ended, was cancelled,
        released, or reclaimed after the lease ran out): stop working on it."""
        ...

    async def take_over(self, job_id: str, worker_id: str, *, lease_s: float) -> bool:
        """Give a running job's lease to ``worker_id`` whoever held it (reconciliation adopting a
        prompt it found running, at start-up or after a reclaim). False when the job is not running."""
        ...

    async def release(
        self,
        job_id: str,
        *,
        worker_id: str | None = None,
        attempt_state: AttemptState = AttemptState.ABANDONED,
        error: Mapping[str, Any] | None = None,
        reason: str = "released",
    ) -> bool:
        """Put a running job back in the queue (shutdown, or a prompt the backend lost); its open
        attempt ends with ``attempt_state`` and its plan is dropped. With ``worker_id``, only if that worker holds it.
        False when the job was not running (or not held by ``worker_id``)."""
        ...

    async def start_attempt(
        self, job_id: str, backend: str, prompt_id: str, *, step: str | None = None
    ) -> AttemptRecord:
        """Record an attempt *before* its prompt is submitted (so a restarted service can ask the
        backend about ``prompt_id``), or, when ``prompt_id`` is the job's ``planned_prompt_id``
        (which reconciliation can already find), while it is; that clears the plan. Raises
        ``JobNotRunning`` unless the job is running."""
        ...

    async def finish_attempt(
        self, job_id: str, n: int, state: AttemptState, *, error: Mapping[str, Any] | None = None
    ) -> bool:
        """End attempt ``n``; False when it had already ended."""
        ...

    async def list_attempts(self, job_id: str) -> list[AttemptRecord]: ...

    async def running_attempts(self) -> dict[str, int]:
        """Backend name → attempts running on it now (dispatched and not ended), from every
        process sharing the store; backends with none are left out."""
        ...

    async def complete_job(
        self, job_id: str, result: Mapping[str, Any], outputs: Sequence[OutputRecord] = ()
    ) -> bool:
        """Mark the job succeeded with ``result`` and record ``outputs`` under their names in the
        same transaction (from ``stage_output``, or ``save_output`` again); its open attempt ends
        ``succeeded`` and the event names the outputs. False, changing nothing, when the job had
        already ended or was deleted (the staged outputs are then discarded)."""
        ...

    async def fail_job(self, job_id: str, error: Mapping[str, Any]) -> bool:
        """Mark the job failed; False, changing nothing, when it had already ended (or is gone)."""
        ...

    async def running_jobs(self, *, lease_expired: bool = False) -> list[tuple[JobRecord, AttemptRecord | None]]:
        """Running jobs with their latest attempt, oldest first, for start-up reconciliation. With
        ``lease_expired`` only those whose lease ran out (when other live workers share the store)."""
        ...

    async def append_event(self, job_id: str, type: str, data: Mapping[str, Any] | None = None) -> EventRecord:
        """Store an event of the job (progress, previews, step events…) under the next sequence number."""
        ...

    async def save_output(
        self,
        job_id: str,
        name: str,
        data: bytes | AsyncIterable[bytes],
        content_type: str = "application/octet-stream",
    ) -> OutputRecord:
        """Store a file the job produced (streamed, content-addressed) under ``name``, replacing an
        output of that name. Raises ``JobNotRunning`` when the job already ended, ``JobNotFound``
        when it was deleted."""
        ...

    async def stage_output(
        self,
        job_id: str,
        name: str,
        data: bytes | AsyncIterable[bytes],
        content_type: str = "application/octet-stream",
    ) -> OutputRecord:
        """Store a file's bytes (streamed, durably) for ``complete_job`` to name: nothing about the
        job is recorded until then, so a job that ends otherwise shows no such output, and the bytes
        reach their content address only in the transaction that names them. Pass a record no one
        will name to ``discard_output``; what a process held staged when it died is removed by the
        next process that writes a file there."""
        ...

    async def delete_job(self, tenant: str, job_id: str) -> None:
        """Delete one of ``tenant``'s jobs that ended, with its attempts, steps, events and outputs;
        an output file goes too unless another job names the same content. ``JobNotFound`` (also
        for another tenant's), ``JobNotEnded`` while it is queued or running."""
        ...

    async def prune(self, created_before: datetime, *, limit: int = 500) -> int:
        """Delete up to ``limit`` ended jobs (any tenant's) created before ``created_before``, as
        ``delete_job`` does; how many went (call again while that is ``limit``)."""
        ...

    async def discard_output(self, output: OutputRecord) -> None:
        """Drop the bytes of a staged output that nothing will name (its job ended otherwise, its
        attempt was given up on); nothing for one already named. ``complete_job`` does this itself
        for the outputs of a job that had already ended."""
        ...

    async def upsert_step(
        self,
        job_id: str,
        name: str,
        state: StepState,
        *,
        outputs: Sequence[str] = (),
        data: Mapping[str, Any] | None = None,
    ) -> StepRecord: ...

    async def list_steps(self, job_id: str) -> list[StepRecord]: ...
