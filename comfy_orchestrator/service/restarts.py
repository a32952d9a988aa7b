"""How long to wait before starting a process that exited again: what the managed ComfyUI processes
(``service.managed``) and the processes of a multi-process service (``service.processes``) share.

The delay doubles with each consecutive failure from ``minimum`` up to ``maximum``, scaled by a
random factor in ``[1 - jitter, 1 + jitter]`` so that processes that died together do not come back
in step; a process that stayed up ``healthy_reset`` seconds starts the count again.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["RestartBackoff"]


@dataclass(frozen=True, slots=True)
class RestartBackoff:
    minimum: float
    maximum: float
    healthy_reset: float
    jitter: float = 0.2

    def failures_after(self, failures: int, uptime: float) -> int:
        """The count of consecutive failures once a process that ran ``uptime`` seconds exited."""
        return 1 if uptime >= self.healthy_reset else failures + 1

    def delay(self, failures: int, rng: random.Random) -> float:
        """Seconds to wait before the next start after ``failures`` consecutive failures."""
        base = min(self.maximum, self.minimum * 2.0 ** min(max(0, failures - 1), 60))
        return min(self.maximum, base * rng.uniform(1 - self.jitter, 1 + self.jitter))
