"""Fixtures for the pool tests: several test doubles on real sockets, and graphs that name models."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from typing import Any

import pytest

from comfy_orchestrator.config import Timeouts
from comfy_orchestrator.pool import BackendConfig, PoolSettings
from comfy_orchestrator.testing import FakeComfyUI

SD15 = "sd15.safetensors"
SDXL = "sdxl.safetensors"
UPSCALER = "up_x2.safetensors"

# Client deadlines that notice a dead, refusing or silent server within about a second.
FAST = Timeouts(connect=1.0, request=3.0, stall=0.6, poll=0.1, unreachable=0.6)
# Health checks and retries on a test's time scale.
QUICK = PoolSettings(
    health_interval=0.05,
    health_timeout=1.0,
    fail_threshold=2,
    recover_threshold=2,
    max_attempts=3,
    backoff_initial=0.01,
    backoff_max=0.05,
    breaker_failures=5,
    breaker_reset=0.5,
)

_seeds = itertools.count(1)

StartDouble = Callable[..., Awaitable[FakeComfyUI]]


def sampler_graph(
    model: str = SD15, *, steps: int = 2, seed: int | None = None, prefix: str = "pool"
) -> dict[str, Any]:
    """CheckpointLoaderSimple → CLIPTextEncode ×2 → KSampler → VAEDecode → SaveImage (a fresh seed
    each time, so no server answers from its cache)."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": model}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": next(_seeds) if seed is None else seed, "steps": steps, "cfg": 7.0,
            "sampler_name": "euler", "scheduler": "normal", "positive": ["2", 0], "negative": ["3", 0],
            "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }


def model_free_graph(colour: int | None = None) -> dict[str, Any]:
    """EmptyImage → ImageInvert → SaveImage: runs anywhere."""
    return {
        "1": {"class_type": "EmptyImage", "inputs": {
            "width": 64, "height": 64, "batch_size": 1, "color": next(_seeds) if colour is None else colour}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "pool_free"}},
    }


def config(server: FakeComfyUI, *, max_in_flight: int = 1, timeouts: Timeouts = FAST) -> BackendConfig:
    return BackendConfig(server.name, server.url, max_in_flight=max_in_flight, timeouts=timeouts)


def configs(*servers: FakeComfyUI, **kwargs: Any) -> list[BackendConfig]:
    return [config(s, **kwargs) for s in servers]


@pytest.fixture
async def start_double() -> AsyncIterator[StartDouble]:
    """``await start_double("a", models={...}, node_delay=...)``: a FakeComfyUI stopped after the test."""
    async with AsyncExitStack() as stack:

        async def start(name: str, *, models: Mapping[str, Sequence[str]] | None = None, **kwargs: Any) -> FakeComfyUI:
            server = FakeComfyUI(name=name, models=models if models is not None else {"checkpoints": [SD15]},
                                 **kwargs)
            return await stack.enter_async_context(server)

        yield start
