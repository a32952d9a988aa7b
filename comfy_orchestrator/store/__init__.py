"""The durable job store the service stands on: jobs, attempts, pipeline steps, events and outputs.

    JobStore               the protocol (SQLite now; a PostgreSQL implementation satisfies it later)
    SQLiteJobStore         the embedded default: one SQLite file in WAL mode, async context manager
    BlobStore, Blob        content-addressed output files (``<root>/<sha[:2]>/<sha>``)
    JobRecord, AttemptRecord, StepRecord, EventRecord, OutputRecord, Page, Claim
    JobState, JobKind, AttemptState, StepState, EventType
    reconcile_running      start-up reconciliation of running jobs with their backends
    reconcile_job, ReconcileReport, Reconciled, Outcome, requeue_lost
    collect_outputs, stage_file, output_files   a finished prompt's output files into the store
    discard_outputs        staged outputs nothing will name, dropped
    body_hash, error_info  the canonical request hash idempotency compares; an exception as JSON
    StoreError             root of the store's errors (IdempotencyConflict, QueueFull, JobNotFound…)
"""

from comfy_orchestrator.store._codec import body_hash, error_info
from comfy_orchestrator.store.base import JobStore
from comfy_orchestrator.store.blobs import Blob, BlobStore, is_sha256
from comfy_orchestrator.store.errors import (
    IdempotencyConflict,
    InvalidCursor,
    JobNotEnded,
    JobNotFound,
    JobNotRunning,
    OutputNotFound,
    QueueFull,
    StoreClosed,
    StoreError,
)
from comfy_orchestrator.store.reconcile import (
    BackendClient,
    FileSource,
    Outcome,
    Reconciled,
    ReconcileReport,
    Resubmit,
    collect_outputs,
    discard_outputs,
    output_files,
    reconcile_job,
    reconcile_running,
    requeue_lost,
    stage_file,
)
from comfy_orchestrator.store.sqlite import SQLiteJobStore
from comfy_orchestrator.store.types import (
    AttemptRecord,
    AttemptState,
    Claim,
    EventRecord,
    EventType,
    JobKind,
    JobRecord,
    JobState,
    OutputRecord,
    Page,
    StepRecord,
    StepState,
)

__all__ = [
    "AttemptRecord",
    "AttemptState",
    "BackendClient",
    "Blob",
    "BlobStore",
    "Claim",
    "EventRecord",
    "EventType",
    "FileSource",
    "IdempotencyConflict",
    "InvalidCursor",
    "JobKind",
    "JobNotEnded",
    "JobNotFound",
    "JobNotRunning",
    "JobRecord",
    "JobState",
    "JobStore",
    "Outcome",
    "OutputNotFound",
    "OutputRecord",
    "Page",
    "QueueFull",
    "ReconcileReport",
    "Reconciled",
    "Resubmit",
    "SQLiteJobStore",
    "StepRecord",
    "StepState",
    "StoreClosed",
    "StoreError",
    "body_hash",
    "collect_outputs",
    "discard_outputs",
    "error_info",
    "is_sha256",
    "output_files",
    "reconcile_job",
    "reconcile_running",
    "requeue_lost",
    "stage_file",
]
