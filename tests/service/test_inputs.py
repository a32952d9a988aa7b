"""``POST /v1/inputs`` (an image as the body) and jobs whose LoadImage reads an uploaded input."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from comfy_orchestrator.service.inputs import INPUTS
from comfy_orchestrator.service.keys import NOTIFIER, STORE
from comfy_orchestrator.store import JobKind
from tests.service.conftest import Service, auth, running_service


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (24, 16), seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buffer.getvalue()


def _solid_png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


async def upload(service: Service, data: bytes, content_type: str = "image/png", *, tenant: str = "acme"
                 ) -> tuple[int, dict[str, Any]]:
    async with service.session.post(f"{service.url}/v1/inputs", data=data,
                                    headers=auth(tenant) | {"Content-Type": content_type}) as resp:
        body: dict[str, Any] = await resp.json()
        return resp.status, body


def invert_graph(image: str) -> dict[str, Any]:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "inverted"}},
    }


async def test_upload_answers_its_content_address_and_header_facts(service: Service) -> None:
    for fmt, content_type in (("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")):
        data = image_bytes(fmt, (24, 16))
        status, body = await upload(service, data, content_type)
        assert status == 201, body
        assert body == {"id": hashlib.sha256(data).hexdigest(), "size": len(data), "content_type": content_type,
                        "width": 24, "height": 16}
        again_status, again = await upload(service, data, content_type)
        assert (again_status, again) == (201, body)  # the same bytes, the same id
        stored = service.app[INPUTS].path("acme", body["id"])
        assert stored.read_bytes() == data
        assert stored.is_relative_to(service.app[INPUTS].root)
    assert not list(service.app[INPUTS].root.rglob("input-*"))  # no temporary file left behind


async def test_bad_uploads_are_refused_with_4xx(tmp_path: Path) -> None:
    async with running_service(tmp_path, extra={"inputs": {"max_bytes": 4096, "max_pixels": 64 * 64}}) as service:
        png = image_bytes("PNG", (8, 8))
        cases: list[tuple[bytes, str, int, str]] = [
            (b"GIF89a" + b"\0" * 64, "image/png", 400, "InvalidImage"),
            (b"not an image at all", "image/jpeg", 400, "InvalidImage"),
            (png, "image/jpeg", 400, "InvalidImage"),  # the header says PNG
            (png[:40], "image/png", 400, "InvalidImage"),  # truncated
            (png, "text/plain", 415, "UnsupportedMediaType"),
            (png, "application/octet-stream", 415, "UnsupportedMediaType"),
            (_solid_png(65, 64), "image/png", 413, "TooManyPixels"),
            (b"\x89PNG" + b"\0" * 5000, "image/png", 413, "InputTooLarge"),
        ]
        for data, content_type, status, kind in cases:
            got_status, body = await upload(service, data, content_type)
            assert (got_status, body["error"]["type"]) == (status, kind), (content_type, body)
        async with service.session.post(f"{service.url}/v1/inputs", data=png,
                                        headers={"Content-Type": "image/png"}) as resp:
            assert resp.status == 401

        async def chunked() -> Any:  # no Content-Length: the cap applies while it streams
            for _ in range(10):
                yield b"\x89PNG" + b"\0" * 996

        async with service.session.post(f"{service.url}/v1/inputs", data=chunked(),
                                        headers=auth() | {"Content-Type": "image/png"}) as resp:
            assert resp.status == 413, await resp.text()
        root = service.app[INPUTS].root
        assert not [p for p in root.rglob("*") if p.is_file()]  # nothing refused was kept


async def test_job_reads_an_uploaded_input_through_load_image(service: Service) -> None:
    data = image_bytes("PNG", (20, 12), seed=7)
    status, info = await upload(service, data)
    assert status == 201, info
    async with await service.submit({"graph": invert_graph("photo.png"), "inputs": {"photo.png": info["id"]}}) as r:
        assert r.status == 202, await r.text()
        job_id = (await r.json())["id"]
    job = await service.wait_state(job_id, "succeeded", "failed")
    assert job["state"] == "succeeded", job
    [name] = job["outputs"]
    async with service.session.get(f"{service.url}/v1/jobs/{job_id}/outputs/{name}", headers=auth()) as resp:
        assert resp.status == 200
        produced = np.asarray(Image.open(io.BytesIO(await resp.read())).convert("RGB"))
    original = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert produced.shape == original.shape
    # 1 - x in float, back to 8 bits by truncation (as ComfyUI saves): within one step of 255 - x
    assert np.abs(produced.astype(int) - (255 - original.astype(int))).max() <= 1
    # the double got the bytes under a content-addressed name and the graph was pointed at it
    uploaded = [p for p in service.doubles[0].input_dir.iterdir() if p.name.startswith("photo-")]
    assert [p.read_bytes() for p in uploaded] == [data]


async def test_template_job_reads_an_input_through_its_image_slot(tmp_path: Path) -> None:
    async with running_service(tmp_path, models={"upscale_models": ["tiny_compact_x2.safetensors"]}) as service:
        status, info = await upload(service, image_bytes("PNG", (10, 6), seed=3))
        assert status == 201
        body = {"template": "cpu_tiny_upscale", "params": {"input_image": "mine.png"},
                "inputs": {"mine.png": info["id"]}}
        async with await service.submit(body) as r:
            assert r.status == 202, await r.text()
            job_id = (await r.json())["id"]
        job = await service.wait_state(job_id, "succeeded", "failed")
        assert job["state"] == "succeeded", job
        [name] = job["outputs"]
        async with service.session.get(f"{service.url}/v1/jobs/{job_id}/outputs/{name}", headers=auth()) as resp:
            assert Image.open(io.BytesIO(await resp.read())).size == (20, 12)  # the upload, upscaled x2


async def test_inputs_are_checked_at_submit(service: Service) -> None:
    status, info = await upload(service, image_bytes("PNG"))
    assert status == 201
    cases: list[tuple[dict[str, Any], str]] = [
        ({"graph": invert_graph("photo.png"), "inputs": {"photo.png": "0" * 64}}, "UnknownInput"),
        ({"graph": invert_graph("photo.png")}, "GraphValidationError"),  # not on the backend, not provided
        ({"graph": invert_graph("photo.png"), "inputs": {"other.png": info["id"]}}, "GraphValidationError"),
        ({"graph": invert_graph("photo.png"), "inputs": {"photo.png": info["id"][:-1]}}, "InvalidRequest"),
        ({"graph": invert_graph("photo.png"), "inputs": {"photo.png": 5}}, "InvalidRequest"),
        ({"pipeline": {"name": "p", "steps": []}, "inputs": {"photo.png": info["id"]}}, "InvalidRequest"),
    ]
    for body, kind in cases:
        async with await service.submit(body) as resp:
            answer = await resp.json()
            assert (resp.status, answer["error"]["type"]) == (400, kind), (body.get("inputs"), answer)
    # another tenant cannot use acme's input, even knowing its id
    async with await service.submit({"graph": invert_graph("photo.png"), "inputs": {"photo.png": info["id"]}},
                                    tenant="other") as resp:
        answer = await resp.json()
        assert (resp.status, answer["error"]["type"]) == (400, "UnknownInput"), answer
    acme_dir, other_dir = service.app[INPUTS].tenant_dir("acme"), service.app[INPUTS].tenant_dir("other")
    assert acme_dir != other_dir
    assert acme_dir.parent == other_dir.parent


async def test_an_input_gone_when_the_job_runs_fails_the_job(service: Service) -> None:
    status, info = await upload(service, image_bytes("PNG", seed=11))
    assert status == 201
    service.app[INPUTS].path("acme", info["id"]).unlink()  # e.g. an operator cleaned the folder after submit
    job, created = await service.app[STORE].create_job(
        "acme", JobKind.GRAPH, {"prompt": invert_graph("photo.png"), "inputs": {"photo.png": info["id"]}})
    assert created
    service.app[NOTIFIER].notify()
    ended = await service.wait_state(job.id, "succeeded", "failed")
    assert ended["state"] == "failed", ended
    assert ended["error"]["type"] == "InputNotFound", ended
