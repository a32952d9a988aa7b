"""What a ``ServiceClient`` raises, as one tree under ``ComfyOrchestratorError``.

    RemoteError
    ├── ServiceError                    the service answered ``{"error": {"type", "message"}}``
    │   ├── Rejected (ValueError)       400, 413: the request itself is wrong (bad graph, caps)
    │   ├── Unauthorized                401: missing or unknown token
    │   ├── NotFound (LookupError)      404: no such job or output (for this tenant)
    │   ├── Conflict                    409 (the job already ended), 422 (idempotency key reused)
    │   └── RetryLater                  429 (queue full), 503 (no backend reachable); ``retry_after``
    ├── ServiceUnreachable (ConnectionError)   no answer at all: refused, reset, DNS
    └── ServiceTimeout (TimeoutError)   the service did not answer in time
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from comfy_orchestrator.errors import ComfyOrchestratorError

__all__ = [
    "Conflict",
    "NotFound",
    "Rejected",
    "RemoteError",
    "RetryLater",
    "ServiceError",
    "ServiceTimeout",
    "ServiceUnreachable",
    "Unauthorized",
    "error_from_response",
]


class RemoteError(ComfyOrchestratorError):
    """Talking to the comfy_orchestrator service went wrong."""


class ServiceError(RemoteError):
    """An error answer: HTTP ``status``, the service's error ``type`` and ``message``; ``details``
    holds the other fields of the error body (``node_errors``, ``missing``, ``job_id``…)."""

    def __init__(self, status: int, type: str, message: str, *, details: Mapping[str, Any] | None = None) -> None:
        super().__init__(f"{status} {type}: {message}")
        self.status = status
        self.type = type
        self.message = message
        self.details: dict[str, Any] = dict(details or {})


class Rejected(ServiceError, ValueError):
    """400 or 413: the graph, template, parameters or body were refused; sending it again will not help."""


class Unauthorized(ServiceError):
    """401: the token is missing or not one the service knows."""


class NotFound(ServiceError, LookupError):
    """404: no such job or output for this tenant."""


class Conflict(ServiceError):
    """409 (the job already ended) or 422 (an idempotency key reused with another body);
    ``job_id`` is the job the key belongs to, when the service says."""

    @property
    def job_id(self) -> str | None:
        value = self.details.get("job_id")
        return value if isinstance(value, str) else None


class RetryLater(ServiceError):
    """429 (this tenant's queue is full) or 503 (no backend reachable): ``retry_after`` seconds, if given."""

    def __init__(
        self,
        status: int,
        type: str,
        message: str,
        *,
        details: Mapping[str, Any] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(status, type, message, details=details)
        self.retry_after = retry_after


class ServiceUnreachable(RemoteError, ConnectionError):
    """The service could not be reached (refused, reset, name not resolved)."""


class ServiceTimeout(RemoteError, TimeoutError):
    """The service did not answer in time."""


_BY_STATUS: dict[int, type[ServiceError]] = {400: Rejected, 401: Unauthorized, 404: NotFound, 409: Conflict,
                                             413: Rejected, 422: Conflict}


def _retry_after(raw: str | None) -> float | None:
    try:
        return float(raw) if raw is not None else None
    except ValueError:
        return None  # an HTTP date: not sent by this service


def error_from_response(status: int, body: Any, retry_after: str | None = None) -> ServiceError:
    """The exception for an error answer; ``body`` is its decoded JSON (anything, if it was not JSON)."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        type_, message = str(error.get("type", "Error")), str(error.get("message", ""))
        details = {k: v for k, v in error.items() if k not in ("type", "message")}
    else:
        type_, message, details = "HTTPError", f"unexpected answer (HTTP {status})", {}
    if status in (429, 503):
        return RetryLater(status, type_, message, details=details, retry_after=_retry_after(retry_after))
    cls = _BY_STATUS.get(status, ServiceError)
    return cls(status, type_, message, details=details)
