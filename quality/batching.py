"""Dynamic batching across concurrent callers, on one worker thread that owns the model work.

Callers (any thread, any event loop) submit items; the worker gathers them into a batch of up to
``max_batch`` units, runs the batch function once, and resolves each caller's future. The model thus
runs on one thread, off every event loop, and many pipelines scoring at once share it.

An item may stand for several units (``size``): an evaluator submits a caller's images as one item of
``len(images)`` units, so they reach the model as one batch. The worker packs whole items, first come
first served, never splitting one: items merge across callers, a caller's images are never spread
over several small batches (a caller with more than ``max_batch`` images submits chunks of
``max_batch``).

How long the worker waits for a batch to fill: a caller that knows more units are coming (an
evaluator whose images are still being decoded) *reserves* them first, and the worker waits for
reserved units as long as they keep arriving, at most ``max_wait_ms`` after the last one, until
``max_batch`` are there. Nothing reserved, nothing to wait for: a lone request runs at once
instead of paying the wait. Under load batches also grow by themselves: while one batch runs, new
requests queue up and form the next.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Generic, TypeVar

from quality.errors import EvaluatorClosed

__all__ = ["BatchStats", "DynamicBatcher", "Reservation"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


@dataclass(slots=True)
class BatchStats:
    """Counters of what the worker did (for tests and metrics); ``items`` and batch sizes count units."""

    batches: int = 0
    items: int = 0
    largest_batch: int = 0
    busy_seconds: float = 0.0

    @property
    def mean_batch(self) -> float:
        return self.items / self.batches if self.batches else 0.0


class Reservation(Generic[T, R]):
    """Units a caller announced: the worker waits for them (each up to ``max_wait_ms``) to fill a batch.

    Submit each through :meth:`submit`; :meth:`release` gives back what will not come (an image that
    failed its checks). Closing it (or leaving its ``with`` block) releases whatever is left.
    Thread-safe: decode threads submit and release on one reservation together.
    """

    def __init__(self, batcher: DynamicBatcher[T, R], count: int) -> None:
        self._batcher = batcher
        self._left = count

    def submit(self, item: T, size: int = 1) -> Future[R]:
        """Submit ``item`` standing for ``size`` of the reserved units."""
        with self._batcher._cond:
            reserved = min(size, self._left)
            self._left -= reserved
        return self._batcher._put(item, size=size, reserved=reserved)

    def release(self, count: int = 1) -> None:
        with self._batcher._cond:
            count = min(count, self._left)
            if count <= 0:
                return
            self._left -= count
        self._batcher._unreserve(count)

    def close(self) -> None:
        self.release(1 << 30)

    def __enter__(self) -> Reservation[T, R]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DynamicBatcher(Generic[T, R]):
    """Runs ``run_batch(items) -> results`` (same length, same order) on batches of submitted items,
    each batch at most ``max_batch`` units (an item larger than that runs alone).

    An exception from ``run_batch`` fails every future of that batch; the worker goes on. A future
    cancelled before its batch starts is left out of it. :meth:`close` stops accepting work, finishes
    what was submitted, and joins the worker.
    """

    def __init__(
        self,
        run_batch: Callable[[Sequence[T]], Sequence[R]],
        *,
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        name: str = "quality-batcher",
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if max_wait_ms < 0:
            raise ValueError("max_wait_ms must not be negative")
        self._run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.name = name
        self.stats = BatchStats()
        self._cond = threading.Condition()
        self._items: deque[tuple[T, Future[R], int]] = deque()
        self._queued = 0  # units in _items
        self._reserved = 0
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    @property
    def closed(self) -> bool:
        return self._closed

    def reserve(self, count: int) -> Reservation[T, R]:
        """Announce ``count`` units about to be submitted, so a batch waits for them to fill."""
        with self._cond:
            if self._closed:
                raise EvaluatorClosed(f"{self.name} is closed")
            self._reserved += count
        return Reservation(self, count)

    def _unreserve(self, count: int) -> None:
        with self._cond:
            self._reserved -= count
            self._cond.notify_all()

    def _put(self, item: T, *, size: int, reserved: int) -> Future[R]:
        if size < 1:
            raise ValueError("an item's size must be at least 1")
        fut: Future[R] = Future()
        with self._cond:
            self._reserved -= reserved
            if self._closed:
                raise EvaluatorClosed(f"{self.name} is closed")
            self._items.append((item, fut, size))
            self._queued += size
            self._cond.notify_all()
        return fut

    def submit(self, item: T, size: int = 1) -> Future[R]:
        """Queue ``item`` (``size`` units); the returned future resolves when its batch has run."""
        return self._put(item, size=size, reserved=0)

    async def run(self, item: T) -> R:
        """Submit ``item`` and await its result without blocking the event loop."""
        return await asyncio.wrap_future(self.submit(item))

    async def run_many(self, items: Sequence[T]) -> list[R]:
        """Submit every item at once (so they share a batch) and await all results, in order."""
        futures = [asyncio.wrap_future(self.submit(item)) for item in items]
        try:
            return list(await asyncio.gather(*futures))
        except BaseException:
            for f in futures:
                f.cancel()
            raise

    def close(self, *, wait: bool = True) -> None:
        """Stop accepting work; the worker finishes what is queued, then exits."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if wait and threading.current_thread() is not self._thread:
            self._thread.join()

    def _next_batch(self) -> list[tuple[T, Future[R], int]] | None:
        with self._cond:
            while not self._items:
                if self._closed:
                    return None
                self._cond.wait()
            # Wait for reserved units while they keep coming: at most max_wait after the last arrival.
            deadline = time.monotonic() + self.max_wait
            seen = self._queued
            while self._queued < self.max_batch and self._reserved > 0 and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
                if self._queued > seen:
                    seen = self._queued
                    deadline = time.monotonic() + self.max_wait
            # Whole items, in order, while they fit (the first one always goes).
            batch = [self._items.popleft()]
            units = batch[0][2]
            while self._items and units + self._items[0][2] <= self.max_batch:
                batch.append(self._items.popleft())
                units += batch[-1][2]
            self._queued -= units
            return batch

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            live = [(item, fut, size) for item, fut, size in batch if fut.set_running_or_notify_cancel()]
            if not live:
                continue
            started = time.perf_counter()
            outcome: Sequence[R] | BaseException
            try:
                outcome = self._run_batch([item for item, _, _ in live])
                if len(outcome) != len(live):
                    raise RuntimeError(f"batch function returned {len(outcome)} results for {len(live)} items")
            except BaseException as exc:  # handed to every waiting caller; the worker goes on
                logger.debug("%s: batch of %d failed: %r", self.name, len(live), exc)
                outcome = exc
            # Counters first, so a caller woken by its result already sees its batch counted.
            units = sum(size for _, _, size in live)
            self.stats.batches += 1
            self.stats.items += units
            self.stats.largest_batch = max(self.stats.largest_batch, units)
            self.stats.busy_seconds += time.perf_counter() - started
            if isinstance(outcome, BaseException):
                for _, fut, _ in live:
                    fut.set_exception(outcome)
            else:
                for (_, fut, _), result in zip(live, outcome, strict=True):
                    fut.set_result(result)
