"""Path tricks in every field that could name a file — input names and ids, output names, job ids,
template names, label keys, image-loader file names, an upload's own file name — are answered with
a 4xx, and no file outside the store is ever read or written."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
from yarl import URL

from comfy_orchestrator.service.inputs import INPUTS
from tests.service.conftest import Service, auth, ops_graph
from tests.service.test_inputs import image_bytes, invert_graph, upload

SECRET = "top-secret-outside-the-store"

# each trick in plain and URL-encoded forms; {secret} is an absolute path to a file outside the store
TRICKS = [
    "../secret.txt", "../../secret.txt", "../../../../../../etc/passwd", "..", ".", "a/../../b", "..\\..\\b",
    "{secret}", "/etc/passwd", "//etc/passwd", "C:\\Windows\\win.ini", "C:/x.png", "x.png\0.txt", "\0",
    "%2e%2e%2fsecret.txt", "%2e%2e/%2e%2e/etc/passwd", "..%2f..%2fetc%2fpasswd", "%252e%252e%252f",
    "..%5c..%5csecret.txt", "%00", "x.png%00.txt", "....//....//etc/passwd", "..;/secret.txt", "~/.ssh/id_rsa",
]


# names a ComfyUI LoadImage resolves inside its input folder (odd, but no way out): not refused there
CONFINED = {"~/.ssh/id_rsa", "....//....//etc/passwd", "..;/secret.txt"}


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    path = tmp_path / "secret.txt"
    path.write_text(SECRET)
    return path


def tricks(secret: Path) -> list[str]:
    return [t.replace("{secret}", str(secret)) for t in TRICKS]


async def _submit_status(service: Service, body: dict[str, Any]) -> tuple[int, str]:
    async with await service.submit(body) as resp:
        text = await resp.text()
        assert SECRET not in text
        return resp.status, text


async def _get_raw(service: Service, path: str) -> tuple[int, bytes]:
    """GET with the path sent exactly as written (no client-side normalising of ``..`` or ``%2e``)."""
    url = URL(f"{service.url}{path}", encoded=True)
    async with service.session.get(url, headers=auth()) as resp:
        return resp.status, await resp.read()


def _encoded(trick: str) -> str:
    """The trick as it would sit in a URL path: NUL and backslash percent-encoded, the rest as is."""
    return trick.replace("\0", "%00").replace("\\", "%5C").replace(" ", "%20")


async def test_job_fields_refuse_path_tricks(service: Service, secret: Path) -> None:
    status, info = await upload(service, image_bytes("PNG"))
    assert status == 201
    for trick in tricks(secret):
        cases = {
            "input name": {"graph": invert_graph("photo.png"), "inputs": {trick: info["id"]}},
            "input id": {"graph": invert_graph("photo.png"), "inputs": {"photo.png": trick}},
            "input id suffix": {"graph": invert_graph("photo.png"), "inputs": {"photo.png": info["id"] + "/" + trick}},
            "template name": {"template": trick},
            "label key": {"graph": ops_graph(), "labels": {trick: "v"}},
        }
        if trick not in CONFINED:
            cases["LoadImage file"] = {"graph": invert_graph(trick)}
            cases["LoadImage file named as input"] = {"graph": invert_graph(trick), "inputs": {"x.png": info["id"]}}
        for field, body in cases.items():
            code, text = await _submit_status(service, body)
            assert 400 <= code < 500, (field, trick, code, text)
    for annotated in ("x.png [output]", "ComfyUI_00001_.png [temp]", "../x.png [input]"):
        code, text = await _submit_status(service, {"graph": invert_graph(annotated)})
        assert (code, '"InvalidFileName"' in text) == (400, True), (annotated, text)
    async with service.session.get(f"{service.url}/v1/jobs", headers=auth()) as resp:
        assert (await resp.json())["items"] == []  # none of them was queued


async def test_url_fields_refuse_path_tricks(service: Service, secret: Path) -> None:
    async with await service.submit({"graph": ops_graph(width=8, height=8)}) as resp:
        job_id = (await resp.json())["id"]
    job = await service.wait_state(job_id, "succeeded")
    [real] = job["outputs"]
    node = real.split("/")[0]
    status, _ = await _get_raw(service, f"/v1/jobs/{job_id}/outputs/{real}")
    assert status == 200  # the route works: the refusals below are about the names
    for trick in tricks(secret):
        enc = _encoded(trick)
        paths = [
            f"/v1/jobs/{job_id}/outputs/{enc}",
            f"/v1/jobs/{job_id}/outputs/{node}/{enc}",
            f"/v1/jobs/{job_id}/outputs/{real}/{enc}",
            f"/v1/jobs/{enc}",
            f"/v1/jobs/{enc}/outputs/{real}",
        ]
        for path in paths:
            code, body = await _get_raw(service, path)
            assert 400 <= code < 500, (path, code, body[:200])
            assert SECRET.encode() not in body
            assert b"root:" not in body


async def test_an_uploads_own_file_name_is_never_used(service: Service, tmp_path: Path) -> None:
    data = image_bytes("PNG", seed=9)
    escape = tmp_path / "escaped.png"
    headers = auth() | {"Content-Type": "image/png",
                        "Content-Disposition": f'attachment; filename="../../../{escape.name}"',
                        "X-File-Name": str(escape)}
    async with service.session.post(f"{service.url}/v1/inputs", data=data, headers=headers) as resp:
        assert resp.status == 201
        info = await resp.json()
    assert info["id"] == hashlib.sha256(data).hexdigest()
    root = service.app[INPUTS].root
    files = [p for p in root.rglob("*") if p.is_file() and ".tmp" not in p.relative_to(root).parts[1:2]]
    assert files == [service.app[INPUTS].path("acme", info["id"])]  # .tmp: the store's own temporary files
    assert not escape.exists()
    assert not [p for p in root.parent.parent.rglob("escaped*")]
