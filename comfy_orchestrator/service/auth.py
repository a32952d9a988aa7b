"""Bearer-token authentication for every ``/v1`` route.

The token comes from ``Authorization: Bearer <token>`` or, for browsers opening a WebSocket (which
cannot set headers), ``?token=``. It is compared with every configured token in constant time
(``hmac.compare_digest``), so neither a match nor its position leaks through timing, and it is
never logged (the access log leaves out query strings, see ``access_log``). The tenant it names
is stored on the request under ``TENANT``. ``?token=`` is taken on ``/v1/events`` only.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from comfy_orchestrator.service.errors import ApiError
from comfy_orchestrator.service.keys import SETTINGS, TENANT

__all__ = ["auth_middleware", "match_token"]

_PROTECTED = "/v1/"
_QUERY_TOKEN_PATHS = frozenset({"/v1/events"})  # WebSockets only: a token in a URL ends up in histories


def match_token(presented: str, tokens: Mapping[str, str]) -> str | None:
    """The tenant of ``presented``, comparing it with every token (no early exit)."""
    found: str | None = None
    given = presented.encode()
    for token, tenant in tokens.items():
        if hmac.compare_digest(given, token.encode()):
            found = tenant
    return found


def _presented(request: web.Request) -> str | None:
    header = request.headers.get("Authorization")
    if header is not None:
        scheme, _, value = header.partition(" ")
        return value.strip() if scheme.lower() == "bearer" and value.strip() else None
    if request.path in _QUERY_TOKEN_PATHS:
        return request.query.get("token") or None
    return None


@web.middleware
async def auth_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    if request.path.startswith(_PROTECTED):
        presented = _presented(request)
        tenant = match_token(presented, request.app[SETTINGS].tenant_of()) if presented else None
        if tenant is None:
            raise ApiError(401, "Unauthorized", "a valid bearer token is required",
                           headers={"WWW-Authenticate": 'Bearer realm="comfy-orchestrator"'})
        request[TENANT] = tenant
    response: web.StreamResponse = await handler(request)
    return response
