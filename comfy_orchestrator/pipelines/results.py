"""What a pipeline produces: images with their lineage, job outcomes, step results, the run's result."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from comfy_orchestrator.config import Timings
from comfy_orchestrator.pipelines.stats import RunStats
from comfy_orchestrator.pipelines.types import Score

__all__ = [
    "Artifact",
    "AttemptRecord",
    "BackendTry",
    "JobOutcome",
    "JobStatus",
    "LoopAttempt",
    "PipelineResult",
    "StepResult",
    "StepStatus",
]


class JobStatus(enum.StrEnum):
    DONE = "done"  # ran on a backend; images saved
    CACHED = "cached"  # served from the disk cache: no pool call
    SKIPPED = "skipped"  # its images were already in out_dir (skip_existing)
    FAILED = "failed"  # failed after its retries
    CANCELLED = "cancelled"  # the run was cancelled while it ran

    @property
    def ok(self) -> bool:
        return self in (JobStatus.DONE, JobStatus.CACHED, JobStatus.SKIPPED)


class StepStatus(enum.StrEnum):
    DONE = "done"  # every job succeeded (or the step needs no job)
    PARTIAL = "partial"  # some jobs failed (on_error="continue"); the others' images go on
    FAILED = "failed"  # nothing came out
    SKIPPED = "skipped"  # not run: an input failed or passed no image on
    GATED = "gated"  # not run: on the branch of a gate that was not taken
    CANCELLED = "cancelled"  # the run was aborted before this step finished


@dataclass(frozen=True, slots=True)
class Artifact:
    """One image a step made, saved at ``path``, with where it came from.

    ``step`` made it by running a graph (content ``key``) with ``model``/``seed``/``params``;
    ``parents`` are the ids of the images it was made from (a transform's input). Scoring and
    selection keep the artifact and add ``score``.
    """

    id: str
    step: str
    path: Path
    key: str
    index: int = 0
    model: str | None = None
    seed: int | None = None
    prompt: str | None = None
    negative: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    parents: tuple[str, ...] = ()
    job_id: str | None = None
    backend: str | None = None
    cached: bool = False
    score: float | None = None
    score_parts: Mapping[str, float] = field(default_factory=dict)

    def read_bytes(self) -> bytes:
        return self.path.read_bytes()

    def open(self) -> Image.Image:
        with Image.open(self.path) as image:
            return image.convert("RGB")

    def with_score(self, score: Score) -> Artifact:
        return dataclasses.replace(self, score=float(score.value), score_parts=dict(score.parts))

    def metric(self, part: str | None = None) -> float | None:
        """The score (``part`` of it when given), or None when unscored."""
        return self.score if part is None else self.score_parts.get(part)

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data.update(path=str(self.path), params=dict(self.params), parents=list(self.parents),
                    score_parts=dict(self.score_parts))
        return data


@dataclass(frozen=True, slots=True)
class BackendTry:
    """One backend's go at a job (the pool may try several per pipeline attempt)."""

    backend: str
    ok: bool
    seconds: float | None = None


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """One pool call of a job: where it ran, how long it took, how it failed, how long we waited after."""

    number: int
    started_at: float
    elapsed: float
    job_id: str | None = None
    backend: str | None = None
    error: str | None = None
    error_type: str | None = None
    wait: float | None = None
    tries: tuple[BackendTry, ...] = ()


@dataclass(frozen=True, slots=True)
class JobOutcome:
    """What became of one graph of a step (after retries)."""

    step: str
    key: str
    status: JobStatus
    model: str | None = None
    seed: int | None = None
    artifacts: tuple[Artifact, ...] = ()
    attempts: tuple[AttemptRecord, ...] = ()
    job_id: str | None = None
    backend: str | None = None
    elapsed: float = 0.0
    timings: Timings | None = None
    error: str | None = None
    exception: BaseException | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class LoopAttempt:
    """One round of the quality-gated loop: what was tried, why, and how it scored."""

    number: int
    model: str | None
    seed: int
    steps: int
    reason: str
    status: JobStatus
    prompt: str | None = None
    score: float | None = None
    artifact: Artifact | None = None
    job_id: str | None = None
    backend: str | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class StepResult:
    """One step's result. ``tried`` holds the results a fallback replaced, in order."""

    name: str
    kind: str
    status: StepStatus
    artifacts: tuple[Artifact, ...] = ()
    jobs: tuple[JobOutcome, ...] = ()
    reason: str | None = None
    passed: bool | None = None
    fallback: str | None = None
    history: tuple[LoopAttempt, ...] = ()
    tried: tuple[StepResult, ...] = ()
    elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status is StepStatus.DONE

    @property
    def failed_jobs(self) -> list[JobOutcome]:
        return [job for job in self.jobs if job.status is JobStatus.FAILED]


@dataclass(frozen=True)
class PipelineResult:
    """Every step's result, the run's statistics, and ways to read the images back."""

    name: str
    steps: Mapping[str, StepResult]
    out_dir: Path
    stats: RunStats
    order: Sequence[str] = ()

    @property
    def ok(self) -> bool:
        """True when every step ran to the end, or was on a gate's branch not taken."""
        return all(s.status in (StepStatus.DONE, StepStatus.GATED) for s in self.steps.values())

    def __getitem__(self, step: str) -> StepResult:
        return self.steps[step]

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready summary: statistics, and per step its status, why, and its images."""
        return {
            "name": self.name, "ok": self.ok, "out_dir": str(self.out_dir), "stats": self.stats.as_dict(),
            "steps": {
                name: {"kind": r.kind, "status": r.status.value, "reason": r.reason, "passed": r.passed,
                       "fallback": r.fallback, "elapsed_s": round(r.elapsed, 3),
                       "images": [{"id": a.id, "path": str(a.path), "model": a.model, "seed": a.seed,
                                   "score": a.score, "parents": list(a.parents)} for a in r.artifacts]}
                for name, r in self.steps.items()
            },
        }

    def artifacts(self, step: str | None = None) -> list[Artifact]:
        """The images ``step`` passed on, or every image made by any step (scored copies preferred)."""
        if step is not None:
            return list(self.steps[step].artifacts)
        latest: dict[str, Artifact] = {}
        for name in self.order or list(self.steps):
            result = self.steps.get(name)
            for artifact in result.artifacts if result is not None else ():
                if artifact.id not in latest or artifact.score is not None:
                    latest[artifact.id] = artifact
        return list(latest.values())

    @property
    def outputs(self) -> list[Artifact]:
        """The images of the last step (in declaration order) that passed any on."""
        for name in reversed(self.order or list(self.steps)):
            result = self.steps.get(name)
            if result is not None and result.artifacts:
                return list(result.artifacts)
        return []

    def lineage(self, artifact: Artifact) -> list[Artifact]:
        """``artifact`` and then the images it was made from, back to a generated one."""
        by_id = {a.id: a for a in self.artifacts()}
        chain = [artifact]
        while chain[-1].parents:
            parent = by_id.get(chain[-1].parents[0])
            if parent is None:
                break
            chain.append(parent)
        return chain
