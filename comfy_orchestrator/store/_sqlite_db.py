"""The SQLite store's database: a writer and a reader connection, each confined to a thread of its
own, and the schema as numbered migrations applied on open (``schema_version`` says where a file
is). Times are integer microseconds since the epoch; JSON is stored as text.

Writes are group-committed. ``write(op)`` queues ``op`` (a plain function of the connection that
runs its statements); whenever the writer thread is free, everything queued so far goes to it as
one batch: one transaction, each operation inside a savepoint of its own, one commit (one fsync
with ``synchronous=FULL``), and only then is every caller answered. An operation that raises is
rolled back to its savepoint and its caller gets the error; the others in the batch commit. The
operations of a batch run one after another, in the order they were queued, so each sees what the
ones before it wrote, exactly as if they had committed one by one; a caller's ``await`` still
returns only once its change is durable. A lone write is a batch of one: nothing waits for
company, so an idle store answers as fast as before.

Processes sharing the file (a multi-process service) take turns through ``flock`` on
``{path}.writelock`` around each write transaction: the kernel wakes the next writer the moment the
lock is free, where SQLite's own busy handler would sleep and retry (1 ms, 2 ms, 5 ms, …). The
batch is topped up once the lock is held: the writes that came while the other processes had their
turns share its commit instead of waiting for a commit of their own.

Each transaction's events (``ops.event`` on the writer's ``WriterConnection``; an operation rolled back
to its savepoint takes its events with it) go to ``Database.on_events`` on the event loop once the
commit is durable, before any caller of the batch is answered: a listener sees every event this
handle commits, in ``seq`` order, and never one that was rolled back.

Reads (``read(op)``) are batched the same way on the reader connection's thread, in one read
transaction per batch; in WAL mode they see every committed transaction and never wait for the
writer. Either way, one trip to a thread per batch replaces one per statement.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import os
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from comfy_orchestrator.store.errors import StoreClosed, StoreError
from comfy_orchestrator.store.types import EventRecord

__all__ = [
    "MAX_BATCH",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "Database",
    "Outcome",
    "WriterConnection",
    "connect",
    "migrate",
    "run_reads",
    "run_writes",
]

log = logging.getLogger(__name__)

T = TypeVar("T")
Op = Callable[[sqlite3.Connection], T]

MAX_BATCH = 256
"""Operations one transaction takes at most: the latency of the last one in a batch stays bounded."""

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

_V2 = (
    # the prompts in flight on each backend, whichever process dispatched them: a tiny index,
    # since attempts leave the state when they end
    "CREATE INDEX attempts_running ON attempts (backend) WHERE state = 'running'",
)

_V3 = (
    # the prompt id a claim drew for its first attempt, until that attempt is recorded
    "ALTER TABLE jobs ADD COLUMN planned_prompt_id TEXT",
)

_V4 = (
    # a job's events, for deleting them with the job (and replaying one job's events)
    "CREATE INDEX events_by_job ON events (job_id)",
)

MIGRATIONS: tuple[tuple[str, ...], ...] = (_V1, _V2, _V3, _V4)
SCHEMA_VERSION = len(MIGRATIONS)


def migrate(db: sqlite3.Connection, path: str) -> int:
    """Bring the database to ``SCHEMA_VERSION`` in one transaction; the version it was at."""
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        rows = db.execute("SELECT version FROM schema_version").fetchall()
        found = int(rows[0][0]) if rows else 0
        if found > SCHEMA_VERSION:
            raise StoreError(f"{path} has schema version {found}; this code knows up to {SCHEMA_VERSION}")
        for version in range(found, SCHEMA_VERSION):
            for statement in MIGRATIONS[version]:
                db.execute(statement)
        if not rows:
            db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
        elif found != SCHEMA_VERSION:
            db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
    except BaseException:
        db.rollback()
        raise
    db.execute("COMMIT")
    if found != SCHEMA_VERSION:
        log.info("%s: schema migrated from version %d to %d", path, found, SCHEMA_VERSION)
    return found


class WriterConnection(sqlite3.Connection):
    """The writer's connection; ``events`` gathers the events of the transaction it is running."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.events: list[EventRecord] = []


def connect(path: Path, *, synchronous: str, busy_timeout: float, writer: bool = True) -> sqlite3.Connection:
    """A connection in autocommit mode (the store opens its own transactions), WAL, rows by name;
    the writer (a ``WriterConnection``) also brings the schema to ``SCHEMA_VERSION``. Usable from
    any one thread at a time."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                         factory=WriterConnection if writer else sqlite3.Connection)
    try:
        db.row_factory = sqlite3.Row
        db.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        if writer:
            (mode,) = db.execute("PRAGMA journal_mode = WAL").fetchone()
            if str(mode).lower() != "wal":
                raise StoreError(f"{path}: SQLite refused WAL mode (journal_mode is {mode})")
        db.execute(f"PRAGMA synchronous = {synchronous}")
        db.execute("PRAGMA foreign_keys = ON")
        if writer:
            migrate(db, str(path))
        else:
            db.execute("PRAGMA query_only = ON")
    except BaseException:
        db.close()
        raise
    return db


Outcome = tuple[bool, Any]
"""An operation's (True, result) or (False, the exception it raised)."""


def run_writes(db: sqlite3.Connection, ops: list[Op[Any]]) -> list[Outcome]:
    """Run ``ops`` in one transaction, each in a savepoint; their outcomes once the commit is
    durable. Raises when the transaction as a whole failed (BEGIN, COMMIT, or an error after which
    SQLite rolled everything back): then nothing of it was committed."""
    outcomes: list[Outcome] = []
    events = db.events if isinstance(db, WriterConnection) else []
    events.clear()
    db.execute("BEGIN IMMEDIATE")
    try:
        for op in ops:
            db.execute("SAVEPOINT op")
            mark = len(events)
            try:
                result = op(db)
            except Exception as exc:
                if not db.in_transaction:  # SQLite rolled the whole transaction back (I/O error, disk full…)
                    raise
                db.execute("ROLLBACK TO op")
                db.execute("RELEASE op")
                del events[mark:]
                outcomes.append((False, exc))
            else:
                db.execute("RELEASE op")
                outcomes.append((True, result))
        db.execute("COMMIT")
    except BaseException:
        events.clear()
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return outcomes


def run_reads(db: sqlite3.Connection, ops: list[Op[Any]]) -> list[Outcome]:
    """Run ``ops`` one after another in one read transaction (one snapshot, taken after every one
    of them was queued: each sees what had committed before it was asked for)."""
    outcomes: list[Outcome] = []
    db.execute("BEGIN")
    try:
        for op in ops:
            try:
                outcomes.append((True, op(db)))
            except Exception as exc:
                outcomes.append((False, exc))
    finally:
        if db.in_transaction:
            db.execute("COMMIT")
    return outcomes


@dataclass(slots=True)
class _Queued:
    op: Op[Any]
    future: asyncio.Future[Any] = field(repr=False)


class _Lane:
    """One connection on a thread of its own, fed batches of operations.

    Callers queue operations on the event loop; whenever the thread is free, everything queued so
    far (at most ``MAX_BATCH``) goes to it as one batch, run by ``run`` (``run_writes`` or
    ``run_reads``); the outcomes come back to the loop in one callback, which answers the callers
    and hands the thread the next batch. No task and one trip per batch, however many callers."""

    def __init__(
        self,
        name: str,
        run: Callable[[sqlite3.Connection, list[Op[Any]]], list[Outcome]],
        on_batch: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self._run = run
        self._on_batch = on_batch  # on the loop after a batch ran to the end, before its callers are answered
        self._db: sqlite3.Connection | None = None
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queued: list[_Queued] = []
        self._running: list[_Queued] = []
        self._idle = asyncio.Event()
        self._idle.set()
        self.batches = 0
        """Batches run to the end (for the writer: transactions committed)."""

    async def start(self, connect: Callable[[], sqlite3.Connection]) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
        self._thread.start()
        try:
            self._db = await self._call(connect)
        except BaseException:
            self._jobs.put(None)
            raise

    async def stop(self) -> None:
        """Let every queued batch run, close the connection, end the thread."""
        await self._idle.wait()
        db, self._db = self._db, None
        if db is not None:
            await self._call(db.close)
        self._jobs.put(None)

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()

    def _post(self, fn: Callable[[], T], done: Callable[[bool, Any], None]) -> None:
        """Run ``fn`` on the thread, then ``done(ok, result or exception)`` on the loop."""
        loop = self._loop
        assert loop is not None

        def job() -> None:
            try:
                outcome: Outcome = (True, fn())
            except BaseException as exc:
                outcome = (False, exc)
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is left to answer
                loop.call_soon_threadsafe(done, *outcome)

        self._jobs.put(job)

    async def _call(self, fn: Callable[[], T]) -> T:
        assert self._loop is not None
        future: asyncio.Future[T] = self._loop.create_future()

        def done(ok: bool, value: Any) -> None:
            if not future.done():
                (future.set_result if ok else future.set_exception)(value)

        self._post(fn, done)
        return await future

    async def submit(self, op: Op[T]) -> T:
        assert self._loop is not None
        future: asyncio.Future[T] = self._loop.create_future()
        self._queued.append(_Queued(op, future))
        if self._idle.is_set():
            self._next_batch()
        return await future

    def _next_batch(self) -> None:
        batch = [q for q in self._queued[:MAX_BATCH] if not q.future.cancelled()]  # cancelled: never run
        del self._queued[:MAX_BATCH]
        if not batch:
            if self._queued:
                self._next_batch()
            else:
                self._idle.set()
            return
        self._idle.clear()
        self._running = batch
        db = self._db
        assert db is not None
        run, ops = self._run, [q.op for q in batch]
        self._post(lambda: run(db, ops), self._batch_done)

    def take_more(self, ops: list[Op[Any]]) -> None:
        """On the thread, while a batch runs: move what was queued since the batch was cut into it
        (``MAX_BATCH`` in all at most), appending their operations to ``ops``. Meanwhile the loop
        only appends to the queue, and each list operation here is atomic under the GIL."""
        room = MAX_BATCH - len(self._running)
        if room <= 0 or not self._queued:
            return
        taken = self._queued[:room]
        del self._queued[:len(taken)]
        for q in taken:
            if not q.future.cancelled():  # cancelled: never run
                self._running.append(q)
                ops.append(q.op)

    def _batch_done(self, ok: bool, value: Any) -> None:
        batch, self._running = self._running, []
        if ok:
            self.batches += 1
            if self._on_batch is not None:
                try:
                    self._on_batch()
                except Exception:  # a listener's bug must not strand the callers
                    log.exception("%s: the batch listener failed", self.name)
        else:
            log.warning("%s: a batch of %d operations failed: %r", self.name, len(batch), value)
        outcomes: list[Outcome] = value if ok else [(False, value)] * len(batch)
        for q, (op_ok, result) in zip(batch, outcomes, strict=True):
            if not q.future.done():
                (q.future.set_result if op_ok else q.future.set_exception)(result)
        self._next_batch()


class Database:
    """A writer and a reader connection to ``path``, each on a thread of its own (see the module's
    docstring): ``write`` group-commits, ``read`` batches too."""

    def __init__(self, path: Path, *, synchronous: str, busy_timeout: float) -> None:
        self.path = path
        self.synchronous = synchronous
        self.busy_timeout = busy_timeout
        self._writer = _Lane(f"sqlite-writer:{path.name}", self._run_writes, self._publish)
        self._committed: list[EventRecord] = []  # the last batch's events: set on the writer's thread
        self.on_events: Callable[[list[EventRecord]], None] | None = None
        """Called on the loop with each committed transaction's events (see the module's docstring)."""
        self._write_lock: int | None = None  # fd of {path}.writelock, opened with the writer
        self._reader = _Lane(f"sqlite-reader:{path.name}", run_reads)
        self._open_lock = asyncio.Lock()
        self._opened = False
        self._closed = False

    async def open(self) -> None:
        if self._closed:
            raise StoreClosed(f"store {self.path} is closed; make a new one")
        async with self._open_lock:
            if self._opened:
                return
            await asyncio.to_thread(self.path.parent.mkdir, parents=True, exist_ok=True)
            try:
                await self._writer.start(functools.partial(self._connect, writer=True))  # migrates first
            except BaseException:
                self._close_write_lock()
                raise
            try:
                await self._reader.start(functools.partial(self._connect, writer=False))
            except BaseException:
                await self._writer.stop()
                self._close_write_lock()
                raise
            self._opened = True

    @property
    def commits(self) -> int:
        """Write transactions committed so far (a batch of writes is one)."""
        return self._writer.batches

    def _connect(self, *, writer: bool) -> sqlite3.Connection:
        if writer and self._write_lock is None:
            self._write_lock = os.open(f"{self.path}.writelock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        return connect(self.path, synchronous=self.synchronous, busy_timeout=self.busy_timeout, writer=writer)

    def _run_writes(self, db: sqlite3.Connection, ops: list[Op[Any]]) -> list[Outcome]:
        """``run_writes`` holding the file lock that the store's other processes take too (on the
        writer's thread: blocking there holds up nothing else)."""
        assert self._write_lock is not None
        fcntl.flock(self._write_lock, fcntl.LOCK_EX)
        try:
            self._writer.take_more(ops)  # what came while another process had its turn joins this commit
            outcomes = run_writes(db, ops)
        finally:
            fcntl.flock(self._write_lock, fcntl.LOCK_UN)
        assert isinstance(db, WriterConnection)
        self._committed, db.events = db.events, []
        return outcomes

    def _publish(self) -> None:
        events, self._committed = self._committed, []
        if events and self.on_events is not None:
            self.on_events(events)

    def _close_write_lock(self) -> None:
        fd, self._write_lock = self._write_lock, None
        if fd is not None:
            os.close(fd)

    async def close(self) -> None:
        """Refuse new calls, let the queued ones run (writes commit), close both connections."""
        if self._closed:
            return
        self._closed = True
        async with self._open_lock:
            if self._opened:
                await self._writer.stop()
                await self._reader.stop()
            self._close_write_lock()

    def _refuse_if_closed(self) -> None:
        if self._closed or not self._opened:
            raise StoreClosed(f"store {self.path} is {'closed' if self._closed else 'not open'}")

    async def write(self, op: Op[T]) -> T:
        """Run ``op`` in the next group-committed transaction; its result once that committed.

        Cancelled before its batch started, ``op`` never runs; cancelled later, it may still commit
        (as a request whose answer was lost may have)."""
        self._refuse_if_closed()
        return await self._writer.submit(op)

    async def read(self, op: Op[T]) -> T:
        """Run ``op`` on the reader connection: it sees every transaction committed before it was
        called."""
        self._refuse_if_closed()
        return await self._reader.submit(op)

    async def fetch(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        """One read statement's rows."""
        args = tuple(params)
        return await self.read(lambda db: db.execute(sql, args).fetchall())
