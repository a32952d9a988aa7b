"""The exceptions comfy_orchestrator raises, as one tree.

    ComfyOrchestratorError
    ├── BackendError                    a ComfyUI server could not do what was asked
    │   ├── BackendUnavailable          refused, reset, 5xx, died mid-job
    │   │   └── PromptLost              the server no longer knows a prompt it accepted
    │   └── ProtocolError               an answer that does not fit ComfyUI's protocol
    ├── GraphError (ValueError)         the graph itself is wrong
    │   ├── GraphValidationError        rejected (by ComfyUI, or locally against /object_info)
    │   ├── TemplateError               unknown slot, bad template file
    │   └── WorkflowFormatError         a UI-format workflow that cannot be converted
    ├── ExecutionFailed                 a node raised while the prompt ran
    ├── JobCancelled                    interrupted or removed from the queue
    ├── ComfyTimeout (TimeoutError)
    │   ├── ConnectTimeout              the server did not accept a connection in time
    │   ├── RequestTimeout              one HTTP request took too long
    │   ├── StalledTimeout              no event for longer than the watchdog allows
    │   └── DeadlineExceeded            the whole run took longer than its deadline
    └── ClientClosed (RuntimeError)     a client used after close()
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "BackendError",
    "BackendUnavailable",
    "ClientClosed",
    "ComfyOrchestratorError",
    "ComfyTimeout",
    "ConnectTimeout",
    "DeadlineExceeded",
    "ExecutionFailed",
    "GraphError",
    "GraphValidationError",
    "JobCancelled",
    "PromptLost",
    "ProtocolError",
    "RequestTimeout",
    "StalledTimeout",
    "TemplateError",
    "WorkflowFormatError",
]


class ComfyOrchestratorError(Exception):
    """Root of every error this package raises on purpose."""


class BackendError(ComfyOrchestratorError):
    """A ComfyUI server failed to do what was asked. ``backend`` is its base URL."""

    def __init__(self, message: str, *, backend: str | None = None) -> None:
        super().__init__(message)
        self.backend = backend


class BackendUnavailable(BackendError):
    """Connection refused or reset, a 5xx answer, or the server died mid-job. Worth retrying elsewhere."""

    def __init__(self, message: str, *, backend: str | None = None, status: int | None = None) -> None:
        super().__init__(message, backend=backend)
        self.status = status


class PromptLost(BackendUnavailable):
    """The server accepted a prompt and then forgot it: not queued, not running, no history. A
    restarted ComfyUI loses its queue; the prompt never ran to completion and may be resubmitted."""

    def __init__(self, message: str, *, backend: str | None = None, prompt_id: str | None = None) -> None:
        super().__init__(message, backend=backend)
        self.prompt_id = prompt_id


class ProtocolError(BackendError):
    """The server answered something that does not fit ComfyUI's protocol."""


class GraphError(ComfyOrchestratorError, ValueError):
    """The graph (or template) is wrong; sending it again will not help."""


class GraphValidationError(GraphError):
    """The graph was rejected, by ComfyUI's POST /prompt or by local validation against /object_info.

    ``error`` and ``node_errors`` are ComfyUI's 400 body, verbatim (local validation produces the same
    shape): ``error = {type, message, details, extra_info}`` and
    ``node_errors = {node_id: {errors: [...], dependent_outputs: [...], class_type}}``.
    """

    def __init__(
        self,
        error: Mapping[str, Any],
        node_errors: Mapping[str, Any] | None = None,
        *,
        backend: str | None = None,
    ) -> None:
        self.error: dict[str, Any] = dict(error)
        self.node_errors: dict[str, Any] = dict(node_errors or {})
        self.backend = backend
        super().__init__(self.summary())

    def summary(self) -> str:
        """One line: the server's message, then each node's first problem (which node, which input)."""
        head = str(self.error.get("message") or self.error.get("type") or "graph rejected")
        details = self.error.get("details")
        if details and not self.node_errors:
            head = f"{head} ({details})"
        parts = []
        for node_id, entry in self.node_errors.items():
            for err in entry.get("errors", []):
                where = f"node {node_id} ({entry.get('class_type', '?')})"
                input_name = (err.get("extra_info") or {}).get("input_name")
                if input_name:
                    where += f" input {input_name!r}"
                parts.append(f"{where}: {err.get('message', '')}; {err.get('details', '')}".rstrip("; "))
        return head + (": " + " | ".join(parts) if parts else "")


class TemplateError(GraphError):
    """A template file or a slot binding is wrong (unknown slot, missing node title, bad value)."""


class WorkflowFormatError(GraphError):
    """A workflow in ComfyUI's UI format that could not be converted to API format."""


class ExecutionFailed(ComfyOrchestratorError):
    """A node raised while the prompt ran (ComfyUI's ``execution_error``)."""

    def __init__(
        self,
        *,
        prompt_id: str,
        node_id: str | None,
        node_type: str | None,
        exception_type: str,
        exception_message: str,
        traceback: list[str] | None = None,
        backend: str | None = None,
    ) -> None:
        self.prompt_id = prompt_id
        self.node_id = node_id
        self.node_type = node_type
        self.exception_type = exception_type
        self.exception_message = exception_message
        self.traceback = traceback or []
        self.backend = backend
        super().__init__(
            f"node {node_id} ({node_type}) raised {exception_type}: {exception_message.strip()}"
        )

    @property
    def out_of_memory(self) -> bool:
        """True when the failure was an allocation the device could not satisfy."""
        text = f"{self.exception_type} {self.exception_message}".lower()
        return any(marker in text for marker in _OOM_MARKERS)


_OOM_MARKERS = (
    "outofmemoryerror",  # torch.OutOfMemoryError (CUDA, MPS)
    "out of memory",
    "can't allocate memory",  # torch's CPU allocator
    "cannot allocate memory",
    "not enough memory",
)


class JobCancelled(ComfyOrchestratorError):
    """The prompt was interrupted, or removed from the queue before it ran."""

    def __init__(self, message: str, *, prompt_id: str | None = None) -> None:
        super().__init__(message)
        self.prompt_id = prompt_id


class ComfyTimeout(ComfyOrchestratorError, TimeoutError):
    """A deadline passed. Also a :class:`TimeoutError`."""


class ConnectTimeout(ComfyTimeout):
    """The server did not accept a connection in time."""


class RequestTimeout(ComfyTimeout):
    """One HTTP request took longer than allowed."""


class StalledTimeout(ComfyTimeout):
    """No event arrived for the prompt for longer than the no-progress watchdog allows."""


class DeadlineExceeded(ComfyTimeout):
    """The whole run took longer than its overall deadline (the prompt was interrupted and dequeued)."""


class ClientClosed(ComfyOrchestratorError, RuntimeError):
    """The client was used after it was closed; make a new one."""
