"""SQLite rows to the store's records."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from comfy_orchestrator.store._codec import from_us, loads
from comfy_orchestrator.store.types import (
    AttemptRecord,
    AttemptState,
    EventRecord,
    JobKind,
    JobRecord,
    JobState,
    OutputRecord,
    StepRecord,
    StepState,
)

__all__ = ["attempt_from", "event_from", "job_from", "output_from", "step_from"]


def job_from(row: sqlite3.Row, *, reclaimed: bool = False) -> JobRecord:
    lease_until = row["lease_until_us"]
    return JobRecord(
        id=row["id"],
        tenant=row["tenant"],
        kind=JobKind(row["kind"]),
        spec=loads(row["spec"]),
        state=JobState(row["state"]),
        created=from_us(row["created_us"]),
        updated=from_us(row["updated_us"]),
        body_hash=row["body_hash"],
        idempotency_key=row["idempotency_key"],
        labels=loads(row["labels"]),
        result=loads(row["result"]),
        error=loads(row["error"]),
        attempts=row["attempts"],
        lease_owner=row["lease_owner"],
        lease_until=None if lease_until is None else from_us(lease_until),
        planned_prompt_id=row["planned_prompt_id"],
        reclaimed=reclaimed,
    )


def attempt_from(row: sqlite3.Row, prefix: str = "") -> AttemptRecord:
    ended = row[f"{prefix}ended_us"]
    return AttemptRecord(
        job_id=row[f"{prefix}job_id"],
        n=row[f"{prefix}n"],
        backend=row[f"{prefix}backend"],
        prompt_id=row[f"{prefix}prompt_id"],
        state=AttemptState(row[f"{prefix}state"]),
        started=from_us(row[f"{prefix}started_us"]),
        ended=None if ended is None else from_us(ended),
        error=loads(row[f"{prefix}error"]),
        step=row[f"{prefix}step"],
    )


def step_from(row: sqlite3.Row) -> StepRecord:
    return StepRecord(
        job_id=row["job_id"],
        name=row["name"],
        state=StepState(row["state"]),
        updated=from_us(row["updated_us"]),
        outputs=tuple(loads(row["outputs"])),
        data=loads(row["data"]),
    )


def event_from(row: sqlite3.Row) -> EventRecord:
    return EventRecord(
        seq=row["seq"],
        job_id=row["job_id"],
        tenant=row["tenant"],
        type=row["type"],
        data=loads(row["data"]),
        at=from_us(row["at_us"]),
    )


def output_from(row: sqlite3.Row, path: Path) -> OutputRecord:
    return OutputRecord(
        job_id=row["job_id"],
        name=row["name"],
        sha256=row["sha256"],
        size=row["size"],
        content_type=row["content_type"],
        path=path,
        created=from_us(row["created_us"]),
    )
