"""What ``POST /v1/jobs`` accepts, and the checks a job passes before it is queued: the body's
shape, the template and its slots, the node and pixel caps, then the pool (some backend has every
node class and model) and ComfyUI's own validation against that backend's ``/object_info``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from comfy_orchestrator.errors import GraphError
from comfy_orchestrator.graph import Graph, Template
from comfy_orchestrator.service.errors import ApiError
from comfy_orchestrator.service.settings import LimitSettings
from comfy_orchestrator.store import JobKind

__all__ = ["JobRequest", "build_graph", "check_limits", "pixels_of"]

_LABEL = r"^[A-Za-z0-9_.\-]{1,64}$"


class JobRequest(BaseModel):
    """``{"graph": {...}}`` or ``{"template": name, "params": {...}}``, with optional ``labels``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    graph: dict[str, Any] | None = None
    template: str | None = Field(None, min_length=1, max_length=200)
    params: dict[str, Any] = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict, max_length=32)

    @model_validator(mode="after")
    def _one_source(self) -> JobRequest:
        if (self.graph is None) == (self.template is None):
            raise ValueError("give exactly one of `graph` or `template`")
        if self.graph is not None and self.params:
            raise ValueError("`params` goes with `template`, not with `graph`")
        for key, value in self.labels.items():
            if ":" in key or not key or len(key) > 64 or len(value) > 256:
                raise ValueError(f"label {key!r}: keys are 1-64 characters without ':', values at most 256")
        return self

    @property
    def kind(self) -> JobKind:
        return JobKind.GRAPH if self.graph is not None else JobKind.TEMPLATE

    def spec(self) -> dict[str, Any]:
        """What the store keeps (and idempotency compares)."""
        if self.graph is not None:
            return self.graph
        return {"template": self.template, "params": self.params}


def build_graph(kind: JobKind | str, spec: Mapping[str, Any], templates: Mapping[str, Template]) -> Graph:
    """The graph a stored job runs. Raises ApiError (400) for an unknown template, a bad slot or a
    malformed graph."""
    try:
        if kind == JobKind.GRAPH:
            return Graph.from_dict(spec)
        name = str(spec["template"])
        template = templates.get(name)
        if template is None:
            known = ", ".join(sorted(templates)) or "none"
            raise ApiError(400, "UnknownTemplate", f"no template named {name!r} (known: {known})")
        return template.bind(spec.get("params") or {})
    except GraphError as exc:
        raise ApiError(400, type(exc).__name__, str(exc)) from None


def _int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def pixels_of(graph: Graph) -> int:
    """The largest ``width × height × batch`` any node asks for (EmptyLatentImage, EmptyImage…)."""
    largest = 0
    for node in graph.to_dict().values():
        inputs = node.get("inputs") or {}
        if "width" in inputs and "height" in inputs:
            batch = max(_int(inputs.get("batch_size"), 1), 1)
            largest = max(largest, _int(inputs["width"], 0) * _int(inputs["height"], 0) * batch)
    return largest


def check_limits(graph: Graph, limits: LimitSettings) -> None:
    if len(graph) > limits.max_nodes:
        raise ApiError(413, "TooManyNodes", f"the graph has {len(graph)} nodes; at most {limits.max_nodes} are allowed")
    pixels = pixels_of(graph)
    if pixels > limits.max_pixels:
        raise ApiError(413, "TooManyPixels", f"the graph asks for {pixels} pixels (width × height × batch); "
                       f"at most {limits.max_pixels} are allowed")
