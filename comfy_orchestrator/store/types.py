"""The job store's records: what a job is, each attempt at it, its steps, events and outputs.

Every record is a frozen dataclass read back from the store; JSON columns come back as plain
``dict``/``list`` values (treat them as read-only). Times are aware UTC ``datetime``s with
microsecond precision (what SQLite stores as integer microseconds and PostgreSQL as ``timestamptz``).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Generic, TypeVar

__all__ = [
    "AttemptRecord",
    "AttemptState",
    "Claim",
    "EventRecord",
    "EventType",
    "JobKind",
    "JobRecord",
    "JobState",
    "OutputRecord",
    "Page",
    "StepRecord",
    "StepState",
]

T = TypeVar("T")


class JobKind(enum.StrEnum):
    """What a job's ``spec`` describes."""

    GRAPH = "graph"  # an API-format graph, run as it is
    TEMPLATE = "template"  # a named template and the slot values to bind
    PIPELINE = "pipeline"  # a pipeline spec: several steps, each one or more prompts


class JobState(enum.StrEnum):
    """Where a job is. ``succeeded``, ``failed`` and ``cancelled`` are final: a job leaves them never."""

    QUEUED = "queued"  # accepted (the 202 was answered after this row was committed), waiting for a worker
    RUNNING = "running"  # a worker holds its lease; an attempt may be in flight on a backend
    SUCCEEDED = "succeeded"  # done, with a result (and outputs); completed exactly once
    FAILED = "failed"  # ended with an error that retrying will not fix, or out of attempts
    CANCELLED = "cancelled"  # cancelled by its tenant before it ended

    @property
    def final(self) -> bool:
        return self in _FINAL

    @property
    def active(self) -> bool:
        """Counted against the tenant's queue bound."""
        return not self.final


_FINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


class AttemptState(enum.StrEnum):
    """How one try of a job on one backend went."""

    RUNNING = "running"  # recorded as its prompt was submitted (or before); it may not have reached the backend
    SUCCEEDED = "succeeded"  # the prompt finished and its results were taken
    FAILED = "failed"  # the prompt failed (rejected, a node raised, the backend died mid-job…)
    CANCELLED = "cancelled"  # the job was cancelled while this attempt ran
    LOST = "lost"  # the backend does not know the prompt (restarted, or gone): the job was resubmitted
    ABANDONED = "abandoned"  # the worker gave the job back (shutdown) before this attempt ended


class StepState(enum.StrEnum):
    """Where one step of a pipeline job is."""

    PENDING = "pending"  # not started
    RUNNING = "running"  # its prompts are in flight
    SUCCEEDED = "succeeded"  # done; ``outputs`` names what it produced
    FAILED = "failed"  # failed; the pipeline decides whether that ends the job
    SKIPPED = "skipped"  # a condition left it out


class EventType(enum.StrEnum):
    """The events the store itself appends, in the same transaction as the change they report.
    Callers append their own (progress, previews, step events) with any other type name."""

    QUEUED = "job.queued"  # created, or given back to the queue (``data.reason`` says why)
    RUNNING = "job.running"  # claimed by a worker
    ATTEMPT = "job.attempt"  # an attempt was recorded: backend, prompt id, number
    SUCCEEDED = "job.succeeded"  # completed: result summary and output names
    FAILED = "job.failed"  # failed: the error
    CANCELLED = "job.cancelled"  # cancelled by its tenant


@dataclass(frozen=True, slots=True)
class JobRecord:
    """One job as stored. ``body_hash`` is the canonical hash of (kind, spec, labels) that an
    idempotency key is checked against; ``attempts`` counts the attempts started; ``lease_owner``
    and ``lease_until`` are set while a worker holds the job (state ``running``).

    ``planned_prompt_id`` is drawn by each claim: the holder may submit its first prompt under it
    at the same time as it records that attempt (a graph job's worker does; a pipeline records each
    prompt first), so until an attempt with that id is recorded (or the job leaves ``running``)
    the prompt may be on a backend that no attempt names, and reconciliation asks every backend
    about it. A claim that takes over a lease that ran out keeps the plan it found open.

    ``reclaimed`` is not stored: it is set on the record ``claim_next`` returns when that claim took
    over a lease that ran out, so the new holder knows to reconcile the job before running it."""

    id: str
    tenant: str
    kind: JobKind
    spec: Mapping[str, Any]
    state: JobState
    created: datetime
    updated: datetime
    body_hash: str
    idempotency_key: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    result: Mapping[str, Any] | None = None
    error: Mapping[str, Any] | None = None
    attempts: int = 0
    lease_owner: str | None = None
    lease_until: datetime | None = None
    planned_prompt_id: str | None = None
    reclaimed: bool = field(default=False, compare=False)


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """One try of a job on one backend. ``prompt_id`` was chosen by the orchestrator and stored
    before the prompt was submitted, or while it was when it is the claim's planned id, so a
    restarted service can ask the backend about it.
    ``n`` counts from 1 per job; ``step`` names the pipeline step the prompt belongs to."""

    job_id: str
    n: int
    backend: str
    prompt_id: str
    state: AttemptState
    started: datetime
    ended: datetime | None = None
    error: Mapping[str, Any] | None = None
    step: str | None = None


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One step of a pipeline job; ``outputs`` names the job's outputs it produced, ``data`` holds
    whatever the pipeline keeps to resume (scores, the chosen candidate…)."""

    job_id: str
    name: str
    state: StepState
    updated: datetime
    outputs: tuple[str, ...] = ()
    data: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class EventRecord:
    """A stored event. ``seq`` is global and strictly increasing in commit order: a reader that saw
    ``seq`` will find everything later with ``events_since(tenant, seq)`` and nothing twice."""

    seq: int
    job_id: str
    tenant: str
    type: str
    data: Mapping[str, Any]
    at: datetime


@dataclass(frozen=True, slots=True)
class OutputRecord:
    """A file a job produced. The bytes live once per content at ``path``
    (``<outputs_dir>/<sha256[:2]>/<sha256>``), however many jobs produced them.

    A record from ``JobStore.stage_output`` is not named yet: its bytes may still wait at ``staged``, a
    file of the store's own, until ``complete_job`` names the output (and moves them to ``path`` in
    the same transaction) or ``discard_output`` drops them. Records read back have ``staged`` None."""

    job_id: str
    name: str
    sha256: str
    size: int
    content_type: str
    path: Path
    created: datetime
    staged: Path | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Claim:
    """Who takes a job as it is created (``JobStore.create_job(claim=…)``): a worker that was idle,
    so the job is committed already ``running`` under its lease, one transaction instead of a queued
    job and a claim."""

    worker_id: str
    lease_s: float


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a listing; pass ``next_cursor`` back for the next one (None: this was the last)."""

    items: tuple[T, ...]
    next_cursor: str | None = None
