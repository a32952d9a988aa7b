"""Fixtures for the job store tests: a store factory parametrised over the implementations.

Only SQLite exists now. A PostgreSQL store joins by adding a ``params`` entry and a branch in
``_open`` (skipped when no database is configured); every contract test then runs against it too.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest

from comfy_orchestrator.store import JobStore, SQLiteJobStore

OpenStore = Callable[..., Awaitable[Any]]


class FakeClock:
    """Unix seconds that move only when told to (``advance``), or by ``step`` at every reading."""

    def __init__(self, start: float | None = None, step: float = 0.0) -> None:
        self.now = time.time() if start is None else start
        self.step = step

    def __call__(self) -> float:
        now = self.now
        self.now += self.step
        return now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def _open(kind: str, root: Path, stack: AsyncExitStack, clock: Callable[[], float] | None) -> JobStore:
    if kind == "sqlite":
        store = SQLiteJobStore(root / "jobs.db", root / "outputs", clock=clock or time.time)
        return await stack.enter_async_context(store)
    raise AssertionError(f"no store implementation {kind!r}")  # pragma: no cover


@pytest.fixture(params=["sqlite"])
async def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[OpenStore]:
    """``await open_store(clock=...)``: a fresh, empty store of the parametrised kind; a second call
    opens another handle on the same database (another process, as far as the store can tell)."""
    async with AsyncExitStack() as stack:

        async def open_(clock: Callable[[], float] | None = None) -> JobStore:
            return await _open(request.param, tmp_path, stack, clock)

        yield open_


@pytest.fixture
async def store(open_store: OpenStore) -> JobStore:
    store: JobStore = await open_store()
    return store


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def clocked_store(open_store: OpenStore, clock: FakeClock) -> JobStore:
    """A store whose time is ``clock``."""
    store: JobStore = await open_store(clock=clock)
    return store


def graph(n: int = 0) -> dict[str, Any]:
    """A small API-format graph; ``n`` makes bodies differ."""
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": n}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "store"}},
    }
