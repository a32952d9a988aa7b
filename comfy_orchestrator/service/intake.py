"""What ``POST /v1/jobs`` accepts, and the checks a job passes before it is queued: the body's
shape, the template and its slots, the node and pixel caps, then the pool (some backend has every
node class and model) and ComfyUI's own validation against that backend's ``/object_info``."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from comfy_orchestrator.errors import GraphError
from comfy_orchestrator.graph import Graph, Template
from comfy_orchestrator.service.errors import ApiError
from comfy_orchestrator.service.pipeline_jobs import with_default_cache
from comfy_orchestrator.service.settings import LimitSettings
from comfy_orchestrator.store import JobKind, is_sha256

__all__ = ["JobRequest", "build_graph", "check_limits", "job_inputs", "pixels_of"]

_LABEL = r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}$"


class JobRequest(BaseModel):
    """``{"graph": {...}}``, ``{"template": name, "params": {...}}`` or ``{"pipeline": {...spec...}}``,
    with optional ``labels``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    graph: dict[str, Any] | None = None
    template: str | None = Field(None, min_length=1, max_length=200)
    params: dict[str, Any] = Field(default_factory=dict)
    pipeline: dict[str, Any] | None = None
    labels: dict[str, str] = Field(default_factory=dict, max_length=32)
    inputs: dict[str, str] = Field(default_factory=dict, max_length=32)  # LoadImage file name -> input id

    @model_validator(mode="after")
    def _one_source(self) -> JobRequest:
        if sum(x is not None for x in (self.graph, self.template, self.pipeline)) != 1:
            raise ValueError("give exactly one of `graph`, `template` or `pipeline`")
        if self.graph is not None and self.params:
            raise ValueError("`params` goes with `template`, not with `graph`")
        for key, value in self.labels.items():
            if not re.fullmatch(_LABEL, key) or ".." in key or len(value) > 256:
                raise ValueError(f"label {key[:80]!r}: keys are 1-64 of A-Z a-z 0-9 _ . - (starting with a letter, "
                                 "digit or _; no '..'), values at most 256 characters")
        _check_inputs(self)
        return self

    @property
    def kind(self) -> JobKind:
        if self.pipeline is not None:
            return JobKind.PIPELINE
        return JobKind.GRAPH if self.graph is not None else JobKind.TEMPLATE

    def spec(self) -> dict[str, Any]:
        """What the store keeps (and idempotency compares); a pipeline's graph steps are cached unless
        it says otherwise (so a job interrupted mid-way resumes where it was)."""
        if self.graph is not None:
            return {"prompt": self.graph, "inputs": dict(self.inputs)} if self.inputs else self.graph
        if self.pipeline is not None:
            return with_default_cache(self.pipeline)
        extra = {"inputs": dict(self.inputs)} if self.inputs else {}
        return {"template": self.template, "params": self.params, **extra}


_INPUT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\- ]{0,127}")


def _check_inputs(request: JobRequest) -> None:
    if request.inputs and request.pipeline is not None:
        raise ValueError("`inputs` go with `graph` or `template`")
    for name, input_id in request.inputs.items():
        if not _INPUT_NAME.fullmatch(name) or ".." in name:
            raise ValueError(f"inputs: {name[:80]!r} is not a plain file name (letters, digits, _ . - and space, "
                             "at most 128, no path)")
        if not is_sha256(input_id):
            raise ValueError(f"inputs.{name}: {input_id[:80]!r} is not an input id from POST /v1/inputs")
    if request.inputs and request.graph is not None and not all(
            isinstance(node, Mapping) and "class_type" in node for node in request.graph.values()):
        raise ValueError("with `inputs`, `graph` must be an API-format graph ({node id: {class_type, inputs}})")


def job_inputs(kind: JobKind | str, spec: Mapping[str, Any]) -> dict[str, str]:
    """A stored job's ``inputs`` (file name -> input id); ``{}`` when it names none. A graph job with
    inputs is kept as ``{"prompt": graph, "inputs": …}``, a form ``Graph.from_dict`` reads as it is."""
    if kind == JobKind.GRAPH:
        prompt = spec.get("prompt")
        if not isinstance(prompt, Mapping) or "class_type" in prompt:
            return {}
    elif kind != JobKind.TEMPLATE:
        return {}
    inputs = spec.get("inputs")
    return {str(k): str(v) for k, v in inputs.items()} if isinstance(inputs, Mapping) else {}


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
