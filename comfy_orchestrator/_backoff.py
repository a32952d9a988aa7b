"""Jittered exponential backoff, the one formula behind the pool's retries, the service client's
reconnects and the restarts of supervised processes.

The wait doubles with each consecutive failure from ``initial`` up to ``maximum`` and is scaled by
a random factor in ``[1 - jitter, 1 + jitter]`` (never past ``maximum``), so that clients or
processes that failed together do not come back in step.
"""

from __future__ import annotations

import random as _random
from dataclasses import dataclass

__all__ = ["RestartBackoff", "backoff_delay"]


def backoff_delay(failures: int, *, initial: float, maximum: float, jitter: float, random: float) -> float:
    """The wait after ``failures`` failures in a row (1 for the first); ``random`` uniform in [0, 1)."""
    base = min(maximum, initial * 2.0 ** min(max(0, failures - 1), 60))
    return max(0.0, min(maximum, base * (1 - jitter + 2 * jitter * random)))


@dataclass(frozen=True, slots=True)
class RestartBackoff:
    """When to start again a process that exited: after ``backoff_delay``, where a process that
    stayed up ``healthy_reset`` seconds starts the count of failures again."""

    minimum: float
    maximum: float
    healthy_reset: float
    jitter: float = 0.2

    def failures_after(self, failures: int, uptime: float) -> int:
        """The count of consecutive failures once a process that ran ``uptime`` seconds exited."""
        return 1 if uptime >= self.healthy_reset else failures + 1

    def delay(self, failures: int, rng: _random.Random) -> float:
        """Seconds to wait before the next start after ``failures`` consecutive failures."""
        return backoff_delay(failures, initial=self.minimum, maximum=self.maximum, jitter=self.jitter,
                             random=rng.random())
