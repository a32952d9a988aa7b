"""Whether a backend may take work: health with hysteresis, and a circuit breaker over its jobs.

Both are plain state machines fed with outcomes and a clock; the backend's health loop and the
job runner feed them, the dispatcher reads them.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable

__all__ = ["BreakerState", "CircuitBreaker", "Health"]


class Health:
    """Up or down, with hysteresis: ``fail_threshold`` consecutive failures take a backend down,
    ``recover_threshold`` consecutive successes bring it back. Before the first outcome it is down;
    a backend that has never failed comes up on its first success."""

    def __init__(self, fail_threshold: int, recover_threshold: int) -> None:
        self.fail_threshold = fail_threshold
        self.recover_threshold = recover_threshold
        self.up = False
        self.known = False  # at least one outcome seen
        self.failures = 0  # consecutive
        self.successes = 0  # consecutive
        self.last_error: str | None = None
        self._ever_failed = False

    def success(self) -> bool:
        """Record a passed check; True when this brought the backend up."""
        self.known = True
        self.failures = 0
        self.successes += 1
        self.last_error = None
        needed = self.recover_threshold if self._ever_failed else 1
        if not self.up and self.successes >= needed:
            self.up = True
            return True
        return False

    def failure(self, error: str) -> bool:
        """Record a failed check (or a job that found the server unavailable); True when this took it down."""
        self.known = True
        self.successes = 0
        self.failures += 1
        self.last_error = error
        self._ever_failed = True
        if self.up and self.failures >= self.fail_threshold:
            self.up = False
            return True
        return False


class BreakerState(enum.StrEnum):
    CLOSED = "closed"  # jobs flow
    OPEN = "open"  # too many consecutive failed attempts: no job until the reset time has passed
    HALF_OPEN = "half_open"  # reset time passed: one trial job decides between closed and open


class CircuitBreaker:
    """Opens after ``failures`` consecutive failed attempts; half-open ``reset`` seconds later, when
    a single trial attempt is let through: success closes it, failure opens it again."""

    def __init__(self, failures: int, reset: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = failures
        self.reset = reset
        self._clock = clock
        self._state = BreakerState.CLOSED
        self.consecutive_failures = 0
        self.opened_at: float | None = None
        self._trial_running = False

    @property
    def state(self) -> BreakerState:
        opened = self.opened_at
        if self._state is BreakerState.OPEN and opened is not None and self._clock() - opened >= self.reset:
            self._state = BreakerState.HALF_OPEN
        return self._state

    def allows(self) -> bool:
        """Whether a new attempt may start now."""
        state = self.state
        return state is BreakerState.CLOSED or (state is BreakerState.HALF_OPEN and not self._trial_running)

    def started(self) -> None:
        """An attempt started (in the half-open state it is the trial)."""
        if self.state is BreakerState.HALF_OPEN:
            self._trial_running = True

    def succeeded(self) -> None:
        self.consecutive_failures = 0
        self._trial_running = False
        self._state = BreakerState.CLOSED
        self.opened_at = None

    def failed(self) -> bool:
        """Record a failed attempt; True when this opened the breaker."""
        self.consecutive_failures += 1
        was_trial, self._trial_running = self._trial_running, False
        if was_trial or (self._state is BreakerState.CLOSED and self.consecutive_failures >= self.threshold):
            self._state = BreakerState.OPEN
            self.opened_at = self._clock()
            return True
        return False

    def neutral(self) -> None:
        """An attempt ended in a way that says nothing about the backend (cancelled, bad graph)."""
        self._trial_running = False
