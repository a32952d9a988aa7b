"""Wake-up calls inside one service process; the store stays the source of truth, these only say
when to look again (and readers and workers still poll, for what other processes write). With
several processes (``service.peers``), ``relay`` passes each wake-up on to the siblings.

* ``notify`` / ``wait``: for event readers. Whoever appends an event calls ``notify``; every reader
  waiting in ``wait`` returns at once instead of at its next poll. Readers take what this process
  committed from the ``EventFeed``; a wake-up passed on from a sibling (``relay=False``) counts in
  ``foreign``, which tells them to read the store instead.
* ``job_queued`` / ``next_job``: for workers. Each job put in the queue wakes *one* idle worker, not
  all of them: a herd of workers racing to claim one job costs a claim transaction each. A queued
  job also carries an event, so ``job_queued`` wakes the readers too.

A worker that found the queue empty passes the ``generation`` it read before it tried to claim to
``next_job``: if a job was queued meanwhile (the wake-up went to nobody, the worker was not yet
waiting), the future it gets is already done and it claims again at once, so no wake-up is lost.

* ``reserve``: hand a job that is about to be created straight to an idle worker. The API takes the
  longest idle worker's ``Claim`` and creates the job already running under its lease (one
  transaction, no claim after it), then ``deliver``s the job to that worker, or ``decline``s (the
  job was not created, or is another one's) and the worker goes back to claiming. A reserved worker
  waits for that answer whatever its poll timer says.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable

from comfy_orchestrator.store import Claim, JobRecord

__all__ = ["Notifier", "Reservation"]


class Reservation:
    """An idle worker set aside for one job being created (``Notifier.reserve``): ``deliver`` or
    ``decline`` it exactly once."""

    def __init__(self, claim: Claim, waiter: asyncio.Future[JobRecord | None]) -> None:
        self.claim = claim
        self._waiter = waiter

    def deliver(self, job: JobRecord) -> None:
        """The job was created running under ``claim``: the worker runs it."""
        if not self._waiter.done():
            self._waiter.set_result(job)

    def decline(self) -> None:
        """No job for this worker after all: it claims from the queue as if woken."""
        if not self._waiter.done():
            self._waiter.set_result(None)


class Notifier:
    def __init__(self) -> None:
        self.relay: Callable[[str], None] | None = None
        """Passes ``e`` (events appended) and ``q`` (a job queued that no worker here took) to the
        sibling processes; None in a service of one process."""
        self._event = asyncio.Event()
        self._idle: collections.deque[tuple[asyncio.Future[JobRecord | None], Claim]] = collections.deque()
        self.generation = 0
        """How many jobs were queued through ``job_queued`` so far."""
        self.foreign = 0
        """How many wake-ups came from elsewhere (``relay=False``): events this process's feed lacks."""

    def notify(self, *, relay: bool = True) -> None:
        """Wake every event reader (and, with ``relay``, those of the sibling processes). Without
        ``relay`` the wake-up came from a sibling (or has no event of this process behind it)."""
        if not relay:
            self.foreign += 1
        self._event.set()
        self._event = asyncio.Event()
        if relay and self.relay is not None:
            self.relay("e")

    async def wait(self, timeout: float) -> bool:
        """Until the next ``notify`` (True) or ``timeout`` seconds (False), whichever comes first."""
        event = self._event
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):  # no extra task, unlike wait_for
                return await event.wait()
        return False

    def job_queued(self, *, relay: bool = True) -> None:
        """A job became claimable: wake the longest idle worker (if any; else, with ``relay``, one in
        a sibling process) and every event reader."""
        self.generation += 1
        woke = False
        while self._idle and not woke:
            waiter, _ = self._idle.popleft()
            if not waiter.done():
                waiter.set_result(None)
                woke = True
        if not woke and relay and self.relay is not None:
            self.relay("q")
        self.notify(relay=relay)

    def next_job(self, generation: int, claim: Claim) -> asyncio.Future[JobRecord | None]:
        """A future done when ``job_queued`` picks this waiter (None: claim from the queue) or a
        ``Reservation`` of it is answered (the job handed over, or None), or done at once when a job
        was queued since ``generation``. Pass it to ``forget`` when done waiting for it."""
        waiter: asyncio.Future[JobRecord | None] = asyncio.get_running_loop().create_future()
        if generation != self.generation:
            waiter.set_result(None)
        else:
            self._idle.append((waiter, claim))
        return waiter

    def reserve(self) -> Reservation | None:
        """Take the longest idle worker for a job about to be created; None when none is idle."""
        while self._idle:
            waiter, claim = self._idle.popleft()
            if not waiter.done():
                return Reservation(claim, waiter)
        return None

    def forget(self, waiter: asyncio.Future[JobRecord | None]) -> bool:
        """Stop waiting on ``waiter`` (timed out, or stopping): it no longer takes a wake-up. False
        when it is reserved and not yet answered: the worker must await it, a job may be on its way."""
        if waiter.done():
            return True
        for i, (idle, _) in enumerate(self._idle):
            if idle is waiter:
                del self._idle[i]
                waiter.cancel()
                return True
        return False  # out of the idle queue yet not done: only ``reserve`` leaves a waiter so
