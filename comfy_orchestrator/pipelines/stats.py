"""Run statistics: counts by outcome, time per model, success rate per backend."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from comfy_orchestrator.pipelines.results import JobOutcome

__all__ = ["BackendStats", "ModelStats", "RunStats"]


@dataclass(frozen=True, slots=True)
class ModelStats:
    """Jobs that ran on the GPU for one model, and their wall time (queueing included)."""

    jobs: int
    seconds: float

    @property
    def mean_seconds(self) -> float:
        return self.seconds / self.jobs if self.jobs else 0.0


@dataclass(frozen=True, slots=True)
class BackendStats:
    """Tries of jobs on one backend (the pool's failovers included): how many, how many succeeded."""

    attempts: int
    succeeded: int

    @property
    def success_rate(self) -> float:
        return self.succeeded / self.attempts if self.attempts else 0.0


@dataclass(frozen=True, slots=True)
class RunStats:
    """What a run (or a batch) did: ``completed`` ran on a backend, ``cached`` came from the disk
    cache, ``skipped`` were already done, ``failed`` failed after their retries."""

    completed: int = 0
    cached: int = 0
    skipped: int = 0
    failed: int = 0
    cancelled: int = 0
    retries: int = 0
    elapsed: float = 0.0
    by_model: dict[str, ModelStats] = field(default_factory=dict)
    by_backend: dict[str, BackendStats] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.completed + self.cached + self.skipped + self.failed + self.cancelled

    @classmethod
    def from_outcomes(cls, outcomes: Iterable[JobOutcome], elapsed: float) -> RunStats:
        counts = {"done": 0, "cached": 0, "skipped": 0, "failed": 0, "cancelled": 0}
        retries = 0
        model_time: dict[str, list[float]] = {}
        backend: dict[str, list[int]] = {}
        for outcome in outcomes:
            counts[outcome.status.value] += 1
            retries += max(0, len(outcome.attempts) - 1)
            if outcome.status.value == "done":
                model_time.setdefault(outcome.model or "(template default)", []).append(outcome.elapsed)
            for attempt in outcome.attempts:
                for go in attempt.tries:
                    tally = backend.setdefault(go.backend, [0, 0])
                    tally[0] += 1
                    tally[1] += go.ok
        return cls(
            completed=counts["done"], cached=counts["cached"], skipped=counts["skipped"],
            failed=counts["failed"], cancelled=counts["cancelled"], retries=retries, elapsed=elapsed,
            by_model={m: ModelStats(len(t), sum(t)) for m, t in sorted(model_time.items())},
            by_backend={b: BackendStats(n, ok) for b, (n, ok) in sorted(backend.items())},
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "completed": self.completed, "cached": self.cached, "skipped": self.skipped,
            "failed": self.failed, "cancelled": self.cancelled, "retries": self.retries,
            "elapsed_s": round(self.elapsed, 3),
            "by_model": {m: {"jobs": s.jobs, "seconds": round(s.seconds, 3), "mean_s": round(s.mean_seconds, 3)}
                         for m, s in self.by_model.items()},
            "by_backend": {b: {"attempts": s.attempts, "succeeded": s.succeeded,
                               "success_rate": round(s.success_rate, 3)} for b, s in self.by_backend.items()},
        }

    def summary(self) -> str:
        """One line: ``12 jobs: 8 completed, 2 skipped, 1 cached, 1 failed in 3.4s``."""
        return (f"{self.total} jobs: {self.completed} completed, {self.skipped} skipped, {self.cached} cached, "
                f"{self.failed} failed" + (f", {self.cancelled} cancelled" if self.cancelled else "")
                + f" in {self.elapsed:.1f}s")
