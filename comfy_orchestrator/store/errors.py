"""What the job store raises, under the package's root error.

    ComfyOrchestratorError
    └── StoreError                      the job store could not do what was asked
        ├── IdempotencyConflict         the key was used before, with another body
        ├── QueueFull                   the tenant already has its bound of unfinished jobs
        ├── JobNotFound (KeyError)      no such job (or not this tenant's)
        ├── OutputNotFound (KeyError)   no such output of that job
        ├── JobNotRunning               the job ended (or went back to the queue): no new attempt
        ├── JobNotEnded                 the job is still queued or running: it cannot be deleted
        ├── InvalidCursor (ValueError)  a page cursor this store did not hand out
        └── StoreClosed (RuntimeError)  the store was used after close()
"""

from __future__ import annotations

from comfy_orchestrator.errors import ComfyOrchestratorError

__all__ = [
    "IdempotencyConflict",
    "InvalidCursor",
    "JobNotEnded",
    "JobNotFound",
    "JobNotRunning",
    "OutputNotFound",
    "QueueFull",
    "StoreClosed",
    "StoreError",
]


class StoreError(ComfyOrchestratorError):
    """Root of the job store's errors."""


class IdempotencyConflict(StoreError):
    """``(tenant, key)`` already names a job created from a different body (HTTP 409/422)."""

    def __init__(self, tenant: str, key: str, job_id: str) -> None:
        super().__init__(f"idempotency key {key!r} of tenant {tenant!r} was used for job {job_id} with another body")
        self.tenant = tenant
        self.key = key
        self.job_id = job_id


class QueueFull(StoreError):
    """The tenant already has ``limit`` queued or running jobs (HTTP 429)."""

    def __init__(self, tenant: str, limit: int) -> None:
        super().__init__(f"tenant {tenant!r} already has {limit} unfinished jobs")
        self.tenant = tenant
        self.limit = limit


class JobNotFound(StoreError, KeyError):
    """No job with that id (for a tenant-scoped call: none of that tenant's)."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job {job_id}")
        self.job_id = job_id

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class OutputNotFound(StoreError, KeyError):
    """The job has no output of that name."""

    def __init__(self, job_id: str, name: str) -> None:
        super().__init__(f"job {job_id} has no output {name!r}")
        self.job_id = job_id
        self.name = name

    def __str__(self) -> str:
        return str(self.args[0])


class JobNotRunning(StoreError):
    """An attempt was started on a job that is not running (it ended, or went back to the queue), or
    an output was saved for a job that already ended. ``state`` is where the job is."""

    def __init__(self, job_id: str, state: str) -> None:
        super().__init__(f"job {job_id} is {state}")
        self.job_id = job_id
        self.state = state


class JobNotEnded(StoreError):
    """A job that is still queued or running was to be deleted. ``state`` is where the job is."""

    def __init__(self, job_id: str, state: str) -> None:
        super().__init__(f"job {job_id} is {state}: cancel it first, or wait for it to end")
        self.job_id = job_id
        self.state = state


class InvalidCursor(StoreError, ValueError):
    """A page cursor that this store did not hand out (or one that was altered)."""


class StoreClosed(StoreError, RuntimeError):
    """The store was used after close()."""
