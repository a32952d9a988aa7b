"""HTTP and WebSocket plumbing for one ComfyUI server: one aiohttp session, errors mapped to ours."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import aiohttp

from comfy_orchestrator.config import Timeouts
from comfy_orchestrator.errors import (
    BackendUnavailable,
    ClientClosed,
    ConnectTimeout,
    GraphValidationError,
    ProtocolError,
    RequestTimeout,
)

__all__ = ["HttpTransport"]


class HttpTransport:
    """Requests to one base URL. The session is created lazily and owned here."""

    def __init__(self, base_url: str, timeouts: Timeouts, headers: Mapping[str, str] | None = None) -> None:
        self.base_url = base_url
        self._timeouts = timeouts
        self._headers = dict(headers or {})
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self._timeout = aiohttp.ClientTimeout(total=timeouts.request, sock_connect=timeouts.connect)
        self._stream_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=timeouts.connect, sock_read=timeouts.request
        )

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise ClientClosed(f"client of {self.base_url} is closed; make a new one")
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers=self._headers,
                timeout=self._timeout,
                connector=aiohttp.TCPConnector(limit=64, ttl_dns_cache=300),
            )
        return self._session

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()

    def ws_url(self, client_id: str) -> str:
        scheme, _, rest = self.base_url.partition("://")
        return f"{'wss' if scheme == 'https' else 'ws'}://{rest}/ws?clientId={client_id}"

    @contextlib.contextmanager
    def _mapped(self, what: str) -> Iterator[None]:
        try:
            yield
        except aiohttp.ConnectionTimeoutError as exc:
            raise ConnectTimeout(f"{what}: no connection to {self.base_url} in time") from exc
        except TimeoutError as exc:
            raise RequestTimeout(f"{what}: {self.base_url} did not answer in time") from exc
        except aiohttp.WSServerHandshakeError as exc:
            raise BackendUnavailable(
                f"{what}: WebSocket refused by {self.base_url} ({exc.status})", backend=self.base_url, status=exc.status
            ) from exc
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            raise BackendUnavailable(f"{what}: {self.base_url} unreachable ({exc})", backend=self.base_url) from exc

    async def ws_connect(self, url: str) -> aiohttp.ClientWebSocketResponse:
        with self._mapped("WebSocket"):
            return await self.session.ws_connect(url, heartbeat=30.0, max_msg_size=0, autoping=True)

    async def _check(self, resp: aiohttp.ClientResponse, what: str) -> None:
        if resp.status >= 500:
            text = (await resp.text())[:300]
            raise BackendUnavailable(
                f"{what}: {self.base_url} answered {resp.status}: {text}", backend=self.base_url, status=resp.status
            )
        if resp.status >= 400:
            text = (await resp.text())[:300]
            raise ProtocolError(f"{what}: {self.base_url} answered {resp.status}: {text}", backend=self.base_url)

    async def _json(self, resp: aiohttp.ClientResponse, what: str) -> Any:
        try:
            return await resp.json(content_type=None)
        except (ValueError, aiohttp.ContentTypeError) as exc:
            raise ProtocolError(f"{what}: {self.base_url} answered no JSON", backend=self.base_url) from exc

    async def get_json(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        with self._mapped(f"GET {path}"):
            async with self.session.get(self.base_url + path, params=params) as resp:
                await self._check(resp, f"GET {path}")
                return await self._json(resp, f"GET {path}")

    async def post_json(self, path: str, body: Mapping[str, Any]) -> None:
        with self._mapped(f"POST {path}"):
            async with self.session.post(self.base_url + path, json=body) as resp:
                await self._check(resp, f"POST {path}")
                await resp.read()

    async def submit(self, body: Mapping[str, Any]) -> Any:
        """POST /prompt; a 400 becomes GraphValidationError with ComfyUI's body verbatim."""
        with self._mapped("POST /prompt"):
            async with self.session.post(self.base_url + "/prompt", json=body) as resp:
                if resp.status == 400:
                    text = await resp.text()
                    try:
                        answer = json.loads(text)
                        error, node_errors = answer["error"], answer.get("node_errors") or {}
                    except (ValueError, KeyError, TypeError):
                        error, node_errors = {"type": "invalid_prompt", "message": text[:500]}, {}
                    if isinstance(error, str):
                        error = {"type": "invalid_prompt", "message": error}
                    raise GraphValidationError(error, node_errors, backend=self.base_url)
                await self._check(resp, "POST /prompt")
                return await self._json(resp, "POST /prompt")

    async def upload(self, path: str, data: bytes, filename: str, subfolder: str, overwrite: bool) -> Any:
        form = aiohttp.FormData()
        form.add_field("image", data, filename=filename, content_type="application/octet-stream")
        form.add_field("overwrite", "true" if overwrite else "false")
        if subfolder:
            form.add_field("subfolder", subfolder)
        with self._mapped(f"POST {path}"):
            async with self.session.post(self.base_url + path, data=form) as resp:
                await self._check(resp, f"POST {path}")
                return await self._json(resp, f"POST {path}")

    async def stream(self, path: str, params: Mapping[str, str], chunk_size: int) -> AsyncIterator[bytes]:
        with self._mapped(f"GET {path}"):
            async with self.session.get(self.base_url + path, params=params, timeout=self._stream_timeout) as resp:
                await self._check(resp, f"GET {path}")
                async for chunk in resp.content.iter_chunked(chunk_size):
                    yield chunk
