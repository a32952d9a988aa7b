"""Routing and dispatch: capable backends only, a clear error otherwise, pull dispatch, affinity, limits."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest

from comfy_orchestrator.graph import Graph
from comfy_orchestrator.pool import EventKind, NoCapableBackend, Pool, PoolEvent, PoolSettings
from comfy_orchestrator.pool.routing import Capabilities, Requirements
from comfy_orchestrator.testing import object_info
from tests.pool.conftest import QUICK, SD15, SDXL, UPSCALER, StartDouble, configs, model_free_graph, sampler_graph


def test_capabilities_come_from_the_loaders_option_lists() -> None:
    info = object_info(
        {"checkpoints": [SD15], "loras": ["detail.safetensors"], "upscale_models": [UPSCALER],
         "vae_approx": ["taesd_encoder.pth", "taesd_decoder.pth"], "diffusion_models": ["flux\\dev.sft"]},
        [],
    )
    caps = Capabilities.from_object_info(info)
    assert caps.models["checkpoints"] == {SD15}
    assert caps.models["loras"] == {"detail.safetensors"}
    assert caps.models["upscale_models"] == {UPSCALER}
    assert caps.models["vae_approx"] == {"taesd"}
    assert caps.models["diffusion_models"] == {"flux/dev.sft"}
    assert "KSampler" in caps.node_classes
    graph = Graph(sampler_graph(SDXL))
    assert caps.missing(Requirements.of(graph)) == [f"model checkpoints/{SDXL}"]
    odd = Graph({**sampler_graph(SD15), "9": {"class_type": "FancyNode", "inputs": {}}})
    assert caps.missing(Requirements.of(odd)) == ["node class FancyNode"]
    assert Requirements.of(graph).model == f"checkpoints/{SDXL}"


async def test_a_graph_goes_only_to_backends_with_its_model(start_double: StartDouble) -> None:
    a = await start_double("a", models={"checkpoints": [SD15]})
    b = await start_double("b", models={"checkpoints": [SDXL]})
    async with Pool(configs(a, b), QUICK) as pool:
        results = await asyncio.gather(
            *(pool.run(sampler_graph(SD15)) for _ in range(4)), *(pool.run(sampler_graph(SDXL)) for _ in range(4))
        )
    assert [r.backend for r in results] == ["a"] * 4 + ["b"] * 4
    assert all(r.result.output_images for r in results)


async def test_no_capable_backend_says_what_is_missing_where(start_double: StartDouble) -> None:
    a = await start_double("a", models={"checkpoints": [SD15]})
    b = await start_double("b", models={"checkpoints": [SDXL]})
    graph = {**sampler_graph("flux.safetensors"), "9": {"class_type": "FancyNode", "inputs": {}}}
    async with Pool(configs(a, b), QUICK) as pool:
        with pytest.raises(NoCapableBackend) as info:
            await pool.run(graph)
        # Restricted to a backend that lacks the model, a runnable graph is refused as well.
        with pytest.raises(NoCapableBackend) as restricted:
            await pool.run(sampler_graph(SDXL), backends=["a", "gone"])
    assert info.value.missing == {
        "a": ["node class FancyNode", "model checkpoints/flux.safetensors"],
        "b": ["node class FancyNode", "model checkpoints/flux.safetensors"],
    }
    assert "a lacks node class FancyNode, model checkpoints/flux.safetensors" in str(info.value)
    assert restricted.value.missing == {"a": [f"model checkpoints/{SDXL}"], "gone": ["not in the pool"]}


async def test_a_slow_backend_does_not_drag_the_pool(start_double: StartDouble) -> None:
    fast = await start_double("fast", models={}, node_delay=0.01)
    slow = await start_double("slow", models={}, node_delay=0.25)
    async with Pool(configs(fast, slow), QUICK) as pool:
        started = time.monotonic()
        results = await asyncio.gather(*(pool.run(model_free_graph()) for _ in range(20)))
        elapsed = time.monotonic() - started
    counts = Counter(r.backend for r in results)
    # A static split would give the slow one 10 jobs (10 × 3 nodes × 0.25 s = 7.5 s).
    assert counts["fast"] >= 15, counts
    assert elapsed < 3.5, elapsed


async def test_in_flight_limit_per_backend(start_double: StartDouble) -> None:
    a = await start_double("a", models={}, node_delay=0.05)
    peak = 0
    async with Pool(configs(a, max_in_flight=2), QUICK) as pool:

        def watch(_: PoolEvent) -> None:
            nonlocal peak
            peak = max(peak, pool.backends()[0].in_flight)

        pool.add_listener(watch)
        await asyncio.gather(*(pool.run(model_free_graph()) for _ in range(6)))
        assert pool.backends()[0].in_flight == 0
    assert peak == 2
    assert a.history
    assert len(a.history) == 6


async def test_model_affinity_keeps_each_model_on_the_backend_that_has_it_loaded(start_double: StartDouble) -> None:
    both = {"checkpoints": [SD15, SDXL]}
    a = await start_double("a", models=both, step_delay=0.02)
    b = await start_double("b", models=both, step_delay=0.02)
    async with Pool(configs(a, b), QUICK) as pool:
        # Warm up: one model each (restricted), so that a last ran SD15 and b SDXL.
        await asyncio.gather(
            pool.run(sampler_graph(SD15), backends=["a"]), pool.run(sampler_graph(SDXL), backends=["b"])
        )
        last = {s.name: s.last_model for s in pool.backends()}
        assert last == {"a": f"checkpoints/{SD15}", "b": f"checkpoints/{SDXL}"}
        # Whichever model comes first, and whichever backend is offered it first, each goes to its backend.
        for _ in range(3):
            results = await asyncio.gather(pool.run(sampler_graph(SDXL)), pool.run(sampler_graph(SD15)))
            assert [r.backend for r in results] == ["b", "a"]
            results = await asyncio.gather(pool.run(sampler_graph(SD15)), pool.run(sampler_graph(SDXL)))
            assert [r.backend for r in results] == ["a", "b"]


async def test_dispatched_event_names_the_backend(start_double: StartDouble) -> None:
    a = await start_double("a", models={"checkpoints": [SD15]})
    events: list[PoolEvent] = []
    async with Pool(configs(a), QUICK) as pool:
        await pool.run(sampler_graph(SD15), on_event=events.append)
    dispatched = [e for e in events if e.kind is EventKind.DISPATCHED]
    assert [(e.backend, e.attempt) for e in dispatched] == [("a", 1)]


@pytest.mark.parametrize("max_in_flight", [1, 2])
async def test_the_last_jobs_wait_for_a_fast_backend_rather_than_start_on_a_slow_one(
    start_double: StartDouble, max_in_flight: int
) -> None:
    fast = await start_double("fast", models={}, node_delay=0.03)  # ~0.1 s a job
    slow = await start_double("slow", models={}, node_delay=0.25)  # ~0.75 s a job
    async with Pool(configs(fast, slow, max_in_flight=max_in_flight), QUICK) as pool:
        for _ in range(2):  # the pool learns how fast each one is
            await asyncio.gather(
                pool.run(model_free_graph(), backends=["fast"]), pool.run(model_free_graph(), backends=["slow"])
            )
        started = time.monotonic()
        results = await asyncio.gather(*(pool.run(model_free_graph()) for _ in range(3)))
        elapsed = time.monotonic() - started
        # Restricted to the slow one, a job still runs there.
        assert (await pool.run(model_free_graph(), backends=["slow"])).backend == "slow"
    assert [r.backend for r in results] == ["fast"] * 3
    assert elapsed < 0.7, elapsed


async def test_affinity_gives_way_to_a_clearly_faster_idle_backend(start_double: StartDouble) -> None:
    both = {"checkpoints": [SD15, SDXL]}
    fast = await start_double("fast", models=both, step_delay=0.005)
    slow = await start_double("slow", models=both, step_delay=0.15)
    settings = PoolSettings(health_interval=30.0)  # no health tick comes to unstick a waiting job
    async with Pool(configs(fast, slow), settings) as pool:
        for _ in range(2):
            await asyncio.gather(
                pool.run(sampler_graph(SD15), backends=["fast"]), pool.run(sampler_graph(SDXL), backends=["slow"])
            )
        started = time.monotonic()
        result = await pool.run(sampler_graph(SDXL))  # slow ran SDXL last, but fast is done sooner
        assert time.monotonic() - started < 0.25
    assert result.backend == "fast"
