"""Every node the double implements runs, with ComfyUI's shapes and sizes."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
from PIL import Image

from comfy_orchestrator.testing import NODES, FakeComfyUI
from tests.double.conftest import Msg, WsClient, colour, recorded, shape, submit, transcript


async def _outputs(session: aiohttp.ClientSession, server: FakeComfyUI, client: WsClient,
                   prompt: dict[str, Any]) -> tuple[list[Msg], dict[str, Any]]:
    messages = await client.until_done(await submit(session, server, prompt, "client-a"))
    assert "execution_success" in [m.type for m in messages], [m.data for m in messages if m.type == "execution_error"]
    return messages, {m.data["node"]: m.data["output"] for m in messages if m.type == "executed"}


def _size(server: FakeComfyUI, output: dict[str, Any]) -> tuple[int, int]:
    image = output["images"][0]
    with Image.open(server.output_dir / image["subfolder"] / image["filename"]) as opened:
        return opened.size


async def test_the_channel_mismatch_graph_runs_as_on_0_3_75(
    session: aiohttp.ClientSession, server: FakeComfyUI, client: WsClient
) -> None:
    (_, entry), = recorded("exec_error_channel_mismatch_history.json").items()
    messages, outputs = await _outputs(session, server, client, entry["prompt"][2])
    assert [shape(m) for m in messages] == [
        shape(m) for m in transcript("horde_0.3.75/exec_error_channel_mismatch_ws.jsonl")]
    assert [i["filename"] for i in outputs["6"]["images"]] == ["orch_err_00001_.png", "orch_err_00002_.png"]


async def test_image_and_text_nodes(session: aiohttp.ClientSession, server: FakeComfyUI, client: WsClient) -> None:
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 40, "height": 30, "batch_size": 1, "color": colour()}},
        "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "bicubic", "width": 80,
                                                     "height": 0, "crop": "disabled"}},
        "3": {"class_type": "ImageCrop", "inputs": {"image": ["2", 0], "width": 50, "height": 20, "x": 5, "y": 5}},
        "4": {"class_type": "ImageToMask", "inputs": {"image": ["3", 0], "channel": "green"}},
        "5": {"class_type": "MaskToImage", "inputs": {"mask": ["4", 0]}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "nodes/mask"}},
        "7": {"class_type": "PrimitiveString", "inputs": {"value": "hello"}},
        "8": {"class_type": "StringConcatenate", "inputs": {"string_a": ["7", 0], "string_b": "world",
                                                            "delimiter": ", "}},
        "9": {"class_type": "PreviewAny", "inputs": {"source": ["8", 0]}},
        "10": {"class_type": "PrimitiveInt", "inputs": {"value": 42}},
        "11": {"class_type": "PreviewAny", "inputs": {"source": ["10", 0]}},
        "12": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "area", "width": 64,
                                                      "height": 64, "crop": "center"}},
        "13": {"class_type": "PreviewImage", "inputs": {"images": ["12", 0]}},
    }
    _, outputs = await _outputs(session, server, client, prompt)
    assert _size(server, outputs["6"]) == (50, 20)
    assert outputs["6"]["images"][0]["subfolder"] == "nodes"
    assert outputs["9"] == {"text": ["hello, world"]}
    assert outputs["11"] == {"text": ["42"]}
    preview = outputs["13"]["images"][0]
    with Image.open(server.temp_dir / preview["filename"]) as image:
        assert image.size == (64, 64)


async def test_latent_and_loader_nodes(session: aiohttp.ClientSession, server: FakeComfyUI,
                                       client: WsClient) -> None:
    prompt = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-schnell.safetensors",
                                                     "weight_dtype": "default"}},
        "2": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "clip_l.safetensors",
                                                         "clip_name2": "t5xxl_fp8.safetensors", "type": "flux"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "an orange star", "clip": ["2", 0]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 48, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": 1, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["3", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "LatentUpscaleBy", "inputs": {"samples": ["5", 0], "upscale_method": "bislerp",
                                                          "scale_by": 1.5}},
        "7": {"class_type": "LatentUpscale", "inputs": {"samples": ["6", 0], "upscale_method": "nearest-exact",
                                                        "width": 128, "height": 0, "crop": "disabled"}},
        "8": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["8", 0]}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "latent"}},
        "11": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": "latents/test"}},
        "12": {"class_type": "CLIPLoader", "inputs": {"clip_name": "clip_l.safetensors", "type": "stable_diffusion"}},
        "13": {"class_type": "CLIPTextEncode", "inputs": {"text": "x", "clip": ["12", 0]}},
        "14": {"class_type": "PreviewAny", "inputs": {"source": ["13", 0]}},
    }
    _, outputs = await _outputs(session, server, client, prompt)
    assert _size(server, outputs["10"]) == (128, 96)
    (latent,) = outputs["11"]["latents"]
    assert (latent["filename"], latent["subfolder"], latent["type"]) == ("test_00001_.latent", "latents", "output")
    raw = (server.output_dir / "latents" / latent["filename"]).read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    assert header["latent_tensor"]["shape"] == [1, 4, 9, 12]
    assert outputs["14"]["text"][0].startswith("Conditioning(")


def test_every_node_has_a_real_object_info_entry() -> None:
    from comfy_orchestrator.testing import object_info

    info = object_info({}, [])
    assert set(info) == set(NODES)
    for name, entry in info.items():
        assert entry["name"] == name
        assert {"input", "output", "output_node", "category"} <= set(entry)
