"""``create_app(settings)``: the HTTP + WebSocket service as an aiohttp application.

One lifespan (a ``cleanup_ctx`` generator) owns everything with a start and an end:

    start-up   open the store → start the pool → start retention (``[store] keep_days``; process 0)
               → reconcile the jobs a previous process left running (in a multi-process service:
               process 0 only) → start the workers → ready (``/readyz`` 200)
    shutdown   draining (``/readyz`` 503, workers stop claiming, event sockets closed) → wait up to
               ``drain_timeout`` for running jobs → cancel the rest on their backends and release
               them to the queue → close the pool, the clients and the store
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import uuid
import weakref
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

from aiohttp import WSCloseCode, web

from comfy_orchestrator.graph import load_templates
from comfy_orchestrator.pool import Pool, PoolSettings
from comfy_orchestrator.service import (
    dashboard,
    events,
    health,
    inputs,
    jobs,
    metrics,
    openapi,
    outputs,
    runs,
    templates,
)
from comfy_orchestrator.service.auth import auth_middleware
from comfy_orchestrator.service.backends import BackendClients
from comfy_orchestrator.service.errors import error_middleware
from comfy_orchestrator.service.feed import EventFeed
from comfy_orchestrator.service.keys import (
    CLIENTS,
    FEED,
    LIFECYCLE,
    MANAGED,
    NOTIFIER,
    PEERS,
    PIPELINES,
    POOL,
    SETTINGS,
    SOCKETS,
    STORE,
    TEMPLATES,
)
from comfy_orchestrator.service.managed import Supervisor
from comfy_orchestrator.service.notifier import Notifier
from comfy_orchestrator.service.peers import PeerBus
from comfy_orchestrator.service.pipeline_jobs import EvaluatorSource, PipelineJobs
from comfy_orchestrator.service.processes import ProcessRole
from comfy_orchestrator.service.retention import prune_forever
from comfy_orchestrator.service.settings import ServiceSettings
from comfy_orchestrator.service.state import Lifecycle, Phase
from comfy_orchestrator.service.worker import Worker
from comfy_orchestrator.store import JobKind, SQLiteJobStore, reconcile_running

__all__ = ["create_app"]

log = logging.getLogger(__name__)


def create_app(
    settings: ServiceSettings,
    *,
    pool_settings: PoolSettings | None = None,
    templates_dir: str | Path | None = None,
    role: ProcessRole | None = None,
) -> web.Application:
    """The service; run it with ``web.run_app`` or an ``AppRunner``. ``pool_settings`` tunes health
    checks and retries; ``templates_dir`` overrides where templates come from; ``role``: which
    process of a multi-process service this is (``service.processes``), None for the only one."""
    app = web.Application(middlewares=[metrics.metrics_middleware, error_middleware, auth_middleware],
                          client_max_size=settings.limits.max_body_bytes)
    configs = [b.config() for b in settings.backends]
    app[SETTINGS] = settings
    store = SQLiteJobStore(settings.store.path, settings.store.outputs_dir)
    app[STORE] = store
    slots = configs if role is None else [dataclasses.replace(c, max_in_flight=role.share(c.max_in_flight))
                                          for c in configs]
    app[POOL] = Pool(slots, pool_settings or settings.pool.pool_settings())
    app[metrics.METRICS] = metrics.Metrics()
    app[metrics.METRICS].watch(app[POOL])
    app[CLIENTS] = BackendClients(configs)
    app[MANAGED] = Supervisor(settings.managed, app[POOL], app[CLIENTS],
                              default_base_dir=settings.store.path.parent / "comfyui")
    known = app[TEMPLATES] = load_templates(templates_dir)
    state_dir = settings.store.path.parent
    evaluators = EvaluatorSource(settings.quality, on_score=app[metrics.METRICS].observe_score)
    app[PIPELINES] = PipelineJobs(store, app[POOL], known, evaluators,
                                  work_dir=state_dir / "pipeline-work", cache_dir=state_dir / "pipeline-cache")
    app[NOTIFIER] = Notifier()
    app[FEED] = EventFeed()
    store.watch_events(app[FEED].publish)
    if role is not None:
        app[PEERS] = PeerBus(role.bus_dir, role.index, role.count, functools.partial(_on_peer_message, app))
    app[LIFECYCLE] = Lifecycle(role)
    sockets: weakref.WeakSet[web.WebSocketResponse] = weakref.WeakSet()
    app[SOCKETS] = sockets
    for table in (jobs.routes, outputs.routes, events.routes, health.routes, metrics.routes, openapi.routes,
                  dashboard.routes, runs.routes, templates.routes):
        app.router.add_routes(table)
    inputs.install(app, settings)  # POST /v1/inputs, the input store and the URL fetcher
    app.cleanup_ctx.append(functools.partial(_lifespan, store=store))
    app.on_shutdown.append(_begin_drain)
    return app


async def drain(app: web.Application) -> None:
    """Drain while still listening: ``/readyz`` answers 503, workers stop claiming, running jobs get up
    to ``drain_timeout`` to finish and the rest go back to the queue. ``comfy-orch serve`` calls this
    on SIGTERM/SIGINT before it closes the listener; the shutdown that follows finds nothing left."""
    await _begin_drain(app)
    await _stop_workers(app[LIFECYCLE].workers, app[SETTINGS].server.drain_timeout)


async def _begin_drain(app: web.Application) -> None:
    """First step of shutdown (before cleanup): unready, stop claiming, close event sockets."""
    app[LIFECYCLE].drain()
    app[NOTIFIER].notify(relay=False)
    sockets = app[SOCKETS]
    for ws in list(sockets):
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")


def _on_peer_message(app: web.Application, kind: str, argument: str) -> None:
    """What a sibling process said (see ``service.peers``)."""
    notifier = app[NOTIFIER]
    if kind == "e":
        notifier.notify(relay=False)
    elif kind == "q":
        notifier.job_queued(relay=False)
    elif kind == "c" and argument.count(" ") == 1:
        job_id, job_kind = argument.split(" ")
        try:
            app[LIFECYCLE].spawn(jobs.interrupt(app, job_id, JobKind(job_kind)), name=f"cancel:{job_id}")
        except ValueError:
            log.warning("a sibling process asked to cancel job %r of an unknown kind %r", job_id, job_kind)
    else:
        log.warning("unknown message from a sibling process: %r %r", kind, argument)


async def _lifespan(app: web.Application, *, store: SQLiteJobStore) -> AsyncIterator[None]:
    settings, lifecycle = app[SETTINGS], app[LIFECYCLE]
    pool, clients = app[POOL], app[CLIENTS]
    role = lifecycle.role
    async with contextlib.AsyncExitStack() as stack:
        await store.open()
        stack.push_async_callback(store.close)
        if (peers := app.get(PEERS)) is not None:
            await peers.start()
            stack.callback(peers.close)
            app[NOTIFIER].relay = peers.publish
        stack.push_async_callback(clients.close)
        await pool.start()
        stack.push_async_callback(pool.close)
        stack.push_async_callback(app[MANAGED].stop)  # after the workers stop, before the pool closes; also
        await app[MANAGED].start()  # when a start is cut short. Local ComfyUIs join the pool as each answers
        instance = uuid.uuid4().hex[:8]
        templates = app[TEMPLATES]
        n_workers = settings.server.workers
        if role is not None:
            # No more workers than this process has slots: a job claimed here while only a sibling
            # has a free slot would wait here for one.
            slots = sum(status.max_in_flight for status in pool.backends())
            n_workers = min(role.share(n_workers), max(1, slots))
        stack.push_async_callback(app[PIPELINES].evaluators.close)
        if settings.store.keep_days is not None and (role is None or role.index == 0):
            keep = timedelta(days=settings.store.keep_days)
            pruning = asyncio.create_task(prune_forever(store, keep, cache=app[PIPELINES].cache), name="retention")
            stack.push_async_callback(_cancel, pruning)  # before the store closes
        workers = [
            Worker(store, pool, clients, templates, app[NOTIFIER], worker_id=f"{instance}-{n}",
                   lease_s=settings.server.lease_s, pipelines=app[PIPELINES], inputs=app[inputs.INPUTS],
                   adopted=lifecycle.adopted)
            for n in range(n_workers)
        ]
        adopter = Worker(store, pool, clients, templates, app[NOTIFIER], worker_id=f"{instance}-adopt",
                         lease_s=settings.server.lease_s, pipelines=app[PIPELINES], adopted=lifecycle.adopted)
        tasks = await _reconcile(app, adopter) if role is None or role.reconcile else []
        tasks += [asyncio.create_task(w.run(lifecycle.stopping), name=f"worker:{w.worker_id}") for w in workers]
        lifecycle.workers = tasks
        lifecycle.phase = Phase.READY
        log.info("service%s ready: %d workers, %d backends, %d prompts adopted",
                 f" process {role.label}" if role is not None else "", len(workers), len(pool.backends()),
                 len(tasks) - len(workers))
        try:
            yield
        finally:
            lifecycle.drain()
            app[NOTIFIER].notify(relay=False)
            await _stop_workers(tasks, settings.server.drain_timeout)
            if peers is not None:
                peers.close()  # no sibling's cancel starts work on a pool about to close
            await lifecycle.settle_spawned()


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _reconcile(app: web.Application, adopter: Worker) -> list[asyncio.Task[None]]:
    """Settle what a previous process left running; a prompt still queued or running on its backend
    is adopted: ``adopter`` holds its lease and follows it to the end (tasks returned)."""
    store, clients = app[STORE], app[CLIENTS]
    report = await reconcile_running(store, clients, worker_id=adopter.worker_id, lease_s=adopter.lease_s)
    # FOLLOW always names the attempt found in the backend's queue
    tasks = [adopter.adoption(item.job, item.attempt) for item in report.follow if item.attempt is not None]
    if report.items:
        log.info("start-up reconciliation: %s", report.counts())
    return tasks


async def _stop_workers(tasks: list[asyncio.Task[None]], drain_timeout: float) -> None:
    _done, pending = await asyncio.wait(tasks, timeout=drain_timeout) if tasks else (set(), set())
    for task in pending:
        task.cancel()  # its job is cancelled on its backend and released to the queue
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for result in results:
        if isinstance(result, Exception):
            log.error("a worker ended with an error: %r", result)
