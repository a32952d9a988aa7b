"""``ServiceClient`` against the real service on a real socket (FakeComfyUI backends)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from pathlib import Path

import pytest

from comfy_orchestrator.errors import ClientClosed, ComfyOrchestratorError
from comfy_orchestrator.remote import (
    Conflict,
    JobInfo,
    NotFound,
    Rejected,
    RetryLater,
    ServiceClient,
    ServiceError,
    ServiceEvent,
    ServiceUnreachable,
    Unauthorized,
)
from comfy_orchestrator.remote.errors import error_from_response
from comfy_orchestrator.service.keys import SOCKETS
from comfy_orchestrator.store import JobState
from tests.service.conftest import TOKENS, Service, ops_graph, running_service


def client(service: Service, tenant: str = "acme") -> ServiceClient:
    return ServiceClient(service.url, TOKENS[tenant], timeout=5.0)


async def test_submit_wait_download_gives_the_stored_output(tmp_path: Path) -> None:
    seen: list[ServiceEvent] = []

    async def record(event: ServiceEvent) -> None:  # an async on_event is awaited
        seen.append(event)

    async with running_service(tmp_path, node_delay=0.2) as service, client(service) as remote:
        job = await remote.submit(ops_graph(color=7), labels={"run": "r1"})
        assert isinstance(job, JobInfo)
        assert job.labels == {"run": "r1"}
        done = await remote.wait(job.id, on_event=record)
        assert done.state is JobState.SUCCEEDED
        assert done.final
        assert done.outputs
        assert seen[-1].type == "job.succeeded"
        assert [e.seq for e in seen] == sorted({e.seq for e in seen})
        name = done.outputs[0]
        data = await remote.download(done.id, name)
        path = await remote.save(done.id, name, tmp_path / "out.png")
        async with service.session.get(f"{service.url}/v1/jobs/{job.id}/outputs/{name}",
                                       headers={"Authorization": f"Bearer {TOKENS['acme']}"}) as resp:
            assert resp.headers["ETag"].strip('"') == hashlib.sha256(data).hexdigest()
    assert path.read_bytes() == data
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".part")]


async def test_template_submit_listing_and_backends(service: Service) -> None:
    async with client(service) as remote:
        first = await remote.submit(template="cpu_model_free_ops", params={"color": 3}, labels={"batch": "b"})
        second = await remote.submit(ops_graph(color=4))
        for job in (first, second):
            assert (await remote.wait(job.id)).state is JobState.SUCCEEDED
        listed = [job.id async for job in remote.jobs(limit=1)]  # one per page: the cursor is followed
        assert sorted(listed) == sorted([first.id, second.id])
        assert [job.id async for job in remote.jobs(labels={"batch": "b"})] == [first.id]
        assert [job.id async for job in remote.jobs(state="queued")] == []
        assert len([job async for job in remote.jobs(state=[JobState.SUCCEEDED, "failed"])]) == 2
        backends = await remote.backends()
        assert [b.name for b in backends] == ["gpu-0"]
        assert backends[0].healthy
        assert backends[0].node_classes > 0


async def test_events_are_replayed_across_a_dropped_socket_without_gap_or_repeat(
    service: Service, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="comfy_orchestrator.remote.client")
    async with client(service) as remote:
        stream = remote.events(after=0)
        first = await remote.submit(ops_graph(color=1))
        seen: list[ServiceEvent] = []
        async for event in stream:
            seen.append(event)
            if event.job_id == first.id and event.final:
                break
        # the service closes every event socket; a job runs to the end while nobody reads
        closing = [asyncio.create_task(ws.close()) for ws in list(service.app[SOCKETS])]
        second = await remote.submit(ops_graph(color=2))
        await service.wait_state(second.id, "succeeded")
        async with asyncio.timeout(15):
            async for event in stream:
                seen.append(event)
                if event.job_id == second.id and event.final:
                    break
        await stream.aclose()
        assert "closed after seq" in caplog.text  # it did reconnect
        await asyncio.gather(*closing)
        everything: list[ServiceEvent] = []
        async with asyncio.timeout(15):
            async for event in remote.events(after=0):
                everything.append(event)
                if event.job_id == second.id and event.final:
                    break
    assert [e.seq for e in seen] == [e.seq for e in everything]
    assert seen == everything
    assert {e.job_id for e in seen} == {first.id, second.id}


async def test_cancel_a_running_job(tmp_path: Path) -> None:
    async with running_service(tmp_path, node_delay=1.0) as svc, client(svc) as remote:
        job = await remote.submit(ops_graph())
        await svc.wait_state(job.id, "running")
        cancelled = await remote.cancel(job.id)
        assert cancelled.state is JobState.CANCELLED
        assert (await remote.wait(job.id)).state is JobState.CANCELLED
        with pytest.raises(Conflict) as info:
            await remote.cancel(job.id)
        assert info.value.status == 409


async def test_delete_an_ended_job(tmp_path: Path) -> None:
    async with running_service(tmp_path, node_delay=1.0) as svc, client(svc) as remote:
        job = await remote.submit(ops_graph())
        await svc.wait_state(job.id, "running")
        with pytest.raises(Conflict):
            await remote.delete(job.id)  # running: cancel it first
        await remote.cancel(job.id)
        await remote.delete(job.id)
        with pytest.raises(NotFound):
            await remote.job(job.id)
        with pytest.raises(NotFound):
            await remote.delete(job.id)


async def test_errors_are_typed(service: Service) -> None:
    async with ServiceClient(service.url, "not-a-token") as intruder:
        with pytest.raises(Unauthorized) as unauthorized:
            await intruder.job("x")
        assert unauthorized.value.status == 401
        with pytest.raises(Unauthorized):
            await anext(intruder.events())
    async with client(service) as remote:
        with pytest.raises(NotFound) as missing:
            await remote.job("nope")
        assert (missing.value.status, missing.value.type) == (404, "JobNotFound")
        assert isinstance(missing.value, LookupError | ComfyOrchestratorError)
        job = await remote.submit(ops_graph(color=1), idempotency_key="k-1")
        assert (await remote.submit(ops_graph(color=1), idempotency_key="k-1")).id == job.id
        with pytest.raises(Conflict) as conflict:
            await remote.submit(ops_graph(color=2), idempotency_key="k-1")
        assert (conflict.value.status, conflict.value.type, conflict.value.job_id) == (
            422, "IdempotencyConflict", job.id)
        with pytest.raises(Rejected) as rejected:
            await remote.submit(ops_graph(upscale_method="no-such-method"))
        assert rejected.value.type == "GraphValidationError"
        assert "upscale_method" in str(rejected.value.details["node_errors"])
        with pytest.raises(NotFound):
            await remote.download(job.id, "1/none.png")
        with pytest.raises(ValueError, match="exactly one"):
            await remote.submit()
    with pytest.raises(ClientClosed):
        await remote.job(job.id)


async def test_a_full_queue_is_429_with_retry_after(tmp_path: Path) -> None:
    async with running_service(tmp_path, node_delay=0.5, limits={"max_queued_per_tenant": 1},
                               server={"drain_timeout": 0.1}) as svc, client(svc) as remote:
        await remote.submit(ops_graph(color=1))
        with pytest.raises(RetryLater) as busy:
            await remote.submit(ops_graph(color=2))
    assert (busy.value.status, busy.value.type) == (429, "QueueFull")
    assert busy.value.retry_after is not None
    assert busy.value.retry_after > 0


async def test_an_unreachable_service(service: Service) -> None:
    url = service.url
    await service.stop()
    async with ServiceClient(url, TOKENS["acme"], timeout=1.0, reconnects=1) as remote:
        with pytest.raises(ServiceUnreachable):
            await remote.job("x")
        with pytest.raises(ServiceUnreachable):
            await anext(remote.events())


def test_error_bodies_that_are_not_the_services_own() -> None:
    busy = error_from_response(503, {"error": {"type": "NoBackendReachable", "message": "all down"}}, "5")
    assert isinstance(busy, RetryLater)
    assert busy.retry_after == 5.0
    proxy = error_from_response(502, None)
    assert type(proxy) is ServiceError
    assert (proxy.status, proxy.type) == (502, "HTTPError")
    assert isinstance(error_from_response(413, {"error": {"type": "TooManyNodes", "message": "m"}}), ValueError)


async def test_an_uploaded_input_feeds_a_graph_job(tmp_path: Path) -> None:
    import io

    from PIL import Image

    image = Image.new("RGB", (16, 8), (10, 200, 30))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "inv"}},
    }
    async with running_service(tmp_path) as service, client(service) as remote:
        input_id = await remote.upload_input(buffer.getvalue())
        assert input_id == await remote.upload_input(buffer.getvalue())  # content-addressed
        job = await remote.submit(graph, inputs={"photo.png": input_id})
        done = await remote.wait(job.id)
        assert done.state is JobState.SUCCEEDED, done.error
        out = Image.open(io.BytesIO(await remote.download(done.id, done.outputs[0]))).convert("RGB")
    assert out.size == (16, 8)
    pixel = out.getpixel((3, 3))
    assert isinstance(pixel, tuple)
    assert all(abs(a - b) <= 1 for a, b in zip(pixel, (245, 55, 225), strict=True))  # 255 - input, ±1 rounding


async def test_a_pipeline_job_and_its_run(tmp_path: Path) -> None:
    spec = {"name": "two-seeds", "steps": [
        {"name": "draw", "kind": "generate", "template": "sd15_txt2img", "models": ["sd15.safetensors"],
         "seeds": [3, 4], "params": {"prompt": "a green star", "width": 64, "height": 64, "steps": 3}}]}
    async with running_service(tmp_path, models={"checkpoints": ["sd15.safetensors"]}) as service, \
            client(service) as remote:
        job = await remote.submit(pipeline=spec, labels={"run": "p1"})
        done = await remote.wait(job.id)
        assert done.state is JobState.SUCCEEDED, done.error
        run = await remote.run(job.id)
        assert [(c["step"], c["seed"]) for c in run["cells"]] == [("draw", 3), ("draw", 4)]
        assert run["grid"] == f"/v1/runs/{job.id}/grid.png"
        assert (await remote.download(job.id, "grid.png"))[:4] == b"\x89PNG"
        with pytest.raises(NotFound):
            await remote.run("no-such-run")
