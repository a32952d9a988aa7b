"""A pool job: what was asked, each attempt at it, and the typed result."""

from __future__ import annotations

import asyncio
import enum
import hashlib
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from comfy_orchestrator.client import GraphLike
from comfy_orchestrator.config import RunResult
from comfy_orchestrator.errors import (
    BackendError,
    ComfyTimeout,
    DeadlineExceeded,
    ExecutionFailed,
    GraphError,
    JobCancelled,
)
from comfy_orchestrator.graph import Graph
from comfy_orchestrator.pool.routing import Capabilities, Requirements

__all__ = ["Attempt", "FailureKind", "Job", "PoolResult", "Upload", "classify"]

_sequence = itertools.count()


class FailureKind(enum.StrEnum):
    """Why an attempt ended without a result, and so whether the job is tried again."""

    UNAVAILABLE = "unavailable"  # refused, reset, 5xx, died mid-job, prompt lost: retried elsewhere
    STALLED = "stalled"  # the no-progress watchdog (or the backend's own deadline) fired: retried elsewhere
    OUT_OF_MEMORY = "out_of_memory"  # a node ran out of memory: POST /free there, one retry elsewhere
    REJECTED = "rejected"  # the graph was rejected (GraphValidationError): never retried
    EXECUTION = "execution"  # a node raised (deterministic): never retried
    CANCELLED = "cancelled"  # cancelled by the caller, or interrupted on the server
    DEADLINE = "deadline"  # the job's own timeout passed


def classify(exc: BaseException, *, job_deadline_passed: bool = False) -> FailureKind:
    """The kind of failure an exception from ``ComfyClient.run`` stands for."""
    if isinstance(exc, JobCancelled | asyncio.CancelledError):
        return FailureKind.CANCELLED
    if isinstance(exc, GraphError):
        return FailureKind.REJECTED
    if isinstance(exc, ExecutionFailed):
        return FailureKind.OUT_OF_MEMORY if exc.out_of_memory else FailureKind.EXECUTION
    if isinstance(exc, DeadlineExceeded) and job_deadline_passed:
        return FailureKind.DEADLINE
    if isinstance(exc, ComfyTimeout):
        return FailureKind.STALLED
    if isinstance(exc, BackendError):
        return FailureKind.UNAVAILABLE
    return FailureKind.EXECUTION


RETRYABLE = frozenset({FailureKind.UNAVAILABLE, FailureKind.STALLED})


@dataclass(frozen=True, slots=True)
class Attempt:
    """One try of a job on one backend. ``started``/``ended`` are Unix times; ``error`` is the
    exception's repr and ``reason`` its kind, both None for the attempt that succeeded."""

    backend: str
    started: float
    ended: float
    error: str | None = None
    reason: FailureKind | None = None

    @property
    def seconds(self) -> float:
        return self.ended - self.started


@dataclass(frozen=True, slots=True)
class PoolResult:
    """A finished job: the backend that ran it (its name), the client's result, every attempt."""

    job_id: str
    backend: str
    result: RunResult
    attempts: tuple[Attempt, ...]
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, slots=True)
class Upload:
    """An input file to put on the chosen backend before submitting: name in the graph, bytes, sha256."""

    name: str
    data: bytes = field(repr=False)
    sha256: str

    @classmethod
    def of(cls, name: str, data: bytes) -> Upload:
        return cls(name, data, hashlib.sha256(data).hexdigest())


class Job:
    """The pool's record of one job (internal; callers see events, ``PoolResult`` and exceptions)."""

    def __init__(
        self,
        job_id: str,
        nodes: dict[str, dict[str, Any]],
        requirements: Requirements,
        *,
        uploads: tuple[Upload, ...],
        timeout: float | None,
        backends: frozenset[str] | None,
        on_event: Callable[[Any], Any] | None,
        labels: Mapping[str, str],
        prompt_id: str | None = None,
    ) -> None:
        self.id = job_id
        self.first_prompt_id = prompt_id  # chosen by the caller (None: drawn like the others)
        self.nodes = nodes
        self.requirements = requirements
        self.model = requirements.model
        self.uploads = uploads
        self.timeout = timeout
        self.backends = backends
        self.on_event = on_event
        self.labels: Mapping[str, str] = MappingProxyType(dict(labels))
        self.seq = next(_sequence)
        self.attempts: list[Attempt] = []
        self.avoid: set[str] = set()  # backends it failed on: taken there only when nothing else can
        self.oom_retried = False
        self.cancel_requested = False
        self.keep_result = True  # False when run() awaits it: nobody asks result() after it ends
        self.task: asyncio.Task[None] | None = None
        self.assignment: asyncio.Future[Any] | None = None
        self.finished = asyncio.Event()
        self.result: PoolResult | None = None
        self.error: BaseException | None = None
        self._fits: dict[str, tuple[Capabilities, bool]] = {}

    @classmethod
    def create(
        cls,
        job_id: str,
        graph: GraphLike,
        *,
        uploads: Mapping[str, bytes] | None,
        timeout: float | None,
        backends: Sequence[str] | None,
        on_event: Callable[[Any], Any] | None,
        labels: Mapping[str, str] | None,
        prompt_id: str | None = None,
    ) -> Job:
        """A job for ``graph`` (API format, or anything with ``to_dict()``); WorkflowFormatError if it is
        not an API-format graph."""
        parsed = Graph(graph.to_dict() if hasattr(graph, "to_dict") else graph)
        return cls(
            job_id,
            parsed.to_dict(),
            Requirements.of(parsed),
            uploads=tuple(Upload.of(name, data) for name, data in (uploads or {}).items()),
            timeout=timeout,
            backends=frozenset(backends) if backends is not None else None,
            on_event=on_event,
            labels=labels or {},
            prompt_id=prompt_id,
        )

    def allowed_on(self, name: str) -> bool:
        return self.backends is None or name in self.backends

    def fits(self, name: str, capabilities: Capabilities | None) -> bool:
        """Whether backend ``name`` (with these capabilities) may and can run this job; cached."""
        if capabilities is None or not self.allowed_on(name):
            return False
        cached = self._fits.get(name)
        if cached is not None and cached[0] is capabilities:
            return cached[1]
        ok = not capabilities.missing(self.requirements)
        self._fits[name] = (capabilities, ok)
        return ok

    def matches(self, labels: Mapping[str, str] | None) -> bool:
        return not labels or all(self.labels.get(k) == v for k, v in labels.items())

    def finish(self, result: PoolResult | None, error: BaseException | None) -> None:
        self.result, self.error = result, error
        self.finished.set()

    def outcome(self) -> PoolResult:
        """The result, or the exception the job ended with (raised)."""
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result
