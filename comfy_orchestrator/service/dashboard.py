"""``GET /dashboard``: a single page (HTML, vanilla JS and CSS shipped as package data) that shows the
backends, submits jobs and follows them live over ``WS /v1/events``; ``GET /`` redirects to it.

The page and its two assets need no token: they hold no tenant data. The script asks for a token,
keeps it in the tab's ``sessionStorage`` and sends it as ``Authorization: Bearer`` on every
``/v1`` call and as ``?token=`` on the event socket (the one route that takes it so, see ``auth``).
Assets are served from a fixed table (no path from the request reaches the file system), with a
Content-Security-Policy that allows only this origin's script, style, fetches and ``blob:`` images
(outputs are fetched with the token and shown from blobs).
"""

from __future__ import annotations

import asyncio
from importlib import resources

from aiohttp import web

from comfy_orchestrator.service.errors import ApiError

__all__ = ["ASSETS", "routes"]

routes = web.RouteTableDef()

ASSETS = {  # URL name -> (file under static/, content type)
    "app.js": ("app.js", "text/javascript"),
    "style.css": ("style.css", "text/css"),
}
_PAGE = ("index.html", "text/html")

_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


async def _asset(file: str, content_type: str) -> web.Response:
    resource = resources.files("comfy_orchestrator.service").joinpath("static", file)
    body = await asyncio.to_thread(resource.read_bytes)
    return web.Response(body=body, content_type=content_type, charset="utf-8", headers=_HEADERS)


@routes.get("/")
async def root(request: web.Request) -> web.Response:
    raise web.HTTPFound("/dashboard")


@routes.get("/dashboard")
async def page(request: web.Request) -> web.Response:
    return await _asset(*_PAGE)


@routes.get("/dashboard/{asset}")
async def asset(request: web.Request) -> web.Response:
    name = request.match_info["asset"]
    found = ASSETS.get(name)
    if found is None:
        raise ApiError(404, "NotFound", f"the dashboard has no asset {name!r}")
    return await _asset(*found)
