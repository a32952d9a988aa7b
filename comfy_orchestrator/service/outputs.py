"""``GET /v1/jobs/{id}/outputs/{name}``: a job's output file, streamed from the store.

Names are made by the service (``<node id>/<file name>``) and looked up in the store's table; the
bytes are read from the content address recorded there, so no name can reach a file outside the
store. Names that look like a path trick are refused before the lookup all the same.
"""

from __future__ import annotations

import re

from aiohttp import web

from comfy_orchestrator.service.errors import ApiError
from comfy_orchestrator.service.keys import STORE, TENANT

__all__ = ["routes", "safe_name", "stream_output"]

routes = web.RouteTableDef()

_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\- ]{0,254}")


def safe_name(name: str) -> bool:
    """One or more plain segments separated by ``/``: no ``..``, no absolute path, no backslash."""
    parts = name.split("/")
    return 0 < len(parts) <= 4 and all(_SEGMENT.fullmatch(p) and ".." not in p for p in parts)


@routes.get("/v1/jobs/{job_id}/outputs/{name:.+}")
async def get_output(request: web.Request) -> web.StreamResponse:
    job_id, name = request.match_info["job_id"], request.match_info["name"]
    if not safe_name(name):
        raise ApiError(400, "InvalidOutputName", "output names are <node id>/<file name> as the job lists them")
    return await stream_output(request, job_id, name)


async def stream_output(request: web.Request, job_id: str, name: str) -> web.StreamResponse:
    """The tenant's output ``name`` of ``job_id`` as the response (ETag, 304, streamed); 404 when absent."""
    store, tenant = request.app[STORE], request[TENANT]
    output = await store.get_output(tenant, job_id, name)
    if output is None:
        raise ApiError(404, "OutputNotFound", f"job {job_id!r} has no output {name!r}")
    etag = f'"{output.sha256}"'
    headers = {"ETag": etag, "Cache-Control": "private, max-age=31536000, immutable"}
    if etag in [tag.strip() for tag in request.headers.get("If-None-Match", "").split(",")]:
        return web.Response(status=304, headers=headers)
    try:
        chunks = aiter(store.read_output(output))
        first = await anext(chunks, b"")  # the file is opened here: a missing one is a 404, not a cut 200
    except FileNotFoundError:
        raise ApiError(404, "OutputNotFound", f"job {job_id!r} has no output {name!r}") from None
    if len(first) == output.size:  # all of it in one chunk: headers and body leave in one write
        return web.Response(body=first, headers={**headers, "Content-Type": output.content_type})
    response = web.StreamResponse(headers=headers)
    response.content_type = output.content_type
    response.content_length = output.size
    await response.prepare(request)
    await response.write(first)
    async for chunk in chunks:
        await response.write(chunk)
    await response.write_eof()
    return response
