"""The double's WebSocket clients and how messages reach them (ComfyUI's ``send`` / ``send_bytes``)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

__all__ = ["SERVER_FEATURES", "SocketHub"]

logger = logging.getLogger(__name__)

SERVER_FEATURES: dict[str, Any] = {"supports_preview_metadata": True, "max_upload_size": 104857600}


@dataclass(eq=False)
class _Client:
    ws: web.WebSocketResponse
    transport: asyncio.BaseTransport | None
    feature_flags: dict[str, Any] = field(default_factory=dict)


class SocketHub:
    """Connected sockets by client id. ``sid=None`` broadcasts, as in ComfyUI; sends are serialised."""

    def __init__(self) -> None:
        self._clients: dict[str, _Client] = {}
        self._lock = asyncio.Lock()

    def __len__(self) -> int:
        return len(self._clients)

    def add(self, sid: str, ws: web.WebSocketResponse, transport: asyncio.BaseTransport | None) -> None:
        self._clients[sid] = _Client(ws, transport)

    def remove(self, sid: str, ws: web.WebSocketResponse) -> None:
        client = self._clients.get(sid)
        if client is not None and client.ws is ws:
            del self._clients[sid]

    def set_feature_flags(self, sid: str, flags: dict[str, Any]) -> None:
        client = self._clients.get(sid)
        if client is not None:
            client.feature_flags = flags

    def supports_preview_metadata(self, sid: str | None) -> bool:
        client = self._clients.get(sid) if sid is not None else None
        return client is not None and client.feature_flags.get("supports_preview_metadata") is True

    def _targets(self, sid: str | None) -> list[_Client]:
        if sid is None:
            return list(self._clients.values())
        client = self._clients.get(sid)
        return [] if client is None else [client]

    async def send_json(self, event: str, data: Any, sid: str | None = None) -> None:
        targets = self._targets(sid)
        if not targets:
            return
        text = json.dumps({"type": event, "data": data})
        async with self._lock:
            for client in targets:
                await _guarded(client.ws.send_str(text))

    async def send_bytes(self, event_type: int, payload: bytes, sid: str | None = None) -> None:
        targets = self._targets(sid)
        if not targets:
            return
        message = event_type.to_bytes(4, "big") + payload
        async with self._lock:
            for client in targets:
                await _guarded(client.ws.send_bytes(message))

    def drop_all(self) -> None:
        """Cut every socket without a close frame, as a crash or a broken network would."""
        for client in list(self._clients.values()):
            if isinstance(client.transport, asyncio.Transport):
                client.transport.abort()
            elif client.transport is not None:
                client.transport.close()
        self._clients.clear()


async def _guarded(send: Awaitable[None]) -> None:
    try:
        await send
    except (aiohttp.ClientError, ConnectionError, RuntimeError) as err:
        logger.debug("send error: %s", err)
