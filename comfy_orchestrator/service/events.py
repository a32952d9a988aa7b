"""``WS /v1/events?after=SEQ&job=ID…``: a tenant's stored events, replayed then followed.

On connect the socket gets every event with a sequence number above ``after`` (default: the
tenant's latest, i.e. only what comes next), then new ones as they are stored, so a reader that
reconnects with the last ``seq`` it saw gets exactly what it missed. After each ``Notifier``
wake-up a reader takes what this process committed from the ``EventFeed`` (the same records, in
the same order, without a read); it reads the store when the feed cannot say (a sibling's wake-up,
its poll, a reader behind the feed's run), and the store stays the only source of truth. Each
message is one event as JSON with its ``seq``; aiohttp's ping/pong heartbeat keeps the connection
honest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from aiohttp import WSMsgType, web

from comfy_orchestrator.service.errors import ApiError
from comfy_orchestrator.service.keys import FEED, NOTIFIER, SETTINGS, SOCKETS, STORE, TENANT
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
    store, notifier, feed = app[STORE], app[NOTIFIER], app[FEED]
    after = _after(request)
    job_ids = request.query.getall("job", []) or None
    wanted = None if job_ids is None else frozenset(job_ids)
    if after is None:
        after = await store.latest_seq(tenant)
    ws = web.WebSocketResponse(heartbeat=app[SETTINGS].server.heartbeat_s)
    await ws.prepare(request)
    app[SOCKETS].add(ws)
    reader = asyncio.create_task(_drain_incoming(ws))
    read_store = True  # first, after a poll, and after a wake-up the feed knows nothing of
    foreign = notifier.foreign
    try:
        while not ws.closed and not reader.done():
            fed = None if read_store else feed.since(tenant, after, job_ids=wanted, limit=_BATCH)
            if fed is None:
                foreign = notifier.foreign  # read before the store: a later sibling's wake-up reads again
                batch = await store.events_since(tenant, after, job_ids=job_ids, limit=_BATCH)
                upto = batch[-1].seq if batch else after
            else:
                batch, upto = fed
            for event in batch:
                await ws.send_json(event_json(event))
            after = upto
            read_store = False
            if len(batch) < _BATCH:
                waker = asyncio.create_task(notifier.wait(_POLL_S))
                await asyncio.wait({waker, reader}, return_when=asyncio.FIRST_COMPLETED)
                waker.cancel()
                notified = waker.done() and not waker.cancelled() and waker.result()
                read_store = not notified or notifier.foreign != foreign
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
