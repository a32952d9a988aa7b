"""Content-addressed files on disk: ``<root>/<sha256[:2]>/<sha256>``, each content stored once.

A file is streamed to a temporary name while its hash is computed, flushed to disk, then renamed to
its address (or dropped, when that content is already there; ``put`` does not even write content
that fits in one chunk and is already there). A reader never sees a partial file, and memory stays at one chunk
whatever the size. Blocking file calls run in a worker thread. Any store implementation can keep
its outputs here; the database only holds the addresses.

``put`` does all of that at once; a job's outputs take two steps. ``stage`` stops before the
rename: the bytes are durable under their temporary name, and ``settle`` (inside the transaction
that names them) or ``discard`` (nothing will) finishes. So bytes reach an address only while a
transaction names them (one rolled back after that leaves them there, unnamed): content whose job
ended otherwise never does, where, shared by every job that produced it, it could not safely be
removed. The transaction that deletes the last name of some content ``retire``s it (moves it
aside; put back if that transaction rolls back).

Temporary files. Each handle writes its own under ``<root>/.tmp/<owner>/``, and holds an exclusive
``flock`` on ``<root>/.tmp/<owner>.lock`` while it lives; the kernel drops that lock when the
process ends, however it ends. A handle making its first temporary file removes the folders of
owners whose lock is free: what a process that died (mid-write, or holding staged files) left
behind, never what a live one, in this process or another sharing the folder, is still writing. The
folder must be on a local file system: over NFS ``flock`` is emulated with per-process locks.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import logging
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

__all__ = ["Blob", "BlobStore", "Retired", "is_sha256", "sweep"]

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"[0-9a-f]{64}")


def is_sha256(text: str) -> bool:
    """Whether ``text`` is a content address: 64 lowercase hex digits."""
    return _SHA256.fullmatch(text) is not None


@dataclass(frozen=True, slots=True)
class Retired:
    """A blob ``retire``d from ``address``, lying at ``moved`` until dropped or restored."""

    moved: Path
    address: Path


@dataclass(frozen=True, slots=True)
class Blob:
    """Stored content: its hash, size and its address. A ``stage``d blob lies at ``staged`` until
    ``settle`` or ``discard``; ``put`` returns it at ``path`` (``staged`` None)."""

    sha256: str
    size: int
    path: Path
    staged: Path | None = None


class BlobStore:
    """Files under ``root``, addressed by their SHA-256."""

    def __init__(self, root: str | Path, *, chunk_size: int = 1 << 16) -> None:
        self.root = Path(root)
        self.chunk_size = chunk_size
        self._owner: _Owner | None = None  # this handle's folder of temporary files, made on first use
        self._owner_lock = threading.Lock()  # temporary files are made in worker threads
        self._folders: set[Path] = set()  # <root>/<xx> folders known to exist

    def path(self, sha256: str) -> Path:
        if not is_sha256(sha256):
            raise ValueError(f"not a lowercase hex SHA-256: {sha256!r}")
        return self.root / sha256[:2] / sha256

    async def put(self, data: bytes | AsyncIterable[bytes]) -> Blob:
        """Store ``data`` (bytes, or chunks streamed in) and return its address.

        Chunks are gathered up to ``chunk_size`` before they go to a worker thread, so a small file
        costs one trip (write, fsync, rename, fsync of the folder), and content already stored is
        never written at all. Not for content a job store names and deletes (its look for the
        address is outside any transaction): that is ``stage`` and ``settle``."""
        return await self._write(data, settle=True)

    async def stage(self, data: bytes | AsyncIterable[bytes]) -> Blob:
        """Write ``data`` as ``put`` does, durably, but leave it under its temporary name (``staged``):
        ``settle`` moves it to its address (or drops it, when that content is there by then),
        ``discard`` drops it. Written even when its content is at its address now: that may be
        ``retire``d before this is settled."""
        return await self._write(data, settle=False)

    def settle(self, blobs: Iterable[Blob]) -> None:
        """Move staged blobs to their addresses, then fsync each folder that changed once (blocking:
        call it from a thread, such as the one of the transaction that names them). Nothing to do for
        one that is there already, or settled before."""
        folders: set[Path] = set()
        for blob in blobs:
            if blob.staged is not None and self._move(blob.staged, blob.path, check=True):
                folders.add(blob.path.parent)
        for folder in folders:
            _fsync_folder(folder)

    def retire(self, sha256s: Iterable[str]) -> list[Retired]:
        """Move the blobs at these addresses (those that are there) into this handle's temporary
        folder (blocking: call it from the thread of the transaction that stops naming them). Once
        that transaction committed, ``drop`` them; if it rolled back, ``restore`` them. Moved, not
        removed, so that a rollback loses nothing; the sweep of a dead owner's folder puts what it
        had retired back at its address (its transaction may not have committed: content-addressed,
        that is always safe; at worst the bytes stay, named by nothing)."""
        retired: list[Retired] = []
        folder = self._owner_folder()
        try:
            for sha in sha256s:
                target = self.path(sha)
                moved = folder / f"retired-{sha}-{secrets.token_hex(4)}"
                try:
                    os.replace(target, moved)
                except FileNotFoundError:
                    continue
                retired.append(Retired(moved, target))
        except BaseException:
            self.restore(retired)
            raise
        return retired

    def restore(self, retired: Iterable[Retired]) -> None:
        """Put ``retire``d blobs back at their addresses (blocking), each folder fsynced; one that
        cannot be is logged, and the rest go back all the same."""
        _put_back([(blob.moved, blob.address) for blob in retired])

    async def drop(self, retired: Iterable[Retired]) -> None:
        """Remove ``retire``d blobs for good (their removal was committed)."""
        paths = [blob.moved for blob in retired]
        if paths:
            await asyncio.to_thread(_unlink_all, paths)

    async def discard(self, blob: Blob) -> None:
        """Drop a staged blob nobody will name (it may be settled or gone already: then nothing)."""
        if blob.staged is not None:
            await asyncio.to_thread(blob.staged.unlink, missing_ok=True)

    def close(self) -> None:
        """Remove this handle's temporary files and give its folder up (a handle never closed leaves
        them for the next one to sweep once this process has ended)."""
        with self._owner_lock:
            owner, self._owner = self._owner, None
        if owner is not None:
            owner.release()

    async def _write(self, data: bytes | AsyncIterable[bytes], *, settle: bool) -> Blob:
        if isinstance(data, bytes | bytearray | memoryview):
            sha, size = hashlib.sha256(data).hexdigest(), len(data)
            staged = await self._finish_whole(None, [bytes(data)], sha, settle)
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
                staged = await self._finish_whole(tmp, pending, sha, settle)
            except BaseException:
                if tmp is not None:
                    await asyncio.to_thread(tmp.discard)
                raise
        log.debug("blob %s (%d bytes) %s", sha, size, "staged" if staged else "at its address")
        return Blob(sha, size, self.path(sha), staged)

    async def _finish_whole(self, tmp: _Tmp | None, chunks: list[bytes], sha256: str, settle: bool) -> Path | None:
        """``_finish`` in a worker thread, which a cancel does not stop: it is waited for, and a file
        it staged meanwhile is removed (nobody will have its name)."""
        finishing = asyncio.ensure_future(asyncio.to_thread(self._finish, tmp, chunks, sha256, settle))
        try:
            return await asyncio.shield(finishing)
        except asyncio.CancelledError:
            await asyncio.wait((finishing,))
            if not finishing.cancelled() and finishing.exception() is None and (left := finishing.result()):
                await asyncio.to_thread(left.unlink, missing_ok=True)
            raise

    def _owner_folder(self) -> Path:
        """This handle's folder of temporary files (claimed on first use: blocking)."""
        with self._owner_lock:
            if self._owner is None:
                self._owner = _Owner.claim(self.root / ".tmp")
            return self._owner.folder

    def _new_tmp(self) -> tuple[int, Path]:
        """A new, empty temporary file (opened for writing) in this handle's folder."""
        path = self._owner_folder() / f"blob-{secrets.token_hex(8)}"
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

    def _finish(self, tmp: _Tmp | None, chunks: list[bytes], sha256: str, settle: bool) -> Path | None:
        """The last chunks written and flushed to disk; with ``settle`` renamed to the content's
        address too. The temporary file left for the caller to settle, or None (with ``settle``:
        moved, or that content was already there).

        Few system calls on purpose: each one lets the event loop's thread take the GIL back, and
        this thread then waits for it."""
        target = self.path(sha256)
        if tmp is not None:
            try:
                tmp.fh.writelines(chunks)
                _flush(tmp.fh)
                tmp.fh.close()
                path = tmp.path
            except BaseException:
                tmp.discard()
                raise
        else:
            if settle and os.path.isfile(target):  # already stored: nothing to write
                return None
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
            except BaseException:
                path.unlink(missing_ok=True)
                raise
        if not settle:
            return path
        try:
            if self._move(path, target, check=tmp is not None):
                _fsync_folder(target.parent)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return None

    def _move(self, tmp: Path, target: Path, *, check: bool) -> bool:
        """Move ``tmp`` to ``target`` unless that content is already there (looked for when
        ``check``); True when it moved. Fsync the folder afterwards, so the rename survives a power
        loss."""
        if check and target.is_file():
            tmp.unlink(missing_ok=True)
            return False
        folder = target.parent
        if folder not in self._folders:
            folder.mkdir(parents=True, exist_ok=True)
            self._folders.add(folder)  # at most 256 of them
        os.replace(tmp, target)  # atomic; a concurrent writer of the same content wrote the same bytes
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


class _Owner:
    """A handle's folder of temporary files, ``<tmp>/<id>/``, and the ``flock``ed ``<tmp>/<id>.lock``
    that says it is alive."""

    def __init__(self, folder: Path, lock_fd: int) -> None:
        self.folder, self._lock_fd = folder, lock_fd

    @classmethod
    def claim(cls, tmp: Path) -> _Owner:
        """A new folder under ``tmp``, after sweeping the folders whose owner has ended."""
        tmp.mkdir(parents=True, exist_ok=True)
        sweep(tmp)
        while True:
            name = secrets.token_hex(8)
            lock = tmp / f"{name}.lock"
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                if os.fstat(fd).st_ino == os.stat(lock).st_ino:  # not swept between open and flock
                    (tmp / name).mkdir()
                    return cls(tmp / name, fd)
            except FileNotFoundError:
                pass
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)

    def release(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        if not self.folder.exists():  # else the lock stays, and the next sweep finishes the job
            self.folder.with_suffix(".lock").unlink(missing_ok=True)
        os.close(self._lock_fd)


_OLD_LAYOUT_S = 86400.0  # loose .tmp/blob-* files of versions before owner folders: removed at this age


def sweep(tmp: Path) -> int:
    """Remove the folders under ``tmp`` whose owner's lock is free (the process that held it ended),
    and those with no lock at all (an owner locks before it makes its folder, and unlocks after it
    removed it); how many. A live owner's folder, in this process or another, is never touched.
    The folder must be on a local file system: ``flock`` is emulated, per process, over NFS."""
    swept = 0
    for entry in tmp.iterdir():
        try:
            if entry.suffix == ".lock":
                swept += _sweep_owner(entry)
            elif entry.is_dir() and not entry.with_suffix(".lock").exists():
                _reinstate(entry)
                shutil.rmtree(entry)
                swept += 1
            elif entry.name.startswith("blob-") and time.time() - entry.stat().st_mtime > _OLD_LAYOUT_S:
                entry.unlink()
        except OSError as exc:  # gone meanwhile, or not ours to remove: the next sweep tries again
            log.debug("%s: not swept: %s", entry, exc)
    if swept:
        log.info("%s: removed the temporary files of %d ended owner(s)", tmp, swept)
    return swept


def _sweep_owner(lock: Path) -> int:
    fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 0  # alive
        _reinstate(lock.with_suffix(""))
        shutil.rmtree(lock.with_suffix(""), ignore_errors=True)
        if lock.with_suffix("").exists():
            return 0  # partly removed: the lock stays for the next sweep
        lock.unlink(missing_ok=True)
        return 1
    finally:
        os.close(fd)


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


_RETIRED = re.compile(r"retired-([0-9a-f]{64})-[0-9a-f]+")


def _reinstate(folder: Path) -> None:
    """Put the blobs a dead owner had retired back where nothing is at their address (the root is
    ``folder``'s grandparent: ``<root>/.tmp/<owner>``)."""
    root = folder.parent.parent
    moves = []
    for path in folder.glob("retired-*"):
        if (match := _RETIRED.fullmatch(path.name)) is not None:
            sha = match.group(1)
            address = root / sha[:2] / sha
            if not address.exists():
                moves.append((path, address))
    _put_back(moves)


def _put_back(moves: Iterable[tuple[Path, Path]]) -> None:
    folders: set[Path] = set()
    for moved, address in moves:
        try:
            address.parent.mkdir(parents=True, exist_ok=True)
            os.replace(moved, address)
            folders.add(address.parent)
        except OSError as exc:
            log.error("%s could not go back to %s: %s", moved, address, exc)
    for folder in folders:
        _fsync_folder(folder)


def _unlink_all(paths: Iterable[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _flush(fh: BinaryIO) -> None:
    fh.flush()
    os.fsync(fh.fileno())
