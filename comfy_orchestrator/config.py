"""Small value objects that configure a client, and the typed result of a run."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from comfy_orchestrator.protocol import FileRef, NodeOutput

__all__ = ["RunResult", "Timeouts", "Timings"]


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Deadlines for talking to one ComfyUI server, in seconds (``None`` = no limit).

    connect: opening a TCP connection (HTTP or WebSocket).
    request: one HTTP request, answer included (downloads: the gap between two reads).
    stall: the no-progress watchdog: a *running* prompt that sends no event for this long is
        interrupted and fails with StalledTimeout (waiting in the queue behind others is not a stall).
    deadline: the default overall limit for one ``run`` (interrupted and dequeued on expiry).
    poll: how long a prompt may be silent before the client asks /queue and /history about it; this is
        also how a dropped socket or a lost prompt is noticed.
    unreachable: how long the server may stay unreachable (refused, reset, 5xx) while a prompt is in
        flight before ``run`` gives up with BackendUnavailable; a quick restart is seen through.
    """

    connect: float | None = 10.0
    request: float | None = 60.0
    stall: float | None = 300.0
    deadline: float | None = None
    poll: float = 2.0
    unreachable: float = 5.0


@dataclass(frozen=True, slots=True)
class Timings:
    """When a prompt was submitted (Unix time) and how long each phase took (seconds)."""

    submitted_at: float
    queued_s: float
    execution_s: float
    total_s: float


@dataclass(frozen=True, slots=True)
class RunResult:
    """A finished prompt: what each output node produced, which nodes came from cache, timings."""

    prompt_id: str
    backend: str
    outputs: Mapping[str, NodeOutput]
    cached_nodes: tuple[str, ...]
    timings: Timings
    preview_count: int = 0
    node_order: tuple[str, ...] = field(default=())

    @property
    def files(self) -> list[FileRef]:
        return [f for out in self.outputs.values() for f in out.files]

    @property
    def images(self) -> list[FileRef]:
        """Every image the prompt reported, saved outputs and temporary previews alike."""
        return [f for out in self.outputs.values() for f in out.images]

    @property
    def output_images(self) -> list[FileRef]:
        """Saved images only (``type == "output"``), the ones SaveImage wrote."""
        return [f for f in self.images if f.type == "output"]

    @property
    def fully_cached(self) -> bool:
        return bool(self.cached_nodes) and not self.node_order
