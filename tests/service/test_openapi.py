"""``/openapi.json`` is a valid OpenAPI 3.1 document naming every route, and the running service
keeps to it: schemathesis fuzzes each operation (no 5xx; status, content type and body as documented)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from openapi_spec_validator import validate
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from comfy_orchestrator.service.openapi import openapi_document
from tests.service.conftest import Service, auth, running_service

_CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


async def test_document_is_valid_openapi(service: Service) -> None:
    async with service.session.get(f"{service.url}/openapi.json") as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        document = await resp.json()
    assert document == openapi_document()
    validate(document)


async def test_every_route_is_documented(service: Service) -> None:
    served: dict[str, set[str]] = {}
    for resource in service.app.router.resources():
        served.setdefault(resource.canonical, set()).update(r.method.lower() for r in resource if r.method != "HEAD")
    documented = {path: set(operations) for path, operations in openapi_document()["paths"].items()}
    assert served == documented


@pytest.fixture
def live_url(tmp_path: Path) -> Iterator[str]:
    """The service in a thread of its own (schemathesis calls it synchronously, with ``requests``)."""
    started = threading.Event()
    box: dict[str, object] = {}

    async def serve() -> None:
        stop = asyncio.Event()
        async with running_service(tmp_path) as svc:
            box.update(url=svc.url, loop=asyncio.get_running_loop(), stop=stop)
            started.set()
            await stop.wait()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), name="service-under-schemathesis")
    thread.start()
    try:
        assert started.wait(30), "the service did not start"
        yield str(box["url"])
    finally:
        loop, stop = box.get("loop"), box.get("stop")
        if isinstance(loop, asyncio.AbstractEventLoop) and isinstance(stop, asyncio.Event):
            loop.call_soon_threadsafe(stop.set)
        thread.join(30)


def test_service_keeps_to_its_document(live_url: str) -> None:
    schema = schemathesis.openapi.from_url(f"{live_url}/openapi.json").exclude(path="/v1/events")  # a WebSocket
    operations = [result.ok() for result in schema.get_all_operations() if isinstance(result, Ok)]
    skipped = {"/v1/events", "/openapi.json"}  # a WebSocket; the document itself (schemathesis leaves it out)
    assert {op.label for op in operations} == {
        f"{method.upper()} {path}" for path, ops in openapi_document()["paths"].items() if path not in skipped
        for method in ops
    }

    for operation in operations:
        @settings(max_examples=30, deadline=None, phases=[Phase.explicit, Phase.generate], database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def check(case: schemathesis.Case[Any]) -> None:
            case.call_and_validate(base_url=live_url, headers=auth(), checks=_CHECKS, timeout=10)

        check()
