"""A dispatched prompt, recorded as an attempt of its job before it is submitted, or while it is when
it goes out under the job's planned prompt id (the worker's graph jobs and the prompts of pipeline
jobs alike)."""

from __future__ import annotations

from comfy_orchestrator.errors import JobCancelled
from comfy_orchestrator.pool import PoolEvent
from comfy_orchestrator.store import AttemptRecord, JobStore, StoreError

__all__ = ["record_dispatch"]


async def record_dispatch(store: JobStore, job_id: str, event: PoolEvent, *, step: str | None = None
                          ) -> AttemptRecord | None:
    """Store the attempt of the prompt ``event`` (a ``DISPATCHED`` pool event) names; None when it
    names no prompt. Raises JobCancelled when the job is no longer running (a tenant cancelled it,
    in this process or another): the pool then does not submit that prompt, or, when it is being
    submitted beside this (the job's planned prompt id), takes it back off."""
    if event.backend is None or event.prompt_id is None:
        return None
    try:
        return await store.start_attempt(job_id, event.backend, event.prompt_id, step=step)
    except StoreError as exc:
        raise JobCancelled(f"job {job_id} is no longer running ({exc}); prompt {event.prompt_id} not run") from None
