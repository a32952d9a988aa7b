"""Submitting a job: it runs on a backend, its output is fetched back, byte for byte."""

from __future__ import annotations

import asyncio
from typing import Any

from comfy_orchestrator.client import ComfyClient
from comfy_orchestrator.service.keys import STORE
from tests.service.conftest import Service, auth, ops_graph


async def _run_to_done(service: Service, body: dict[str, Any]) -> dict[str, Any]:
    async with await service.submit(body) as resp:
        assert resp.status == 202, await resp.text()
        job_id = (await resp.json())["id"]
    return await service.wait_state(job_id, "succeeded", "failed")


async def test_graph_job_runs_and_its_output_is_the_backends_file(service: Service) -> None:
    job = await _run_to_done(service, {"graph": ops_graph(color=0xFF0000), "labels": {"run": "a"}})
    assert job["state"] == "succeeded", job
    assert job["labels"] == {"run": "a"}
    [name] = job["outputs"]
    async with service.session.get(f"{service.url}/v1/jobs/{job['id']}/outputs/{name}", headers=auth()) as resp:
        assert resp.status == 200
        assert resp.content_type == "image/png"
        served = await resp.read()
        etag = resp.headers["ETag"]
    async with ComfyClient(service.doubles[0].url) as comfy:
        entry = await comfy.history(job["result"]["prompt_id"])
        assert entry is not None
        [ref] = [f for out in entry.outputs.values() for f in out.files if f.type == "output"]
        assert served == await comfy.download(ref)
    async with service.session.get(f"{service.url}/v1/jobs/{job['id']}/outputs/{name}",
                                   headers=auth() | {"If-None-Match": etag}) as resp:
        assert resp.status == 304
        assert await resp.read() == b""


async def test_template_job_runs(service: Service) -> None:
    job = await _run_to_done(service, {"template": "cpu_model_free_ops", "params": {"width": 32, "height": 32}})
    assert job["state"] == "succeeded", job
    assert job["kind"] == "template"


async def test_list_filters_by_state_and_label_and_pages(service: Service) -> None:
    ids = []
    for n in range(3):
        async with await service.submit({"graph": ops_graph(color=n), "labels": {"batch": "x" if n else "y"}}) as r:
            ids.append((await r.json())["id"])
    for job_id in ids:
        await service.wait_state(job_id, "succeeded")
    url = f"{service.url}/v1/jobs"
    async with service.session.get(url, params={"label": "batch:x", "limit": "1"}, headers=auth()) as resp:
        page = await resp.json()
    assert len(page["items"]) == 1
    assert page["next_cursor"]
    async with service.session.get(url, params={"label": "batch:x", "cursor": page["next_cursor"]},
                                   headers=auth()) as resp:
        rest = await resp.json()
    assert {j["id"] for j in page["items"] + rest["items"]} == set(ids[1:])
    async with service.session.get(url, params={"state": "queued,running"}, headers=auth()) as resp:
        assert (await resp.json())["items"] == []
    async with service.session.get(url, params={"cursor": "garbage"}, headers=auth()) as resp:
        assert resp.status == 400
    async with service.session.get(url, headers=auth("other")) as resp:
        assert (await resp.json())["items"] == []


async def test_backends_and_health(service: Service) -> None:
    async with service.session.get(f"{service.url}/v1/backends", headers=auth()) as resp:
        [backend] = (await resp.json())["items"]
    assert backend["name"] == "gpu-0"
    assert backend["healthy"]
    assert backend["node_classes"] > 0
    for path in ("/healthz", "/readyz"):
        async with service.session.get(service.url + path) as resp:
            assert resp.status == 200


async def test_same_idempotency_key_and_body_is_one_job_even_when_racing(service: Service) -> None:
    body = {"graph": ops_graph(color=7)}

    async def post() -> tuple[int, str]:
        async with await service.submit(body, key="k-race") as resp:
            return resp.status, (await resp.json())["id"]

    answers = await asyncio.gather(*(post() for _ in range(20)))
    assert len({job_id for _, job_id in answers}) == 1
    assert sorted(status for status, _ in answers) == [200] * 19 + [202]
    async with await service.submit({"graph": ops_graph(color=8)}, key="k-race") as resp:
        assert resp.status == 422
        assert (await resp.json())["error"]["type"] == "IdempotencyConflict"


async def test_the_attempt_is_stored_with_the_prompt_id_the_backend_ran(service: Service) -> None:
    """Start-up reconciliation finds a job's prompt on its backend by the id stored before submission."""
    job = await _run_to_done(service, {"graph": ops_graph(color=0x00FF00)})
    (attempt,) = await service.app[STORE].list_attempts(job["id"])
    assert attempt.prompt_id == job["result"]["prompt_id"]
    async with ComfyClient(service.doubles[0].url) as comfy:
        assert await comfy.history(attempt.prompt_id) is not None


async def test_a_job_posted_while_a_worker_is_idle_is_created_already_claimed(service: Service) -> None:
    await asyncio.sleep(0.3)  # both workers have found the queue empty and wait
    job = await _run_to_done(service, {"graph": ops_graph(color=0x00FF00)})
    assert job["state"] == "succeeded", job
    events = await service.app[STORE].events_since("acme", 0, job_ids=[job["id"]])
    queued, running = events[0], events[1]
    assert (queued.type, running.type) == ("job.queued", "job.running")
    assert running.seq == queued.seq + 1
    assert running.at == queued.at  # one transaction: no claim came after the create
    # a repeated key finds the job as it is: the worker set aside for it goes back to the queue
    key = "same-body"
    first = await service.submit({"graph": ops_graph(color=0x0000FF)}, key=key)
    again = await service.submit({"graph": ops_graph(color=0x0000FF)}, key=key)
    assert (first.status, again.status) == (202, 200)
    job_id = (await first.json())["id"]
    assert (await again.json())["id"] == job_id
    await service.wait_state(job_id, "succeeded")
    later = await _run_to_done(service, {"graph": ops_graph(color=0x0000FE)})
    assert later["state"] == "succeeded"
