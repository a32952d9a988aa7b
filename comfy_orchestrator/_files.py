"""Files written whole or not at all."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterable
from pathlib import Path
from typing import BinaryIO

from comfy_orchestrator.errors import ClientClosed

__all__ = ["save_stream", "write_atomically"]


def write_atomically(path: Path, data: bytes | str) -> None:
    """Write ``data`` (text as UTF-8) to a temporary name beside ``path``, unique to this call, then
    rename it into place: a reader, or another writer of the same file, never sees half of it. The
    folder is made when missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")
    partial.write_bytes(data.encode() if isinstance(data, str) else data)
    partial.replace(path)


async def save_stream(chunks: AsyncIterable[bytes], target: Path) -> Path:
    """Stream ``chunks`` to ``target`` (written beside it, then renamed: never a partial file). The
    disk is written from worker threads, one chunk at a time: a slow disk holds up neither the event
    loop nor more than a chunk of memory. Nothing is left behind when the stream fails or is cancelled."""
    spool = _Spool(target)
    try:
        async for chunk in chunks:
            await asyncio.to_thread(spool.write, chunk)
        await asyncio.to_thread(spool.commit)
    finally:
        # Also when cancelled: the thread still runs, and waits for a write still in flight.
        await asyncio.to_thread(spool.discard)
    return target


class _Spool:
    """``target``, written as ``target.part`` from worker threads and renamed when complete.

    Each method runs in a thread; a lock keeps ``discard`` from closing the file under a ``write``
    whose task was cancelled while its thread ran on, and no write opens the file once discarded."""

    def __init__(self, target: Path) -> None:
        self.target = target
        self.partial = target.with_name(target.name + ".part")
        self._file: BinaryIO | None = None
        self._ended = False
        self._lock = threading.Lock()

    def _open(self) -> BinaryIO:
        if self._ended:
            raise ClientClosed(f"the download to {self.target} was abandoned")
        if self._file is None:
            self._file = self.partial.open("wb")
        return self._file

    def write(self, chunk: bytes) -> None:
        with self._lock:
            self._open().write(chunk)

    def commit(self) -> None:
        with self._lock:
            self._open().close()  # opened here when the output is empty: it is still a file
            self.partial.replace(self.target)
            self._ended = True

    def discard(self) -> None:
        with self._lock:
            self._ended = True
            if self._file is not None:
                self._file.close()
            self.partial.unlink(missing_ok=True)
