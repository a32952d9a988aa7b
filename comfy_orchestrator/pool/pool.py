"""``Pool``: several ComfyUI servers behind one ``run``.

    async with Pool([BackendConfig("a", "http://gpu-a:8188"), BackendConfig("b", "http://gpu-b:8188")]) as pool:
        result = await pool.run(graph, timeout=600, on_event=print)
        png = await pool.download(result, result.result.output_images[0])

A job goes to a backend that has every node class and model file its graph names; an idle backend
pulls the next job it can run (see ``dispatch``); a job whose backend dies, refuses, answers 5xx or
hangs is resubmitted elsewhere (see ``runner``). Background work (health checks, jobs given to
``submit``) is owned by the pool and cancelled on close: the pool may be opened in one task and closed
in another (a service's start-up and clean-up hooks), which an ``asyncio.TaskGroup`` does not allow.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any

from comfy_orchestrator.client import GraphLike
from comfy_orchestrator.errors import BackendUnavailable, ComfyOrchestratorError, JobCancelled
from comfy_orchestrator.pool.backend import Backend, BackendStatus
from comfy_orchestrator.pool.config import BackendConfig, PoolSettings
from comfy_orchestrator.pool.dispatch import Dispatcher
from comfy_orchestrator.pool.events import EventHub, Listener, PoolEvent
from comfy_orchestrator.pool.jobs import Job, PoolResult
from comfy_orchestrator.pool.routing import NoCapableBackend
from comfy_orchestrator.pool.runner import JobRunner
from comfy_orchestrator.pool.stats import PoolStats, StatsRecorder
from comfy_orchestrator.protocol import FileRef

__all__ = ["Pool", "PoolClosed"]

log = logging.getLogger(__name__)

EventCallback = Callable[[PoolEvent], Any]


class PoolClosed(ComfyOrchestratorError, RuntimeError):
    """The pool was used after close (or before it was opened)."""


class Pool:
    """A pool of ComfyUI backends; an async context manager (``start`` / ``close``)."""

    def __init__(self, backends: Iterable[BackendConfig] = (), settings: PoolSettings | None = None) -> None:
        self.settings = settings or PoolSettings()
        self._initial = list(backends)
        names = [c.name for c in self._initial]
        if len(set(names)) != len(names):
            raise ValueError(f"backend names must be unique, got {names}")
        self._backends: dict[str, Backend] = {}
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._jobs: dict[str, Job] = {}  # not finished
        self._finished: OrderedDict[str, Job] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        self._dispatcher = Dispatcher(self._backends)
        self._hub = EventHub()
        self._stats = StatsRecorder()
        self._runner = JobRunner(self.settings, self._dispatcher, self._hub, self._stats, self._spawn)
        self._started = False
        self._closed = False

    # -- life cycle ----------------------------------------------------------------------------------

    async def __aenter__(self) -> Pool:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Probe every configured backend once (one that does not answer starts down and keeps being
        probed) and start the health checks."""
        if self._started:
            raise RuntimeError("the pool is already started")
        self._started = True
        await asyncio.gather(*(self.add_backend(config) for config in self._initial))

    async def close(self) -> None:
        """Cancel the jobs still queued or running (their prompts are taken off the servers), stop the
        health checks and close every client. Await ``result`` / ``run`` first to let jobs finish."""
        if self._closed:
            return
        self._closed = True
        for job in list(self._jobs.values()):
            self._cancel_task(job)
        await asyncio.gather(*(job.finished.wait() for job in list(self._jobs.values())))
        for task in [*self._watchers.values(), *self._tasks]:
            task.cancel()
        await asyncio.gather(*self._watchers.values(), *self._tasks, return_exceptions=True)
        await asyncio.gather(*(b.close() for b in self._backends.values()))
        self._dispatcher.close()
        self._hub.close()

    def _check_open(self) -> None:
        if self._closed or not self._started:
            raise PoolClosed("the pool is closed" if self._closed else "the pool is not started (use `async with`)")

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- backends ------------------------------------------------------------------------------------

    async def add_backend(self, config: BackendConfig) -> None:
        """Add a backend and probe it once; it takes jobs as soon as it is up."""
        self._check_open()
        if config.name in self._backends:
            raise ValueError(f"the pool already has a backend named {config.name!r}")
        backend = Backend(config, self.settings)
        self._backends[config.name] = backend
        await backend.probe()
        if backend.removed:  # removed while probing
            return
        self._watchers[config.name] = asyncio.get_running_loop().create_task(
            self._watch(backend), name=f"pool-health:{config.name}"
        )
        self._changed()

    async def drain(self, name: str) -> None:
        """Give ``name`` no new job and wait until its running jobs are done. Queued jobs that only it
        could run fail with NoCapableBackend."""
        backend = self._backend(name)
        backend.draining = True
        self._changed()
        await backend.idle.wait()

    async def resume(self, name: str) -> None:
        """Let a drained (or draining) backend take jobs again."""
        self._backend(name).draining = False
        self._changed()

    async def remove_backend(self, name: str) -> None:
        """Drain ``name`` (waiting for its running jobs), then stop watching it and close its client."""
        await self.drain(name)
        backend = self._backends.pop(name, None)
        if backend is None:
            return
        watcher = self._watchers.pop(name, None)
        if watcher is not None:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        await backend.close()
        self._changed()

    def backends(self) -> list[BackendStatus]:
        return [backend.status() for backend in self._backends.values()]

    def _backend(self, name: str) -> Backend:
        try:
            return self._backends[name]
        except KeyError:
            raise KeyError(f"no backend named {name!r} (known: {', '.join(self._backends) or 'none'})") from None

    async def _watch(self, backend: Backend) -> None:
        while True:
            await asyncio.sleep(self.settings.health_interval)
            await backend.probe()
            self._changed()

    def _changed(self) -> None:
        """Backends changed (health, capabilities, draining, removal): fail queued jobs nothing can
        run any more, then let free slots pull."""
        for job in self._dispatcher.queued:
            missing = self._unroutable(job)
            if missing is not None:
                self._dispatcher.fail(job, NoCapableBackend(missing, job_id=job.id))
        self._dispatcher.pump()

    def _unroutable(self, job: Job) -> dict[str, list[str]] | None:
        missing = self._dispatcher.unroutable(job)
        if missing is not None and job.backends is not None:
            missing.update({name: ["not in the pool"] for name in sorted(job.backends - set(self._backends))})
        return missing

    # -- jobs ----------------------------------------------------------------------------------------

    async def submit(
        self,
        graph: GraphLike,
        *,
        job_id: str | None = None,
        uploads: Mapping[str, bytes] | None = None,
        timeout: float | None = None,
        backends: Sequence[str] | None = None,
        on_event: EventCallback | None = None,
        labels: Mapping[str, str] | None = None,
        prompt_id: str | None = None,
    ) -> str:
        """Queue a job and return its id at once; it runs in the background (see :meth:`run`, which
        also says what ``prompt_id`` does). Raises NoCapableBackend when no backend can run the graph."""
        self._check_open()
        job_id = job_id or uuid.uuid4().hex
        if job_id in self._jobs:
            raise ValueError(f"a job with id {job_id!r} is already running")
        job = Job.create(job_id, graph, uploads=uploads, timeout=timeout, backends=backends, on_event=on_event,
                         labels=labels, prompt_id=prompt_id)
        self._finished.pop(job_id, None)
        missing = self._unroutable(job)
        if missing is not None:
            raise NoCapableBackend(missing, job_id=job.id)
        self._jobs[job.id] = job
        job.task = asyncio.get_running_loop().create_task(self._runner.run(job), name=f"pool-job:{job.id}")
        job.task.add_done_callback(lambda _: self._job_ended(job))
        return job.id

    async def run(
        self,
        graph: GraphLike,
        *,
        job_id: str | None = None,
        uploads: Mapping[str, bytes] | None = None,
        timeout: float | None = None,
        backends: Sequence[str] | None = None,
        on_event: EventCallback | None = None,
        labels: Mapping[str, str] | None = None,
        prompt_id: str | None = None,
    ) -> PoolResult:
        """Run ``graph`` on a capable backend and return its result.

        ``uploads`` (input file name -> bytes) are uploaded to the chosen backend first (once per
        backend and content) and the graph's LoadImage inputs naming them are pointed at the stored
        names. ``timeout`` bounds the whole job, queueing and retries included. ``backends`` restricts
        it to these names. ``on_event`` gets every event of this job (may be async).

        An async ``on_event`` is awaited on ``dispatched`` before the attempt's prompt is submitted,
        so it can store the prompt id first, or raise JobCancelled to have it never submitted. With
        ``prompt_id``, the first attempt's prompt is submitted under that id, which the caller
        already knows: its ``dispatched`` listener then runs *beside* the submission, and its
        JobCancelled takes the prompt back off the backend (at once, and again two seconds later
        in case the server queued it only after the first take-off). Later attempts draw their own
        ids.

        Raises NoCapableBackend, GraphValidationError or ExecutionFailed (as from the client; an
        out-of-memory error only after its retry), BackendUnavailable when the attempts are spent,
        DeadlineExceeded after ``timeout``, JobCancelled when cancelled. Cancelling the awaiting task
        cancels the job.
        """
        job_id = await self.submit(graph, job_id=job_id, uploads=uploads, timeout=timeout, backends=backends,
                                   on_event=on_event, labels=labels, prompt_id=prompt_id)
        self._jobs[job_id].keep_result = False  # run() reads it here; kept, it would crowd out submit()'s
        try:
            return await self.result(job_id)
        except asyncio.CancelledError:
            if job_id in self._jobs:  # not kept once it ended
                await asyncio.shield(self.cancel(job_id))
            raise

    async def result(self, job_id: str) -> PoolResult:
        """Wait for a job and return its result, or raise what it ended with."""
        job = self._job(job_id)
        await job.finished.wait()
        return job.outcome()

    async def cancel(self, job_id: str) -> None:
        """Cancel a job: taken off the queue, or its prompt interrupted and dequeued on its backend
        (that prompt only). Returns once the job has ended (a no-op for a finished job)."""
        job = self._job(job_id)
        if not job.finished.is_set():
            self._cancel_task(job)
            await job.finished.wait()

    async def cancel_all(self, labels: Mapping[str, str] | None = None) -> int:
        """Cancel every unfinished job (whose labels include all of ``labels``); returns how many."""
        chosen = [job for job in list(self._jobs.values()) if job.matches(labels)]
        await asyncio.gather(*(self.cancel(job.id) for job in chosen))
        return len(chosen)

    def jobs(self, labels: Mapping[str, str] | None = None) -> list[str]:
        """Ids of the unfinished jobs (whose labels include all of ``labels``), oldest first."""
        return [job.id for job in self._jobs.values() if job.matches(labels)]

    async def download(self, result: PoolResult, ref: FileRef) -> bytes:
        """A file a job produced, from the backend that produced it."""
        backend = self._backends.get(result.backend)
        if backend is None:
            raise BackendUnavailable(f"backend {result.backend!r} left the pool; its files are out of reach")
        return await backend.client.download(ref)

    def _job_ended(self, job: Job) -> None:
        self._jobs.pop(job.id, None)
        if job.keep_result:
            self._finished[job.id] = job
            while len(self._finished) > self.settings.keep_finished:
                self._finished.popitem(last=False)
        if not job.finished.is_set():  # cancelled before its task took its first step
            job.finish(None, JobCancelled(f"job {job.id} was cancelled"))

    def _job(self, job_id: str) -> Job:
        job = self._jobs.get(job_id) or self._finished.get(job_id)
        if job is None:
            raise KeyError(f"no job {job_id!r} in this pool (unknown, or finished long ago)")
        return job

    @staticmethod
    def _cancel_task(job: Job) -> None:
        job.cancel_requested = True
        if job.task is not None:
            job.task.cancel()

    # -- events and statistics ---------------------------------------------------------------------------

    def add_listener(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener(event)`` (synchronously, in order) for every event of every job; returns the
        function that removes it."""
        return self._hub.add(listener)

    def subscribe(self) -> AsyncIterator[PoolEvent]:
        """Every event of every job from now on, as an async iterator that ends when the pool closes::

            async for event in pool.subscribe(): ...
        """
        return self._hub.stream()

    def stats(self) -> PoolStats:
        return self._stats.snapshot()
