"""A pool of ComfyUI backends: routing by node classes and model files, pull-based dispatch with
model affinity, health checks, failover with backoff, a circuit breaker, events and statistics.

    Pool                   async context manager; run / submit / result / cancel / cancel_all,
                           add_backend / drain / remove_backend, backends(), stats(), subscribe()
    BackendConfig          one server: name, url, headers, max_in_flight, timeouts
    PoolSettings           health checks, capability refresh, retries, backoff, breaker
    PoolResult, Attempt    a finished job and each try it took
    PoolEvent, EventKind   queued, dispatched, progress, preview, cached, retried, done, failed, cancelled
    BackendStatus          a snapshot of one backend
    PoolStats              per backend (success rate, time) and per model (time)
    NoCapableBackend       no backend has what the graph needs; ``.missing`` says what, where
"""

from comfy_orchestrator.pool.backend import BackendStatus
from comfy_orchestrator.pool.config import BackendConfig, PoolSettings
from comfy_orchestrator.pool.events import EventKind, Listener, PoolEvent
from comfy_orchestrator.pool.health import BreakerState
from comfy_orchestrator.pool.jobs import Attempt, FailureKind, PoolResult
from comfy_orchestrator.pool.pool import Pool, PoolClosed
from comfy_orchestrator.pool.routing import Capabilities, NoCapableBackend, Requirements
from comfy_orchestrator.pool.stats import BackendStats, ModelStats, PoolStats

__all__ = [
    "Attempt",
    "BackendConfig",
    "BackendStats",
    "BackendStatus",
    "BreakerState",
    "Capabilities",
    "EventKind",
    "FailureKind",
    "Listener",
    "ModelStats",
    "NoCapableBackend",
    "Pool",
    "PoolClosed",
    "PoolEvent",
    "PoolResult",
    "PoolSettings",
    "PoolStats",
    "Requirements",
]
