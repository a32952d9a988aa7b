"""What only the SQLite store has to show: WAL, its schema version, reopening, that a job whose
create returned survives the process being killed, and how concurrent writes are group-committed."""

from __future__ import annotations

import asyncio
import random
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from comfy_orchestrator.store import Claim, JobState, SQLiteJobStore, StoreClosed, StoreError
from comfy_orchestrator.store._sqlite_db import Database
from tests.store.conftest import graph

REPO = Path(__file__).resolve().parents[2]


def _pragma(db: Path, name: str) -> object:
    with sqlite3.connect(db) as conn:
        return conn.execute(f"PRAGMA {name}").fetchone()[0]


async def test_opens_in_wal_mode_with_a_schema_version(tmp_path: Path) -> None:
    async with SQLiteJobStore(tmp_path / "db" / "jobs.db", tmp_path / "out") as store:
        await store.create_job("acme", "graph", graph())
    assert _pragma(tmp_path / "db" / "jobs.db", "journal_mode") == "wal"
    with sqlite3.connect(tmp_path / "db" / "jobs.db") as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(4,)]


async def test_reopening_keeps_everything_and_migrates_nothing(tmp_path: Path) -> None:
    async with SQLiteJobStore(tmp_path / "jobs.db", tmp_path / "out") as store:
        job, _ = await store.create_job("acme", "graph", graph(), idempotency_key="k")
        await store.save_output(job.id, "a.png", b"png")
    async with SQLiteJobStore(tmp_path / "jobs.db", tmp_path / "out") as store:
        assert await store.get_job("acme", job.id) == job
        assert (await store.create_job("acme", "graph", graph(), idempotency_key="k")) == (job, False)
        assert b"".join([c async for c in await store.open_output("acme", job.id, "a.png")]) == b"png"


async def test_a_version_1_file_is_migrated_keeping_its_jobs(tmp_path: Path) -> None:
    async with SQLiteJobStore(tmp_path / "jobs.db", tmp_path / "out") as store:
        job, _ = await store.create_job("acme", "graph", graph())
    with sqlite3.connect(tmp_path / "jobs.db") as conn:  # as the first release left it
        conn.execute("DROP INDEX attempts_running")
        conn.execute("ALTER TABLE jobs DROP COLUMN planned_prompt_id")
        conn.execute("DROP INDEX events_by_job")
        conn.execute("UPDATE schema_version SET version = 1")
    async with SQLiteJobStore(tmp_path / "jobs.db", tmp_path / "out") as store:
        assert await store.get_job("acme", job.id) == job
        assert await store.running_attempts() == {}
        claimed = await store.claim_next("w1", lease_s=30)
        assert claimed is not None
        assert claimed.planned_prompt_id is not None
    with sqlite3.connect(tmp_path / "jobs.db") as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(4,)]
        assert conn.execute("SELECT name FROM sqlite_master WHERE name = 'attempts_running'").fetchall()
        assert conn.execute("SELECT name FROM sqlite_master WHERE name = 'events_by_job'").fetchall()


async def test_a_version_2_file_keeps_its_running_jobs_without_a_plan(tmp_path: Path) -> None:
    async with SQLiteJobStore(tmp_path / "jobs.db", tmp_path / "out") as store:
        job, _ = await store.create_job("acme", "graph", graph())
        claimed = await store.claim_next("w1", lease_s=30)
        assert claimed is not None
        await store.start_attempt(job.id, "gpu-a", "p-1")
    with sqlite3.connect(tmp_path / "jobs.db") as conn:  # as the release before plans left it
        conn.execute("ALTER TABLE jobs DROP COLUMN planned_prompt_id")
        conn.execute("DROP INDEX events_by_job")
        conn.execute("UPDATE schema_version SET version = 2")
    async with SQLiteJobStore(tmp_path / "jobs.db", tmp_path / "out") as store:
        [(running, attempt)] = await store.running_jobs()
        assert running.planned_prompt_id is None
        assert attempt is not None
        assert attempt.prompt_id == "p-1"


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    async with SQLiteJobStore(tmp_path / "jobs.db", tmp_path / "out"):
        pass
    with sqlite3.connect(tmp_path / "jobs.db") as conn:
        conn.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(StoreError, match="schema version 99"):
        async with SQLiteJobStore(tmp_path / "jobs.db", tmp_path / "out"):
            pass


def test_synchronous_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="synchronous"):
        SQLiteJobStore(tmp_path / "jobs.db", tmp_path / "out", synchronous="OFF")  # type: ignore[arg-type]


@pytest.mark.parametrize("synchronous", ["FULL", "NORMAL"])
async def test_every_created_job_survives_a_sigkill(tmp_path: Path, synchronous: str) -> None:
    """A child creates 200 jobs, printing each id once create_job returned; it is SIGKILLed at a
    random point, three times over. Every printed id must be in the reopened database (at most one
    more job may have committed without its id being printed)."""
    db, printed = tmp_path / "jobs.db", []
    rng = random.Random(20240601)
    for round_ in range(3):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.store._kill_writer", str(db), str(tmp_path / "out"), "200",
            str(round_ * 1000), synchronous, cwd=REPO, stdout=asyncio.subprocess.PIPE)
        assert proc.stdout is not None
        kill_after = rng.randrange(5, 150)
        seen = 0
        async with asyncio.timeout(60):
            while seen < kill_after:
                line = await proc.stdout.readline()
                assert line.endswith(b"\n"), "the writer ended before it was killed"
                printed.append(line.decode().strip())
                seen += 1
            proc.send_signal(signal.SIGKILL)
            rest = await proc.stdout.read()
            await proc.wait()
        assert proc.returncode == -signal.SIGKILL
        printed += [line.decode() for line in rest.split(b"\n")[:-1]]  # only whole lines: fully printed
    async with SQLiteJobStore(db, tmp_path / "out") as store:
        for job_id in printed:
            job = await store.get_job("acme", job_id)
            assert job is not None, job_id
            assert job.state is JobState.QUEUED
        stored = (await store.list_jobs("acme", limit=1000)).items
    assert len(printed) <= len(stored) <= len(printed) + 3
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)


# -- group commit ---------------------------------------------------------------------------------


async def test_concurrent_creates_share_commits_and_each_is_durable(tmp_path: Path) -> None:
    async with SQLiteJobStore(tmp_path / "jobs.db", tmp_path / "out") as store:
        before = store.commits
        results = await asyncio.gather(*(store.create_job("acme", "graph", graph(i)) for i in range(100)))
        commits = store.commits - before
        assert all(created for _, created in results)
        assert 1 <= commits < 100  # the first went alone; the rest waited for it and went together
    with sqlite3.connect(tmp_path / "jobs.db") as conn:  # another connection: they are all on disk
        ids = {row[0] for row in conn.execute("SELECT id FROM jobs")}
        queued = {row[0] for row in conn.execute("SELECT job_id FROM events WHERE type = 'job.queued'")}
    assert ids == queued == {job.id for job, _ in results}


async def test_a_failing_write_is_rolled_back_alone(tmp_path: Path) -> None:
    """Writes batched into one transaction: the ones that raise leave nothing behind and get their
    error; their batch mates commit."""
    async with SQLiteJobStore(tmp_path / "jobs.db", tmp_path / "out") as store:
        first, _ = await store.create_job("acme", "graph", graph(0), idempotency_key="k")
        done, _ = await store.create_job("acme", "graph", graph(1))
        assert await store.claim_next("w", lease_s=60) is not None  # `first`
        assert await store.claim_next("w", lease_s=60) is not None  # `done`
        assert await store.complete_job(done.id, {})
        before = store.commits
        results = await asyncio.gather(
            store.create_job("acme", "graph", graph(2)),
            store.create_job("acme", "graph", graph(3), idempotency_key="k"),  # another body: conflict
            store.start_attempt(done.id, "gpu-0", "p-late"),  # the job ended: JobNotRunning
            store.create_job("acme", "graph", graph(4)),
            store.save_output(done.id, "late.png", b"late"),  # JobNotRunning
            store.start_attempt(first.id, "gpu-0", "p-1"),
            return_exceptions=True,
        )
        assert store.commits - before < len(results)  # some shared a transaction
        assert [type(r).__name__ for r in results] == [
            "tuple", "IdempotencyConflict", "JobNotRunning", "tuple", "JobNotRunning", "AttemptRecord"]
        listed = {j.id for j in (await store.list_jobs("acme", limit=100)).items}
        assert listed == {first.id, done.id, results[0][0].id, results[3][0].id}  # type: ignore[index]
        assert [a.prompt_id for a in await store.list_attempts(first.id)] == ["p-1"]
        assert await store.list_attempts(done.id) == []
        assert await store.list_outputs("acme", done.id) == []


async def test_what_a_failing_write_did_is_undone_but_its_batch_commits(tmp_path: Path) -> None:
    db = Database(tmp_path / "jobs.db", synchronous="FULL", busy_timeout=5)
    await db.open()
    try:
        await db.write(lambda conn: conn.execute("CREATE TABLE marks (name TEXT)"))

        def mark(name: str, fail: bool = False) -> Callable[[sqlite3.Connection], object]:
            def op(conn: sqlite3.Connection) -> object:
                conn.execute("INSERT INTO marks VALUES (?)", (name,))
                if fail:
                    raise ValueError(f"{name} failed after writing")
                return name
            return op

        before = db.commits
        results = await asyncio.gather(
            db.write(mark("a")), db.write(mark("b")), db.write(mark("c", fail=True)), db.write(mark("d")),
            return_exceptions=True)
        assert list(results[:2]) == ["a", "b"]
        assert results[3] == "d"
        assert isinstance(results[2], ValueError)
        # "a" alone and "b", "c", "d" together, or all four (they came before "a" took the lock)
        assert 1 <= db.commits - before <= 2
        assert sorted(tuple(r) for r in await db.fetch("SELECT name FROM marks")) == [("a",), ("b",), ("d",)]
    finally:
        await db.close()


async def test_a_write_cancelled_before_its_turn_never_runs(tmp_path: Path) -> None:
    db = Database(tmp_path / "jobs.db", synchronous="FULL", busy_timeout=5)
    await db.open()
    try:
        release = threading.Event()

        def slow(conn: sqlite3.Connection) -> None:  # holds the writer thread until released
            release.wait(30)
            conn.execute("CREATE TABLE marks (name TEXT)")

        def mark(name: str) -> Callable[[sqlite3.Connection], object]:
            return lambda conn: conn.execute("INSERT INTO marks VALUES (?)", (name,))

        first = asyncio.create_task(db.write(slow))
        await asyncio.sleep(0)  # `slow` is on the thread now; the next ones queue behind it
        cancelled = asyncio.create_task(db.write(mark("cancelled")))
        kept = asyncio.create_task(db.write(mark("kept")))
        await asyncio.sleep(0)
        cancelled.cancel()
        release.set()
        await first
        await kept
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert [tuple(row) for row in await db.fetch("SELECT name FROM marks")] == [("kept",)]
    finally:
        await db.close()


async def test_closing_lets_queued_writes_commit_then_refuses(tmp_path: Path) -> None:
    store = SQLiteJobStore(tmp_path / "jobs.db", tmp_path / "out")
    await store.open()
    creating = [asyncio.create_task(store.create_job("acme", "graph", graph(i))) for i in range(20)]
    await asyncio.sleep(0)  # all queued
    await store.close()
    created = [(await task)[0] for task in creating]
    with pytest.raises(StoreClosed):
        await store.create_job("acme", "graph", graph(99))
    async with SQLiteJobStore(tmp_path / "jobs.db", tmp_path / "out") as reopened:
        for job in created:
            assert await reopened.get_job("acme", job.id) == job


async def test_watchers_never_see_an_event_whose_operation_was_rolled_back(tmp_path: Path) -> None:
    from comfy_orchestrator.store import _sqlite_ops as ops

    async with SQLiteJobStore(tmp_path / "jobs.db", tmp_path / "out") as store:
        batches: list[list[str]] = []
        store.watch_events(lambda events: batches.append([e.type for e in events]))
        job, _ = await store.create_job("acme", "graph", graph())

        def fails(db: sqlite3.Connection) -> None:
            ops.event(db, job.id, "acme", "job.doomed", {}, 0)
            raise RuntimeError("rolled back to its savepoint")

        blocker = asyncio.ensure_future(store.append_event(job.id, "job.first"))  # the lane is busy…
        results = await asyncio.gather(store.append_event(job.id, "job.before"), store._db.write(fails),
                                       store.append_event(job.id, "job.after"), return_exceptions=True)
        await blocker
        assert isinstance(results[1], RuntimeError)
        assert batches[0] == ["job.queued"]
        assert batches[-1][-2:] == ["job.before", "job.after"]  # …so these three shared a commit
        assert [t for batch in batches[1:] for t in batch] == ["job.first", "job.before", "job.after"]
        assert [e.type for e in await store.events_since("acme", 0)] == ["job.queued", "job.first", "job.before",
                                                                          "job.after"]


async def test_writes_that_come_while_another_process_holds_the_lock_share_one_commit(tmp_path: Path) -> None:
    import fcntl
    import os

    async with SQLiteJobStore(tmp_path / "jobs.db", tmp_path / "out") as store:
        job, _ = await store.create_job("acme", "graph", graph())
        other = os.open(f"{tmp_path / 'jobs.db'}.writelock", os.O_RDWR)  # another process's turn
        fcntl.flock(other, fcntl.LOCK_EX)
        try:
            before = store.commits
            first = asyncio.ensure_future(store.append_event(job.id, "job.progress", {"n": 0}))
            await asyncio.sleep(0.1)  # its batch is cut, and waits for the lock
            rest = [asyncio.ensure_future(store.append_event(job.id, "job.progress", {"n": n})) for n in range(1, 6)]
            await asyncio.sleep(0.1)
            assert not first.done()
        finally:
            fcntl.flock(other, fcntl.LOCK_UN)
            os.close(other)
        events = await asyncio.gather(first, *rest)
        assert [e.data["n"] for e in events] == list(range(6))
        assert [e.seq for e in events] == list(range(events[0].seq, events[0].seq + 6))
        assert store.commits == before + 1  # the five that came while it waited joined its commit


async def test_a_deletion_that_rolls_back_puts_the_content_back(tmp_path: Path) -> None:
    """The files a deleting transaction stops naming are moved aside in it; when it fails after
    that, they are back at their addresses and the job reads them as before."""
    async with SQLiteJobStore(tmp_path / "jobs.db", tmp_path / "out") as store:
        job, _ = await store.create_job("acme", "graph", graph(), claim=Claim("w", 30))
        output = await store.stage_output(job.id, "9/a.png", b"kept after all")
        assert await store.complete_job(job.id, {}, [output])

        def delete_then_fail(db: sqlite3.Connection, retire: Callable[[list[str]], None]) -> None:
            db.execute("DELETE FROM outputs WHERE job_id = ?", (job.id,))
            retire([output.sha256])
            assert not output.path.exists()  # moved aside inside the transaction
            raise RuntimeError("the transaction fails after the files moved")

        with pytest.raises(RuntimeError, match="after the files moved"):
            await store._deleting(delete_then_fail)
        assert b"".join([c async for c in await store.open_output("acme", job.id, "9/a.png")]) == b"kept after all"
        assert sorted((tmp_path / "out").glob(".tmp/*/*")) == []  # nothing left aside


async def test_a_deletion_whose_caller_is_cancelled_twice_still_puts_the_content_back(tmp_path: Path) -> None:
    store = SQLiteJobStore(tmp_path / "jobs.db", tmp_path / "out")
    await store.open()
    job, _ = await store.create_job("acme", "graph", graph(), claim=Claim("w", 30))
    output = await store.stage_output(job.id, "9/a.png", b"still named")
    assert await store.complete_job(job.id, {}, [output])
    retired = threading.Event()

    def retire_then_fail(db: sqlite3.Connection, retire: Callable[[list[str]], None]) -> None:
        retire([output.sha256])
        retired.set()
        time.sleep(0.3)  # the caller is cancelled meanwhile, twice
        raise RuntimeError("rolled back")

    deleting = asyncio.create_task(store._deleting(retire_then_fail))
    assert await asyncio.to_thread(retired.wait, 5)
    deleting.cancel()
    await asyncio.sleep(0.05)
    deleting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await deleting
    await store.close()  # waits until the files followed the transaction
    assert output.path.read_bytes() == b"still named"


_DIES_WHILE_DELETING = """
import os, sys
from comfy_orchestrator.store import BlobStore
BlobStore(sys.argv[1]).retire([sys.argv[2]])  # moved aside, and the process dies before any commit
os._exit(0)
"""


async def test_content_a_dead_process_had_moved_aside_goes_back_to_its_address(tmp_path: Path) -> None:
    """Its transaction may never have committed: the sweep of its folder puts the bytes back."""
    async with SQLiteJobStore(tmp_path / "jobs.db", tmp_path / "out") as store:
        job, _ = await store.create_job("acme", "graph", graph(), claim=Claim("w", 30))
        output = await store.stage_output(job.id, "9/a.png", b"named still")
        assert await store.complete_job(job.id, {}, [output])
        died = await asyncio.create_subprocess_exec(sys.executable, "-c", _DIES_WHILE_DELETING,
                                                    str(tmp_path / "out"), output.sha256)
        assert await died.wait() == 0
        assert not output.path.exists()
    async with SQLiteJobStore(tmp_path / "jobs.db", tmp_path / "out") as store:
        await store.stage_output(job.id, "9/b.png", b"x")  # this handle's first temporary file sweeps
        assert b"".join([c async for c in await store.open_output("acme", job.id, "9/a.png")]) == b"named still"
