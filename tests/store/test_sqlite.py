"""What only the SQLite store has to show: WAL, its schema version, reopening, and that a job whose
create returned survives the process being killed."""

from __future__ import annotations

import asyncio
import random
import signal
import sqlite3
import sys
from pathlib import Path

import pytest

from comfy_orchestrator.store import JobState, SQLiteJobStore, StoreError
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
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(1,)]


async def test_reopening_keeps_everything_and_migrates_nothing(tmp_path: Path) -> None:
    async with SQLiteJobStore(tmp_path / "jobs.db", tmp_path / "out") as store:
        job, _ = await store.create_job("acme", "graph", graph(), idempotency_key="k")
        await store.save_output(job.id, "a.png", b"png")
    async with SQLiteJobStore(tmp_path / "jobs.db", tmp_path / "out") as store:
        assert await store.get_job("acme", job.id) == job
        assert (await store.create_job("acme", "graph", graph(), idempotency_key="k")) == (job, False)
        assert b"".join([c async for c in await store.open_output("acme", job.id, "a.png")]) == b"png"


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
