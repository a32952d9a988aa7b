"""``GET /metrics``: the service's Prometheus metrics, on a registry of its own.

Each application holds one :class:`Metrics` (under ``METRICS``) with its own ``CollectorRegistry``:
nothing is registered at import, so two apps in one process (the tests) never share a sample.

    comfy_orchestrator_jobs{state}                          queued and running jobs, read from the
                                                            store at scrape time (all tenants summed)
    comfy_orchestrator_queue_depth                          jobs waiting for a worker (= jobs{state="queued"})
    comfy_orchestrator_backend_in_flight{backend}           prompts each backend is running now
    comfy_orchestrator_backend_healthy{backend}             1 when the pool's health checks pass
    comfy_orchestrator_attempts_total{backend,outcome}      pool attempts that ended: succeeded / failed
                                                            / cancelled
    comfy_orchestrator_attempt_seconds{backend,outcome}     dispatch → end of each attempt, per backend
    comfy_orchestrator_image_score                          every quality score the evaluator gave an image
                                                            of a pipeline job (CLIPScore scale, 0..2.5)
    comfy_orchestrator_http_requests_total{route,method,status}
    comfy_orchestrator_http_request_seconds{route,method}

In a multi-process service (``service.processes``) every value lives in ``PROMETHEUS_MULTIPROC_DIR``
and ``/metrics`` sums counters and histograms over the processes (whichever answers); the store's
gauges come from the process that answers, ``backend_in_flight`` is summed over the live processes.

``/metrics`` is served without a token (Prometheus scrapes it, usually on a private network): it
therefore shows nothing that belongs to a tenant — no tenant names, job ids, labels or token
fragments; routes are their templates (``/v1/jobs/{job_id}``), never the concrete path.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from comfy_orchestrator.pool import EventKind, Pool, PoolEvent
from comfy_orchestrator.service.keys import POOL, STORE
from comfy_orchestrator.store import JobState, JobStore

__all__ = ["METRICS", "Metrics", "metrics_middleware", "routes"]

log = logging.getLogger(__name__)

routes = web.RouteTableDef()

_NS = "comfy_orchestrator"
_ACTIVE = (JobState.QUEUED, JobState.RUNNING)
# A prompt takes from well under a second (a cached graph) to many minutes (video, upscales).
_ATTEMPT_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, float("inf"))
_HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, float("inf"))
_SCORE_BUCKETS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5, float("inf"))  # 2.5·max(cos, 0)
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_ENDS = {EventKind.DONE: "succeeded", EventKind.RETRIED: "failed", EventKind.FAILED: "failed",
         EventKind.CANCELLED: "cancelled"}


class Metrics:
    """The metrics of one application, on ``self.registry``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # set by the parent of a multi-process service (read by prometheus_client at import, too)
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self.jobs = Gauge(f"{_NS}_jobs", "Jobs queued or running, by state (all tenants).", ["state"], registry=r,
                          multiprocess_mode="mostrecent")
        self.queue_depth = Gauge(f"{_NS}_queue_depth", "Jobs waiting for a worker (all tenants).", registry=r,
                                 multiprocess_mode="mostrecent")
        self.in_flight = Gauge(f"{_NS}_backend_in_flight", "Prompts a backend runs now.", ["backend"], registry=r,
                               multiprocess_mode="livesum")
        self.healthy = Gauge(f"{_NS}_backend_healthy", "1 when a backend passes its health checks.", ["backend"],
                             registry=r, multiprocess_mode="mostrecent")
        self.attempts = Counter(f"{_NS}_attempts", "Pool attempts that ended, by backend and outcome.",
                                ["backend", "outcome"], registry=r)
        self.attempt_seconds = Histogram(f"{_NS}_attempt_seconds", "Time from dispatch to the end of an attempt.",
                                         ["backend", "outcome"], buckets=_ATTEMPT_BUCKETS, registry=r)
        self.score = Histogram(f"{_NS}_image_score", "Quality scores given to the images of pipeline jobs.",
                               buckets=_SCORE_BUCKETS, registry=r)
        self.requests = Counter(f"{_NS}_http_requests", "HTTP requests answered, by route template and status.",
                                ["route", "method", "status"], registry=r)
        self.request_seconds = Histogram(f"{_NS}_http_request_seconds", "Time to answer an HTTP request.",
                                         ["route", "method"], buckets=_HTTP_BUCKETS, registry=r)
        self._dispatched: dict[str, tuple[str, float]] = {}  # job id -> (backend, dispatch time) of its attempt

    def watch(self, pool: Pool) -> None:
        """Observe every attempt ``pool`` runs (a synchronous listener: it never awaits)."""
        pool.add_listener(self.on_pool_event)

    def on_pool_event(self, event: PoolEvent) -> None:
        if event.kind is EventKind.DISPATCHED and event.backend is not None:
            self._dispatched[event.job_id] = (event.backend, event.at)
            self._publish_running(event.backend)
            return
        outcome = _ENDS.get(event.kind)
        if outcome is None:
            return
        started = self._dispatched.pop(event.job_id, None)
        if started is None:  # failed or cancelled before any backend took it
            return
        backend, at = started
        self._publish_running(backend)
        self.attempts.labels(backend, outcome).inc()
        self.attempt_seconds.labels(backend, outcome).observe(max(event.at - at, 0.0))

    def _running(self, backend: str) -> int:
        """This process's attempts on ``backend`` now (dispatched, not ended)."""
        return sum(1 for name, _ in self._dispatched.values() if name == backend)

    def _publish_running(self, backend: str) -> None:
        """Many processes: each keeps its own gauge current, and a scrape sums the live ones."""
        if self.multiprocess:
            self.in_flight.labels(backend).set(self._running(backend))

    def observe_score(self, score: float) -> None:
        """Record a quality score the evaluator gave an image."""
        self.score.observe(score)

    async def refresh(self, store: JobStore, pool: Pool) -> None:
        """Read the gauges' values: active jobs from the store (one count per state), in-flight
        prompts and health from the pool."""
        counts = await store.count_by_state(_ACTIVE)
        for state, n in counts.items():
            self.jobs.labels(state.value).set(n)
        self.queue_depth.set(counts[JobState.QUEUED])
        for status in pool.backends():
            # many processes: each its own attempts, summed (every backend has a series from the first scrape)
            self.in_flight.labels(status.name).set(self._running(status.name) if self.multiprocess
                                                   else status.in_flight)
            self.healthy.labels(status.name).set(1 if status.healthy else 0)

    def exposition(self) -> bytes:
        if not self.multiprocess:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]  # every process's values, summed
        return generate_latest(registry)


METRICS = web.AppKey("metrics", Metrics)


def _route(request: web.Request) -> str:
    info = request.match_info
    if info.http_exception is not None or info.route.resource is None:
        return "unmatched"  # never the raw path: it would let any client mint new series
    return info.route.resource.canonical


@web.middleware
async def metrics_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Count each answer by route template, method and status (outermost, so it sees the final status)."""
    metrics = request.app[METRICS]
    started = time.perf_counter()
    status = 500
    try:
        response: web.StreamResponse = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    except asyncio.CancelledError:
        status = 499  # the client went away before the answer
        raise
    finally:
        route, method = _route(request), request.method if request.method in _METHODS else "other"
        metrics.requests.labels(route, method, str(status)).inc()
        metrics.request_seconds.labels(route, method).observe(time.perf_counter() - started)


@routes.get("/metrics")
async def scrape(request: web.Request) -> web.Response:
    app = request.app
    observed = app[METRICS]
    await observed.refresh(app[STORE], app[POOL])
    return web.Response(body=observed.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})
