"""Where the service is in its life: starting, ready, draining (``/readyz`` answers from it)."""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from comfy_orchestrator.service.processes import ProcessRole

__all__ = ["Lifecycle", "Phase"]

log = logging.getLogger(__name__)


class Phase(enum.StrEnum):
    STARTING = "starting"  # opening the store, probing backends, reconciling
    READY = "ready"  # accepting and running jobs
    DRAINING = "draining"  # shutting down: no new claims; running jobs finish or go back to the queue


class Lifecycle:
    def __init__(self, role: ProcessRole | None = None) -> None:
        self.role = role  # which process of a multi-process service this is; None: the only one
        self.phase = Phase.STARTING
        self.stopping = asyncio.Event()  # set when draining begins: workers stop claiming
        self.workers: list[asyncio.Task[None]] = []  # the running worker tasks, for a drain to wait on
        # job id → the task following a prompt a previous process left running; cancelling the task
        # takes the prompt off its backend (what a tenant's cancel does).
        self.adopted: dict[str, asyncio.Task[None]] = {}
        self._spawned: set[asyncio.Task[Any]] = set()  # short tasks nobody awaits (a sibling's cancel)

    def spawn(self, coro: Coroutine[Any, Any, Any], *, name: str) -> None:
        """Run ``coro`` in the background, held until it ends (and awaited at shutdown)."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._spawned.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._spawned.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("%s failed: %r", task.get_name(), exc, exc_info=exc)

    async def settle_spawned(self) -> None:
        """Wait for the background tasks still running (their errors are logged as they end)."""
        await asyncio.gather(*self._spawned, return_exceptions=True)

    def drain(self) -> None:
        self.phase = Phase.DRAINING
        self.stopping.set()

    @property
    def ready(self) -> bool:
        return self.phase is Phase.READY
