"""What the service's JSON answers are read into: frozen dataclasses, never raw dicts."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from comfy_orchestrator.errors import ProtocolError
from comfy_orchestrator.store import JobKind, JobState

__all__ = ["BackendInfo", "JobInfo", "ServiceEvent"]

FINAL_EVENTS = frozenset({"job.succeeded", "job.failed", "job.cancelled"})


def _field(body: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = body.get(name)
    if not isinstance(value, kind):
        raise ProtocolError(f"the service answered {name}={value!r}, which is not a {kind}")
    return value


def _mapping(body: Mapping[str, Any], name: str) -> Mapping[str, Any] | None:
    value = body.get(name)
    return dict(value) if isinstance(value, dict) else None


@dataclass(frozen=True, slots=True)
class JobInfo:
    """One job as the service reports it. ``outputs`` names its files (``<node id>/<file name>``);
    it is empty in listings, which leave them out. ``result`` and ``error`` are the service's summaries."""

    id: str
    kind: JobKind
    state: JobState
    created: datetime
    updated: datetime
    labels: Mapping[str, str] = field(default_factory=dict)
    attempts: int = 0
    result: Mapping[str, Any] | None = None
    error: Mapping[str, Any] | None = None
    outputs: tuple[str, ...] = ()

    @property
    def final(self) -> bool:
        """Succeeded, failed or cancelled: the job will not change again."""
        return self.state.final

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> JobInfo:
        try:
            return cls(
                id=_field(body, "id", str),
                kind=JobKind(_field(body, "kind", str)),
                state=JobState(_field(body, "state", str)),
                created=datetime.fromisoformat(_field(body, "created", str)),
                updated=datetime.fromisoformat(_field(body, "updated", str)),
                labels={str(k): str(v) for k, v in (_mapping(body, "labels") or {}).items()},
                attempts=int(body.get("attempts") or 0),
                result=_mapping(body, "result"),
                error=_mapping(body, "error"),
                outputs=tuple(str(name) for name in body.get("outputs") or ()),
            )
        except ValueError as exc:
            raise ProtocolError(f"the service answered a job that does not parse: {exc}") from None


@dataclass(frozen=True, slots=True)
class ServiceEvent:
    """One stored event of a job: ``seq`` orders all of a tenant's events; ``type`` is
    ``job.queued``, ``job.running``, ``job.attempt``, ``job.progress``, ``job.cached``,
    ``job.retried``, ``job.succeeded``, ``job.failed`` or ``job.cancelled``."""

    seq: int
    job_id: str
    type: str
    at: datetime
    data: Mapping[str, Any] = field(default_factory=dict)

    @property
    def final(self) -> bool:
        """The job ended with this event."""
        return self.type in FINAL_EVENTS

    @property
    def fraction(self) -> float | None:
        """For ``job.progress``: how far the running node is, 0 to 1."""
        value = self.data.get("fraction")
        return float(value) if isinstance(value, int | float) else None

    @classmethod
    def from_json(cls, body: Any) -> ServiceEvent:
        if not isinstance(body, dict):
            raise ProtocolError(f"an event that is not an object: {body!r:.200}")
        try:
            return cls(seq=_field(body, "seq", int), job_id=_field(body, "job_id", str),
                       type=_field(body, "type", str), at=datetime.fromisoformat(_field(body, "at", str)),
                       data=_mapping(body, "data") or {})
        except ValueError as exc:
            raise ProtocolError(f"an event that does not parse: {exc}") from None


@dataclass(frozen=True, slots=True)
class BackendInfo:
    """One backend of the service's pool: health, breaker, load, how many node classes it has and
    the files each of its model folders lists."""

    name: str
    healthy: bool
    draining: bool
    breaker: str
    in_flight: int
    max_in_flight: int
    node_classes: int = 0
    models: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    last_model: str | None = None
    last_error: str | None = None
    success_rate: float | None = None

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> BackendInfo:
        models = _mapping(body, "models") or {}
        rate = body.get("success_rate")
        return cls(
            name=_field(body, "name", str),
            healthy=bool(body.get("healthy")),
            draining=bool(body.get("draining")),
            breaker=str(body.get("breaker", "")),
            in_flight=int(body.get("in_flight") or 0),
            max_in_flight=int(body.get("max_in_flight") or 0),
            node_classes=int(body.get("node_classes") or 0),
            models={str(k): tuple(str(f) for f in v or ()) for k, v in models.items()},
            last_model=body.get("last_model") if isinstance(body.get("last_model"), str) else None,
            last_error=body.get("last_error") if isinstance(body.get("last_error"), str) else None,
            success_rate=float(rate) if isinstance(rate, int | float) else None,
        )
