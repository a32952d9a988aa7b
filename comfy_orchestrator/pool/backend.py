"""One backend of a pool: its long-lived client, health, capabilities, circuit breaker and slots."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from comfy_orchestrator.client import ComfyClient
from comfy_orchestrator.errors import ComfyOrchestratorError
from comfy_orchestrator.pool.config import BackendConfig, PoolSettings
from comfy_orchestrator.pool.health import BreakerState, CircuitBreaker, Health
from comfy_orchestrator.pool.jobs import Upload
from comfy_orchestrator.pool.routing import Capabilities
from comfy_orchestrator.pool.uploads import stored_filename

__all__ = ["Backend", "BackendStatus"]

log = logging.getLogger(__name__)

_SPEED_WEIGHT = 0.2  # weight of the newest attempt in the moving mean of attempt seconds


@dataclass(frozen=True, slots=True)
class BackendStatus:
    """A snapshot of one backend, for status pages and tests."""

    name: str
    url: str
    healthy: bool
    draining: bool
    in_flight: int
    max_in_flight: int
    breaker: BreakerState
    node_classes: int  # how many node classes /object_info lists (0 while unknown)
    models: Mapping[str, tuple[str, ...]]  # model folder -> files its loaders offer
    last_model: str | None  # the checkpoint / diffusion model of the last job it took
    last_error: str | None  # of the last failed health check


class Backend:
    """The pool's view of one ComfyUI server. Jobs run on it through :attr:`client`, one client for
    the backend's whole life in the pool."""

    def __init__(self, config: BackendConfig, settings: PoolSettings) -> None:
        self.config = config
        self.name = config.name
        self.settings = settings
        self.client = ComfyClient(config.url, timeouts=config.timeouts, headers=config.headers)
        self.health = Health(settings.fail_threshold, settings.recover_threshold)
        self.breaker = CircuitBreaker(settings.breaker_failures, settings.breaker_reset)
        self.capabilities: Capabilities | None = None
        self.in_flight = 0  # slots taken: prompts queued or executing on the server
        self.attempts = 0  # attempts under way (a freed slot's attempt may still be fetching its result)
        self.draining = False
        self.removed = False
        self.last_model: str | None = None
        self.mean_seconds: float | None = None  # moving mean of the execution time of its prompts
        self._taken: deque[float] = deque()  # when each held slot was taken, oldest first
        self.idle = asyncio.Event()
        self.idle.set()
        self._stored: dict[str, str] = {}  # sha256 -> the name LoadImage must use on this server
        self._upload_lock = asyncio.Lock()

    # -- dispatch ----------------------------------------------------------------------------------

    def eligible(self) -> bool:
        """Whether it may be given work at all (up, known, not draining, breaker letting jobs through)."""
        return (
            not self.removed
            and not self.draining
            and self.health.up
            and self.capabilities is not None
            and self.breaker.allows()
        )

    def can_take(self) -> bool:
        """Eligible and with a free slot."""
        return self.in_flight < self.config.max_in_flight and self.eligible()

    def take(self, model: str | None) -> None:
        """A job was given a slot here (an attempt starts)."""
        self.in_flight += 1
        self._taken.append(time.monotonic())
        self.attempts += 1
        self.idle.clear()
        self.breaker.started()
        if model is not None:
            self.last_model = model

    def free_slot(self) -> None:
        self.in_flight -= 1
        self._taken.popleft()  # the server runs its prompts in order: the oldest finishes first

    def end_attempt(self) -> None:
        self.attempts -= 1
        if self.attempts == 0:
            self.idle.set()

    def record_time(self, seconds: float) -> None:
        """Feed the moving mean of how long one prompt executes here."""
        prev = self.mean_seconds
        self.mean_seconds = seconds if prev is None else prev + _SPEED_WEIGHT * (seconds - prev)

    def backlog(self, now: float) -> float | None:
        """Estimated seconds until the prompts it holds are done; None while its speed is unknown, or
        when they take far longer than they should (a slow model load, a hang: no estimate)."""
        mean = self.mean_seconds
        if mean is None:
            return None
        if not self._taken:
            return 0.0
        expected, elapsed = len(self._taken) * mean, now - self._taken[0]
        if elapsed > 2 * expected + 1.0:
            return None
        return max(0.0, expected - elapsed)

    # -- health and capabilities ---------------------------------------------------------------------

    async def check(self) -> None:
        """One health check: GET /system_stats and GET /queue must answer in time. Raises on failure."""
        async with asyncio.timeout(self.settings.health_timeout):
            await self.client.system_stats()
            await self.client.queue()

    async def refresh_capabilities(self) -> Capabilities:
        info = await self.client.object_info(refresh=True)
        self.capabilities = Capabilities.from_object_info(info)
        return self.capabilities

    def capabilities_stale(self) -> bool:
        caps = self.capabilities
        return caps is None or time.monotonic() - caps.fetched_at >= self.settings.capabilities_refresh

    async def probe(self) -> bool:
        """Check health (and fetch capabilities when due); True when the backend's state changed."""
        was_up, caps = self.health.up, self.capabilities
        try:
            await self.check()
            if not self.health.up or self.capabilities_stale():
                await self.refresh_capabilities()
        except (ComfyOrchestratorError, TimeoutError) as exc:
            if self.health.failure(f"{type(exc).__name__}: {exc}"):
                log.warning("backend %s is down after %d failed checks: %s", self.name, self.health.failures, exc)
        else:
            if self.health.success():
                log.info("backend %s is up (%s)", self.name, self.config.url)
                self._stored.clear()  # a restarted server may have lost its input files
        return self.health.up != was_up or self.capabilities is not caps

    async def watch(self, on_change: Callable[[], None]) -> None:
        """Probe every ``health_interval`` seconds until cancelled; call ``on_change`` after each probe."""
        while not self.removed:
            await self.probe()
            on_change()
            await asyncio.sleep(self.settings.health_interval)

    def job_found_unavailable(self, error: str) -> None:
        """A job saw the server unreachable: that counts as a failed health check."""
        if self.health.failure(error):
            log.warning("backend %s is down after %d failures (the last a job's: %s)", self.name,
                        self.health.failures, error)

    # -- files -------------------------------------------------------------------------------------

    async def put_uploads(self, uploads: Iterable[Upload]) -> dict[str, str]:
        """Upload each file unless this server already has its content; name in graph -> stored name."""
        names: dict[str, str] = {}
        async with self._upload_lock:
            for upload in uploads:
                stored = self._stored.get(upload.sha256)
                if stored is None:
                    ref = await self.client.upload_image(upload.data, filename=stored_filename(upload))
                    stored = f"{ref.subfolder}/{ref.filename}" if ref.subfolder else ref.filename
                    self._stored[upload.sha256] = stored
                    log.debug("uploaded %s to %s as %s", upload.name, self.name, stored)
                names[upload.name] = stored
        return names

    # -- life cycle --------------------------------------------------------------------------------

    async def close(self) -> None:
        self.removed = True
        await self.client.close()

    def status(self) -> BackendStatus:
        caps = self.capabilities
        return BackendStatus(
            name=self.name,
            url=self.config.url,
            healthy=self.health.up,
            draining=self.draining,
            in_flight=self.in_flight,
            max_in_flight=self.config.max_in_flight,
            breaker=self.breaker.state,
            node_classes=len(caps.node_classes) if caps is not None else 0,
            models=caps.summary() if caps is not None else {},
            last_model=self.last_model,
            last_error=self.health.last_error,
        )
