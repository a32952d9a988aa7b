"""A running service on a real socket, with FakeComfyUI doubles as its backends."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from comfy_orchestrator.config import Timeouts
from comfy_orchestrator.graph import load_templates
from comfy_orchestrator.pool import PoolSettings
from comfy_orchestrator.service import ServiceSettings, create_app
from comfy_orchestrator.testing import FakeComfyUI

TOKENS = {"acme": "acme-token-0123456789", "other": "other-token-0123456789"}
QUICK = PoolSettings(health_interval=0.05, health_timeout=1.0, fail_threshold=2, recover_threshold=2,
                     max_attempts=2, backoff_initial=0.01, backoff_max=0.05)
FAST = Timeouts(connect=1.0, request=3.0, stall=5.0, poll=0.1, unreachable=0.6)


def auth(tenant: str = "acme") -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[tenant]}"}


async def wait_ready(session: aiohttp.ClientSession, url: str, process: asyncio.subprocess.Process, *,
                     timeout: float, output: Callable[[], str] = lambda: "") -> None:
    """Until the ``comfy-orch serve`` at ``url`` answers ``/readyz`` with 200; fails the test (with
    ``output()``) when ``process`` exits first."""
    async with asyncio.timeout(timeout):
        while True:
            if process.returncode is not None:
                pytest.fail(f"serve exited with {process.returncode}:\n{output()}")
            try:
                async with session.get(f"{url}/readyz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.05)


def ops_graph(**params: Any) -> dict[str, Any]:
    """The model-free template's graph with ``params`` bound, as a POST /v1/jobs graph."""
    return load_templates()["cpu_model_free_ops"].bind(params).to_dict()


@dataclass
class Service:
    url: str
    app: web.Application
    runner: web.AppRunner
    session: aiohttp.ClientSession
    doubles: list[FakeComfyUI]
    stopped: bool = field(default=False)

    async def submit(self, body: Mapping[str, Any], *, tenant: str = "acme", key: str | None = None
                     ) -> aiohttp.ClientResponse:
        headers = auth(tenant) | ({"Idempotency-Key": key} if key else {})
        return await self.session.post(f"{self.url}/v1/jobs", json=body, headers=headers)

    async def job(self, job_id: str, *, tenant: str = "acme") -> dict[str, Any]:
        async with self.session.get(f"{self.url}/v1/jobs/{job_id}", headers=auth(tenant)) as resp:
            assert resp.status == 200, await resp.text()
            body: dict[str, Any] = await resp.json()
            return body

    async def wait_state(self, job_id: str, *states: str, timeout: float = 15.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                job = await self.job(job_id)
                if job["state"] in states:
                    return job
                await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            await self.runner.cleanup()


@asynccontextmanager
async def running_service(
    tmp_path: Path,
    *,
    doubles: int = 1,
    node_delay: float = 0.0,
    limits: Mapping[str, Any] | None = None,
    server: Mapping[str, Any] | None = None,
    models: Mapping[str, list[str]] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> AsyncIterator[Service]:
    """``models``: what every double holds; ``extra``: more settings sections (``{"quality": {...}}``)."""
    async with AsyncExitStack() as stack:
        fakes = [await stack.enter_async_context(FakeComfyUI(name=f"fake-{n}", node_delay=node_delay, models=models))
                 for n in range(doubles)]
        settings = ServiceSettings.from_mapping({
            "server": {"workers": 2, "lease_s": 10.0, "drain_timeout": 5.0, "heartbeat_s": 5.0, **(server or {})},
            "store": {"path": str(tmp_path / "jobs.db"), "outputs_dir": str(tmp_path / "outputs")},
            "backends": [{"name": f"gpu-{n}", "url": fake.url} for n, fake in enumerate(fakes)],
            "tokens": [{"token": token, "tenant": tenant} for tenant, token in TOKENS.items()],
            "limits": dict(limits or {}),
            **(extra or {}),
        })
        app = create_app(settings, pool_settings=QUICK)
        runner = web.AppRunner(app, shutdown_timeout=2.0)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        session = await stack.enter_async_context(aiohttp.ClientSession())
        service = Service(f"http://127.0.0.1:{port}", app, runner, session, fakes)
        try:
            yield service
        finally:
            await service.stop()


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[Service]:
    async with running_service(tmp_path) as svc:
        yield svc


def dumps(body: Any) -> bytes:
    return json.dumps(body).encode()
