"""Retention: ended jobs older than ``[store] keep_days`` are deleted with their attempts, events and
output files (``JobStore.prune``), and the pipeline cache's entries unused as long (``DiskCache.prune``),
at start-up and then every hour, in transactions of a few hundred
jobs so that other writes go in between. One process of a multi-process service does it (process 0);
the store makes each deletion safe whoever runs it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from comfy_orchestrator.pipelines.cache import DiskCache
from comfy_orchestrator.store import JobStore

__all__ = ["prune_forever", "prune_once"]

log = logging.getLogger(__name__)

_BATCH = 500
_EVERY_S = 3600.0


async def prune_once(store: JobStore, keep: timedelta, *, cache: DiskCache | None = None,
                     clock: Callable[[], float] = time.time, batch: int = _BATCH) -> int:
    """Delete every ended job created more than ``keep`` ago, and the pipeline ``cache``'s entries
    unused for as long; how many jobs went."""
    cutoff = datetime.fromtimestamp(clock(), UTC) - keep
    total = 0
    while (deleted := await store.prune(cutoff, limit=batch)) > 0:
        total += deleted
        if deleted < batch:
            break
    entries = 0 if cache is None else await asyncio.to_thread(cache.prune, cutoff.timestamp())
    if total or entries:
        log.info("retention: deleted %d ended jobs created before %s and %d pipeline cache entries unused since",
                 total, cutoff.isoformat(timespec="seconds"), entries)
    return total


async def prune_forever(store: JobStore, keep: timedelta, *, cache: DiskCache | None = None,
                        every_s: float = _EVERY_S, clock: Callable[[], float] = time.time) -> None:
    """``prune_once`` now and every ``every_s`` seconds until cancelled; a store error is logged and
    the next round tries again."""
    while True:
        try:
            await prune_once(store, keep, cache=cache, clock=clock)
        except Exception:  # a locked or full disk, a bug: logged, and the next round tries again
            log.exception("retention: this round failed, trying again in %.0f s", every_s)
        await asyncio.sleep(every_s)
