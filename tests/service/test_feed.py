"""The event feed: what this process committed lately, handed to event sockets without a read, and
never an answer it cannot vouch for (a gap, a reader behind the run: the store is read)."""

from __future__ import annotations

from datetime import UTC, datetime

from comfy_orchestrator.service.feed import EventFeed
from comfy_orchestrator.store import EventRecord

AT = datetime(2026, 1, 1, tzinfo=UTC)


def ev(seq: int, tenant: str = "acme", job: str = "j1") -> EventRecord:
    return EventRecord(seq, job, tenant, "job.progress", {}, AT)


def seqs(answer: tuple[list[EventRecord], int] | None) -> tuple[list[int], int] | None:
    return None if answer is None else ([e.seq for e in answer[0]], answer[1])


def test_a_run_of_consecutive_events_answers_the_readers_it_reaches() -> None:
    feed = EventFeed()
    assert feed.since("acme", 0) is None  # nothing published: the store knows
    feed.publish([ev(5), ev(6, "other"), ev(7, job="j2")])
    assert seqs(feed.since("acme", 4)) == ([5, 7], 7)
    assert seqs(feed.since("acme", 5)) == ([7], 7)
    assert seqs(feed.since("other", 4)) == ([6], 7)  # covered up to 7 though 7 was not its
    assert seqs(feed.since("acme", 4, job_ids={"j2"})) == ([7], 7)
    assert seqs(feed.since("acme", 7)) == ([], 7)  # the run ends where the reader is
    assert feed.since("acme", 3) is None  # event 4 may be anyone's: read the store
    assert feed.since("acme", 8) is None  # ahead of the run (a sibling's events): read the store


def test_a_gap_starts_a_new_run() -> None:
    feed = EventFeed()
    feed.publish([ev(1), ev(2)])
    feed.publish([ev(4)])  # 3 was committed by someone else
    assert feed.since("acme", 2) is None
    assert seqs(feed.since("acme", 3)) == ([4], 4)
    feed.publish([ev(5)])
    assert seqs(feed.since("acme", 3)) == ([4, 5], 5)


def test_limit_and_the_size_of_the_run() -> None:
    feed = EventFeed(size=3)
    feed.publish([ev(n) for n in range(1, 7)])
    assert feed.since("acme", 2) is None  # 1 to 3 fell off the front
    assert seqs(feed.since("acme", 3, limit=2)) == ([4, 5], 5)
    assert seqs(feed.since("acme", 5, limit=2)) == ([6], 6)
