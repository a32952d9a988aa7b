"""The dashboard's page and assets over HTTP: served without a token, from a fixed table, with a
Content-Security-Policy that keeps the page to its own script, style, fetches and ``blob:`` images."""

from __future__ import annotations

import re
from importlib import resources

import pytest

from comfy_orchestrator.service.dashboard import ASSETS
from tests.service.conftest import Service


async def test_root_redirects_to_the_page(service: Service) -> None:
    async with service.session.get(f"{service.url}/", allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == "/dashboard"


async def test_the_page_needs_no_token_and_allows_only_its_own_origin(service: Service) -> None:
    async with service.session.get(f"{service.url}/dashboard") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/html"
        html = await resp.text()
        csp = resp.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp
    assert "script-src 'self';" in csp
    assert "img-src 'self' blob:;" in csp
    assert "unsafe-inline" not in csp
    scripts = re.findall(r"<script\b[^>]*>", html)
    assert scripts == ['<script src="/dashboard/app.js" defer>']  # nothing inline: the CSP would block it
    assert 'href="/dashboard/style.css"' in html
    assert re.search(r"https?://", html) is None  # no CDN: the machines are offline


@pytest.mark.parametrize(("name", "content_type"), [(n, t) for n, (_, t) in ASSETS.items()])
async def test_assets_are_the_packaged_files(service: Service, name: str, content_type: str) -> None:
    packaged = resources.files("comfy_orchestrator.service").joinpath("static", ASSETS[name][0]).read_bytes()
    async with service.session.get(f"{service.url}/dashboard/{name}") as resp:
        assert resp.status == 200
        assert resp.content_type == content_type
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert await resp.read() == packaged


@pytest.mark.parametrize("name", ["index.html", "nope.js", "..%2Fdashboard.py", "app.js%00", "APP.JS"])
async def test_anything_else_under_dashboard_is_404(service: Service, name: str) -> None:
    async with service.session.get(f"{service.url}/dashboard/{name}") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["type"] == "NotFound"


def test_the_script_never_parses_job_data_as_html() -> None:
    script = resources.files("comfy_orchestrator.service").joinpath("static", "app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in script
