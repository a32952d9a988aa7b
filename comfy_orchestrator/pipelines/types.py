"""What a pipeline needs from its collaborators, as protocols. Only types live here.

A pipeline runs its graphs on a *pool* (``comfy_orchestrator.pool.Pool`` or anything with the same
``run`` / ``download``) and scores images with an *evaluator* (``quality.ClipEvaluator`` or anything
with the same ``score``). Both are structural: nothing here imports them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from PIL import Image

from comfy_orchestrator.config import RunResult
from comfy_orchestrator.graph import Graph
from comfy_orchestrator.protocol import FileRef

__all__ = ["Evaluator", "PoolEventLike", "PoolLike", "PoolResultLike", "Score"]


class Score(Protocol):
    """One image's score: ``value`` is what gates and selections compare, ``parts`` what it is made of."""

    @property
    def value(self) -> float: ...

    @property
    def parts(self) -> Mapping[str, float]: ...


class Evaluator(Protocol):
    """Scores images against the prompt they were made from, one score per image, in order.
    ``quality.ClipEvaluator`` is one; a test can bring its own."""

    async def score(
        self,
        images: Sequence[bytes | Image.Image],
        prompt: str,
        *,
        negative: str | None = None,
    ) -> Sequence[Score]: ...


class PoolEventLike(Protocol):
    """What a pipeline reads from a pool event (``job_id``, ``kind``; ``backend``, ``fraction`` and
    ``reason`` are read when present)."""

    @property
    def job_id(self) -> str: ...

    @property
    def kind(self) -> Any: ...


class PoolResultLike(Protocol):
    """A finished pool job: which backend ran it, the run's result, and the pool's attempts."""

    @property
    def job_id(self) -> str: ...

    @property
    def backend(self) -> str: ...

    @property
    def result(self) -> RunResult: ...

    @property
    def attempts(self) -> Sequence[Any]: ...


class PoolLike(Protocol):
    """The part of ``comfy_orchestrator.pool.Pool`` a pipeline uses."""

    async def run(
        self,
        graph: Graph,
        *,
        job_id: str | None = None,
        uploads: Mapping[str, bytes] | None = None,
        timeout: float | None = None,
        backends: Sequence[str] | None = None,
        on_event: Callable[[Any], Any] | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> PoolResultLike: ...

    async def download(self, result: Any, ref: FileRef) -> bytes: ...
