"""Pull-based dispatch: one queue of jobs for the whole pool; every free slot of a backend pulls the
next job it can run. There is no static split: a fast backend simply comes back for more sooner.

The rule a free slot follows, in queue order (oldest first; a retried job keeps its place):

1. skip jobs this backend may not or cannot run (``backends=`` restriction, missing node class or
   model file);
2. skip a job that already failed here while another eligible backend that can run it exists (it
   waits for that one, busy or not; with nothing else able to run it, it comes back here);
3. model affinity: skip a job whose model (checkpoint / diffusion model) differs from the one this
   backend ran last when another *idle* backend that can run it ran exactly that model last and
   would take it (rule 4 does not send it elsewhere) — that one takes it in the same pass. A job
   never waits for a *busy* affine backend: an idle backend loading a model costs seconds, a queue
   that waits for a busy one can cost a whole job;
4. the tail: skip a job when the other backends that can run it would clearly (in under
   ``TAIL_MARGIN`` of the time) finish it and every other job queued for this one before this one
   could finish it, estimated from each backend's moving mean execution time and what it holds (a
   backend whose prompts are overdue counts for nothing). With a long queue this never holds; at the
   end of a batch it keeps a 4× slower backend from starting the last job that a fast one finishes
   sooner, and it lets a backend hold two prompts (``max_in_flight=2``: no idle gap between two
   prompts) without hoarding. While a job waits so, the queue is looked at again every
   ``REPUMP_DELAY`` seconds, as the estimates move with time.

Free slots are offered jobs least-loaded backend first, then the one that has been fastest. A slot
is held from dispatch until the server reports the prompt executed (``execution_success``): the
next job is submitted while the finished one's /history entry is still being fetched, so the server
does not sit idle for that round trip.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections.abc import Mapping

from comfy_orchestrator.pool.backend import Backend
from comfy_orchestrator.pool.jobs import Job

__all__ = ["REPUMP_DELAY", "TAIL_MARGIN", "Dispatcher", "Slot"]

TAIL_MARGIN = 0.8
REPUMP_DELAY = 0.1


class Slot:
    """One attempt's hold on a backend: ``free`` gives the slot back early (the server is done with
    the prompt), ``end`` closes the attempt (and frees the slot if still held). Both are idempotent."""

    __slots__ = ("_dispatcher", "_ended", "_held", "backend")

    def __init__(self, dispatcher: Dispatcher, backend: Backend) -> None:
        self._dispatcher = dispatcher
        self.backend = backend
        self._held = True
        self._ended = False

    def free(self) -> None:
        if self._held:
            self._held = False
            self.backend.free_slot()
            self._dispatcher.pump()

    def end(self) -> None:
        if not self._ended:
            self._ended = True
            self.backend.end_attempt()
            self.free()


class Dispatcher:
    """The pool's job queue; ``pump`` hands queued jobs to free slots whenever something changed."""

    def __init__(self, backends: Mapping[str, Backend]) -> None:
        self._backends = backends  # the pool's live mapping
        self._queue: list[Job] = []
        self._deferred = False  # rule 4 held a job back in the last pump
        self._repump: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def queued(self) -> list[Job]:
        return list(self._queue)

    async def acquire(self, job: Job) -> Slot:
        """Queue ``job`` and wait until a backend slot takes it; the caller must ``end`` the slot."""
        future: asyncio.Future[Backend] = asyncio.get_running_loop().create_future()
        job.assignment = future
        bisect.insort(self._queue, job, key=lambda j: j.seq)
        self.pump()
        try:
            return Slot(self, await future)
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.exception() is None:
                future.result().breaker.neutral()
                Slot(self, future.result()).end()  # taken just as the job was cancelled
            else:
                self.withdraw(job)
            raise
        finally:
            job.assignment = None

    def withdraw(self, job: Job) -> None:
        if job in self._queue:
            self._queue.remove(job)

    def fail(self, job: Job, error: BaseException) -> None:
        """Take a queued job out and make its ``acquire`` raise ``error``."""
        self.withdraw(job)
        if job.assignment is not None and not job.assignment.done():
            job.assignment.set_exception(error)

    def pump(self) -> None:
        """Give queued jobs to free slots until no free slot wants any queued job."""
        self._deferred = False
        while self._queue:
            free = sorted(
                (b for b in self._backends.values() if b.can_take()),
                key=lambda b: (b.in_flight / b.config.max_in_flight, b.mean_seconds or 0.0, b.name),
            )
            for backend in free:
                job = self._next_for(backend, free)
                if job is not None:
                    self._queue.remove(job)
                    backend.take(job.model)
                    assert job.assignment is not None
                    job.assignment.set_result(backend)
                    break
            else:
                break
        if self._deferred and self._repump is None:
            self._repump = asyncio.get_running_loop().call_later(REPUMP_DELAY, self._pump_later)

    def _pump_later(self) -> None:
        self._repump = None
        self.pump()

    def close(self) -> None:
        if self._repump is not None:
            self._repump.cancel()
            self._repump = None

    def _next_for(self, backend: Backend, free: list[Backend]) -> Job | None:
        others = [b for b in self._backends.values() if b is not backend and b.eligible()]
        idle_others = [b for b in free if b is not backend and b.in_flight == 0]
        for job in self._queue:
            if job.assignment is None or job.assignment.done():
                continue
            if not job.fits(backend.name, backend.capabilities):
                continue
            if backend.name in job.avoid and any(
                b.name not in job.avoid and job.fits(b.name, b.capabilities) for b in others
            ):
                continue
            if (
                job.model is not None
                and backend.last_model != job.model
                and any(
                    b.last_model == job.model
                    and b.name not in job.avoid
                    and job.fits(b.name, b.capabilities)
                    and not self._others_finish_first(b, job)
                    for b in idle_others
                )
            ):
                continue
            if self._others_finish_first(backend, job):
                self._deferred = True
                continue
            return job
        return None

    def _others_finish_first(self, backend: Backend, job: Job) -> bool:
        """Rule 4: would the other backends finish all jobs queued for ``backend`` before it finished ``job``?"""
        now = time.monotonic()
        backlog, mean = backend.backlog(now), backend.mean_seconds
        if backlog is None or mean is None:
            return False
        finish = (backlog + mean) * TAIL_MARGIN
        capacity = 0
        for other in self._backends.values():
            if (
                other is backend
                or other.name in job.avoid
                or not other.eligible()
                or not job.fits(other.name, other.capabilities)
            ):
                continue
            other_backlog, other_mean = other.backlog(now), other.mean_seconds
            if other_backlog is None or not other_mean:
                continue
            capacity += max(0, int((finish - other_backlog) // other_mean))
        if capacity == 0:
            return False
        queued = 0
        for waiting in self._queue:
            if waiting.fits(backend.name, backend.capabilities):
                queued += 1
                if queued > capacity:
                    return False
        return True

    def unroutable(self, job: Job) -> dict[str, list[str]] | None:
        """What each backend lacks for ``job`` when none can ever run it (None while one can, or
        might: a backend whose capabilities are not known yet counts as might)."""
        considered = [
            b for b in self._backends.values() if not b.removed and not b.draining and job.allowed_on(b.name)
        ]
        for backend in considered:
            if backend.capabilities is None or job.fits(backend.name, backend.capabilities):
                return None
        return {b.name: b.capabilities.missing(job.requirements) for b in considered if b.capabilities is not None}
