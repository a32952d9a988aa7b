"""What a pool is made of: one ``BackendConfig`` per ComfyUI server and the pool's ``PoolSettings``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from comfy_orchestrator._backoff import backoff_delay
from comfy_orchestrator.config import Timeouts

__all__ = ["BackendConfig", "PoolSettings"]


@dataclass(frozen=True, slots=True)
class BackendConfig:
    """One ComfyUI server of a pool.

    name: unique in the pool; events, results and statistics name the backend by it.
    url: the server's base URL (``http://gpu-box:8188``).
    headers: sent with every request, e.g. ``{"Authorization": "Bearer …"}`` for a server behind a proxy.
    max_in_flight: prompts the pool keeps on this server at once (queued there or running). ComfyUI
        runs one prompt at a time: with 1 the server idles for a round trip between two prompts; with 2
        the next one waits on the server, so it never idles (the dispatcher keeps a slow backend from
        hoarding the last jobs of a batch, see ``dispatch``).
    timeouts: the client's deadlines for this server (``None``: ``Timeouts()``); ``stall`` is the
        watchdog that turns a hung prompt into a failover.
    """

    name: str
    url: str
    headers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    max_in_flight: int = 1
    timeouts: Timeouts | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a backend needs a name")
        if self.max_in_flight < 1:
            raise ValueError(f"backend {self.name}: max_in_flight must be at least 1, got {self.max_in_flight}")


@dataclass(frozen=True, slots=True)
class PoolSettings:
    """How a pool watches its backends and retries jobs (seconds unless said otherwise).

    health_interval: time between two health checks (GET /system_stats and GET /queue) of a backend.
    health_timeout: how long one health check may take before it counts as failed.
    fail_threshold: consecutive failures (failed checks, and jobs that found the server unavailable)
        that mark a healthy backend down.
    recover_threshold: consecutive passed checks that bring a down backend up again. A backend that has
        never failed comes up on its first passed check.
    capabilities_refresh: how often /object_info (node classes, model lists) is fetched again; it is
        also fetched whenever a backend comes up.
    max_attempts: attempts per job for failures worth retrying elsewhere (server unavailable, died,
        5xx, stalled). A rejected graph or a node error is never retried; an out-of-memory error gets
        one extra attempt after ``POST /free`` on the backend that ran out.
    backoff_initial, backoff_max, backoff_jitter: the wait before a retry is
        ``min(backoff_max, backoff_initial * 2 ** (retry - 1))``, scaled by a random factor in
        ``[1 - jitter, 1 + jitter]``.
    breaker_failures: consecutive failed attempts on a backend that open its circuit breaker (it then
        takes no job); after ``breaker_reset`` it is half-open: one trial job, whose success closes it.
    keep_finished: finished jobs whose results stay readable through ``Pool.result``.
    """

    health_interval: float = 5.0
    health_timeout: float = 5.0
    fail_threshold: int = 3
    recover_threshold: int = 2
    capabilities_refresh: float = 60.0
    max_attempts: int = 3
    backoff_initial: float = 0.5
    backoff_max: float = 10.0
    backoff_jitter: float = 0.2
    breaker_failures: int = 5
    breaker_reset: float = 30.0
    keep_finished: int = 1024

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.fail_threshold < 1 or self.recover_threshold < 1 or self.breaker_failures < 1:
            raise ValueError("fail_threshold, recover_threshold and breaker_failures must be at least 1")
        if not 0 <= self.backoff_jitter < 1:
            raise ValueError("backoff_jitter must be in [0, 1)")

    def backoff(self, retry: int, random: float) -> float:
        """The wait before retry number ``retry`` (1 for the first), ``random`` uniform in [0, 1)."""
        return backoff_delay(retry, initial=self.backoff_initial, maximum=self.backoff_max,
                             jitter=self.backoff_jitter, random=random)
