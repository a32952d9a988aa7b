"""A wake-up call for event readers: whoever appends an event calls ``notify``; readers waiting in
``wait`` return at once instead of at their next poll (the store stays the source of truth)."""

from __future__ import annotations

import asyncio
import contextlib

__all__ = ["Notifier"]


class Notifier:
    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout: float) -> None:
        """Until the next ``notify`` or ``timeout`` seconds, whichever comes first."""
        event = self._event
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)
