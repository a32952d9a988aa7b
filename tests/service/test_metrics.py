"""``/metrics``: Prometheus text on a registry per app, changing as jobs run, with no tenant data."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from comfy_orchestrator.service.metrics import Metrics
from tests.service.conftest import TOKENS, Service, auth, ops_graph, running_service


async def _scrape(service: Service) -> tuple[str, dict[tuple[str, frozenset[tuple[str, str]]], float]]:
    async with service.session.get(f"{service.url}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=")
        text = await resp.text()
    samples = {(s.name, frozenset(s.labels.items())): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    return text, samples


def _value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((f"comfy_orchestrator_{name}", frozenset(labels.items())), 0.0)


async def test_metrics_change_after_a_job_runs(service: Service) -> None:
    _, before = await _scrape(service)
    assert _value(before, "attempts_total", backend="gpu-0", outcome="succeeded") == 0
    assert _value(before, "image_score_count") == 0  # present, empty until scored jobs exist

    async with await service.submit({"graph": ops_graph(), "labels": {"team": "acme-secret"}}) as resp:
        assert resp.status == 202
        job_id = (await resp.json())["id"]
    await service.wait_state(job_id, "succeeded")
    async with service.session.get(f"{service.url}/v1/jobs/{job_id}", headers=auth()) as resp:
        assert resp.status == 200

    text, after = await _scrape(service)
    assert _value(after, "attempts_total", backend="gpu-0", outcome="succeeded") == 1
    assert _value(after, "attempt_seconds_count", backend="gpu-0", outcome="succeeded") == 1
    assert _value(after, "jobs", state="queued") == 0
    assert _value(after, "jobs", state="running") == 0
    assert _value(after, "queue_depth") == 0
    assert _value(after, "backend_healthy", backend="gpu-0") == 1
    assert _value(after, "http_requests_total", route="/v1/jobs", method="POST", status="202") == 1
    assert _value(after, "http_requests_total", route="/v1/jobs/{job_id}", method="GET", status="200") >= 2
    assert _value(after, "http_requests_total", route="/metrics", method="GET", status="200") == 1
    for secret in ("acme", job_id, *TOKENS.values()):
        assert secret not in text


async def test_queue_depth_and_running_jobs(tmp_path: Path) -> None:
    async with running_service(tmp_path, node_delay=1.0, server={"workers": 1}) as svc:
        ids = []
        for n in range(3):
            async with await svc.submit({"graph": ops_graph(), "labels": {"n": str(n)}}) as resp:
                assert resp.status == 202
                ids.append((await resp.json())["id"])
        await svc.wait_state(ids[0], "running")
        _, samples = await _scrape(svc)
        assert _value(samples, "jobs", state="running") == 1
        assert _value(samples, "jobs", state="queued") == 2
        assert _value(samples, "queue_depth") == 2
        for job_id in ids:
            async with svc.session.post(f"{svc.url}/v1/jobs/{job_id}/cancel", headers=auth()) as resp:
                assert resp.status == 200


async def test_unknown_paths_share_one_series(service: Service) -> None:
    for n in range(3):
        async with service.session.get(f"{service.url}/nope/{n}") as resp:
            assert resp.status == 404
    text, samples = await _scrape(service)
    assert _value(samples, "http_requests_total", route="unmatched", method="GET", status="404") == 3
    assert "/nope/" not in text


def test_each_app_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()  # a global registry would refuse the second's names
    first.observe_score(0.75)
    assert first.registry.get_sample_value("comfy_orchestrator_image_score_count") == 1
    assert second.registry.get_sample_value("comfy_orchestrator_image_score_count") == 0
