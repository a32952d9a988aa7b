"""Events per job, statistics per backend and model, uploads and downloads through the pool."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import pytest
from PIL import Image

from comfy_orchestrator.client import ComfyClient
from comfy_orchestrator.pool import EventKind, Pool, PoolEvent
from comfy_orchestrator.protocol import FileRef
from comfy_orchestrator.testing import NodeFailure
from tests.pool.conftest import QUICK, SD15, SDXL, StartDouble, configs, sampler_graph


async def test_event_sequence_of_a_job(start_double: StartDouble) -> None:
    a = await start_double("a", step_delay=0.01)
    events: list[PoolEvent] = []
    everything: list[PoolEvent] = []
    async with Pool(configs(a), QUICK) as pool:
        remove = pool.add_listener(everything.append)
        graph = sampler_graph(SD15, steps=4, seed=12345)
        result = await pool.run(graph, on_event=events.append, labels={"user": "u1"})
        remove()
        again: list[PoolEvent] = []
        await pool.run(graph, on_event=again.append)  # same graph, same server: answered from cache
    kinds = [e.kind for e in events]
    assert kinds[:2] == [EventKind.QUEUED, EventKind.DISPATCHED]
    assert kinds[-1] is EventKind.DONE
    assert set(kinds[2:-1]) == {EventKind.PROGRESS, EventKind.PREVIEW, EventKind.OUTPUT}
    [output] = [e for e in events if e.kind is EventKind.OUTPUT]  # SaveImage's files, before /history
    assert (output.node, output.files) == ("7", result.result.outputs["7"].files)
    fractions = [e.fraction for e in events if e.kind is EventKind.PROGRESS]
    assert fractions == [0.25, 0.5, 0.75, 1.0]
    previews = [e for e in events if e.kind is EventKind.PREVIEW]
    assert previews
    assert all(e.image and e.mime == "image/jpeg" for e in previews)
    assert all(e.job_id == result.job_id and e.labels == {"user": "u1"} for e in events)
    assert events[-1].backend == "a"
    assert events[1].backend == "a"
    assert everything == events  # the pool-wide listener saw the same, until removed
    cached = [e for e in again if e.kind is EventKind.CACHED]
    assert len(cached) == 1
    assert set(cached[0].nodes) == set(graph)


async def test_async_on_event_and_subscribe(start_double: StartDouble) -> None:
    a = await start_double("a")
    seen: list[EventKind] = []

    async def on_event(event: PoolEvent) -> None:
        await asyncio.sleep(0)
        seen.append(event.kind)

    pool = Pool(configs(a), QUICK)
    async with pool:
        stream = pool.subscribe()
        streamed: list[PoolEvent] = []

        async def read() -> None:
            async for event in stream:
                streamed.append(event)

        reader = asyncio.create_task(read())
        await asyncio.sleep(0)
        await pool.run(sampler_graph(SD15), on_event=on_event)
    await asyncio.wait_for(reader, 2)  # the stream ends when the pool closes
    assert seen[0] is EventKind.QUEUED
    assert seen[-1] is EventKind.DONE
    assert [e.kind for e in streamed] == seen


async def test_failed_and_retried_events_say_why(start_double: StartDouble) -> None:
    a = await start_double("a")
    a.faults.execution_error = NodeFailure("ValueError", "no good", node_class="KSampler")
    events: list[PoolEvent] = []
    async with Pool(configs(a), QUICK) as pool:
        with pytest.raises(Exception, match="no good"):
            await pool.run(sampler_graph(SD15), on_event=events.append)
    assert events[-1].kind is EventKind.FAILED
    assert events[-1].reason is not None
    assert "ExecutionFailed" in events[-1].reason


async def test_statistics_per_backend_and_model(start_double: StartDouble) -> None:
    a = await start_double("a", models={"checkpoints": [SD15, SDXL]}, step_delay=0.01)
    b = await start_double("b", models={"checkpoints": [SD15]}, step_delay=0.01)
    async with Pool(configs(a, b), QUICK) as pool:
        await asyncio.gather(*(pool.run(sampler_graph(SD15)) for _ in range(4)))
        await asyncio.gather(*(pool.run(sampler_graph(SDXL)) for _ in range(2)))
        a.faults.execution_error = NodeFailure("ValueError", "boom", node_class="KSampler")
        with pytest.raises(Exception, match="boom"):
            await pool.run(sampler_graph(SDXL))
        stats = pool.stats()
    assert stats.jobs_ok == 6
    assert stats.jobs_failed == 1
    assert stats.retries == 0
    assert stats.backends["a"].failed == 1
    assert stats.backends["a"].failures == {"execution": 1}
    assert stats.backends["a"].ok + stats.backends["b"].ok == 6
    assert stats.backends["b"].success_rate == 1.0
    rate = stats.backends["a"].success_rate
    assert rate is not None
    assert rate == stats.backends["a"].ok / (stats.backends["a"].ok + 1)
    mean = stats.backends["a"].mean_seconds
    assert mean is not None
    assert 0 < mean < 2
    assert stats.models[f"checkpoints/{SD15}"].jobs == 4
    assert stats.models[f"checkpoints/{SDXL}"].jobs == 2
    assert stats.models[f"checkpoints/{SDXL}"].mean_seconds > 0


async def test_uploads_are_stored_once_per_backend_and_outputs_download(
    start_double: StartDouble, monkeypatch: pytest.MonkeyPatch
) -> None:
    uploads: list[str | None] = []
    original = ComfyClient.upload_image

    async def counted(self: ComfyClient, image: Any, **kwargs: Any) -> FileRef:
        uploads.append(kwargs.get("filename"))
        return await original(self, image, **kwargs)

    monkeypatch.setattr(ComfyClient, "upload_image", counted)
    a = await start_double("a")
    buffer = io.BytesIO()
    Image.new("RGB", (32, 16), (255, 0, 0)).save(buffer, format="PNG")
    png = buffer.getvalue()
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "cat.png"}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "pool_upload"}},
    }
    async with Pool(configs(a), QUICK) as pool:
        first = await pool.run(graph, uploads={"cat.png": png})
        second = await pool.run(graph, uploads={"cat.png": png})
        data = await pool.download(first, first.result.output_images[0])
    stored = [p.name for p in a.input_dir.iterdir() if p.name.startswith("cat-")]
    assert len(stored) == 1
    assert stored[0].endswith(".png")
    assert uploads == stored  # uploaded once, for both jobs
    assert second.result.fully_cached or second.result.output_images
    with Image.open(io.BytesIO(data)) as image:
        assert image.size == (32, 16)
        assert image.convert("RGB").getpixel((0, 0)) == (0, 255, 255)
