"""Fixtures for the pipeline tests: test doubles holding different checkpoints behind a real Pool."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import pytest

from comfy_orchestrator.config import Timeouts
from comfy_orchestrator.graph import Template, load_templates
from comfy_orchestrator.pool import BackendConfig, Pool, PoolSettings
from comfy_orchestrator.testing import FakeComfyUI, NodeFailure
from tests.conftest import GRAPHS_DIR
from tests.pipelines.judge import ShapeJudge

SD15 = "sd15.safetensors"
DREAM = "dreamshaper_8.safetensors"
SDXL = "sdxl_base.safetensors"
UPSCALER = "RealESRGAN_x4plus.pth"
SMALL = {"width": 64, "height": 64}  # every test image is 64×64: quick to draw, encode and judge

FAST = Timeouts(connect=1.0, request=5.0, stall=5.0, poll=0.2, unreachable=1.0)
QUICK = PoolSettings(health_interval=0.5, health_timeout=2.0, max_attempts=2, backoff_initial=0.01,
                     backoff_max=0.05, breaker_failures=50)


@dataclass
class Cluster:
    pool: Pool
    servers: dict[str, FakeComfyUI]

    def prompts_run(self) -> int:
        """Prompts the backends executed (their /history), the measure of GPU work."""
        return sum(len(server.history) for server in self.servers.values())

    def prompts_on(self, name: str) -> int:
        return len(self.servers[name].history)


StartCluster = Callable[..., Awaitable[Cluster]]


@pytest.fixture(scope="session")
def templates() -> dict[str, Template]:
    return load_templates(GRAPHS_DIR)


@pytest.fixture
def judge() -> ShapeJudge:
    return ShapeJudge()


@pytest.fixture
async def start_cluster() -> AsyncIterator[StartCluster]:
    """``await start_cluster({"a": [SD15], "b": [DREAM]})``: one double per backend, each holding those
    checkpoints (and the x4 upscaler), behind a started Pool."""
    async with AsyncExitStack() as stack:

        async def start(checkpoints: Mapping[str, Sequence[str]], **double: Any) -> Cluster:
            servers = {}
            for name, models in checkpoints.items():
                server = FakeComfyUI(models={"checkpoints": list(models), "upscale_models": [UPSCALER]},
                                     name=name, **double)
                servers[name] = await stack.enter_async_context(server)
            configs = [BackendConfig(name, s.url, timeouts=FAST) for name, s in servers.items()]
            pool = await stack.enter_async_context(Pool(configs, QUICK))
            return Cluster(pool, servers)

        yield start


@pytest.fixture
async def cluster(start_cluster: StartCluster) -> Cluster:
    """Two backends: ``a`` holds sd15, ``b`` holds dreamshaper and sdxl."""
    return await start_cluster({"a": [SD15], "b": [DREAM, SDXL]})


def seeds_where(succeeds: bool, *, model: str = SD15, steps: int = 20, count: int = 1, start: int = 0) -> list[int]:
    """The first ``count`` seeds from ``start`` on which the double's sampler succeeds (or fails)."""
    from comfy_orchestrator.testing import sampler_succeeds

    found: list[int] = []
    seed = start
    while len(found) < count:
        if sampler_succeeds(seed, model, steps) is succeeds:
            found.append(seed)
        seed += 1
    return found


def broken_node(times: int | None = 1) -> NodeFailure:
    """A node error the pool does not retry (it retries an out-of-memory error once itself)."""
    return NodeFailure("ValueError", "sigma out of range", node_class="KSampler", times=times)
