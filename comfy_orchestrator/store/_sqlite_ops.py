"""The SQL of the SQLite store: plain functions of a connection, run on its thread; the writing ones
inside a transaction the store opened (one savepoint of a group commit)."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

from comfy_orchestrator.store._codec import datetime_us, decode_cursor, dumps, from_us, loads
from comfy_orchestrator.store._sqlite_db import WriterConnection
from comfy_orchestrator.store.errors import IdempotencyConflict, JobNotEnded, JobNotFound, JobNotRunning, QueueFull
from comfy_orchestrator.store.types import (
    AttemptState,
    EventRecord,
    EventType,
    JobKind,
    JobState,
    OutputRecord,
    StepState,
)

__all__ = [
    "COUNT_ACTIVE_SQL",
    "OUTPUTS_SQL",
    "claim",
    "count_active",
    "end_attempt",
    "end_attempts",
    "event",
    "events_query",
    "finish",
    "insert_job",
    "job_row",
    "lease",
    "list_jobs_query",
    "one",
    "record_output",
    "release",
    "running_jobs_query",
    "start_attempt",
    "upsert_output",
    "upsert_step",
]

COUNT_ACTIVE_SQL = "SELECT COUNT(*) FROM jobs WHERE tenant = ? AND state IN ('queued', 'running')"
OUTPUTS_SQL = "SELECT o.* FROM outputs o JOIN jobs j ON j.id = o.job_id WHERE o.job_id = ? AND j.tenant = ?"
"""A job's outputs, only when the job is the tenant's."""

_ATTEMPT_COLUMNS = ("job_id", "n", "backend", "prompt_id", "state", "started_us", "ended_us", "error", "step")


def one(db: sqlite3.Connection, sql: str, params: Iterable[Any] = ()) -> sqlite3.Row | None:
    row: sqlite3.Row | None = db.execute(sql, tuple(params)).fetchone()
    return row


def job_row(db: sqlite3.Connection, job_id: str, tenant: str | None = None) -> sqlite3.Row:
    """The job's bookkeeping columns; ``JobNotFound`` when it is missing (or another tenant's)."""
    row = one(db, "SELECT id, tenant, state, attempts, lease_owner FROM jobs WHERE id = ?", (job_id,))
    if row is None or (tenant is not None and row["tenant"] != tenant):
        raise JobNotFound(job_id)
    return row


def count_active(db: sqlite3.Connection, tenant: str) -> int:
    row = one(db, COUNT_ACTIVE_SQL, (tenant,))
    return 0 if row is None else int(row[0])


def event(
    db: sqlite3.Connection, job_id: str, tenant: str, type: str, data: Mapping[str, Any], now: int
) -> EventRecord:
    text = dumps(dict(data))
    cursor = db.execute("INSERT INTO events (job_id, tenant, type, data, at_us) VALUES (?, ?, ?, ?, ?)",
                              (job_id, tenant, str(type), text, now))
    assert cursor.lastrowid is not None
    record = EventRecord(cursor.lastrowid, job_id, tenant, str(type), loads(text), from_us(now))
    if isinstance(db, WriterConnection):  # the transaction's events, for Database.on_events
        db.events.append(record)
    return record


def end_attempts(
    db: sqlite3.Connection, job_id: str, state: AttemptState, error: Mapping[str, Any] | None, now: int
) -> None:
    """End the job's open attempt(s) with ``state`` (keeping an error they already carry)."""
    db.execute("UPDATE attempts SET state = ?, ended_us = ?, error = COALESCE(?, error) "
                     "WHERE job_id = ? AND state = 'running'",
                     (state.value, now, None if error is None else dumps(error), job_id))


def insert_job(
    db: sqlite3.Connection,
    *,
    job_id: str,
    tenant: str,
    kind: JobKind,
    spec_json: str,
    labels: Mapping[str, str],
    digest: str,
    idempotency_key: str | None,
    max_active: int | None,
    now: int,
    lease: tuple[str, int] | None = None,
) -> tuple[sqlite3.Row, bool]:
    """The idempotent create: the job already under the key (same body), or a new queued one; with
    ``lease`` (worker id, until), a new one already claimed (a planned prompt id drawn): queued and
    running in one transaction."""
    if idempotency_key is not None:
        row = one(db, "SELECT * FROM jobs WHERE tenant = ? AND idempotency_key = ?", (tenant, idempotency_key))
        if row is not None:
            if row["body_hash"] != digest:
                raise IdempotencyConflict(tenant, idempotency_key, row["id"])
            return row, False
    if max_active is not None and count_active(db, tenant) >= max_active:
        raise QueueFull(tenant, max_active)
    db.execute(
        "INSERT INTO jobs (id, tenant, kind, spec, state, created_us, updated_us, body_hash, idempotency_key, labels) "
        "VALUES (?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?)",
        (job_id, tenant, kind.value, spec_json, now, now, digest, idempotency_key, dumps(dict(labels))),
    )
    db.executemany("INSERT INTO job_labels (job_id, key, value) VALUES (?, ?, ?)",
                         [(job_id, k, v) for k, v in labels.items()])
    event(db, job_id, tenant, EventType.QUEUED, {"kind": kind.value}, now)
    if lease is not None:
        db.execute("UPDATE jobs SET state = 'running', lease_owner = ?, lease_until_us = ?, planned_prompt_id = ? "
                   "WHERE id = ?", (*lease, str(uuid.uuid4()), job_id))
        event(db, job_id, tenant, EventType.RUNNING, {"reclaimed": False}, now)
    row = one(db, "SELECT * FROM jobs WHERE id = ?", (job_id,))
    assert row is not None
    return row, True


def claim(db: sqlite3.Connection, worker_id: str, until: int, now: int) -> tuple[sqlite3.Row, bool] | None:
    """Lease the oldest running job whose lease ran out, else the oldest queued one; (row, reclaimed).
    A queued job gets a new planned prompt id; a reclaimed one keeps the plan its previous holder
    left open (it may have submitted it), for the new holder to reconcile."""
    row = one(db, "SELECT id, tenant FROM jobs WHERE state = 'running' AND lease_until_us <= ? "
                  "ORDER BY created_us, id LIMIT 1", (now,))
    reclaimed = row is not None
    if row is None:
        row = one(db, "SELECT id, tenant FROM jobs WHERE state = 'queued' ORDER BY created_us, id LIMIT 1")
        if row is None:
            return None
        db.execute("UPDATE jobs SET state = 'running', lease_owner = ?, lease_until_us = ?, updated_us = ?, "
                   "planned_prompt_id = ? WHERE id = ?", (worker_id, until, now, str(uuid.uuid4()), row["id"]))
    else:
        db.execute("UPDATE jobs SET lease_owner = ?, lease_until_us = ?, updated_us = ? WHERE id = ?",
                   (worker_id, until, now, row["id"]))
    event(db, row["id"], row["tenant"], EventType.RUNNING, {"reclaimed": reclaimed}, now)
    claimed = one(db, "SELECT * FROM jobs WHERE id = ?", (row["id"],))
    assert claimed is not None
    return claimed, reclaimed


def start_attempt(
    db: sqlite3.Connection, job_id: str, backend: str, prompt_id: str, step: str | None, now: int
) -> int:
    """Record the next attempt of a running job; its number. An attempt under the job's planned
    prompt id settles that plan."""
    row = job_row(db, job_id)
    if row["state"] != JobState.RUNNING:
        raise JobNotRunning(job_id, row["state"])
    n = int(row["attempts"]) + 1
    # A graph job runs one attempt at a time: a new one means the pool gave up on the previous (its
    # backend died, refused it…) and retries elsewhere. Left open, it would be ended with the job, as
    # ``succeeded`` when the retry succeeds. A pipeline's attempts (``step`` set) run side by side and
    # are ended one by one by their runner.
    if step is None:
        end_attempts(db, job_id, AttemptState.FAILED,
                     {"type": "Retried", "message": f"superseded by attempt {n} on {backend}"}, now)
    db.execute("INSERT INTO attempts (job_id, n, backend, prompt_id, state, started_us, step) "
                     "VALUES (?, ?, ?, ?, 'running', ?, ?)", (job_id, n, backend, prompt_id, now, step))
    db.execute("UPDATE jobs SET attempts = ?, updated_us = ?, planned_prompt_id = "
               "NULLIF(planned_prompt_id, ?) WHERE id = ?", (n, now, prompt_id, job_id))
    event(db, job_id, row["tenant"], EventType.ATTEMPT,
                {"n": n, "backend": backend, "prompt_id": prompt_id, "step": step}, now)
    return n


def finish(
    db: sqlite3.Connection,
    job_id: str,
    state: JobState,
    attempt_state: AttemptState,
    event_data: Mapping[str, Any],
    *,
    tenant: str | None,
    result: Mapping[str, Any] | None,
    error: Mapping[str, Any] | None,
    now: int,
    outputs: Sequence[OutputRecord] = (),
    settle: Callable[[Sequence[OutputRecord]], None] | None = None,
) -> bool:
    """Move a job to a final state once, naming its ``outputs`` (``settle``d first: their bytes
    moved to their addresses); False (nothing changed) when it already was in one, or was deleted
    (which only an ended job can be) — for a tenant's call, ``JobNotFound`` then."""
    try:
        row = job_row(db, job_id, tenant)
    except JobNotFound:
        if tenant is None:  # a worker's call
            return False
        raise
    if JobState(row["state"]).final:
        return False
    if outputs and settle is not None:
        settle(outputs)
    for output in outputs:
        upsert_output(db, output)
    end_attempts(db, job_id, attempt_state, error, now)
    db.execute(
        "UPDATE jobs SET state = ?, result = ?, error = ?, lease_owner = NULL, lease_until_us = NULL, updated_us = ?, "
        "planned_prompt_id = NULL WHERE id = ?",
        (state.value, None if result is None else dumps(result), None if error is None else dumps(error), now, job_id))
    event(db, job_id, row["tenant"], EventType(f"job.{state.value}"), event_data, now)
    return True


def list_jobs_query(
    tenant: str,
    states: Collection[JobState] | None,
    labels: Mapping[str, str] | None,
    cursor: str | None,
    limit: int,
) -> tuple[str, list[Any]]:
    """A page of the tenant's jobs, newest first, after ``cursor``: one row more than ``limit``
    tells whether another page follows."""
    where: list[str] = ["tenant = ?"]
    params: list[Any] = [tenant]
    if states:
        names = [JobState(s).value for s in states]
        where.append(f"state IN ({', '.join('?' * len(names))})")
        params += names
    for key, value in (labels or {}).items():
        where.append("EXISTS (SELECT 1 FROM job_labels l WHERE l.job_id = jobs.id AND l.key = ? AND l.value = ?)")
        params += [key, value]
    if cursor is not None:
        created_us, last_id = decode_cursor(cursor)
        where.append("(created_us, id) < (?, ?)")
        params += [created_us, last_id]
    sql = f"SELECT * FROM jobs WHERE {' AND '.join(where)} ORDER BY created_us DESC, id DESC LIMIT ?"
    return sql, [*params, limit + 1]


def events_query(tenant: str, seq: int, job_ids: Collection[str] | None, limit: int) -> tuple[str, list[Any]]:
    sql, params = "SELECT * FROM events WHERE tenant = ? AND seq > ?", [tenant, seq]
    if job_ids is not None:
        ids = list(job_ids)
        sql += f" AND job_id IN ({', '.join('?' * len(ids))})"
        params += ids
    return sql + " ORDER BY seq LIMIT ?", [*params, limit]


def running_jobs_query(lease_expired_before: int | None) -> tuple[str, list[Any]]:
    """Running jobs joined with their latest attempt (columns ``a_*``; NULL when none started)."""
    columns = ", ".join(f"a.{c} AS a_{c}" for c in _ATTEMPT_COLUMNS)
    sql = (f"SELECT j.*, {columns} FROM jobs j LEFT JOIN attempts a ON a.job_id = j.id AND a.n = j.attempts "
           "WHERE j.state = 'running'")
    params: list[Any] = []
    if lease_expired_before is not None:
        sql += " AND j.lease_until_us <= ?"
        params.append(lease_expired_before)
    return sql + " ORDER BY j.created_us, j.id", params


def lease(db: sqlite3.Connection, job_id: str, worker_id: str, until: int, *, renew: bool) -> bool:
    """Extend ``worker_id``'s lease (``renew``), or hand the lease to it whoever held it."""
    params: tuple[Any, ...]
    if renew:
        sql, params = ("UPDATE jobs SET lease_until_us = ? WHERE id = ? AND state = 'running' AND lease_owner = ?",
                       (until, job_id, worker_id))
    else:
        sql, params = ("UPDATE jobs SET lease_owner = ?, lease_until_us = ? WHERE id = ? AND state = 'running'",
                       (worker_id, until, job_id))
    cursor = db.execute(sql, params)
    return cursor.rowcount == 1


def release(
    db: sqlite3.Connection,
    job_id: str,
    worker_id: str | None,
    attempt_state: AttemptState,
    error: Mapping[str, Any] | None,
    reason: str,
    now: int,
) -> bool:
    """A running job back to ``queued``, its open attempt ended; False when it was not running
    (or not held by ``worker_id``, or deleted)."""
    row = one(db, "SELECT tenant, state, lease_owner FROM jobs WHERE id = ?", (job_id,))
    if row is None or row["state"] != JobState.RUNNING or (worker_id is not None and row["lease_owner"] != worker_id):
        return False
    end_attempts(db, job_id, attempt_state, error, now)
    db.execute("UPDATE jobs SET state = 'queued', lease_owner = NULL, lease_until_us = NULL, updated_us = ?, "
               "planned_prompt_id = NULL WHERE id = ?", (now, job_id))
    event(db, job_id, row["tenant"], EventType.QUEUED, {"reason": reason}, now)
    return True


def end_attempt(
    db: sqlite3.Connection, job_id: str, n: int, state: AttemptState, error: Mapping[str, Any] | None, now: int
) -> bool:
    cursor = db.execute(
        "UPDATE attempts SET state = ?, ended_us = ?, error = ? WHERE job_id = ? AND n = ? AND state = 'running'",
        (state.value, now, None if error is None else dumps(error), job_id, n))
    return cursor.rowcount == 1


def record_output(
    db: sqlite3.Connection, output: OutputRecord, settle: Callable[[Sequence[OutputRecord]], None]
) -> None:
    """Name a staged blob as its job's output (replacing one of that name) while the job runs,
    ``settle``-ing it first (its bytes moved to their address)."""
    row = job_row(db, output.job_id)
    if JobState(row["state"]).final:
        raise JobNotRunning(output.job_id, row["state"])
    settle([output])
    upsert_output(db, output)


def upsert_output(db: sqlite3.Connection, output: OutputRecord) -> None:
    db.execute(
        "INSERT INTO outputs (job_id, name, sha256, size, content_type, created_us) VALUES (?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (job_id, name) DO UPDATE SET sha256 = excluded.sha256, size = excluded.size, "
        "content_type = excluded.content_type, created_us = excluded.created_us",
        (output.job_id, output.name, output.sha256, output.size, output.content_type, datetime_us(output.created)))


def upsert_step(
    db: sqlite3.Connection, job_id: str, name: str, state: StepState, outputs_json: str, data_json: str, now: int
) -> None:
    job_row(db, job_id)
    db.execute(
        "INSERT INTO steps (job_id, name, state, updated_us, outputs, data) VALUES (?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (job_id, name) DO UPDATE SET state = excluded.state, updated_us = excluded.updated_us, "
        "outputs = excluded.outputs, data = excluded.data",
        (job_id, name, state.value, now, outputs_json, data_json))


_JOB_TABLES = ("job_labels", "attempts", "steps", "events", "outputs")


def delete_jobs(db: sqlite3.Connection, job_ids: Sequence[str], retire: Callable[[Sequence[str]], None]) -> int:
    """Delete ``job_ids`` with their labels, attempts, steps, events and output names; the content
    no other job names any more is ``retire``d (last, so that a statement failing before leaves the
    files alone). How many jobs went."""
    if not job_ids:
        return 0
    marks = ", ".join("?" * len(job_ids))
    shas = [r[0] for r in db.execute(f"SELECT DISTINCT sha256 FROM outputs WHERE job_id IN ({marks})", job_ids)]
    for table in _JOB_TABLES:
        db.execute(f"DELETE FROM {table} WHERE job_id IN ({marks})", job_ids)
    deleted = db.execute(f"DELETE FROM jobs WHERE id IN ({marks})", job_ids).rowcount
    unnamed = [sha for sha in shas if one(db, "SELECT 1 FROM outputs WHERE sha256 = ? LIMIT 1", (sha,)) is None]
    if unnamed:
        retire(unnamed)
    return int(deleted)


def delete_job(db: sqlite3.Connection, tenant: str, job_id: str, retire: Callable[[Sequence[str]], None]) -> None:
    """Delete one of ``tenant``'s jobs that ended (``JobNotEnded`` otherwise)."""
    row = job_row(db, job_id, tenant)
    if not JobState(row["state"]).final:
        raise JobNotEnded(job_id, row["state"])
    delete_jobs(db, [job_id], retire)


def prune(db: sqlite3.Connection, created_before_us: int, limit: int, retire: Callable[[Sequence[str]], None]) -> int:
    """Delete up to ``limit`` ended jobs created before ``created_before_us`` (each state's oldest first)."""
    ids: list[str] = []
    for state in sorted(s.value for s in JobState if s.final):  # each a range of the (state, created_us) index
        ids += [r[0] for r in db.execute(
            "SELECT id FROM jobs WHERE state = ? AND created_us < ? ORDER BY created_us LIMIT ?",
            (state, created_before_us, limit - len(ids)))]
        if len(ids) >= limit:
            break
    return delete_jobs(db, ids, retire)
