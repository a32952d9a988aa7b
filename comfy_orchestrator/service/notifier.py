"""Wake-up calls inside one service process; the store stays the source of truth, these only say
when to look again (and readers and workers still poll, for what other processes write). With
several processes (``service.peers``), ``relay`` passes each wake-up on to the siblings.

* ``notify`` / ``wait``: for event readers. Whoever appends an event calls ``notify``; every reader
  waiting in ``wait`` returns at once instead of at its next poll.
* ``job_queued`` / ``next_job``: for workers. Each job put in the queue wakes *one* idle worker, not
  all of them: a herd of workers racing to claim one job costs a claim transaction each. A queued
  job also carries an event, so ``job_queued`` wakes the readers too.

A worker that found the queue empty passes the ``generation`` it read before it tried to claim to
``next_job``: if a job was queued meanwhile (the wake-up went to nobody, the worker was not yet
waiting), the future it gets is already done and it claims again at once, so no wake-up is lost.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable

__all__ = ["Notifier"]


class Notifier:
    def __init__(self) -> None:
        self.relay: Callable[[str], None] | None = None
        """Passes ``e`` (events appended) and ``q`` (a job queued that no worker here took) to the
        sibling processes; None in a service of one process."""
        self._event = asyncio.Event()
        self._idle: collections.deque[asyncio.Future[None]] = collections.deque()
        self.generation = 0
        """How many jobs were queued through ``job_queued`` so far."""

    def notify(self, *, relay: bool = True) -> None:
        """Wake every event reader (and, with ``relay``, those of the sibling processes)."""
        self._event.set()
        self._event = asyncio.Event()
        if relay and self.relay is not None:
            self.relay("e")

    async def wait(self, timeout: float) -> None:
        """Until the next ``notify`` or ``timeout`` seconds, whichever comes first."""
        event = self._event
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):  # no extra task, unlike wait_for
                await event.wait()

    def job_queued(self, *, relay: bool = True) -> None:
        """A job became claimable: wake the longest idle worker (if any; else, with ``relay``, one in
        a sibling process) and every event reader."""
        self.generation += 1
        woke = False
        while self._idle and not woke:
            waiter = self._idle.popleft()
            if not waiter.done():
                waiter.set_result(None)
                woke = True
        if not woke and relay and self.relay is not None:
            self.relay("q")
        self.notify(relay=relay)

    def next_job(self, generation: int) -> asyncio.Future[None]:
        """A future done when ``job_queued`` picks this waiter, or at once when a job was queued
        since ``generation``. Pass it to ``forget`` when done waiting for it."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if generation != self.generation:
            waiter.set_result(None)
        else:
            self._idle.append(waiter)
        return waiter

    def forget(self, waiter: asyncio.Future[None]) -> None:
        """Stop waiting on ``waiter`` (timed out, or stopping): it no longer takes a wake-up."""
        if waiter.done():
            return
        waiter.cancel()
        with contextlib.suppress(ValueError):
            self._idle.remove(waiter)
