"""Uploads, LoadImage, /view, upscalers and the informational routes."""

from __future__ import annotations

import io
from typing import Any

import aiohttp
import pytest
from PIL import Image

from comfy_orchestrator.testing import FakeComfyUI, upscale_factor
from tests.double.conftest import MODELS, WsClient, colour, recorded, submit


def _png(rgb: tuple[int, int, int], size: int = 8, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (size, size), (*rgb, 128)[: len(mode)]).save(buffer, format="PNG")
    return buffer.getvalue()


async def _upload(session: aiohttp.ClientSession, server: FakeComfyUI, data: bytes, name: str = "up.png",
                  **fields: str) -> tuple[int, Any]:
    form = aiohttp.FormData()
    form.add_field("image", data, filename=name, content_type="image/png")
    for key, value in fields.items():
        form.add_field(key, value)
    async with session.post(f"{server.url}/upload/image", data=form) as response:
        body = await response.json() if response.content_type == "application/json" else await response.text()
        return response.status, body


async def test_upload_answers_like_comfyui(session: aiohttp.ClientSession, server: FakeComfyUI) -> None:
    want = recorded("upload.json")
    assert await _upload(session, server, _png((1, 2, 3)), "orch_up.png", overwrite="true") == (
        200, want["upload0_sub=''_overwrite=true"]["body"])
    assert await _upload(session, server, _png((1, 2, 3)), "orch_up.png", overwrite="true", subfolder="orch") == (
        200, want["upload1_sub='orch'_overwrite=true"]["body"])
    assert await _upload(session, server, _png((1, 2, 3)), "orch_up.png") == (
        200, want["upload2_sub=''_overwrite=false"]["body"])
    status, body = await _upload(session, server, _png((9, 9, 9)), "orch_up.png")
    assert (status, body["name"]) == (200, "orch_up (1).png")
    assert (await _upload(session, server, _png((1, 2, 3)), "x.png", subfolder="../../etc"))[0] == 400
    async with session.post(f"{server.url}/api/upload/image", data={"subfolder": ""}) as response:
        assert response.status == 400
    assert (await _upload(session, server, _png((1, 2, 3)), "t.png", type="temp"))[1]["type"] == "temp"


async def test_uploaded_image_runs_through_load_image(session: aiohttp.ClientSession, server: FakeComfyUI,
                                                      client: WsClient) -> None:
    await _upload(session, server, _png((10, 200, 30), 16, "RGBA"), "orch_up.png", subfolder="orch_up",
                  overwrite="1")
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "orch_up/orch_up.png"}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "MaskToImage", "inputs": {"mask": ["1", 1]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "orch_up/inv"}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "orch_up/mask"}},
    }
    messages = await client.until_done(await submit(session, server, prompt, "client-a"))
    outputs = {m.data["node"]: m.data["output"] for m in messages if m.type == "executed"}
    assert outputs == recorded("upload.json")["loadimage_history_outputs"]
    async with session.get(f"{server.url}/view", params={"filename": "inv_00001_.png", "subfolder": "orch_up",
                                                         "type": "output"}) as response:
        image = Image.open(io.BytesIO(await response.read()))
    assert image.size == (16, 16)
    assert image.getpixel((3, 3)) == (245, 54, 225)  # 1 - 200/255 in float32, truncated as ComfyUI does
    async with session.get(f"{server.url}/view", params={"filename": "orch_up.png", "subfolder": "orch_up",
                                                         "type": "input"}) as response:
        assert response.status == 200


async def test_load_image_of_a_missing_file_is_rejected(session: aiohttp.ClientSession,
                                                        server: FakeComfyUI) -> None:
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": "does_not_exist.png"}},
              "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
              "4": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}}}
    async with session.post(f"{server.url}/prompt", json={"prompt": prompt}) as response:
        assert response.status == 400
        body = await response.json()
    want = recorded("upload.json")["loadimage_missing"]["body"]
    assert body["node_errors"]["1"]["errors"][0]["type"] == want["node_errors"]["1"]["errors"][0]["type"]
    assert body["node_errors"]["1"]["errors"][0]["details"] == want["node_errors"]["1"]["errors"][0]["details"]


@pytest.mark.parametrize(("query", "status"), [
    ({"filename": "nope.png", "type": "output"}, 404),
    ({"filename": "../../etc/passwd", "type": "output"}, 400),
    ({"filename": "/etc/passwd", "type": "output"}, 400),
    ({"filename": "x.png", "type": "bogus"}, 400),
    ({"filename": "x.png", "subfolder": "../..", "type": "output"}, 403),
    ({"type": "output"}, 404),
])
async def test_view_errors(session: aiohttp.ClientSession, server: FakeComfyUI, query: dict[str, str],
                           status: int) -> None:
    async with session.get(f"{server.url}/view", params=query) as response:
        assert response.status == status
        assert await response.read() == b""


async def test_view_serves_outputs_with_their_content_type(session: aiohttp.ClientSession, server: FakeComfyUI,
                                                           client: WsClient) -> None:
    prompt = {"1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 32, "batch_size": 2,
                                                           "color": colour()}},
              "9": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "orch_view"}}}
    messages = await client.until_done(await submit(session, server, prompt, "client-a"))
    (output,) = [m.data["output"] for m in messages if m.type == "executed"]
    assert [i["filename"] for i in output["images"]] == ["orch_view_00001_.png", "orch_view_00002_.png"]
    base = {"filename": "orch_view_00001_.png", "subfolder": "", "type": "output"}
    for extra, content_type in (({}, "image/png"), ({"preview": "webp;90"}, "image/webp"),
                                ({"preview": "jpeg;50"}, "image/jpeg"), ({"channel": "a"}, "image/png"),
                                ({"channel": "rgb"}, "image/png")):
        async with session.get(f"{server.url}/api/view", params={**base, **extra}) as response:
            assert (response.status, response.content_type) == (200, content_type)
            assert Image.open(io.BytesIO(await response.read())).size == (64, 32)
    async with session.get(f"{server.url}/view", params={"filename": "orch_view_00002_.png [output]"}) as response:
        assert response.status == 200


@pytest.mark.parametrize(("model", "factor"), [("RealESRGAN_x4plus.pth", 4), ("tiny_compact_x2.safetensors", 2),
                                               ("plain.pth", 2)])
async def test_upscale_with_model(session: aiohttp.ClientSession, server: FakeComfyUI, client: WsClient,
                                  model: str, factor: int) -> None:
    assert upscale_factor(model) == factor
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 16, "batch_size": 1, "color": colour()}},
        "2": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": model}},
        "3": {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["2", 0], "image": ["1", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "orch_up"}},
    }
    messages = await client.until_done(await submit(session, server, prompt, "client-a"))
    assert [(m.data["value"], m.data["max"]) for m in messages if m.type == "progress"] == [(1, 1)]
    assert not any(isinstance(m.type, int) for m in messages)
    (output,) = [m.data["output"]["images"][0] for m in messages if m.type == "executed"]
    with Image.open(server.output_dir / output["filename"]) as image:
        assert image.size == (32 * factor, 16 * factor)


async def test_object_info_offers_the_configured_models(session: aiohttp.ClientSession,
                                                        server: FakeComfyUI) -> None:
    async with session.get(f"{server.url}/object_info") as response:
        info = await response.json()
    assert info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0] == MODELS["checkpoints"]
    assert info["UNETLoader"]["input"]["required"]["unet_name"][0] == MODELS["diffusion_models"]
    assert info["VAELoader"]["input"]["required"]["vae_name"][0] == ["ae.safetensors", "taesd", "pixel_space"]
    assert info["UpscaleModelLoader"]["input"]["required"]["model_name"] == [
        "COMBO", {"multiselect": False, "options": MODELS["upscale_models"]}]
    assert info["KSampler"]["output_node"] is False
    assert info["SaveImage"]["output_node"] is True
    async with session.get(f"{server.url}/api/object_info/EmptyImage") as response:
        assert await response.json() == recorded("horde_0.3.75/info.json")["/object_info/EmptyImage"]["body"]
    async with session.get(f"{server.url}/object_info/Nope") as response:
        assert await response.json() == {}


async def test_informational_routes(session: aiohttp.ClientSession, server: FakeComfyUI) -> None:
    info = recorded("horde_0.3.75/info.json")
    async with session.get(f"{server.url}/system_stats") as response:
        stats = await response.json()
    want = info["/system_stats"]["body"]
    assert set(stats) == set(want)
    assert set(stats["system"]) == set(want["system"])
    assert set(stats["devices"][0]) == set(want["devices"][0])
    async with session.get(f"{server.url}/features") as response:
        assert await response.json() == info["/features"]["body"]
    async with session.get(f"{server.url}/models/upscale_models") as response:
        assert await response.json() == MODELS["upscale_models"]
    async with session.get(f"{server.url}/models/nope") as response:
        assert response.status == 404
    async with session.get(f"{server.url}/api/models") as response:
        assert await response.json() == info["/models"]["body"]
