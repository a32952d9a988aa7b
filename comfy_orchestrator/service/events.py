"""``WS /v1/events?after=SEQ&job=ID…``: a tenant's stored events, replayed then followed.

On connect the socket gets every event with a sequence number above ``after`` (default: the
tenant's latest, i.e. only what comes next), then new ones as they are stored: the store is the
only source, read after each ``Notifier`` wake-up or poll, so a reader that reconnects with the
last ``seq`` it saw gets exactly what it missed. Each message is one event as JSON with its
``seq``; aiohttp's ping/pong heartbeat keeps the connection honest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from aiohttp import WSMsgType, web

from comfy_orchestrator.service.errors import ApiError
from comfy_orchestrator.service.keys import NOTIFIER, SETTINGS, SOCKETS, STORE, TENANT
from comfy_orchestrator.store import EventRecord

__all__ = ["event_json", "routes"]

log = logging.getLogger(__name__)

routes = web.RouteTableDef()

_POLL_S = 0.5  # events written by another process (or missed wake-ups) show up within this
_BATCH = 500


def event_json(event: EventRecord) -> dict[str, Any]:
    return {"seq": event.seq, "job_id": event.job_id, "type": event.type, "data": dict(event.data),
            "at": event.at.isoformat()}


def _after(request: web.Request) -> int | None:
    raw = request.query.get("after")
    if raw is None:
        return None
    if not raw.isdigit():
        raise ApiError(400, "InvalidRequest", "after must be a non-negative integer (an event's seq)")
    return int(raw)


@routes.get("/v1/events")
async def events(request: web.Request) -> web.StreamResponse:
    app, tenant = request.app, request[TENANT]
    store, notifier = app[STORE], app[NOTIFIER]
    after = _after(request)
    job_ids = request.query.getall("job", []) or None
    if after is None:
        after = await store.latest_seq(tenant)
    ws = web.WebSocketResponse(heartbeat=app[SETTINGS].server.heartbeat_s)
    await ws.prepare(request)
    app[SOCKETS].add(ws)
    reader = asyncio.create_task(_drain_incoming(ws))
    try:
        while not ws.closed and not reader.done():
            batch = await store.events_since(tenant, after, job_ids=job_ids, limit=_BATCH)
            for event in batch:
                await ws.send_json(event_json(event))
                after = event.seq
            if len(batch) < _BATCH:
                waker = asyncio.create_task(notifier.wait(_POLL_S))
                await asyncio.wait({waker, reader}, return_when=asyncio.FIRST_COMPLETED)
                waker.cancel()
    except ConnectionResetError:
        log.debug("tenant %s: event socket reset by the client", tenant)
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        await ws.close()
    return ws


async def _drain_incoming(ws: web.WebSocketResponse) -> None:
    """Read (and ignore) what the client sends, so close frames and pongs are handled; returns on close."""
    async for msg in ws:
        if msg.type in (WSMsgType.CLOSE, WSMsgType.ERROR):
            break
