"""Per-step policies: how failures are retried and what a failure does to the rest of the run."""

from __future__ import annotations

import enum
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, Field, model_validator

from comfy_orchestrator.errors import GraphError, JobCancelled

__all__ = ["Backoff", "DelayFunction", "OnError", "RetryPolicy"]

#: A custom backoff: (the attempt that just failed, 1-based; its exception) -> seconds to wait.
DelayFunction = Callable[[int, BaseException], float]


class Backoff(enum.StrEnum):
    EXPONENTIAL = "exponential"  # initial_interval × coefficient^(n-1)
    LINEAR = "linear"  # initial_interval × (1 + coefficient·(n-1))
    CUSTOM = "custom"  # delay(n, error), a callable (Python declarations only)


class OnError(enum.StrEnum):
    ABORT = "abort"  # cancel the whole run; Pipeline.run raises PipelineAborted
    CONTINUE = "continue"  # record the failure; steps that still have inputs run on


class RetryPolicy(BaseModel):
    """How a job of a step is retried, after Temporal's retry policy.

    ``max_attempts`` counts the first try (1 = no retry). The wait after failed attempt ``n`` is
    set by ``backoff`` and capped by ``max_interval``. Errors whose class (or a base class) is
    named in ``non_retryable`` fail at once: by default a rejected graph (``GraphError``), a
    cancelled job (``JobCancelled``) and a graph no backend of the pool can run (the pool's
    ``NoCapableBackend``), which no retry can fix. The pool itself already moves a job off a backend
    that died or hung; a step's retry is for what it does not retry (a node error, its own deadline).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    backoff: Backoff = Backoff.EXPONENTIAL
    max_attempts: int = Field(default=3, ge=1)
    initial_interval: float = Field(default=1.0, ge=0)
    coefficient: float = Field(default=2.0, ge=0)
    max_interval: float | None = Field(default=60.0, ge=0)
    non_retryable: tuple[str, ...] = (GraphError.__name__, JobCancelled.__name__, "NoCapableBackend")
    delay: DelayFunction | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _custom_needs_callable(self) -> RetryPolicy:
        if (self.backoff is Backoff.CUSTOM) != (self.delay is not None):
            raise ValueError("backoff 'custom' goes with a delay callable, and a delay callable with 'custom'")
        return self

    @classmethod
    def none(cls) -> RetryPolicy:
        """One attempt, no retry."""
        return cls(max_attempts=1)

    @classmethod
    def custom(cls, delay: DelayFunction, *, max_attempts: int = 3, max_interval: float | None = None) -> RetryPolicy:
        return cls(backoff=Backoff.CUSTOM, delay=delay, max_attempts=max_attempts, max_interval=max_interval)

    def retryable(self, error: BaseException) -> bool:
        names = {cls.__name__ for cls in type(error).__mro__}
        return not names.intersection(self.non_retryable)

    def interval(self, attempt: int, error: BaseException) -> float:
        """Seconds to wait after failed attempt ``attempt`` (1-based) before the next one."""
        if self.backoff is Backoff.CUSTOM:
            assert self.delay is not None
            wait = float(self.delay(attempt, error))
        elif self.backoff is Backoff.LINEAR:
            wait = self.initial_interval * (1 + self.coefficient * (attempt - 1))
        else:
            wait = self.initial_interval * self.coefficient ** (attempt - 1)
        if self.max_interval is not None:
            wait = min(wait, self.max_interval)
        return max(wait, 0.0)

    def next_interval(self, attempt: int, error: BaseException) -> float | None:
        """The wait before retrying after failed attempt ``attempt``, or None when it must not be retried."""
        if attempt >= self.max_attempts or not self.retryable(error):
            return None
        return self.interval(attempt, error)
