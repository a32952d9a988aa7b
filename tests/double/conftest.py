"""Raw-aiohttp helpers for driving the test double through real sockets (no client library)."""

from __future__ import annotations

import asyncio
import itertools
import json
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from comfy_orchestrator.testing import FakeComfyUI
from tests.conftest import PROTOCOL_DIR

MODELS = {
    "checkpoints": ["sd15.safetensors", "dreamshaper_8.safetensors"],
    "diffusion_models": ["flux1-schnell.safetensors"],
    "text_encoders": ["clip_l.safetensors", "t5xxl_fp8.safetensors"],
    "vae": ["ae.safetensors"],
    "vae_approx": ["taesd_decoder.safetensors", "taesd_encoder.safetensors"],
    "loras": ["style.safetensors"],
    "upscale_models": ["RealESRGAN_x4plus.pth", "tiny_compact_x2.safetensors", "plain.pth"],
}
_colours = itertools.count(1)


def colour() -> int:
    """A colour no earlier test used, so no cache can answer."""
    return (next(_colours) * 7919) % 16_777_215


def transcript(name: str, client: str | None = None) -> list[Msg]:
    """The messages of a recording from the POST /prompt on (``t_ms >= 0``), as ``Msg``."""
    path = PROTOCOL_DIR / name
    if not path.exists():
        pytest.skip(f"no recording {path}")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [recorded_msg(r["msg"]) for r in rows
            if r["t_ms"] >= 0 and (client is None or r.get("client") in (None, client))]


def recorded(name: str) -> Any:
    path = PROTOCOL_DIR / name
    if not path.exists():
        pytest.skip(f"no recording {path}")
    return json.loads(path.read_text())


@dataclass
class Msg:
    """One WebSocket message: ``type`` is the JSON type, or the binary event type as an int."""

    type: str | int
    data: Any
    raw: bytes = b""

    @property
    def prompt_id(self) -> str | None:
        if isinstance(self.data, dict):
            return self.data.get("prompt_id")
        return None


def recorded_msg(msg: dict[str, Any]) -> Msg:
    if msg.get("binary"):
        return Msg(int(msg["event_type"]), msg)
    return Msg(msg["type"], msg["data"])


def shape(msg: Msg) -> tuple[Any, ...]:
    """What must match between a recording and the double: types, nodes, states, values."""
    data = msg.data
    if isinstance(msg.type, int):
        return ("bin", msg.type)
    if msg.type == "status":
        return ("status", data["status"]["exec_info"]["queue_remaining"])
    if msg.type == "progress_state":
        return ("progress_state", tuple((n, s["state"], s["value"], s["max"]) for n, s in data["nodes"].items()))
    if msg.type in ("executing", "executed"):
        return (msg.type, data["node"], tuple(sorted((data.get("output") or {}).keys())))
    if msg.type == "progress":
        return ("progress", data["node"], data["value"], data["max"])
    if msg.type == "execution_cached":
        return ("execution_cached", tuple(data["nodes"]))
    if msg.type in ("execution_error", "execution_interrupted"):
        return (msg.type, data["node_id"], data["node_type"])
    return (msg.type,)


class WsClient:
    """A socket that records every message it receives, in a background task."""

    def __init__(self, session: aiohttp.ClientSession, server: FakeComfyUI, client_id: str,
                 feature_flags: bool = True) -> None:
        self.session, self.server, self.client_id, self.feature_flags = session, server, client_id, feature_flags
        self.messages: list[Msg] = []
        self.closed = asyncio.Event()
        self._new = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None

    async def connect(self) -> WsClient:
        ws = self._ws = await self.session.ws_connect(self.server.ws_url(self.client_id))
        if self.feature_flags:
            await ws.send_json({"type": "feature_flags", "data": {"supports_preview_metadata": True}})
        self._task = asyncio.create_task(self._read(ws))
        await self.wait_for(lambda m: m.type == ("feature_flags" if self.feature_flags else "status"))
        return self

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for message in ws:
            if message.type == aiohttp.WSMsgType.TEXT:
                body = json.loads(message.data)
                self.messages.append(Msg(body["type"], body["data"]))
            elif message.type == aiohttp.WSMsgType.BINARY:
                (event,) = struct.unpack(">I", message.data[:4])
                self.messages.append(Msg(event, None, message.data))
            self._new.set()
        self.closed.set()
        self._new.set()

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def wait_for(self, predicate: Callable[[Msg], bool], timeout: float = 10.0, start: int = 0) -> Msg:
        async with asyncio.timeout(timeout):
            while True:
                for msg in self.messages[start:]:
                    if predicate(msg):
                        return msg
                if self.closed.is_set():
                    raise ConnectionError("socket closed")
                self._new.clear()
                await self._new.wait()

    async def until_done(self, prompt_id: str, timeout: float = 10.0) -> list[Msg]:
        """Every message from the prompt's pick-up ``status`` to its ``executing {node: null}``."""
        end = await self.wait_for(lambda m: m.type == "executing" and m.data.get("node") is None
                                  and m.prompt_id == prompt_id, timeout)
        stop = self.messages.index(end)
        first = next(i for i, m in enumerate(self.messages) if m.prompt_id == prompt_id)
        while first > 0 and self.messages[first - 1].type == "status" and "sid" not in self.messages[first - 1].data:
            first -= 1
        return self.messages[first:stop + 1]


async def submit(session: aiohttp.ClientSession, server: FakeComfyUI, prompt: dict[str, Any],
                 client_id: str | None = None, **extra: Any) -> str:
    body: dict[str, Any] = {"prompt": prompt, **extra}
    if client_id is not None:
        body["client_id"] = client_id
    async with session.post(f"{server.url}/prompt", json=body) as response:
        answer = await response.json()
        assert response.status == 200, answer
        return str(answer["prompt_id"])


async def history(session: aiohttp.ClientSession, server: FakeComfyUI, prompt_id: str) -> dict[str, Any]:
    async with session.get(f"{server.url}/history/{prompt_id}") as response:
        body: dict[str, Any] = await response.json()
        return body


def basic_prompt(colour_value: int = 3368652, prefix: str = "orch_basic") -> dict[str, Any]:
    """The graph of the ``basic_*`` recordings."""
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1,
                                                     "color": colour_value}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": prefix}},
        "2": {"class_type": "ImageScaleBy", "inputs": {"image": ["1", 0], "upscale_method": "bilinear",
                                                       "scale_by": 2.0}},
        "3": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}},
        "4": {"class_type": "ImageBlur", "inputs": {"image": ["3", 0], "blur_radius": 3, "sigma": 1.0}},
        "5": {"class_type": "GetImageSize", "inputs": {"image": ["4", 0]}},
        "6": {"class_type": "PreviewAny", "inputs": {"source": ["5", 0]}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
    }


def tiny_prompt(colour_value: int | None = None, prefix: str = "tiny") -> dict[str, Any]:
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1,
                                                     "color": colour() if colour_value is None else colour_value}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }


def chain_prompt(length: int, colour_value: int | None = None) -> dict[str, Any]:
    """EmptyImage then ``length`` ImageInverts then SaveImage: one node boundary after another."""
    prompt = tiny_prompt(colour_value, "chain")
    for i in range(length):
        prompt[str(10 + i)] = {"class_type": "ImageInvert", "inputs": {"image": [str(9 + i) if i else "1", 0]}}
    prompt["9"]["inputs"]["images"] = [str(9 + length) if length else "1", 0]
    return prompt


def sampler_prompt(text: str, seed: int, steps: int = 4, model: str = "sd15.safetensors", size: int = 64,
                   prefix: str = "sample", denoise: float = 1.0) -> dict[str, Any]:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": model}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": seed, "steps": steps, "cfg": 7.0, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "denoise": denoise}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[FakeComfyUI]:
    async with FakeComfyUI(models=MODELS, base_dir=tmp_path, name="test-double") as double:
        yield double


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client_session:
        yield client_session


@pytest.fixture
async def client(session: aiohttp.ClientSession, server: FakeComfyUI) -> AsyncIterator[WsClient]:
    ws = await WsClient(session, server, "client-a").connect()
    yield ws
    await ws.close()
