"""The service's settings: one frozen pydantic model, loaded from a TOML file by the CLI.

    [server]   host, port, workers (claiming tasks), lease_s, drain_timeout (seconds a shutdown
               waits for running jobs before handing them back to the queue), heartbeat_s
    [store]    path (the SQLite file), outputs_dir
    [[backends]] name, url, headers, max_in_flight
    [[tokens]] token, tenant          bearer tokens, each naming the tenant it acts for
    [limits]   max_body_bytes, max_queued_per_tenant, max_nodes, max_pixels

Unknown keys are refused, so a typo names itself in the error instead of being ignored.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from comfy_orchestrator.errors import ComfyOrchestratorError
from comfy_orchestrator.pool import BackendConfig

__all__ = [
    "BackendSettings",
    "LimitSettings",
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


class StoreSettings(_Section):
    path: Path = Path("var/jobs.db")
    outputs_dir: Path = Path("var/outputs")


class BackendSettings(_Section):
    name: str = Field(min_length=1)
    url: str = Field(pattern=r"^https?://")
    headers: dict[str, str] = Field(default_factory=dict)
    max_in_flight: int = Field(default=1, ge=1)

    def config(self) -> BackendConfig:
        return BackendConfig(self.name, self.url, headers=dict(self.headers), max_in_flight=self.max_in_flight)


class TokenSettings(_Section):
    token: str = Field(min_length=16, repr=False)  # never shown in a repr or an error
    tenant: str = Field(min_length=1, max_length=128)


class LimitSettings(_Section):
    max_body_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)
    max_queued_per_tenant: int = Field(default=100, ge=1)
    max_nodes: int = Field(default=500, ge=1)
    max_pixels: int = Field(default=4096 * 4096, ge=1)


class ServiceSettings(_Section):
    """Everything ``create_app`` needs; ``ServiceSettings.load("service.toml")``."""

    server: ServerSettings = ServerSettings()
    store: StoreSettings = StoreSettings()
    backends: tuple[BackendSettings, ...] = ()
    tokens: tuple[TokenSettings, ...] = ()
    limits: LimitSettings = LimitSettings()

    @field_validator("backends")
    @classmethod
    def _unique_backends(cls, backends: tuple[BackendSettings, ...]) -> tuple[BackendSettings, ...]:
        names = [b.name for b in backends]
        if len(set(names)) != len(names):
            raise ValueError(f"backend names must be unique, got {names}")
        return backends

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
