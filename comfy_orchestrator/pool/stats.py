"""Statistics of a pool's run: per backend (attempts, successes, failures, time) and per model (time)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from comfy_orchestrator.pool.jobs import Attempt, FailureKind

__all__ = ["BackendStats", "ModelStats", "PoolStats"]


@dataclass(frozen=True, slots=True)
class BackendStats:
    """Attempts one backend ran: ``ok`` succeeded, ``failed`` did not (for any reason but a cancel)."""

    name: str
    ok: int
    failed: int
    cancelled: int
    busy_seconds: float  # time spent in attempts, all outcomes
    mean_seconds: float | None  # of the attempts that succeeded
    failures: Mapping[str, int]  # FailureKind -> count

    @property
    def attempts(self) -> int:
        return self.ok + self.failed + self.cancelled

    @property
    def success_rate(self) -> float | None:
        """ok / (ok + failed); None before the first finished attempt."""
        done = self.ok + self.failed
        return self.ok / done if done else None


@dataclass(frozen=True, slots=True)
class ModelStats:
    """Jobs that finished on a model (checkpoint or diffusion model; ``"none"`` for model-free graphs)."""

    model: str
    jobs: int
    total_seconds: float

    @property
    def mean_seconds(self) -> float:
        return self.total_seconds / self.jobs if self.jobs else 0.0


@dataclass(frozen=True, slots=True)
class PoolStats:
    jobs_ok: int
    jobs_failed: int
    jobs_cancelled: int
    retries: int
    backends: Mapping[str, BackendStats]
    models: Mapping[str, ModelStats]


class _BackendTally:
    __slots__ = ("busy", "cancelled", "failed", "failures", "ok", "ok_seconds")

    def __init__(self) -> None:
        self.ok = self.failed = self.cancelled = 0
        self.busy = self.ok_seconds = 0.0
        self.failures: dict[str, int] = {}


class StatsRecorder:
    """Counts as jobs go; :meth:`snapshot` freezes them into a :class:`PoolStats`."""

    def __init__(self) -> None:
        self._backends: dict[str, _BackendTally] = {}
        self._models: dict[str, tuple[int, float]] = {}
        self.jobs_ok = self.jobs_failed = self.jobs_cancelled = self.retries = 0

    def attempt(self, attempt: Attempt) -> None:
        tally = self._backends.setdefault(attempt.backend, _BackendTally())
        tally.busy += attempt.seconds
        if attempt.reason is None:
            tally.ok += 1
            tally.ok_seconds += attempt.seconds
        elif attempt.reason is FailureKind.CANCELLED:
            tally.cancelled += 1
        else:
            tally.failed += 1
            tally.failures[attempt.reason] = tally.failures.get(attempt.reason, 0) + 1

    def job_done(self, model: str | None, seconds: float) -> None:
        self.jobs_ok += 1
        key = model or "none"
        jobs, total = self._models.get(key, (0, 0.0))
        self._models[key] = (jobs + 1, total + seconds)

    def snapshot(self) -> PoolStats:
        backends = {
            name: BackendStats(
                name=name,
                ok=t.ok,
                failed=t.failed,
                cancelled=t.cancelled,
                busy_seconds=t.busy,
                mean_seconds=t.ok_seconds / t.ok if t.ok else None,
                failures=MappingProxyType(dict(t.failures)),
            )
            for name, t in self._backends.items()
        }
        models = {name: ModelStats(name, jobs, total) for name, (jobs, total) in self._models.items()}
        return PoolStats(
            jobs_ok=self.jobs_ok,
            jobs_failed=self.jobs_failed,
            jobs_cancelled=self.jobs_cancelled,
            retries=self.retries,
            backends=MappingProxyType(backends),
            models=MappingProxyType(models),
        )
