"""Where the service is in its life: starting, ready, draining (``/readyz`` answers from it)."""

from __future__ import annotations

import asyncio
import enum

__all__ = ["Lifecycle", "Phase"]


class Phase(enum.StrEnum):
    STARTING = "starting"  # opening the store, probing backends, reconciling
    READY = "ready"  # accepting and running jobs
    DRAINING = "draining"  # shutting down: no new claims; running jobs finish or go back to the queue


class Lifecycle:
    def __init__(self) -> None:
        self.phase = Phase.STARTING
        self.stopping = asyncio.Event()  # set when draining begins: workers stop claiming
        self.workers: list[asyncio.Task[None]] = []  # the running worker tasks, for a drain to wait on
        # job id → the task following a prompt a previous process left running; cancelling the task
        # takes the prompt off its backend (what a tenant's cancel does).
        self.adopted: dict[str, asyncio.Task[None]] = {}

    def drain(self) -> None:
        self.phase = Phase.DRAINING
        self.stopping.set()

    @property
    def ready(self) -> bool:
        return self.phase is Phase.READY
