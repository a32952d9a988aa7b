"""``/healthz`` (the process answers), ``/readyz`` (ready for jobs: 503 while starting or draining)
and ``GET /v1/backends`` (each backend's health, capabilities and load, from the pool).

In a multi-process service the load is the whole service's: ``in_flight`` counts the attempts
running on the backend from the store (every process's), ``max_in_flight`` is the configured total;
``in_flight_here`` / ``max_in_flight_here`` are the answering process's own share."""

from __future__ import annotations

import os

from aiohttp import web

from comfy_orchestrator.service.keys import LIFECYCLE, MANAGED, POOL, SETTINGS, STORE

__all__ = ["routes"]

routes = web.RouteTableDef()


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    role = request.app[LIFECYCLE].role
    return web.json_response({"status": "ok", "pid": os.getpid(), "process": role.label if role is not None else "0/1"})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    lifecycle = request.app[LIFECYCLE]
    return web.json_response({"status": lifecycle.phase.value}, status=200 if lifecycle.ready else 503)


@routes.get("/v1/backends")
async def backends(request: web.Request) -> web.Response:
    pool, supervisor = request.app[POOL], request.app[MANAGED]
    stats = pool.stats()
    several = request.app[LIFECYCLE].role is not None
    running = await request.app[STORE].running_attempts() if several else {}
    configured = {b.name: b.max_in_flight for b in request.app[SETTINGS].backends}
    items = []
    for status in pool.backends():
        per = stats.backends.get(status.name)
        managed = supervisor.status(status.name)
        items.append({
            "name": status.name,
            "healthy": status.healthy,
            "draining": status.draining,
            "breaker": status.breaker.value,
            "in_flight": running.get(status.name, 0) if several else status.in_flight,
            "max_in_flight": configured.get(status.name, status.max_in_flight) if several else status.max_in_flight,
            "in_flight_here": status.in_flight,
            "max_in_flight_here": status.max_in_flight,
            "node_classes": status.node_classes,
            "models": {folder: list(files) for folder, files in status.models.items()},
            "last_model": status.last_model,
            "last_error": status.last_error,
            "success_rate": per.success_rate if per is not None else None,
            "managed": managed.to_json() if managed is not None else None,
        })
    in_pool = {item["name"] for item in items}
    for managed in supervisor.statuses():  # a local process that has not answered yet: not in the pool
        if managed.name not in in_pool:
            items.append({"name": managed.name, "healthy": False, "draining": False, "breaker": "closed",
                          "in_flight": 0, "max_in_flight": 0, "in_flight_here": 0, "max_in_flight_here": 0,
                          "node_classes": 0, "models": {},
                          "last_model": None, "last_error": f"managed process {managed.state.value}",
                          "success_rate": None, "managed": managed.to_json()})
    return web.json_response({"items": items})
