"""Content-addressed files on disk: ``<root>/<sha256[:2]>/<sha256>``, each content stored once.

A file is streamed to a temporary name under ``<root>/.tmp`` while its hash is computed, flushed to
disk, then renamed to its address (or dropped, when that content is already there). A reader
never sees a partial file, and memory stays at one chunk whatever the size. Blocking file calls run
in a worker thread. Any store implementation can keep its outputs here; the database only holds
the addresses.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import tempfile
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

__all__ = ["Blob", "BlobStore"]

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class Blob:
    """Stored content: its hash, size and where it lies."""

    sha256: str
    size: int
    path: Path


class BlobStore:
    """Files under ``root``, addressed by their SHA-256."""

    def __init__(self, root: str | Path, *, chunk_size: int = 1 << 16) -> None:
        self.root = Path(root)
        self.chunk_size = chunk_size

    def path(self, sha256: str) -> Path:
        if not _SHA256.fullmatch(sha256):
            raise ValueError(f"not a lowercase hex SHA-256: {sha256!r}")
        return self.root / sha256[:2] / sha256

    async def put(self, data: bytes | AsyncIterable[bytes]) -> Blob:
        """Store ``data`` (bytes, or chunks streamed in) and return its address."""
        tmp_dir = self.root / ".tmp"
        await asyncio.to_thread(tmp_dir.mkdir, parents=True, exist_ok=True)
        fd, tmp_name = await asyncio.to_thread(tempfile.mkstemp, dir=tmp_dir, prefix="blob-")
        tmp = Path(tmp_name)
        digest, size = hashlib.sha256(), 0
        try:
            with os.fdopen(fd, "wb") as fh:
                if isinstance(data, bytes | bytearray | memoryview):
                    digest.update(data)
                    size = len(data)
                    await asyncio.to_thread(fh.write, data)
                else:
                    async for chunk in data:
                        digest.update(chunk)
                        size += len(chunk)
                        await asyncio.to_thread(fh.write, chunk)
                await asyncio.to_thread(_flush, fh)
            sha = digest.hexdigest()
            target = self.path(sha)
            stored = await asyncio.to_thread(_settle, tmp, target)
        except BaseException:
            await asyncio.to_thread(tmp.unlink, missing_ok=True)
            raise
        log.debug("%s blob %s (%d bytes)", "stored" if stored else "deduplicated", sha, size)
        return Blob(sha, size, target)

    async def read(self, sha256: str, *, chunk_size: int | None = None) -> AsyncIterator[bytes]:
        """The content at ``sha256``, in chunks; FileNotFoundError when it is not stored."""
        size = chunk_size or self.chunk_size
        fh = await asyncio.to_thread(self.path(sha256).open, "rb")
        try:
            while chunk := await asyncio.to_thread(fh.read, size):
                yield chunk
        finally:
            await asyncio.to_thread(fh.close)

    async def exists(self, sha256: str) -> bool:
        return await asyncio.to_thread(self.path(sha256).is_file)


def _flush(fh: BinaryIO) -> None:
    fh.flush()
    os.fsync(fh.fileno())


def _settle(tmp: Path, target: Path) -> bool:
    """Move ``tmp`` to ``target`` unless that content is already there; True when it moved."""
    if target.is_file():
        tmp.unlink()
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, target)  # atomic; a concurrent writer of the same content wrote the same bytes
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power loss
    finally:
        os.close(dir_fd)
    return True
