"""The content-addressed file store on its own: what a cancelled write leaves behind, staged bytes
that reach their address only when settled, and temporary files of ended processes swept."""

from __future__ import annotations

import asyncio
import os
import sys
import textwrap
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
    assert temporary(tmp_path) == []
    assert addressed(tmp_path) == []


def addressed(root: Path) -> list[Path]:
    """What lies at a content address."""
    return sorted(root.glob("??/*"))


def temporary(root: Path) -> list[Path]:
    """Temporary files, staged ones included, of any handle."""
    return sorted(root.rglob("blob-*"))


def read(path: Path | None) -> bytes | None:
    return None if path is None or not path.exists() else path.read_bytes()


async def test_staged_bytes_reach_their_address_only_when_settled(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path)
    kept, dropped = await blobs.stage(b"named later"), await blobs.stage(b"never named")
    assert read(kept.staged) == b"named later"  # durable already, but at no address
    assert read(dropped.staged) == b"never named"
    assert addressed(tmp_path) == []
    await asyncio.to_thread(blobs.settle, [kept])
    await blobs.discard(dropped)
    assert addressed(tmp_path) == [kept.path]
    assert read(kept.path) == b"named later"
    assert temporary(tmp_path) == []
    again = await blobs.stage(b"named later")  # at its address already, staged all the same (it may be retired)
    assert read(again.staged) == b"named later"
    await asyncio.to_thread(blobs.settle, [again])  # the content is there: the staged copy just goes
    assert addressed(tmp_path) == [kept.path]
    assert temporary(tmp_path) == []
    blobs.close()
    assert await asyncio.to_thread(lambda: list((tmp_path / ".tmp").iterdir())) == []  # folder and lock given up


_DIES_HOLDING_STAGED_BYTES = textwrap.dedent("""
    import asyncio, os, sys
    from comfy_orchestrator.store import BlobStore

    async def main():
        blob = await BlobStore(sys.argv[1]).stage(b"staged by a process that dies")
        print(blob.staged, flush=True)
        os._exit(0)  # no close, no discard: as a SIGKILL leaves it

    asyncio.run(main())
""")


async def test_the_temporary_files_of_an_ended_process_are_swept_and_a_live_handles_are_not(tmp_path: Path) -> None:
    live = BlobStore(tmp_path)
    held = await live.stage(b"staged by a live handle")
    died = await asyncio.create_subprocess_exec(sys.executable, "-c", _DIES_HOLDING_STAGED_BYTES, str(tmp_path),
                                                stdout=asyncio.subprocess.PIPE)
    stdout, _ = await died.communicate()
    assert died.returncode == 0
    orphan = Path(stdout.decode().strip())
    assert read(orphan) == b"staged by a process that dies"
    lockless = tmp_path / ".tmp" / "0123456789abcdef"  # an owner's release cut short: no lock, a file left
    old_layout, recent = tmp_path / ".tmp" / "blob-old", tmp_path / ".tmp" / "blob-recent"
    await asyncio.to_thread(_leave_behind, lockless, old_layout, recent)
    newcomer = BlobStore(tmp_path)
    fresh = await newcomer.stage(b"anything")  # its first temporary file sweeps the ended owners
    assert read(orphan) is None
    assert read(lockless / "blob-left") is None
    assert read(old_layout) is None  # an earlier version's loose file, two days old
    assert read(recent) == b"maybe an earlier version's process is still writing it"
    await asyncio.to_thread(recent.unlink)
    assert held.staged is not None
    assert fresh.staged is not None
    alive = [held.staged.parent.name, fresh.staged.parent.name]
    left = await asyncio.to_thread(lambda: sorted(p.name for p in (tmp_path / ".tmp").iterdir()))
    assert left == sorted([*alive, *(name + ".lock" for name in alive)])  # the dead owner's folder and lock went
    assert read(held.staged) == b"staged by a live handle"
    await asyncio.to_thread(live.settle, [held])
    assert read(held.path) == b"staged by a live handle"
    live.close()
    newcomer.close()


def _leave_behind(lockless: Path, old_layout: Path, recent: Path) -> None:
    lockless.mkdir()
    (lockless / "blob-left").write_bytes(b"left")
    old_layout.write_bytes(b"old")
    two_days_ago = time.time() - 2 * 86400
    os.utime(old_layout, (two_days_ago, two_days_ago))
    recent.write_bytes(b"maybe an earlier version's process is still writing it")
