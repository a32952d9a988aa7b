"""Pipeline events: what happens to each job and step, for an ``on_event`` callback.

Job events (``job_id`` set) mirror the pool's (queued, dispatched, progress, preview, done,
retried, failed, cancelled) and add the pipeline's own: ``cached`` (a disk-cache hit, no GPU
work) and ``skipped`` (its output already exists). Step events say when a step starts and ends,
which way a gate went, when a fallback takes over and when the quality loop escalates.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["EventCallback", "EventKind", "PipelineEvent"]

log = logging.getLogger(__name__)


class EventKind(enum.StrEnum):
    QUEUED = "queued"  # the pool accepted the job
    DISPATCHED = "dispatched"  # a backend took it (``backend``)
    PROGRESS = "progress"  # sampling progress (``fraction`` 0..1)
    PREVIEW = "preview"  # a preview frame arrived
    CACHED = "cached"  # served from the disk cache (or ComfyUI's own cache): no GPU work
    SKIPPED = "skipped"  # its output exists already (skip_existing), or the step cannot run
    DONE = "done"  # finished; its images are saved
    RETRIED = "retried"  # failed and will run again (``reason``)
    FAILED = "failed"  # failed for good (``reason``)
    CANCELLED = "cancelled"  # cancelled with the run
    STEP_STARTED = "step_started"
    STEP_FINISHED = "step_finished"  # ``reason`` holds the step's status
    GATE = "gate"  # a gate decided (``reason``: "passed …" or "failed …")
    FALLBACK = "fallback"  # a fallback step takes over (``reason``: why)
    ESCALATED = "escalated"  # the quality loop tries again (``reason``: what changed)


# The pool's events a pipeline passes on; its done/failed/cancelled are superseded by the pipeline's
# own, sent once the images are saved or the step's retry policy has decided.
_POOL_KINDS = {kind.value: kind for kind in (EventKind.QUEUED, EventKind.DISPATCHED, EventKind.PROGRESS,
                                             EventKind.PREVIEW, EventKind.CACHED, EventKind.RETRIED)}


@dataclass(frozen=True, slots=True)
class PipelineEvent:
    kind: EventKind
    step: str | None = None
    job_id: str | None = None
    backend: str | None = None
    fraction: float | None = None
    reason: str | None = None
    model: str | None = None
    cell: str | None = None  # the comparison cell, for comparison runs
    at: float = field(default_factory=time.time)


EventCallback = Callable[[PipelineEvent], Awaitable[None] | None]


class Emitter:
    """Delivers events to a callback that may be sync or async; async deliveries are awaited by
    :meth:`drain` (the runner drains before it returns)."""

    def __init__(self, callback: EventCallback | None) -> None:
        self._callback = callback
        self._pending: set[asyncio.Future[None]] = set()
        self.counts: dict[EventKind, int] = {}

    def emit(self, event: PipelineEvent) -> None:
        self.counts[event.kind] = self.counts.get(event.kind, 0) + 1
        if event.kind in (EventKind.FAILED, EventKind.RETRIED):
            log.info("%s: job %s on %s %s: %s", event.step, event.job_id, event.backend, event.kind, event.reason)
        if self._callback is None:
            return
        try:
            result = self._callback(event)
        except Exception:  # a listener's bug must not end a long run; it is logged with the event
            log.exception("on_event failed on %s of step %s (job %s)", event.kind, event.step, event.job_id)
            return
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(result)
            self._pending.add(task)
            task.add_done_callback(self._delivered)

    def pool_listener(self, step: str, model: str | None, cell: str | None = None) -> Callable[[Any], None]:
        """An ``on_event`` for ``Pool.run`` that re-emits the pool's events for ``step``."""

        def listen(event: Any) -> None:
            raw = getattr(event, "kind", None)
            kind = _POOL_KINDS.get(str(getattr(raw, "value", raw)))
            if kind is None:
                return
            self.emit(PipelineEvent(
                kind=kind, step=step, job_id=getattr(event, "job_id", None),
                backend=getattr(event, "backend", None), fraction=getattr(event, "fraction", None),
                reason=getattr(event, "reason", None), model=model, cell=cell,
            ))

        return listen

    async def drain(self) -> None:
        """Wait for the async deliveries still running (their failures are logged, not raised)."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    def _delivered(self, task: asyncio.Future[None]) -> None:
        self._pending.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("on_event failed: %r", error)
