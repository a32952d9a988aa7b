"""What a pool tells about its jobs, as typed events, and the fan-out to listeners.

Per job, in order: ``queued``, then for each attempt ``dispatched`` (which backend) followed by
``cached``, ``progress``, ``preview`` and ``output`` as the server reports them, and ``retried`` (why) when the
attempt failed in a way worth another try; finally exactly one of ``done``, ``failed`` (why) or
``cancelled``.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from comfy_orchestrator.protocol import FileRef

__all__ = ["EventKind", "Listener", "PoolEvent"]

log = logging.getLogger(__name__)


class EventKind(enum.StrEnum):
    QUEUED = "queued"  # accepted; waiting for a backend
    DISPATCHED = "dispatched"  # a backend took it (``backend``, ``attempt``)
    PROGRESS = "progress"  # a step inside a node (``fraction`` of that node, ``node``)
    PREVIEW = "preview"  # a preview image (``image``, ``mime``)
    CACHED = "cached"  # the server answered these ``nodes`` from its cache
    OUTPUT = "output"  # ``node`` wrote these ``files`` (its ``executed``; the prompt may not have finished)
    RETRIED = "retried"  # the attempt on ``backend`` failed (``reason``); queued again after ``delay``
    DONE = "done"  # finished on ``backend``
    FAILED = "failed"  # gave up (``reason``)
    CANCELLED = "cancelled"  # cancelled by the caller (or the pool closed)


@dataclass(frozen=True, slots=True)
class PoolEvent:
    """One thing that happened to a job. Fields that do not apply to a kind are None / empty."""

    job_id: str
    kind: EventKind
    backend: str | None = None
    attempt: int = 0  # 1 for the first attempt; 0 before any
    prompt_id: str | None = None  # on ``dispatched``: the id the attempt's prompt will be submitted under
    fraction: float | None = None
    node: str | None = None
    nodes: tuple[str, ...] = ()
    reason: str | None = None
    delay: float | None = None
    files: tuple[FileRef, ...] = ()
    image: bytes | None = field(default=None, repr=False)
    mime: str | None = None
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    at: float = field(default_factory=time.time)  # Unix time


Listener = Callable[[PoolEvent], None]


class EventHub:
    """Fans events out to synchronous listeners (called in order; one that raises is logged and kept)
    and to async streams (each with its own unbounded queue, so a slow reader loses nothing)."""

    def __init__(self) -> None:
        self._listeners: list[Listener] = []
        self._streams: list[asyncio.Queue[PoolEvent | None]] = []
        self._closed = False

    def add(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener`` for every event from now on; returns the function that removes it."""
        self._listeners.append(listener)

        def remove() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return remove

    def emit(self, event: PoolEvent) -> None:
        for queue in self._streams:
            queue.put_nowait(event)
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("pool event listener %r failed on %s of job %s", listener, event.kind, event.job_id)

    async def stream(self) -> AsyncIterator[PoolEvent]:
        """Every event from now on, until the hub is closed."""
        if self._closed:
            return
        queue: asyncio.Queue[PoolEvent | None] = asyncio.Queue()
        self._streams.append(queue)
        try:
            while (event := await queue.get()) is not None:
                yield event
        finally:
            self._streams.remove(queue)

    def close(self) -> None:
        """End every stream (after the events already queued for it)."""
        self._closed = True
        for queue in self._streams:
            queue.put_nowait(None)
