"""Content-addressed files on disk: ``<root>/<sha256[:2]>/<sha256>``, each content stored once.

A file is streamed to a temporary name under ``<root>/.tmp`` while its hash is computed, flushed to
disk, then renamed to its address (or dropped, when that content is already there; content that
fits in one chunk and is already there is never written). A reader
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
import secrets
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

__all__ = ["Blob", "BlobStore", "is_sha256"]

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"[0-9a-f]{64}")


def is_sha256(text: str) -> bool:
    """Whether ``text`` is a content address: 64 lowercase hex digits."""
    return _SHA256.fullmatch(text) is not None


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
        self._tmp_ready = False
        self._folders: set[Path] = set()  # <root>/<xx> folders known to exist

    def path(self, sha256: str) -> Path:
        if not is_sha256(sha256):
            raise ValueError(f"not a lowercase hex SHA-256: {sha256!r}")
        return self.root / sha256[:2] / sha256

    async def put(self, data: bytes | AsyncIterable[bytes]) -> Blob:
        """Store ``data`` (bytes, or chunks streamed in) and return its address.

        Chunks are gathered up to ``chunk_size`` before they go to a worker thread, so a small output
        costs one trip (write, fsync, rename, fsync of the folder), and content already stored is
        never written at all."""
        if isinstance(data, bytes | bytearray | memoryview):
            sha, size = hashlib.sha256(data).hexdigest(), len(data)
            stored = await asyncio.to_thread(self._finish, None, [bytes(data)], sha)
        else:
            digest, size = hashlib.sha256(), 0
            pending: list[bytes] = []
            buffered = 0
            tmp: _Tmp | None = None
            try:
                async for chunk in data:
                    digest.update(chunk)
                    size += len(chunk)
                    pending.append(chunk)
                    buffered += len(chunk)
                    if buffered >= self.chunk_size:
                        spill = asyncio.ensure_future(asyncio.to_thread(self._spill, tmp, pending))
                        try:
                            tmp = await asyncio.shield(spill)
                        except asyncio.CancelledError:  # the thread goes on: wait for the file it makes
                            await asyncio.wait((spill,))
                            if not spill.cancelled() and spill.exception() is None:
                                tmp = spill.result()
                            raise
                        pending, buffered = [], 0
                sha = digest.hexdigest()
                stored = await asyncio.to_thread(self._finish, tmp, pending, sha)
            except BaseException:
                if tmp is not None:
                    await asyncio.to_thread(tmp.discard)
                raise
        log.debug("%s blob %s (%d bytes)", "stored" if stored else "deduplicated", sha, size)
        return Blob(sha, size, self.path(sha))

    def _new_tmp(self) -> tuple[int, Path]:
        """A new, empty temporary file (opened for writing) under ``<root>/.tmp``."""
        tmp_dir = self.root / ".tmp"
        if not self._tmp_ready:
            tmp_dir.mkdir(parents=True, exist_ok=True)
            self._tmp_ready = True
        path = tmp_dir / f"blob-{secrets.token_hex(8)}"
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), path

    def _spill(self, tmp: _Tmp | None, chunks: list[bytes]) -> _Tmp:
        """Write ``chunks`` to the temporary file (made on the first call)."""
        if tmp is None:
            fd, path = self._new_tmp()
            tmp = _Tmp(os.fdopen(fd, "wb"), path)
        try:
            tmp.fh.writelines(chunks)
        except BaseException:
            tmp.discard()
            raise
        return tmp

    def _finish(self, tmp: _Tmp | None, chunks: list[bytes], sha256: str) -> bool:
        """The last chunks written, flushed to disk and renamed to the content's address; True when
        it was stored, False when that content was already there.

        Few system calls on purpose: each one lets the event loop's thread take the GIL back, and
        this thread then waits for it."""
        target = self.path(sha256)
        if tmp is not None:
            try:
                tmp.fh.writelines(chunks)
                _flush(tmp.fh)
                tmp.fh.close()
                return self._settle(tmp.path, target, check=True)
            except BaseException:
                tmp.discard()
                raise
        if os.path.isfile(target):  # already stored: nothing to write
            return False
        fd, path = self._new_tmp()
        try:
            try:
                for chunk in chunks:
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            return self._settle(path, target, check=False)
        except BaseException:
            path.unlink(missing_ok=True)
            raise

    def _settle(self, tmp: Path, target: Path, *, check: bool) -> bool:
        """Move ``tmp`` to ``target`` unless that content is already there (looked for when
        ``check``); True when it moved. The folder is fsynced, so the rename survives a power loss."""
        if check and target.is_file():
            tmp.unlink()
            return False
        folder = target.parent
        if folder not in self._folders:
            folder.mkdir(parents=True, exist_ok=True)
            self._folders.add(folder)  # at most 256 of them
        os.replace(tmp, target)  # atomic; a concurrent writer of the same content wrote the same bytes
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return True

    async def read(self, sha256: str, *, chunk_size: int | None = None) -> AsyncIterator[bytes]:
        """The content at ``sha256``, in chunks; FileNotFoundError when it is not stored. A file
        smaller than a chunk is opened, read and closed in one trip to a worker thread."""
        size = chunk_size or self.chunk_size
        fh, first = await asyncio.to_thread(_open_and_read, self.path(sha256), size)
        if fh is None:
            if first:
                yield first
            return
        try:
            chunk = first
            while chunk:
                yield chunk
                chunk = await asyncio.to_thread(fh.read, size)
        finally:
            await asyncio.to_thread(fh.close)

    async def exists(self, sha256: str) -> bool:
        return await asyncio.to_thread(self.path(sha256).is_file)


@dataclass(slots=True)
class _Tmp:
    """A temporary file being written, and its name."""

    fh: BinaryIO
    path: Path

    def discard(self) -> None:
        self.fh.close()
        self.path.unlink(missing_ok=True)


def _open_and_read(path: Path, size: int) -> tuple[BinaryIO | None, bytes]:
    """``path`` opened and its first ``size`` bytes; the file is already closed (None) when that
    was all of it."""
    fh = path.open("rb")
    try:
        first = fh.read(size)
    except BaseException:
        fh.close()
        raise
    if len(first) < size:
        fh.close()
        return None, first
    return fh, first


def _flush(fh: BinaryIO) -> None:
    fh.flush()
    os.fsync(fh.fileno())
