"""The content-addressed file store on its own: what a cancelled write leaves behind."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from comfy_orchestrator.store import BlobStore


async def test_a_put_cancelled_while_its_first_chunks_go_to_disk_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cancel lands while a worker thread is still making the temporary file: the put waits for
    that thread, then removes the file (an output staged early and then dropped, say)."""
    blobs = BlobStore(tmp_path, chunk_size=4)
    spilling = threading.Event()
    spill = BlobStore._spill

    def slow_spill(self: BlobStore, tmp: Any, chunks: list[bytes]) -> Any:
        spilling.set()
        time.sleep(0.3)  # the cancel comes before the file exists
        return spill(self, tmp, chunks)

    monkeypatch.setattr(BlobStore, "_spill", slow_spill)

    async def chunks() -> AsyncIterator[bytes]:
        yield b"12345678"  # more than a chunk: it goes to a temporary file
        await asyncio.sleep(30)
        yield b"never"

    putting = asyncio.create_task(blobs.put(chunks()))
    assert await asyncio.to_thread(spilling.wait, 5)
    putting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await putting
    assert list((tmp_path / ".tmp").iterdir()) == []
