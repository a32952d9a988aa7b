"""Bad input and other tenants' jobs are answered with a JSON 4xx, before anything is queued."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from comfy_orchestrator.client import ComfyClient
from tests.service.conftest import TOKENS, Service, auth, dumps, ops_graph, running_service


async def _error(resp: object) -> dict[str, str]:
    body = await resp.json()  # type: ignore[attr-defined]
    return body["error"]  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {TOKENS['acme']}"}]
)
async def test_every_v1_route_needs_a_valid_token(service: Service, headers: dict[str, str]) -> None:
    for method, path in [("GET", "/v1/jobs"), ("POST", "/v1/jobs"), ("GET", "/v1/jobs/x"), ("GET", "/v1/backends"),
                         ("POST", "/v1/jobs/x/cancel"), ("GET", "/v1/jobs/x/outputs/1/a.png"), ("GET", "/v1/events")]:
        async with service.session.request(method, service.url + path, headers=headers) as resp:
            assert resp.status == 401, path
            error = await _error(resp)
            assert error["type"] == "Unauthorized"
            assert TOKENS["acme"] not in error["message"]


async def test_a_query_token_is_only_taken_by_the_event_socket(service: Service) -> None:
    async with service.session.get(f"{service.url}/v1/jobs", params={"token": TOKENS["acme"]}) as resp:
        assert resp.status == 401


async def test_another_tenants_job_is_not_found(service: Service) -> None:
    async with await service.submit({"graph": ops_graph()}) as resp:
        job_id = (await resp.json())["id"]
    await service.wait_state(job_id, "succeeded")
    name = (await service.job(job_id))["outputs"][0]
    for method, path in [("GET", f"/v1/jobs/{job_id}"), ("POST", f"/v1/jobs/{job_id}/cancel"),
                         ("GET", f"/v1/jobs/{job_id}/outputs/{name}")]:
        async with service.session.request(method, service.url + path, headers=auth("other")) as resp:
            assert resp.status == 404, path
    async with service.session.get(f"{service.url}/v1/jobs/nope", headers=auth()) as resp:
        assert resp.status == 404
        assert (await _error(resp))["type"] == "JobNotFound"


@pytest.mark.parametrize("name", ["../../jobs.db", "..%2F..%2Fjobs.db", "1/..", "%2e%2e/x", "/etc/passwd",
                                  "1\\..\\x", "1/a.png%00", "1//a.png", ".hidden"])
async def test_output_name_tricks_are_refused(service: Service, name: str) -> None:
    async with await service.submit({"graph": ops_graph()}) as resp:
        job_id = (await resp.json())["id"]
    await service.wait_state(job_id, "succeeded")
    async with service.session.get(f"{service.url}/v1/jobs/{job_id}/outputs/{name}", headers=auth()) as resp:
        assert 400 <= resp.status < 500
        assert "error" in await resp.json()


async def test_body_over_the_limit_is_413_by_header_and_by_stream(tmp_path: Path) -> None:
    async with running_service(tmp_path, limits={"max_body_bytes": 4096}) as svc:
        big = dumps({"graph": ops_graph(), "labels": {"pad": "x" * 250}}) + b" " * 8000
        async with svc.session.post(f"{svc.url}/v1/jobs", data=big, headers=auth()) as resp:
            assert resp.status == 413
            assert (await _error(resp))["type"] == "BodyTooLarge"

        async def chunks():  # type: ignore[no-untyped-def]  # no Content-Length: chunked
            for _ in range(10):
                yield b" " * 1000

        async with svc.session.post(f"{svc.url}/v1/jobs", data=chunks(), headers=auth()) as resp:
            assert resp.status == 413
            assert "error" in await resp.json()


async def test_caps_on_nodes_and_pixels(tmp_path: Path) -> None:
    async with running_service(tmp_path, limits={"max_nodes": 4, "max_pixels": 64 * 64}) as svc:
        async with await svc.submit({"graph": ops_graph()}) as resp:
            assert resp.status == 413
            assert (await _error(resp))["type"] == "TooManyNodes"
        graph = {"1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 2,
                                                                "color": 0}},
                 "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}}
        async with await svc.submit({"graph": graph}) as resp:
            assert resp.status == 413
            error = await _error(resp)
            assert error["type"] == "TooManyPixels"
            assert "8192" in error["message"]


async def test_queue_bound_per_tenant_is_429_with_retry_after(tmp_path: Path) -> None:
    async with running_service(tmp_path, node_delay=0.5, limits={"max_queued_per_tenant": 2},
                               server={"drain_timeout": 0.1}) as svc:
        for n in range(2):
            async with await svc.submit({"graph": ops_graph(color=n)}) as resp:
                assert resp.status == 202
        async with await svc.submit({"graph": ops_graph(color=9)}) as resp:
            assert resp.status == 429
            assert int(resp.headers["Retry-After"]) > 0
        async with await svc.submit({"graph": ops_graph(color=9)}, tenant="other") as resp:
            assert resp.status == 202  # the bound is per tenant


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        ({"template": "no_such_template"}, "UnknownTemplate"),
        ({"template": "cpu_model_free_ops", "params": {"no_such_slot": 1}}, "TemplateError"),
        ({"template": "cpu_model_free_ops", "params": {"width": "wide"}}, "TemplateError"),
        ({"graph": ops_graph(upscale_method="no-such-method")}, "GraphValidationError"),
        ({"graph": {"1": {"class_type": "NoSuchNode", "inputs": {}}}}, "NoCapableBackend"),
        ({"graph": {}, "template": "cpu_model_free_ops"}, "InvalidRequest"),
        ({"labels": {"a": "b"}}, "InvalidRequest"),
        ([1, 2], "InvalidRequest"),
    ],
)
async def test_bad_jobs_are_400_before_queueing(service: Service, body: object, kind: str) -> None:
    async with service.session.post(f"{service.url}/v1/jobs", data=dumps(body), headers=auth()) as resp:
        assert resp.status == 400, await resp.text()
        error = await _error(resp)
    assert error["type"] == kind
    if kind == "GraphValidationError":
        assert error["node_errors"]  # type: ignore[index]
        assert "upscale_method" in str(error["node_errors"])
    async with service.session.get(f"{service.url}/v1/jobs", headers=auth()) as resp:
        assert (await resp.json())["items"] == []


async def test_invalid_json_is_400(service: Service) -> None:
    async with service.session.post(f"{service.url}/v1/jobs", data=b"{nope", headers=auth()) as resp:
        assert resp.status == 400
        assert (await _error(resp))["type"] == "InvalidJSON"


async def test_cancel_interrupts_a_running_job(tmp_path: Path) -> None:
    async with running_service(tmp_path, node_delay=1.0) as svc:
        async with await svc.submit({"graph": ops_graph()}) as resp:
            job_id = (await resp.json())["id"]
        await svc.wait_state(job_id, "running")
        async with svc.session.post(f"{svc.url}/v1/jobs/{job_id}/cancel", headers=auth()) as resp:
            assert resp.status == 200
            assert (await resp.json())["state"] == "cancelled"
        async with svc.session.post(f"{svc.url}/v1/jobs/{job_id}/cancel", headers=auth()) as resp:
            assert resp.status == 409
        assert (await svc.job(job_id))["state"] == "cancelled"
        async with ComfyClient(svc.doubles[0].url) as comfy:  # the prompt was taken off its backend
            async with asyncio.timeout(5):
                while True:
                    queue = await comfy.queue()
                    if not queue.running and not queue.pending:
                        break
                    await asyncio.sleep(0.05)


@pytest.mark.parametrize("depth", [900, 5000])
async def test_deeply_nested_bodies_are_4xx(service: Service, depth: int) -> None:
    graph = "[" * depth + "]" * depth
    for body in (graph.encode(), b'{"graph": {"1": {"class_type": "EmptyImage", "inputs": {"width": ' + graph.encode()
                 + b"}}}}"):
        async with service.session.post(f"{service.url}/v1/jobs", data=body, headers=auth()) as resp:
            assert resp.status == 400, await resp.text()
