"""comfy_orchestrator: async ComfyUI client, backend pool, quality-gated pipelines and a service."""

from comfy_orchestrator.client import ComfyClient
from comfy_orchestrator.config import RunResult, Timeouts, Timings
from comfy_orchestrator.errors import (
    BackendError,
    BackendUnavailable,
    ClientClosed,
    ComfyOrchestratorError,
    ComfyTimeout,
    ConnectTimeout,
    DeadlineExceeded,
    ExecutionFailed,
    GraphError,
    GraphValidationError,
    JobCancelled,
    PromptLost,
    ProtocolError,
    RequestTimeout,
    StalledTimeout,
    TemplateError,
    WorkflowFormatError,
)
from comfy_orchestrator.graph import Graph, Template, content_hash, load_templates, validate, validate_prompt
from comfy_orchestrator.protocol import FileRef, NodeOutput

__all__ = [
    "BackendError",
    "BackendUnavailable",
    "ClientClosed",
    "ComfyClient",
    "ComfyOrchestratorError",
    "ComfyTimeout",
    "ConnectTimeout",
    "DeadlineExceeded",
    "ExecutionFailed",
    "FileRef",
    "Graph",
    "GraphError",
    "GraphValidationError",
    "JobCancelled",
    "NodeOutput",
    "PromptLost",
    "ProtocolError",
    "RequestTimeout",
    "RunResult",
    "StalledTimeout",
    "Template",
    "TemplateError",
    "Timeouts",
    "Timings",
    "WorkflowFormatError",
    "content_hash",
    "load_templates",
    "validate",
    "validate_prompt",
]
