"""The embedded job store: one SQLite file in WAL mode, outputs in a ``BlobStore`` beside it.

Durability. ``synchronous=FULL`` (the default) fsyncs the write-ahead log at every commit, so a job
whose ``create_job`` returned survives a killed process *and* a power loss or kernel panic. With
``synchronous="NORMAL"`` the log is only fsynced at checkpoints: a commit still survives the process
being killed (SIGKILL, OOM killer — the WAL pages sit in the OS page cache), but a power loss can
roll back the last transactions. Jobs cost seconds of GPU time each, so one fsync per commit is
cheap by comparison (and writes that arrive together share one commit); the service answers 202
after the commit, so FULL keeps its promise.

Concurrency. Two connections per store, each on a thread of its own: reads go to one, writes to
the other, group-committed (``_sqlite_db``): the writes of concurrent callers run one after another
in one transaction, each in its own savepoint, and every caller is answered after the one commit
(one fsync for all of them). Each store call is one trip to a thread, not one per statement. A read
sees only committed transactions. Every write transaction opens with ``BEGIN IMMEDIATE``, taking
SQLite's write lock up front, so processes sharing the file (several stores, workers in other
processes) serialise on claims, idempotency checks and sequence numbers instead of failing with a
lock upgrade. The store's own writers also take turns on a file lock (``_sqlite_db``), which they
wait for without a limit (a process that dies releases it; one stopped mid-transaction would hold
SQLite's lock too); ``busy_timeout`` is how long any other writer of the file waits. Writes being serial, event
sequence numbers are handed out in commit order.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import sqlite3
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Callable, Collection, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar

from comfy_orchestrator.store import _sqlite_ops as ops
from comfy_orchestrator.store import _sqlite_rows as rows
from comfy_orchestrator.store._codec import body_hash, datetime_us, dumps, encode_cursor, from_us, loads, to_us
from comfy_orchestrator.store._sqlite_db import Database
from comfy_orchestrator.store.blobs import Blob, BlobStore, Retired
from comfy_orchestrator.store.errors import JobNotFound, JobNotRunning, OutputNotFound
from comfy_orchestrator.store.reconcile import discard_outputs
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

__all__ = ["SQLiteJobStore"]

log = logging.getLogger(__name__)

T = TypeVar("T")

Synchronous = Literal["FULL", "NORMAL", "EXTRA"]
_MAX_PAGE = 1000


class SQLiteJobStore:
    """A ``JobStore`` in the SQLite file ``path``, with outputs under ``outputs_dir``::

        async with SQLiteJobStore("var/jobs.db", "var/outputs") as store:
            job, created = await store.create_job("acme", "graph", graph, idempotency_key=key)

    The schema is created (or migrated) on open. ``clock`` (Unix seconds) stamps every row and
    decides lease expiry; tests pass a fake one.
    """

    def __init__(
        self,
        path: str | Path,
        outputs_dir: str | Path,
        *,
        synchronous: Synchronous = "FULL",
        busy_timeout: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if synchronous not in ("FULL", "NORMAL", "EXTRA"):
            raise ValueError(f"synchronous must be FULL, NORMAL or EXTRA, not {synchronous!r}")
        self.path = Path(path)
        self.blobs = BlobStore(outputs_dir)
        self.synchronous = synchronous
        self.busy_timeout = busy_timeout
        self._clock = clock
        self._db = Database(self.path, synchronous=synchronous, busy_timeout=busy_timeout)
        self._deletions: set[asyncio.Future[Any]] = set()  # deleting writes whose files are not settled yet

    # -- life cycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> SQLiteJobStore:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def open(self) -> None:
        """Connect, switch to WAL, create or migrate the schema (idempotent)."""
        await self._db.open()
        log.info("job store %s open (WAL, synchronous=%s)", self.path, self.synchronous)

    async def close(self) -> None:
        if self._deletions:  # their files follow their transactions before the handle goes
            await asyncio.wait(self._deletions)
        await self._db.close()
        await asyncio.to_thread(self.blobs.close)  # staged bytes nobody named go with it

    def watch_events(self, listener: Callable[[Sequence[EventRecord]], None] | None) -> None:
        self._db.on_events = listener

    @property
    def commits(self) -> int:
        """Write transactions this handle committed: writes that come together share one."""
        return self._db.commits

    def _now(self) -> int:
        return to_us(self._clock())

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
        kind = JobKind(kind)
        labels = {str(k): str(v) for k, v in (labels or {}).items()}
        spec_json = dumps(spec)
        digest = body_hash(kind, spec, labels, spec_json=spec_json)
        now = self._now()
        lease = None if claim is None else (claim.worker_id, now + to_us(claim.lease_s))
        row, created = await self._db.write(functools.partial(
            ops.insert_job, job_id=uuid.uuid4().hex, tenant=tenant, kind=kind, spec_json=spec_json, labels=labels,
            digest=digest, idempotency_key=idempotency_key, max_active=max_active, now=now, lease=lease))
        job = rows.job_from(row)
        if created:
            log.info("job %s queued (tenant %s, %s)%s", job.id, tenant, kind.value,
                     "" if claim is None else f" and claimed by {claim.worker_id}")
        return job, created

    async def get_job(self, tenant: str, job_id: str) -> JobRecord | None:
        found = await self._db.fetch("SELECT * FROM jobs WHERE id = ? AND tenant = ?", (job_id, tenant))
        return rows.job_from(found[0]) if found else None

    async def list_jobs(
        self,
        tenant: str,
        *,
        states: Collection[JobState] | None = None,
        labels: Mapping[str, str] | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> Page[JobRecord]:
        if not 1 <= limit <= _MAX_PAGE:
            raise ValueError(f"limit must be between 1 and {_MAX_PAGE}, not {limit}")
        found = await self._db.fetch(*ops.list_jobs_query(tenant, states, labels, cursor, limit))
        page = found[:limit]
        next_cursor = encode_cursor(page[-1]["created_us"], page[-1]["id"]) if len(found) > limit else None
        return Page(tuple(rows.job_from(r) for r in page), next_cursor)

    async def count_active(self, tenant: str) -> int:
        found = await self._db.fetch(ops.COUNT_ACTIVE_SQL, (tenant,))
        return int(found[0][0])

    async def count_by_state(self, states: Collection[JobState]) -> dict[JobState, int]:
        wanted = [JobState(s) for s in states]
        counts = dict.fromkeys(wanted, 0)
        if wanted:
            marks = ", ".join("?" * len(wanted))
            for row in await self._db.fetch(f"SELECT state, count(*) FROM jobs WHERE state IN ({marks}) GROUP BY state",
                                            [s.value for s in wanted]):
                counts[JobState(row[0])] = int(row[1])
        return counts

    async def cancel_job(self, tenant: str, job_id: str) -> bool:
        return await self._finish(job_id, JobState.CANCELLED, AttemptState.CANCELLED, {}, tenant=tenant)

    async def delete_job(self, tenant: str, job_id: str) -> None:
        await self._deleting(functools.partial(ops.delete_job, tenant=tenant, job_id=job_id))
        log.info("tenant %s: job %s deleted", tenant, job_id)

    async def prune(self, created_before: datetime, *, limit: int = 500) -> int:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        return await self._deleting(functools.partial(ops.prune, created_before_us=datetime_us(created_before),
                                                      limit=limit))

    async def _deleting(self, op: Callable[..., T]) -> T:
        """Run a deleting ``op(db, retire=…)``: the content it stops naming is moved aside in its
        transaction, then removed once that committed, or put back if it rolled back. The files
        follow the transaction's outcome in a task of their own, which a cancelled caller does not
        stop (``close`` waits for it)."""
        retired: list[Retired] = []

        def retire(shas: Sequence[str]) -> None:
            retired.extend(self.blobs.retire(shas))

        async def write_then_settle_files() -> T:
            writing = asyncio.ensure_future(self._db.write(lambda db: op(db, retire=retire)))
            await asyncio.wait((writing,))
            if writing.exception() is not None:
                await asyncio.to_thread(self.blobs.restore, retired)
            else:
                await self.blobs.drop(retired)
            return writing.result()

        task = asyncio.ensure_future(write_then_settle_files())
        self._deletions.add(task)
        task.add_done_callback(_forget_deletion(self._deletions))
        return await asyncio.shield(task)

    async def events_since(
        self, tenant: str, seq: int, *, job_ids: Collection[str] | None = None, limit: int = 1000
    ) -> list[EventRecord]:
        found = await self._db.fetch(*ops.events_query(tenant, seq, job_ids, limit))
        return [rows.event_from(r) for r in found]

    async def latest_seq(self, tenant: str) -> int:
        found = await self._db.fetch("SELECT MAX(seq) FROM events WHERE tenant = ?", (tenant,))
        return int(found[0][0] or 0)

    async def get_output(self, tenant: str, job_id: str, name: str) -> OutputRecord | None:
        found = await self._db.fetch(ops.OUTPUTS_SQL + " AND o.name = ?", (job_id, tenant, name))
        return rows.output_from(found[0], self.blobs.path(found[0]["sha256"])) if found else None

    async def list_outputs(self, tenant: str, job_id: str) -> list[OutputRecord]:
        found = await self._db.fetch(ops.OUTPUTS_SQL + " ORDER BY o.created_us, o.name", (job_id, tenant))
        return [rows.output_from(r, self.blobs.path(r["sha256"])) for r in found]

    async def open_output(
        self, tenant: str, job_id: str, name: str, *, chunk_size: int | None = None
    ) -> AsyncIterator[bytes]:
        record = await self.get_output(tenant, job_id, name)
        if record is None:
            raise OutputNotFound(job_id, name)
        return self.read_output(record, chunk_size=chunk_size)

    def read_output(self, output: OutputRecord, *, chunk_size: int | None = None) -> AsyncIterator[bytes]:
        return self.blobs.read(output.sha256, chunk_size=chunk_size)

    # -- the workers' side ---------------------------------------------------------------------

    async def claim_next(self, worker_id: str, *, lease_s: float) -> JobRecord | None:
        now = self._now()
        claimed = await self._db.write(lambda db: ops.claim(db, worker_id, now + to_us(lease_s), now))
        if claimed is None:
            return None
        row, reclaimed = claimed
        job = rows.job_from(row, reclaimed=reclaimed)
        log.info("job %s claimed by %s%s", job.id, worker_id, " (its lease had run out)" if reclaimed else "")
        return job

    async def renew_lease(self, job_id: str, worker_id: str, *, lease_s: float) -> bool:
        until = self._now() + to_us(lease_s)
        return await self._db.write(lambda db: ops.lease(db, job_id, worker_id, until, renew=True))

    async def take_over(self, job_id: str, worker_id: str, *, lease_s: float) -> bool:
        until = self._now() + to_us(lease_s)
        return await self._db.write(lambda db: ops.lease(db, job_id, worker_id, until, renew=False))

    async def release(
        self,
        job_id: str,
        *,
        worker_id: str | None = None,
        attempt_state: AttemptState = AttemptState.ABANDONED,
        error: Mapping[str, Any] | None = None,
        reason: str = "released",
    ) -> bool:
        state, now = AttemptState(attempt_state), self._now()
        released = await self._db.write(lambda db: ops.release(db, job_id, worker_id, state, error, reason, now))
        if released:
            log.info("job %s back in the queue: %s", job_id, reason)
        return released

    async def start_attempt(
        self, job_id: str, backend: str, prompt_id: str, *, step: str | None = None
    ) -> AttemptRecord:
        now = self._now()
        n = await self._db.write(lambda db: ops.start_attempt(db, job_id, backend, prompt_id, step, now))
        log.info("job %s attempt %d: prompt %s on %s", job_id, n, prompt_id, backend)
        return AttemptRecord(job_id, n, backend, prompt_id, AttemptState.RUNNING, from_us(now), step=step)

    async def finish_attempt(
        self, job_id: str, n: int, state: AttemptState, *, error: Mapping[str, Any] | None = None
    ) -> bool:
        state, now = AttemptState(state), self._now()
        return await self._db.write(lambda db: ops.end_attempt(db, job_id, n, state, error, now))

    async def list_attempts(self, job_id: str) -> list[AttemptRecord]:
        found = await self._db.fetch("SELECT * FROM attempts WHERE job_id = ? ORDER BY n", (job_id,))
        return [rows.attempt_from(r) for r in found]

    async def running_attempts(self) -> dict[str, int]:
        found = await self._db.fetch(
            "SELECT backend, count(*) FROM attempts WHERE state = 'running' GROUP BY backend")
        return {str(row[0]): int(row[1]) for row in found}

    async def complete_job(
        self, job_id: str, result: Mapping[str, Any], outputs: Sequence[OutputRecord] = ()
    ) -> bool:
        named = [{"name": o.name, "sha256": o.sha256, "size": o.size, "content_type": o.content_type} for o in outputs]
        try:
            changed = await self._finish(job_id, JobState.SUCCEEDED, AttemptState.SUCCEEDED,
                                         {"result": dict(result), "outputs": named}, result=result, outputs=outputs)
        except Exception:
            await discard_outputs(self, outputs)  # the transaction is over: what it did not settle is nobody's
            raise
        if not changed:
            await discard_outputs(self, outputs)
        return changed

    async def fail_job(self, job_id: str, error: Mapping[str, Any]) -> bool:
        return await self._finish(job_id, JobState.FAILED, AttemptState.FAILED, {"error": dict(error)}, error=error)

    async def _finish(
        self,
        job_id: str,
        state: JobState,
        attempt_state: AttemptState,
        event_data: Mapping[str, Any],
        *,
        tenant: str | None = None,
        result: Mapping[str, Any] | None = None,
        error: Mapping[str, Any] | None = None,
        outputs: Sequence[OutputRecord] = (),
    ) -> bool:
        changed = await self._db.write(functools.partial(
            ops.finish, job_id=job_id, state=state, attempt_state=attempt_state, event_data=event_data, tenant=tenant,
            result=result, error=error, now=self._now(), outputs=outputs, settle=self._settle))
        log.log(logging.INFO if changed else logging.DEBUG, "job %s %s%s", job_id, state.value,
                "" if changed else ": had already ended, nothing changed")
        return changed

    async def running_jobs(self, *, lease_expired: bool = False) -> list[tuple[JobRecord, AttemptRecord | None]]:
        found = await self._db.fetch(*ops.running_jobs_query(self._now() if lease_expired else None))
        return [(rows.job_from(r), None if r["a_n"] is None else rows.attempt_from(r, "a_")) for r in found]

    async def append_event(self, job_id: str, type: str, data: Mapping[str, Any] | None = None) -> EventRecord:
        data, now = data or {}, self._now()

        def append(db: sqlite3.Connection) -> EventRecord:
            return ops.event(db, job_id, ops.job_row(db, job_id)["tenant"], type, data, now)

        return await self._db.write(append)

    async def save_output(
        self,
        job_id: str,
        name: str,
        data: bytes | AsyncIterable[bytes],
        content_type: str = "application/octet-stream",
    ) -> OutputRecord:
        # The job's state is read while the content streams in (an ended job's outputs are refused
        # here, and again, definitively, in the transaction that records the name).
        state = asyncio.ensure_future(self._db.fetch("SELECT state FROM jobs WHERE id = ?", (job_id,)))
        try:
            staged = await self.stage_output(job_id, name, data, content_type)
        finally:
            found = await state
        try:
            if not found:
                raise JobNotFound(job_id)
            if JobState(found[0]["state"]).final:
                raise JobNotRunning(job_id, found[0]["state"])
            await self._db.write(lambda db: ops.record_output(db, staged, self._settle))
        except Exception:
            await discard_outputs(self, [staged])
            raise
        return dataclasses.replace(staged, staged=None)

    async def stage_output(
        self,
        job_id: str,
        name: str,
        data: bytes | AsyncIterable[bytes],
        content_type: str = "application/octet-stream",
    ) -> OutputRecord:
        blob = await self.blobs.stage(data)
        return OutputRecord(job_id, name, blob.sha256, blob.size, content_type, blob.path, from_us(self._now()),
                            staged=blob.staged)

    async def discard_output(self, output: OutputRecord) -> None:
        await self.blobs.discard(_blob(output))

    def _settle(self, outputs: Sequence[OutputRecord]) -> None:
        """On the writer's thread, inside the transaction that names ``outputs``: their bytes to
        their addresses (a transaction rolled back after this leaves them there, unnamed)."""
        self.blobs.settle([_blob(o) for o in outputs])

    async def upsert_step(
        self,
        job_id: str,
        name: str,
        state: StepState,
        *,
        outputs: Sequence[str] = (),
        data: Mapping[str, Any] | None = None,
    ) -> StepRecord:
        now, data_json = self._now(), dumps(dict(data or {}))
        state, outputs_json = StepState(state), dumps(list(outputs))
        await self._db.write(lambda db: ops.upsert_step(db, job_id, name, state, outputs_json, data_json, now))
        return StepRecord(job_id, name, StepState(state), from_us(now), tuple(outputs), loads(data_json))

    async def list_steps(self, job_id: str) -> list[StepRecord]:
        found = await self._db.fetch("SELECT * FROM steps WHERE job_id = ? ORDER BY rowid", (job_id,))
        return [rows.step_from(r) for r in found]


def _blob(output: OutputRecord) -> Blob:
    return Blob(output.sha256, output.size, output.path, output.staged)


def _forget_deletion(deletions: set[asyncio.Future[Any]]) -> Callable[[asyncio.Future[Any]], None]:
    def forget(task: asyncio.Future[Any]) -> None:
        deletions.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: its caller may have been cancelled, and gets it no more
    return forget
