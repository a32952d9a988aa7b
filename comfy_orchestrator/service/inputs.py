"""``POST /v1/inputs``: input images for jobs, stored per tenant by content.

    POST /v1/inputs   Content-Type image/png | image/jpeg | image/webp, the image as the body
                      Content-Type application/json, ``{"url": "https://…"}``: fetched by the service,
                      only from a host in ``[inputs] url_allow`` and only over global addresses (see
                      ``service.fetch``)
                      → 201 ``{"id", "size", "content_type", "width", "height"}``

An image is checked with Pillow before it is kept: its format must be the declared one (a fetched
image's format is read from its bytes), its header must parse and its ``width × height`` must be
within ``[inputs] max_pixels``; its size is capped by ``max_bytes`` while it streams in. It is kept
in a ``BlobStore`` per tenant, at ``<inputs dir>/<tenant key>/<sha256[:2]>/<sha256>``: the tenant
key is a hash of the tenant's name and the id is the content's SHA-256, so no name from a request
reaches the file system and no tenant can read another's inputs. The same bytes uploaded twice get the same id.

A job names its inputs as ``{"inputs": {"<file name in the graph's LoadImage>": "<id>"}}``;
``load_uploads`` reads them back for the worker, which hands them to ``Pool.run(uploads=…)``.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import io
import logging
import re
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from aiohttp import web
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

from comfy_orchestrator.errors import ComfyOrchestratorError
from comfy_orchestrator.graph import Graph
from comfy_orchestrator.pool.uploads import IMAGE_LOADERS
from comfy_orchestrator.service.errors import ApiError
from comfy_orchestrator.service.fetch import Fetcher, FetchFailed, FetchPolicy, FetchRefused, FetchTooLarge
from comfy_orchestrator.service.intake import job_inputs
from comfy_orchestrator.service.keys import TENANT
from comfy_orchestrator.service.settings import ServiceSettings
from comfy_orchestrator.store import BlobStore, JobRecord

__all__ = [
    "CONTENT_TYPES",
    "FETCHER",
    "INPUTS",
    "InputInfo",
    "InputNotFound",
    "InputStore",
    "check_image_names",
    "check_inputs",
    "install",
    "load_uploads",
    "routes",
]

log = logging.getLogger(__name__)

routes = web.RouteTableDef()

CONTENT_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}  # Pillow format → type


class InputNotFound(ComfyOrchestratorError, LookupError):
    """A job names an input id its tenant has not uploaded (or that was removed since)."""


@dataclass(frozen=True, slots=True)
class InputInfo:
    """A stored input, as ``POST /v1/inputs`` answers it."""

    id: str
    size: int
    content_type: str
    width: int
    height: int


class InputStore:
    """Images under ``root``, one folder per tenant, each addressed by its SHA-256."""

    def __init__(self, root: str | Path, *, max_bytes: int, max_pixels: int) -> None:
        self.root = Path(root)
        self.max_bytes, self.max_pixels = max_bytes, max_pixels
        self._blobs: dict[str, BlobStore] = {}

    def tenant_dir(self, tenant: str) -> Path:
        return self.root / hashlib.sha256(tenant.encode()).hexdigest()[:32]

    def blobs(self, tenant: str) -> BlobStore:
        """The tenant's inputs: a content-addressed store of its own."""
        store = self._blobs.get(tenant)
        if store is None:
            store = self._blobs[tenant] = BlobStore(self.tenant_dir(tenant))
        return store

    def path(self, tenant: str, input_id: str) -> Path:
        try:
            return self.blobs(tenant).path(input_id)
        except ValueError:
            raise InputNotFound(f"{input_id[:80]!r} is not an input id (64 lowercase hex digits)") from None

    async def exists(self, tenant: str, input_id: str) -> bool:
        try:
            return await asyncio.to_thread(self.path(tenant, input_id).is_file)
        except InputNotFound:
            return False

    async def read(self, tenant: str, input_id: str) -> bytes:
        try:
            return await asyncio.to_thread(self.path(tenant, input_id).read_bytes)
        except FileNotFoundError:
            raise InputNotFound(f"no input {input_id!r}") from None

    async def put(self, tenant: str, data: bytes | AsyncIterable[bytes], *, declared: str | None = None
                  ) -> InputInfo:
        """Keep an image (bytes, or chunks as they stream in, counted against ``max_bytes``),
        checked with Pillow, in the tenant's content-addressed store. Raises ApiError: 413 past
        ``max_bytes`` or ``max_pixels``, 400 for bytes that are not an image of an accepted format
        or not of the ``declared`` content type."""
        if not isinstance(data, bytes):
            data = await _gather(data, self.max_bytes)
        if len(data) > self.max_bytes:
            raise ApiError(413, "InputTooLarge", f"an input is at most {self.max_bytes} bytes")
        content_type, width, height = await asyncio.to_thread(_inspect, data, self.max_pixels)
        if declared is not None and declared != content_type:
            raise ApiError(400, "InvalidImage", f"the body is {content_type}, not {declared} as declared")
        blob = await self.blobs(tenant).put(data)
        log.info("tenant %s: input %s stored (%s, %dx%d, %d bytes)", tenant, blob.sha256[:12], content_type, width,
                 height, blob.size)
        return InputInfo(blob.sha256, blob.size, content_type, width, height)


async def _gather(chunks: AsyncIterable[bytes], max_bytes: int) -> bytes:
    """The chunks as one body, refused (413) as soon as it passes ``max_bytes``."""
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > max_bytes:
            raise ApiError(413, "InputTooLarge", f"an input is at most {max_bytes} bytes")
    return bytes(body)


def _inspect(data: bytes, max_pixels: int) -> tuple[str, int, int]:
    """(content type, width, height) of the image in ``data``, from its header; raises ApiError."""
    try:
        with Image.open(io.BytesIO(data), formats=list(CONTENT_TYPES)) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ApiError(413, "TooManyPixels", f"the image is {width}×{height}; at most {max_pixels} pixels "
                               "are allowed")
            content_type = CONTENT_TYPES[str(image.format)]
            image.verify()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ApiError(413, "TooManyPixels", f"the image has more than {max_pixels} pixels") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, KeyError, EOFError) as exc:
        raise ApiError(400, "InvalidImage", f"not a PNG, JPEG or WebP image ({type(exc).__name__})") from None
    return content_type, width, height


async def check_inputs(store: InputStore, tenant: str, inputs: Mapping[str, str]) -> None:
    """Raise ApiError (400) unless every id in ``inputs`` is one of ``tenant``'s inputs."""
    for name, input_id in inputs.items():
        if not await store.exists(tenant, input_id):
            raise ApiError(400, "UnknownInput", f"inputs.{name}: no input {input_id!r} (upload it to /v1/inputs)")


_ANNOTATION = re.compile(r"\s*\[input\]$")


def check_image_names(graph: Graph) -> None:
    """Raise ApiError (400) when an image loader names a file outside the backend's input folder: an
    absolute path (``/x``, ``C:x``), a ``..`` segment, a backslash, a NUL, a ``%`` (an encoded trick
    some layer might decode), or ``[output]``/``[temp]`` (files other jobs, maybe other tenants',
    wrote on a shared backend). ``sub/x.png`` is fine."""
    for node_id, node in graph.to_dict().items():
        input_name = IMAGE_LOADERS.get(str(node.get("class_type")))
        value = (node.get("inputs") or {}).get(input_name) if input_name is not None else None
        if not isinstance(value, str):
            continue
        plain = _ANNOTATION.sub("", value)
        if (not plain or plain.startswith("/") or any(c in plain for c in "\\\0%") or ".." in plain.split("/")
                or re.match(r"[A-Za-z]:", plain) or re.search(r"\[(output|temp)\]\s*$", plain)):
            raise ApiError(400, "InvalidFileName", f"node {node_id}: {value[:120]!r} is not a file name in the "
                           "backend's input folder")


async def load_uploads(store: InputStore | None, job: JobRecord) -> dict[str, bytes]:
    """The files ``job`` names in its ``inputs`` (graph file name → bytes), for ``Pool.run(uploads=…)``.
    Raises InputNotFound when one is gone."""
    inputs = job_inputs(job.kind, job.spec)
    if not inputs:
        return {}
    if store is None:
        raise InputNotFound(f"job {job.id} names inputs, but this service keeps none")
    return {name: await store.read(job.tenant, input_id) for name, input_id in inputs.items()}


class UrlInput(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str = Field(min_length=1, max_length=2048)


INPUTS = web.AppKey("inputs", InputStore)
FETCHER = web.AppKey("input_fetcher", Fetcher)


def install(app: web.Application, settings: ServiceSettings) -> None:
    """The input store, the URL fetcher (closed with the app) and the ``/v1/inputs`` route."""
    section = settings.inputs
    root = section.dir if section.dir is not None else settings.store.outputs_dir.parent / "inputs"
    app[INPUTS] = InputStore(root, max_bytes=section.max_bytes, max_pixels=section.max_pixels)
    policy = FetchPolicy(section.url_allow, tuple(section.allow_networks))
    app[FETCHER] = Fetcher(policy, max_bytes=section.max_bytes, timeout_s=section.fetch_timeout_s,
                           max_redirects=section.max_redirects)
    app.router.add_routes(routes)
    app.cleanup_ctx.append(functools.partial(_fetcher_lifespan, fetcher=app[FETCHER]))


async def _fetcher_lifespan(app: web.Application, *, fetcher: Fetcher) -> AsyncIterator[None]:
    try:
        yield
    finally:
        await fetcher.close()


async def _body_chunks(request: web.Request) -> AsyncIterator[bytes]:
    async for chunk in request.content.iter_chunked(1 << 16):
        yield chunk


@routes.post("/v1/inputs")
async def upload(request: web.Request) -> web.Response:
    store, tenant = request.app[INPUTS], request[TENANT]
    content_type = request.content_type
    if content_type == "application/json":
        info = await _from_url(request, store, tenant)
    elif content_type in CONTENT_TYPES.values():
        if request.content_length is not None and request.content_length > store.max_bytes:
            raise ApiError(413, "InputTooLarge", f"the body is {request.content_length} bytes; an input is at most "
                           f"{store.max_bytes}")
        info = await store.put(tenant, _body_chunks(request), declared=content_type)
    else:
        accepted = ", ".join([*CONTENT_TYPES.values(), "application/json ({\"url\": ...})"])
        raise ApiError(415, "UnsupportedMediaType", f"Content-Type {content_type!r} is not taken; send one of "
                       f"{accepted}")
    return web.json_response(asdict(info), status=201)


async def _from_url(request: web.Request, store: InputStore, tenant: str) -> InputInfo:
    body = UrlInput.model_validate_json(await request.read())
    fetcher = request.app[FETCHER]
    if not fetcher.policy.enabled:
        raise ApiError(403, "UrlInputsDisabled", "inputs by URL are disabled: [inputs] url_allow is empty; upload "
                       "the image as the body instead")
    try:
        fetched = await fetcher.fetch(body.url)
    except FetchRefused as exc:
        status, kind = (400, "InvalidUrl") if exc.reason in ("url", "scheme") else (403, "UrlRefused")
        raise ApiError(status, kind, str(exc), extra={"reason": exc.reason}) from None
    except FetchTooLarge as exc:
        raise ApiError(413, "InputTooLarge", str(exc)) from None
    except FetchFailed as exc:
        raise ApiError(400, "InputFetchFailed", str(exc)) from None
    log.info("tenant %s: fetched an input from %s", tenant, fetched.url)
    return await store.put(tenant, fetched.data)

