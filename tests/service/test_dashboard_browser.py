"""The dashboard in a real browser: Debian's headless chromium, driven by playwright, against the real
service on a real socket with FakeComfyUI backends. Jobs are submitted through the page's form, followed
over the event socket (token as ``?token=``), cancelled with the page's button, and their outputs shown.

Chromium is not optional here: CI runs these tests, so a missing browser fails them (``scripts/setup.sh``
installs it) rather than skipping them.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from playwright.async_api import Browser, ConsoleMessage, Locator, Page, async_playwright, expect

from comfy_orchestrator.service import ServiceSettings, create_app
from comfy_orchestrator.service.keys import SOCKETS
from comfy_orchestrator.testing import FakeComfyUI, HangMode, NodeFailure
from tests.service.conftest import QUICK, TOKENS, Service, auth, ops_graph, running_service

CHROMIUM = Path("/usr/bin/chromium")
FINAL = re.compile(r"^(succeeded|failed|cancelled)$")
WAIT_MS = 60_000  # generous: the machine may be loaded; nothing here is a timing assertion
SD15, DREAM = "sd15.safetensors", "dreamshaper_8.safetensors"
TINY_MODELS = {"diffusion_models": ["tiny_sd2_unet.safetensors"],
               "vae_approx": ["taesd_encoder.safetensors", "taesd_decoder.safetensors"]}


def chromium_path() -> str:
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: the dashboard's browser tests need Debian's chromium "
                    "(scripts/setup.sh installs it: apt-get install -y --no-install-recommends chromium)")
    return str(CHROMIUM)


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    executable = chromium_path()
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=executable, headless=True)
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    """A fresh browser context (its own session storage); fails the test on a script error or a
    Content-Security-Policy violation."""
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    opened = await context.new_page()
    problems: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error" and ("Content Security Policy" in message.text or "Uncaught" in message.text):
            problems.append(message.text)

    opened.on("pageerror", lambda exc: problems.append(f"uncaught: {exc}"))
    opened.on("console", on_console)
    try:
        yield opened
    finally:
        await context.close()
    assert problems == []


@asynccontextmanager
async def service_with(tmp_path: Path, fake: FakeComfyUI, **sections: Mapping[str, Any]) -> AsyncIterator[Service]:
    """The service with one given backend double (``running_service`` makes plain ones) and any other
    settings ``sections`` (``quality={...}``)."""
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(fake)
        settings = ServiceSettings.from_mapping({
            "server": {"workers": 2, "lease_s": 10.0, "drain_timeout": 5.0, "heartbeat_s": 5.0},
            "store": {"path": str(tmp_path / "jobs.db"), "outputs_dir": str(tmp_path / "outputs")},
            "backends": [{"name": "gpu-0", "url": fake.url}],
            "tokens": [{"token": token, "tenant": tenant} for tenant, token in TOKENS.items()],
            **sections,
        })
        runner = web.AppRunner(create_app(settings, pool_settings=QUICK), shutdown_timeout=2.0)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        session = await stack.enter_async_context(aiohttp.ClientSession())
        service = Service(f"http://127.0.0.1:{runner.addresses[0][1]}", runner.app, runner, session, [fake])
        try:
            yield service
        finally:
            await service.stop()


async def open_dashboard(page: Page, service: Service, token: str) -> None:
    await page.goto(f"{service.url}/")
    assert page.url == f"{service.url}/dashboard"  # / redirects to the page
    await page.fill("#token", token)
    await page.click("#login-form button[type=submit]")
    await expect(page.locator("#main")).to_be_visible(timeout=WAIT_MS)
    await expect(page.locator("#connection")).to_have_text("events: live", timeout=WAIT_MS)


async def submit_template(page: Page, template: str, params: dict[str, object], labels: str = "") -> str:
    await page.check("input[name=mode][value=template]")
    await page.fill("#template", template)
    await page.fill("#params", json.dumps(params))
    await page.fill("#labels", labels)
    await page.click("#submit-button")
    result = page.locator("#submit-result[data-job-id]")
    await expect(result).to_be_attached(timeout=WAIT_MS)
    job_id = await result.get_attribute("data-job-id")
    assert job_id
    return job_id


def job_item(page: Page, job_id: str) -> Locator:
    return page.locator(f'li.job[data-job-id="{job_id}"]')


async def shown_image_size(page: Page, job_id: str) -> tuple[int, int]:
    image = job_item(page, job_id).locator(".outputs img").first
    await expect(image).to_be_visible(timeout=WAIT_MS)
    await page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=await image.element_handle(),
                                 timeout=WAIT_MS)
    width, height = await image.evaluate("img => [img.naturalWidth, img.naturalHeight]")
    return int(width), int(height)


async def test_a_job_submitted_through_the_form_finishes_on_the_page_with_its_image(
    service: Service, page: Page, tmp_path: Path
) -> None:
    await open_dashboard(page, service, TOKENS["acme"])
    backend = page.locator('#backends tr[data-backend="gpu-0"]')
    await expect(backend).to_have_attribute("data-health", "healthy", timeout=WAIT_MS)

    job_id = await submit_template(page, "cpu_model_free_ops", {"width": 40, "height": 24, "color": 0xFF0000},
                                   labels='{"run": "browser"}')
    item = job_item(page, job_id)
    await expect(item.locator(".state")).to_have_text("succeeded", timeout=WAIT_MS)
    await expect(item.locator("progress.progress")).to_have_js_property("value", 1)
    await expect(item.locator(".labels")).to_have_text("run=browser")
    await expect(item.locator(".cancel")).to_be_hidden()
    assert await shown_image_size(page, job_id) == (80, 48)  # the template scales by 2
    job = await service.job(job_id)
    assert job["state"] == "succeeded"
    await expect(item.locator(".outputs figcaption")).to_have_text(job["outputs"])

    await page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
    assert (tmp_path / "dashboard.png").stat().st_size > 0


async def test_a_bad_submission_shows_the_services_error(service: Service, page: Page) -> None:
    await open_dashboard(page, service, TOKENS["acme"])
    await page.fill("#template", "no_such_template")
    await page.click("#submit-button")
    await expect(page.locator("#submit-result")).to_contain_text("UnknownTemplate", timeout=WAIT_MS)
    await page.fill("#template", "cpu_model_free_ops")
    await page.fill("#params", "[1, 2")
    await page.click("#submit-button")
    await expect(page.locator("#submit-result")).to_contain_text("parameters is not valid JSON", timeout=WAIT_MS)
    async with service.session.get(f"{service.url}/v1/jobs", headers=auth()) as resp:
        assert (await resp.json())["items"] == []


async def test_progress_bar_follows_the_sampler_live(tmp_path: Path, page: Page) -> None:
    fake = FakeComfyUI(name="fake-slow", models=TINY_MODELS, step_delay=0.4)
    async with service_with(tmp_path, fake) as service:
        await open_dashboard(page, service, TOKENS["acme"])
        job_id = await submit_template(page, "cpu_tiny_unet_txt2img", {"steps": 20, "seed": 7})
        item = job_item(page, job_id)
        # Part-way: a progress event moved the bar strictly between empty and full while the job runs.
        await page.wait_for_function(
            """id => {
                const li = document.querySelector(`li.job[data-job-id="${id}"]`);
                const bar = li && li.querySelector("progress.progress");
                return li && li.dataset.state === "running" && bar.hasAttribute("value")
                    && bar.value > 0 && bar.value < 1;
            }""", arg=job_id, timeout=WAIT_MS)
        await expect(item.locator(".detail")).to_contain_text("%")
        await expect(item.locator(".state")).to_have_text("succeeded", timeout=WAIT_MS)
        assert await shown_image_size(page, job_id) == (64, 64)


async def test_the_cancel_button_cancels_a_running_job(service: Service, page: Page) -> None:
    service.doubles[0].faults.hang = HangMode.START  # prompts are accepted and never start
    try:
        await open_dashboard(page, service, TOKENS["acme"])
        job_id = await submit_template(page, "cpu_model_free_ops", {"color": 5})
        item = job_item(page, job_id)
        await expect(item.locator(".state")).to_have_text("running", timeout=WAIT_MS)
        await item.locator(".cancel").click()
        await expect(item.locator(".state")).to_have_text("cancelled", timeout=WAIT_MS)
        await expect(item.locator(".cancel")).to_be_hidden()
        assert (await service.job(job_id))["state"] == "cancelled"
        await expect(item.locator(".outputs img")).to_have_count(0)
        await item.locator(".delete").click()  # an ended job can go
        await expect(item).to_have_count(0, timeout=WAIT_MS)
        async with service.session.get(f"{service.url}/v1/jobs/{job_id}", headers=auth()) as resp:
            assert resp.status == 404
    finally:
        service.doubles[0].faults.hang = None


async def test_tokens_guard_the_data_not_the_page(service: Service, page: Page) -> None:
    async with await service.submit({"graph": ops_graph(color=9)}) as resp:  # acme's, before the page opens
        earlier = (await resp.json())["id"]
    await service.wait_state(earlier, "succeeded")

    await page.goto(f"{service.url}/dashboard")  # the page loads without a token and asks for one
    await expect(page.locator("#login")).to_be_visible()
    await expect(page.locator("#main")).to_be_hidden()
    await page.fill("#token", "not-a-valid-token-at-all")
    await page.click("#login-form button[type=submit]")
    await expect(page.locator("#login-error")).to_have_text("The token was refused.", timeout=WAIT_MS)
    await expect(page.locator("#main")).to_be_hidden()

    await page.fill("#token", TOKENS["other"])  # another tenant sees none of acme's jobs
    await page.click("#login-form button[type=submit]")
    await expect(page.locator("#connection")).to_have_text("events: live", timeout=WAIT_MS)
    await expect(page.locator("#jobs-empty")).to_be_visible()
    await expect(job_item(page, earlier)).to_have_count(0)

    await page.click("#forget-token")
    await expect(page.locator("#login")).to_be_visible()
    await page.fill("#token", TOKENS["acme"])
    await page.click("#login-form button[type=submit]")
    await expect(job_item(page, earlier).locator(".state")).to_have_text("succeeded", timeout=WAIT_MS)
    assert await shown_image_size(page, earlier) == (128, 128)

    await page.reload()  # the token is kept for the tab; the event socket authenticates with it
    await expect(page.locator("#connection")).to_have_text("events: live", timeout=WAIT_MS)
    async with await service.submit({"graph": ops_graph(color=10)}) as resp:  # submitted elsewhere: arrives live
        later = (await resp.json())["id"]
    await expect(job_item(page, later).locator(".state")).to_have_text("succeeded", timeout=WAIT_MS)
    assert await page.evaluate("() => sessionStorage.length") == 1
    assert await page.evaluate("() => localStorage.length") == 0


async def test_the_page_reconnects_and_replays_what_it_missed(tmp_path: Path, page: Page) -> None:
    async with running_service(tmp_path) as service:
        await open_dashboard(page, service, TOKENS["acme"])
        first = await submit_template(page, "cpu_model_free_ops", {"color": 1})
        await expect(job_item(page, first).locator(".state")).to_have_text("succeeded", timeout=WAIT_MS)
        await page.context.set_offline(True)  # the page cannot reconnect until it is back online
        for socket in list(service.app[SOCKETS]):  # the service drops the page's event socket
            await socket.close()
        await expect(page.locator("#connection")).to_have_text("events: reconnecting", timeout=WAIT_MS)
        async with await service.submit({"graph": ops_graph(color=2)}) as resp:  # while the page is offline
            missed = (await resp.json())["id"]
        await service.wait_state(missed, "succeeded")
        await page.context.set_offline(False)
        await expect(page.locator("#connection")).to_have_text("events: live", timeout=WAIT_MS)
        await expect(job_item(page, missed).locator(".state")).to_have_text("succeeded", timeout=WAIT_MS)


async def test_a_comparison_pipeline_shows_its_grid_with_scores(tmp_path: Path, page: Page) -> None:
    fake = FakeComfyUI(name="fake-two-models", models={"checkpoints": [SD15, DREAM]})
    spec = {"name": "compare", "steps": [
        {"name": "draw", "kind": "generate", "template": "sd15_txt2img", "models": [SD15, DREAM],
         "prompts": ["a red circle", "a blue square"], "seeds": [3],
         "params": {"width": 64, "height": 64, "steps": 4}},
        {"name": "rate", "kind": "score", "depends_on": ["draw"]},
    ]}
    async with service_with(tmp_path, fake, quality={"model": "tiny-shapes", "device": "cpu"}) as service:
        await open_dashboard(page, service, TOKENS["acme"])
        await page.check("input[name=mode][value=pipeline]")
        await page.fill("#pipeline", json.dumps(spec))
        await page.click("#submit-button")
        result = page.locator("#submit-result[data-job-id]")
        await expect(result).to_be_attached(timeout=WAIT_MS)
        job_id = await result.get_attribute("data-job-id")
        assert job_id
        item = job_item(page, job_id)
        await expect(item.locator(".state")).to_have_text(FINAL, timeout=WAIT_MS)
        job = await service.job(job_id)
        assert job["state"] == "succeeded", job["error"]
        await expect(item.locator(".state")).to_have_text("succeeded")
        await expect(item.locator(".kind")).to_have_text("pipeline")

        async with service.session.get(f"{service.url}/v1/runs/{job_id}", headers=auth()) as resp:
            assert resp.status == 200, await resp.text()
            run = await resp.json()
        scored = [c for c in run["cells"] if c["score"] is not None]
        assert scored, run["cells"]
        grid = item.locator("table.grid")
        await expect(grid).to_be_visible(timeout=WAIT_MS)
        headers = await grid.locator("thead th").all_text_contents()
        assert headers[3:] == list(dict.fromkeys(c["model"] for c in run["cells"]))
        cells = grid.locator("td.cell")
        await expect(cells.locator("img")).to_have_count(len(run["cells"]), timeout=WAIT_MS)
        shown = sorted(await cells.locator(".score").all_text_contents())
        assert shown == sorted(f"score {c['score']:.3f}" if c["score"] is not None else "score —"
                               for c in run["cells"])
        best: dict[tuple[object, ...], float] = {}  # the best score of each row (step, prompt, seed)
        for c in scored:
            row = (c["step"], c["prompt"], c["seed"])
            best[row] = max(best.get(row, c["score"]), c["score"])
        outlined = sorted(await grid.locator("td.best .score").all_text_contents())
        assert outlined == sorted(f"score {score:.3f}" for score in best.values())
        grid_image = item.locator(".grid-image img")
        await expect(grid_image).to_be_visible(timeout=WAIT_MS)
        await page.wait_for_function("img => img.complete && img.naturalWidth > 0",
                                     arg=await grid_image.element_handle(), timeout=WAIT_MS)
        await page.screenshot(path=str(tmp_path / "comparison.png"), full_page=True)


async def test_job_data_is_shown_as_text_never_as_markup(service: Service, page: Page) -> None:
    markup = '<img src="x" onerror="document.title=\'pwned\'">'
    service.doubles[0].faults.execution_error = NodeFailure("RuntimeError", f"boom {markup}", times=None)
    try:
        async with await service.submit({"graph": ops_graph(color=4), "labels": {"note": markup}}) as resp:
            job_id = (await resp.json())["id"]
        await service.wait_state(job_id, "failed", timeout=60)
    finally:
        service.doubles[0].faults.execution_error = None
    await open_dashboard(page, service, TOKENS["acme"])
    item = job_item(page, job_id)
    await expect(item.locator(".state")).to_have_text("failed", timeout=WAIT_MS)
    await expect(item.locator(".labels")).to_have_text(f"note={markup}")
    await expect(item.locator(".job-error")).to_contain_text(f"boom {markup}", timeout=WAIT_MS)
    assert await item.locator("img").count() == 0
    assert await page.title() == "comfy_orchestrator dashboard"
