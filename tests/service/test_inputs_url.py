"""``POST /v1/inputs`` with ``{"url": ...}``: fetched only from allow-listed hosts, only over allowed
addresses, on every redirect hop; refusals are 4xx with a message saying why.

Every origin server here listens on 127.0.0.1; the service reaches it only where a test lists
127.0.0.1/32 in ``allow_networks``. The metadata address is refused before any connection is made.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.service.conftest import Service, auth, running_service
from tests.service.test_inputs import image_bytes

PNG = image_bytes("PNG", (12, 8), seed=5)
MAX_BYTES = 64 * 1024


@dataclass
class Origin:
    url: str
    port: int
    hits: Counter[str]


@asynccontextmanager
async def origin() -> AsyncIterator[Origin]:
    """A small web server: an image, redirects (``/to?url=``), a loop, a 404, bodies over the cap."""
    hits: Counter[str] = Counter()

    async def handle(request: web.Request) -> web.StreamResponse:
        hits[request.path] += 1
        if request.path == "/img.png":
            return web.Response(body=PNG, content_type="image/png")
        if request.path == "/to":
            raise web.HTTPFound(request.query["url"])
        if request.path == "/slow":
            await asyncio.sleep(60)  # far beyond the fetch's time cap; cancelled at clean-up
        if request.path == "/bad-redirect":
            return web.Response(status=302, headers={"Location": "http://[::1"})
        if request.path == "/loop":
            raise web.HTTPTemporaryRedirect("/loop")
        if request.path == "/big":
            return web.Response(body=b"\0" * (MAX_BYTES + 1), content_type="image/png")
        if request.path == "/big-chunked":
            response = web.StreamResponse()
            response.content_type = "image/png"
            response.enable_chunked_encoding()
            await response.prepare(request)
            for _ in range(MAX_BYTES // 4096 + 2):
                await response.write(b"\0" * 4096)
            await response.write_eof()
            return response
        raise web.HTTPNotFound()

    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", handle)
    runner = web.AppRunner(app, shutdown_timeout=0.5)  # a handler still in /slow is cancelled at clean-up
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield Origin(f"http://127.0.0.1:{port}", port, hits)
    finally:
        await runner.cleanup()


async def fetch(service: Service, url: str, *, tenant: str = "acme") -> tuple[int, dict[str, Any]]:
    async with service.session.post(f"{service.url}/v1/inputs", json={"url": url}, headers=auth(tenant)) as resp:
        body: dict[str, Any] = await resp.json()
        return resp.status, body


@asynccontextmanager
async def service_with(tmp_path: Path, inputs: Mapping[str, Any]) -> AsyncIterator[Service]:
    async with running_service(tmp_path, extra={"inputs": {"max_bytes": MAX_BYTES, **inputs}}) as service:
        yield service


async def test_allowed_url_is_fetched_and_stored_like_an_upload(tmp_path: Path) -> None:
    async with origin() as src, service_with(
            tmp_path, {"url_allow": [f"127.0.0.1:{src.port}"], "allow_networks": ["127.0.0.1/32"]}) as service:
        status, body = await fetch(service, f"{src.url}/img.png")
        assert status == 201, body
        assert body == {"id": hashlib.sha256(PNG).hexdigest(), "size": len(PNG), "content_type": "image/png",
                        "width": 12, "height": 8}
        # a redirect within the allowed origin is followed
        status, again = await fetch(service, f"{src.url}/to?url=/img.png")
        assert (status, again) == (201, body)
        assert src.hits["/img.png"] == 2


async def test_every_hop_is_checked_against_the_allow_list(tmp_path: Path) -> None:
    async with origin() as src, origin() as elsewhere, service_with(
            tmp_path, {"url_allow": [f"127.0.0.1:{src.port}"], "allow_networks": ["127.0.0.1/32"]}) as service:
        refused = {
            f"{elsewhere.url}/img.png": "host",  # another port of the same address
            f"{src.url}/to?url={elsewhere.url}/img.png": "host",  # redirected there
            f"{src.url}/to?url=http://localhost:{src.port}/img.png": "host",  # another host name, same server
            f"http://127.0.0.1:{src.port}@localhost:{src.port}/img.png": "host",  # credentials, another host
        }
        for url, reason in refused.items():
            status, body = await fetch(service, url)
            assert status == 403, (url, body)
            assert body["error"]["type"] == "UrlRefused"
            assert body["error"]["reason"] == reason
            assert "url_allow" in body["error"]["message"] or "credentials" in body["error"]["message"]
        assert not elsewhere.hits
        assert src.hits["/img.png"] == 0


async def test_loopback_is_refused_unless_an_operator_allows_it(tmp_path: Path) -> None:
    async with origin() as src, service_with(
            tmp_path, {"url_allow": [f"127.0.0.1:{src.port}", f"localhost:{src.port}"]}) as service:
        for url in (f"{src.url}/img.png", f"http://localhost:{src.port}/img.png"):  # literal, then resolved
            status, body = await fetch(service, url)
            assert status == 403, (url, body)
            assert body["error"]["type"] == "UrlRefused"
            assert body["error"]["reason"] == "address"
            assert "loopback" in body["error"]["message"]
        assert not src.hits  # refused before connecting


async def test_redirect_to_the_metadata_address_is_refused(tmp_path: Path) -> None:
    async with origin() as src, service_with(tmp_path, {
            "url_allow": [f"127.0.0.1:{src.port}", "169.254.169.254", "[::ffff:169.254.169.254]"],
            "allow_networks": ["127.0.0.1/32"]}) as service:
        for target in ("http://169.254.169.254/latest/meta-data/", "http://[::ffff:169.254.169.254]/latest/"):
            status, body = await fetch(service, f"{src.url}/to?url={target}")
            assert status == 403, body
            assert body["error"]["reason"] == "address", body
            assert "169.254.169.254 is a link-local address" in body["error"]["message"]
        assert src.hits["/to"] == 2


async def test_other_schemes_and_malformed_urls_are_refused(tmp_path: Path) -> None:
    async with origin() as src, service_with(
            tmp_path, {"url_allow": [f"127.0.0.1:{src.port}"], "allow_networks": ["127.0.0.1/32"]}) as service:
        for url in ("file:///etc/passwd", "ftp://127.0.0.1/x.png", "gopher://127.0.0.1:70/", "/img.png",
                    "data:image/png;base64,AAAA", "javascript:alert(1)"):
            status, body = await fetch(service, url)
            assert (status, body["error"]["type"]) == (400, "InvalidUrl"), (url, body)
        status, body = await fetch(service, f"{src.url}/to?url=file:///etc/passwd")  # nor through a redirect
        assert (status, body["error"]["type"]) == (400, "InvalidUrl"), body
        for payload in ({"url": ""}, {"url": 5}, {"href": src.url}, {"url": "x" * 5000}):
            async with service.session.post(f"{service.url}/v1/inputs", json=payload, headers=auth()) as resp:
                assert resp.status == 400, (payload, await resp.text())


async def test_oversized_slow_and_failing_fetches_are_4xx(tmp_path: Path) -> None:
    async with origin() as src, service_with(
            tmp_path, {"url_allow": [f"127.0.0.1:{src.port}"], "allow_networks": ["127.0.0.1/32"],
                       "max_redirects": 3}) as service:
        for path in ("/big", "/big-chunked"):
            status, body = await fetch(service, f"{src.url}{path}")
            assert (status, body["error"]["type"]) == (413, "InputTooLarge"), (path, body)
        status, body = await fetch(service, f"{src.url}/loop")
        assert (status, body["error"]["type"]) == (400, "InputFetchFailed"), body
        assert "more than 3 redirects" in body["error"]["message"]
        assert src.hits["/loop"] == 4
        status, body = await fetch(service, f"{src.url}/missing.png")
        assert (status, body["error"]["type"]) == (400, "InputFetchFailed"), body
        assert "404" in body["error"]["message"]
        status, body = await fetch(service, f"{src.url}/bad-redirect")
        assert (status, body["error"]["type"]) == (400, "InputFetchFailed"), body


async def test_a_fetch_is_capped_in_time(tmp_path: Path) -> None:
    async with origin() as src, service_with(
            tmp_path, {"url_allow": [f"127.0.0.1:{src.port}"], "allow_networks": ["127.0.0.1/32"],
                       "fetch_timeout_s": 0.5}) as service:
        status, body = await fetch(service, f"{src.url}/slow")
        assert (status, body["error"]["type"]) == (400, "InputFetchFailed"), body
        assert "took longer than 0.5s" in body["error"]["message"]


async def test_url_inputs_are_off_without_an_allow_list(service: Service) -> None:
    async with origin() as src:
        status, body = await fetch(service, f"{src.url}/img.png")
        assert (status, body["error"]["type"]) == (403, "UrlInputsDisabled"), body
        assert "url_allow" in body["error"]["message"]
        assert not src.hits
