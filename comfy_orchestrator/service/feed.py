"""The events this process committed lately, so that event sockets need not read back from the
store what it just wrote.

The store hands every committed transaction's events to ``EventFeed.publish`` (``JobStore.watch_events``)
before its writers are answered, so the feed has them before anyone is notified. The feed keeps
only a run of *consecutive* sequence numbers: since ``seq`` is handed out in commit order and never
twice, a run with no gap holds every event in its range, whichever tenant it belongs to. An event
that does not follow the last one (a sibling process, or another writer of the file, committed the
ones between) starts a new run. ``since`` answers from the run when it reaches back to what the
reader already has, and None otherwise: the reader then reads the store, which stays the source of
truth (replays after a reconnect, siblings' events, anything older than the run).
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Collection, Sequence

from comfy_orchestrator.store import EventRecord

__all__ = ["EventFeed"]


class EventFeed:
    def __init__(self, size: int = 4096) -> None:
        self._run: collections.deque[EventRecord] = collections.deque(maxlen=size)

    def publish(self, events: Sequence[EventRecord]) -> None:
        """Events just committed by this process, in ``seq`` order."""
        for event in events:
            if self._run and event.seq != self._run[-1].seq + 1:
                self._run.clear()
            self._run.append(event)

    def since(
        self, tenant: str, after: int, *, job_ids: Collection[str] | None = None, limit: int = 1000
    ) -> tuple[list[EventRecord], int] | None:
        """The tenant's events after ``after`` (of ``job_ids`` only, when given; at most ``limit``)
        and the ``seq`` the answer covers up to: pass that as ``after`` next time, whether or not
        an event of this reader came with it. ``([], after)`` when the run ends at ``after``, and
        None when it does not reach back to ``after + 1`` (read the store)."""
        if not self._run or not self._run[0].seq <= after + 1 <= self._run[-1].seq + 1:
            return None
        found: list[EventRecord] = []
        upto = after
        newer = list(itertools.islice(reversed(self._run), self._run[-1].seq - after))  # readers keep near the end
        for event in reversed(newer):
            upto = event.seq
            if event.tenant == tenant and (job_ids is None or event.job_id in job_ids):
                found.append(event)
                if len(found) >= limit:
                    break
        return found, upto
