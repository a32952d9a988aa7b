"""The pool over two real ComfyUI servers holding different tiny models: routing by model file, and
failover when the server running a job is killed mid-job."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from comfy_orchestrator.config import Timeouts
from comfy_orchestrator.graph import Template
from comfy_orchestrator.pool import BackendConfig, EventKind, FailureKind, NoCapableBackend, Pool, PoolSettings
from tests.live_fixtures import SpawnComfy

pytestmark = pytest.mark.comfy_live

GRAPHS = Path(__file__).resolve().parents[2] / "graphs"
TIMEOUTS = Timeouts(connect=2.0, request=20.0, stall=60.0, poll=0.2, unreachable=1.0)
SETTINGS = PoolSettings(health_interval=0.25, fail_threshold=2, recover_threshold=2, backoff_initial=0.05,
                        backoff_max=0.2)


def slow_upscale(colour: int) -> dict[str, Any]:
    """256 px through the tiny ESRGAN ×4: a few seconds on one CPU thread, on either server."""
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 256, "height": 256, "batch_size": 1, "color": colour}},
        "2": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "tiny_esrgan_x4.safetensors"}},
        "3": {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["2", 0], "image": ["1", 0]}},
        "4": {"class_type": "ImageScaleBy", "inputs": {"image": ["3", 0], "upscale_method": "nearest-exact",
                                                       "scale_by": 0.125}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "pool_live_up"}},
    }


@pytest.mark.timeout(150)
async def test_routing_by_model_and_failover_when_a_server_is_killed(spawn_comfy: SpawnComfy) -> None:
    with_unet, upscalers_only = await asyncio.gather(spawn_comfy(), spawn_comfy())
    (upscalers_only.models.models_dir / "diffusion_models" / upscalers_only.models.unet).unlink()
    servers = {"with-unet": with_unet, "upscalers-only": upscalers_only}
    configs = [BackendConfig(name, live.url, timeouts=TIMEOUTS) for name, live in servers.items()]
    unet_graph = Template.load(GRAPHS / "cpu_tiny_unet_txt2img.json")

    async with Pool(configs, SETTINGS) as pool:
        models = {s.name: s.models for s in pool.backends()}
        assert with_unet.models.unet in models["with-unet"]["diffusion_models"]
        assert with_unet.models.unet not in models["upscalers-only"].get("diffusion_models", ())
        assert with_unet.models.upscale_x4 in models["upscalers-only"]["upscale_models"]

        # Routing: the UNet graph only ever goes to the server that has the UNet.
        results = await asyncio.gather(*(pool.run(unet_graph.bind(seed=seed, steps=2)) for seed in range(3)))
        assert [r.backend for r in results] == ["with-unet"] * 3
        assert all(r.result.output_images for r in results)
        png = await pool.download(results[0], results[0].result.output_images[0])
        assert png.startswith(b"\x89PNG")
        with pytest.raises(NoCapableBackend) as info:
            await pool.run(unet_graph.bind(unet="not_here.safetensors"))
        assert set(info.value.missing) == {"with-unet", "upscalers-only"}

        # Failover: kill the server that took the job, mid-job; the other finishes it.
        dispatched: asyncio.Queue[str] = asyncio.Queue()
        job = await pool.submit(
            slow_upscale(colour=int(time.time()) % 0xFFFFFF),
            on_event=lambda e: dispatched.put_nowait(e.backend or "") if e.kind is EventKind.DISPATCHED else None,
        )
        first = await asyncio.wait_for(dispatched.get(), 30)
        await asyncio.sleep(0.8)  # submitted and running (it takes seconds)
        await servers[first].process.kill()
        killed_at = time.monotonic()
        result = await asyncio.wait_for(pool.result(job), 60)
        other = next(name for name in servers if name != first)
        assert result.backend == other
        assert [a.backend for a in result.attempts] == [first, other]
        assert result.attempts[0].reason is FailureKind.UNAVAILABLE
        assert result.result.output_images
        assert time.monotonic() - killed_at < 30
        assert {s.name: s.healthy for s in pool.backends()}[first] is False
        stats = pool.stats()
        assert stats.retries >= 1
        assert stats.backends[first].failures.get("unavailable", 0) >= 1
