"""The exceptions of pipelines and comparison runs, under the package's root error.

    ComfyOrchestratorError
    └── PipelineError
        ├── PipelineSpecError (ValueError)   the declaration is wrong: unknown kind, missing or
        │                                    cyclic depends_on, unknown template or slot, …
        ├── PipelineAborted                  a step with ``on_error="abort"`` failed; ``.result``
        │                                    holds what had finished, ``__cause__`` the failure
        └── NoImages                         a graph finished without saving an image
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from comfy_orchestrator.errors import ComfyOrchestratorError

if TYPE_CHECKING:
    from comfy_orchestrator.pipelines.results import PipelineResult

__all__ = ["NoImages", "PipelineAborted", "PipelineError", "PipelineSpecError", "readable_problems"]


class PipelineError(ComfyOrchestratorError):
    """Root of the errors of ``comfy_orchestrator.pipelines``."""


class PipelineSpecError(PipelineError, ValueError):
    """A pipeline or comparison declaration is invalid. ``problems`` lists every problem found, one
    line each, located (``steps[2] 'upscale': depends_on names unknown step 'gen2'``)."""

    def __init__(self, problems: Sequence[str], *, source: str = "pipeline spec") -> None:
        self.problems = list(problems)
        self.source = source
        lines = "\n  ".join(self.problems)
        super().__init__(f"{source} is invalid ({len(self.problems)} problem(s)):\n  {lines}")


class PipelineAborted(PipelineError):
    """A step whose policy is ``on_error="abort"`` failed (after its retries and fallbacks); the
    other steps were cancelled. ``result`` holds every step that had finished."""

    def __init__(self, step: str, reason: str, result: PipelineResult) -> None:
        self.step = step
        self.reason = reason
        self.result = result
        super().__init__(f"pipeline aborted: step {step!r} failed: {reason}")


class NoImages(PipelineError):
    """A graph ran to completion without saving an image (no SaveImage output)."""


def readable_problems(exc: ValidationError, data: Any) -> list[str]:
    """pydantic's errors as located lines: ``steps[1] 'rate': k: Input should be greater than 0``."""
    lines = []
    for error in exc.errors():
        loc = list(error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        if not loc:
            lines.extend(message.splitlines())
            continue
        place, rest = _place(loc, data)
        field = ".".join(str(part) for part in rest if not _is_tag(part))
        lines.append(f"{place}: {field}: {message}" if field else f"{place}: {message}")
    return lines


def _place(loc: list[Any], data: Any) -> tuple[str, list[Any]]:
    if len(loc) >= 2 and loc[0] == "steps" and isinstance(loc[1], int):
        index = loc[1]
        steps = data.get("steps") if isinstance(data, Mapping) else None
        step = steps[index] if isinstance(steps, list) and index < len(steps) else None
        name = step.get("name") if isinstance(step, Mapping) else None
        return (f"steps[{index}] {name!r}" if name else f"steps[{index}]"), loc[2:]
    return str(loc[0]), loc[1:]


def _is_tag(part: Any) -> bool:
    """A discriminated union's tag in an error location (the step kind), left out of field paths."""
    return part in {"generate", "transform", "score", "gate", "select", "quality_loop"}
