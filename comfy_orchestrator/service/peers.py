"""Wake-ups between the processes of one service (``[server] processes`` above 1).

Every process binds a Unix datagram socket, ``{bus_dir}/{index}.sock``, and tells its siblings, one
datagram each, what they would otherwise find only at their next poll of the store:

    ``e``          events were appended: wake the event sockets (``Notifier.notify``)
    ``q``          a job was queued and no worker here was idle to take it: wake one idle worker
                   in each sibling (the first to claim it gets it; the others find the queue empty)
    ``c JOB_ID``   a tenant cancelled this job: whichever process runs it interrupts its prompt

The store stays the only source of truth; a wake-up lost (a sibling restarting) costs only the
poll interval. ``e`` and ``q`` are coalesced: however many come in one turn of the event loop, each
sibling gets at most one datagram, and one that finds the sibling's queue full (Linux keeps only
``net.unix.max_dgram_qlen`` datagrams, often 10) is dropped, since the sibling has wake-ups
waiting already. A cancel that finds it full is sent again shortly, for up to ``_CANCEL_RETRY_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = ["PeerBus"]

log = logging.getLogger(__name__)

_MAX_DATAGRAM = 512
_CANCEL_RETRY_S = 5.0  # a cancel's prompt is otherwise interrupted only when the job's lease is next renewed
_CANCEL_RETRY_EVERY_S = 0.02


class PeerBus:
    """Process ``index`` of ``count``; ``on_message(kind, argument)`` gets what siblings send."""

    def __init__(self, bus_dir: Path, index: int, count: int, on_message: Callable[[str, str], None]) -> None:
        self.bus_dir, self.index, self.count = bus_dir, index, count
        self._on_message = on_message
        self._sock: socket.socket | None = None
        self._pending: set[str] = set()
        self._flush_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._paths = [str(bus_dir / f"{i}.sock") for i in range(count)]  # formatted once: sent to per event
        self.sent = 0

    def path(self, index: int) -> str:
        return self._paths[index]

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.setblocking(False)
        own = self.path(self.index)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(own)  # left by this index's previous process (it crashed)
        sock.bind(own)
        self._sock = sock
        self._loop.add_reader(sock.fileno(), self._readable)

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        if self._loop is not None:
            self._loop.remove_reader(sock.fileno())
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(self.index))

    def publish(self, kind: str) -> None:
        """Send ``kind`` (``e`` or ``q``) to every sibling at the end of this turn of the loop."""
        if self._sock is None:
            return
        self._pending.add(kind)
        if not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def send_now(self, kind: str, argument: str = "") -> None:
        """Send ``kind argument`` to every sibling now (a cancel); retried for a sibling whose queue is full."""
        payload = f"{kind} {argument}".encode() if argument else kind.encode()
        full = self._send(payload, range(self.count))
        if full and self._loop is not None:
            deadline = self._loop.time() + _CANCEL_RETRY_S
            self._loop.call_later(_CANCEL_RETRY_EVERY_S, self._resend, payload, full, deadline)

    def _resend(self, payload: bytes, indices: list[int], deadline: float) -> None:
        full = self._send(payload, indices)
        if not full or self._loop is None:
            return
        if self._loop.time() < deadline:
            self._loop.call_later(_CANCEL_RETRY_EVERY_S, self._resend, payload, full, deadline)
        else:
            log.warning("processes %s did not take %r for %.0f s; they see it when the job's lease is next renewed",
                        full, payload[:80], _CANCEL_RETRY_S)

    def _flush(self) -> None:
        self._flush_scheduled = False
        pending, self._pending = self._pending, set()
        for kind in sorted(pending):
            self._send(kind.encode(), range(self.count))  # a full queue holds wake-ups already

    def _send(self, payload: bytes, indices: Iterable[int]) -> list[int]:
        """``payload`` to each sibling in ``indices``; those whose queue was full."""
        sock = self._sock
        full: list[int] = []
        if sock is None:
            return full
        for index in indices:
            if index == self.index:
                continue
            try:
                sock.sendto(payload, self._paths[index])
                self.sent += 1
            except (FileNotFoundError, ConnectionRefusedError):
                pass  # that sibling is not up (yet, or any more): it reads the store when it is
            except BlockingIOError:
                full.append(index)
        return full

    def _readable(self) -> None:
        sock = self._sock
        while sock is not None:
            try:
                payload = sock.recv(_MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            kind, _, argument = payload.decode(errors="replace").partition(" ")
            try:
                self._on_message(kind, argument)
            except Exception:
                log.exception("peer message %r", payload[:80])
            sock = self._sock
