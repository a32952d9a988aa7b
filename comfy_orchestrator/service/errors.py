"""How the service answers errors: always JSON ``{"error": {"type", "message", ...}}``.

``ApiError`` is what a handler raises to answer a 4xx; ``error_middleware`` turns it, aiohttp's
own HTTP errors (404 route, 405, 413 body too large) and bad input (``ValueError``, pydantic's
``ValidationError``, undecodable JSON) into that body. Anything else is logged with its traceback
and answered with a bare 500 body: no traceback ever reaches a client.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from aiohttp import web
from pydantic import ValidationError

__all__ = ["ApiError", "error_body", "error_middleware"]

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An answer with ``status`` (4xx) and a typed JSON error; ``extra`` adds fields to it."""

    def __init__(
        self,
        status: int,
        type: str,
        message: str,
        *,
        extra: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type
        self.message = message
        self.extra = dict(extra or {})
        self.headers = dict(headers or {})

    def response(self) -> web.Response:
        return error_body(self.status, self.type, self.message, extra=self.extra, headers=self.headers)


def error_body(
    status: int,
    type: str,
    message: str,
    *,
    extra: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    return web.json_response({"error": {"type": type, "message": message, **(extra or {})}}, status=status,
                             headers=headers)


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False, include_input=False):
        where = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except ApiError as exc:
        return exc.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.content_type == "application/json":
            raise
        return error_body(exc.status, exc.__class__.__name__.removeprefix("HTTP"), exc.reason,
                          headers={k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")})
    except ValidationError as exc:
        return error_body(400, "InvalidRequest", _validation_message(exc))
    except json.JSONDecodeError as exc:
        return error_body(400, "InvalidJSON", f"the body is not valid JSON: {exc.msg} at position {exc.pos}")
    except ValueError as exc:
        return error_body(400, "InvalidRequest", str(exc) or type(exc).__name__)
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return error_body(500, "InternalError", "the service failed to answer this request; it was logged")
