"""The SQLite store's database: one connection used one transaction at a time, and the schema as
numbered migrations applied on open (``schema_version`` says where a file is). Times are integer
microseconds since the epoch; JSON is stored as text."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import aiosqlite

from comfy_orchestrator.store.errors import StoreClosed, StoreError

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "Database", "connect", "migrate"]

log = logging.getLogger(__name__)

_V1 = (
    """CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        kind TEXT NOT NULL,
        spec TEXT NOT NULL,
        state TEXT NOT NULL,
        created_us INTEGER NOT NULL,
        updated_us INTEGER NOT NULL,
        body_hash TEXT NOT NULL,
        idempotency_key TEXT,
        labels TEXT NOT NULL,
        result TEXT,
        error TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        lease_owner TEXT,
        lease_until_us INTEGER
    )""",
    "CREATE UNIQUE INDEX jobs_idempotency ON jobs (tenant, idempotency_key) WHERE idempotency_key IS NOT NULL",
    "CREATE INDEX jobs_by_tenant ON jobs (tenant, created_us, id)",
    "CREATE INDEX jobs_by_state ON jobs (state, created_us, id)",
    "CREATE INDEX jobs_active ON jobs (tenant, state)",
    """CREATE TABLE job_labels (
        job_id TEXT NOT NULL REFERENCES jobs (id),
        key TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (job_id, key)
    )""",
    "CREATE INDEX job_labels_by_value ON job_labels (key, value)",
    """CREATE TABLE attempts (
        job_id TEXT NOT NULL REFERENCES jobs (id),
        n INTEGER NOT NULL,
        backend TEXT NOT NULL,
        prompt_id TEXT NOT NULL,
        state TEXT NOT NULL,
        started_us INTEGER NOT NULL,
        ended_us INTEGER,
        error TEXT,
        step TEXT,
        PRIMARY KEY (job_id, n)
    )""",
    "CREATE INDEX attempts_by_prompt ON attempts (prompt_id)",
    """CREATE TABLE steps (
        job_id TEXT NOT NULL REFERENCES jobs (id),
        name TEXT NOT NULL,
        state TEXT NOT NULL,
        updated_us INTEGER NOT NULL,
        outputs TEXT NOT NULL,
        data TEXT NOT NULL,
        PRIMARY KEY (job_id, name)
    )""",
    # AUTOINCREMENT: a sequence number is never handed out twice, even after old events are pruned.
    """CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id TEXT NOT NULL,
        tenant TEXT NOT NULL,
        type TEXT NOT NULL,
        data TEXT NOT NULL,
        at_us INTEGER NOT NULL
    )""",
    "CREATE INDEX events_by_tenant ON events (tenant, seq)",
    """CREATE TABLE outputs (
        job_id TEXT NOT NULL REFERENCES jobs (id),
        name TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        size INTEGER NOT NULL,
        content_type TEXT NOT NULL,
        created_us INTEGER NOT NULL,
        PRIMARY KEY (job_id, name)
    )""",
    "CREATE INDEX outputs_by_sha ON outputs (sha256)",
)

MIGRATIONS: tuple[tuple[str, ...], ...] = (_V1,)
SCHEMA_VERSION = len(MIGRATIONS)


async def migrate(db: aiosqlite.Connection, path: str) -> int:
    """Bring the database to ``SCHEMA_VERSION`` in one transaction; the version it was at."""
    await db.execute("BEGIN IMMEDIATE")
    try:
        await db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        rows = list(await db.execute_fetchall("SELECT version FROM schema_version"))
        found = int(rows[0][0]) if rows else 0
        if found > SCHEMA_VERSION:
            raise StoreError(f"{path} has schema version {found}; this code knows up to {SCHEMA_VERSION}")
        for version in range(found, SCHEMA_VERSION):
            for statement in MIGRATIONS[version]:
                await db.execute(statement)
        if not rows:
            await db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
        elif found != SCHEMA_VERSION:
            await db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
    except BaseException:
        await db.rollback()
        raise
    await db.commit()
    if found != SCHEMA_VERSION:
        log.info("%s: schema migrated from version %d to %d", path, found, SCHEMA_VERSION)
    return found


async def connect(path: Path, *, synchronous: str, busy_timeout: float) -> aiosqlite.Connection:
    """A connection in autocommit mode (the store opens its own transactions), WAL, rows by name,
    the schema at ``SCHEMA_VERSION``."""
    db = await aiosqlite.connect(path, isolation_level=None)
    try:
        db.row_factory = sqlite3.Row
        await db.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        (mode,) = next(iter(await db.execute_fetchall("PRAGMA journal_mode = WAL")))
        if str(mode).lower() != "wal":
            raise StoreError(f"{path}: SQLite refused WAL mode (journal_mode is {mode})")
        await db.execute(f"PRAGMA synchronous = {synchronous}")
        await db.execute("PRAGMA foreign_keys = ON")
        await migrate(db, str(path))
    except BaseException:
        await db.close()
        raise
    return db


class Database:
    """One connection to ``path`` and an ``asyncio.Lock`` that keeps one transaction (or read) on it
    at a time, so coroutines never see each other's uncommitted rows. Write transactions open with
    ``BEGIN IMMEDIATE``: the write lock is taken up front, so processes sharing the file serialise
    instead of failing to upgrade a read lock."""

    def __init__(self, path: Path, *, synchronous: str, busy_timeout: float) -> None:
        self.path = path
        self.synchronous = synchronous
        self.busy_timeout = busy_timeout
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()
        self._closed = False

    async def open(self) -> None:
        if self._closed:
            raise StoreClosed(f"store {self.path} is closed; make a new one")
        async with self._lock:
            if self._db is None:
                await asyncio.to_thread(self.path.parent.mkdir, parents=True, exist_ok=True)
                self._db = await connect(self.path, synchronous=self.synchronous, busy_timeout=self.busy_timeout)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        async with self._lock:  # let a transaction in progress finish
            db, self._db = self._db, None
            if db is not None:
                await db.close()

    def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreClosed(f"store {self.path} is {'closed' if self._closed else 'not open'}")
        return self._db

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """A write transaction, committed when the block ends, rolled back when it raises."""
        async with self._lock:
            db = self._conn()
            try:  # BEGIN inside: cancelled while it waits for the write lock, it still runs; roll it back
                await db.execute("BEGIN IMMEDIATE")
                yield db
                await db.commit()
            except BaseException:
                await db.rollback()  # a no-op when no transaction is open
                raise

    async def fetch(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        """One read statement (it sees every committed transaction)."""
        async with self._lock:
            return list(await self._conn().execute_fetchall(sql, tuple(params)))
