"""pytest plugin: real ComfyUI servers with tiny random-weight models, for tests marked ``comfy_live``.

``live_comfy`` (session): one server for the whole run, started on first use. ``spawn_comfy``
(function): a factory for extra, independent servers (failover, crash tests), stopped after the test.
Both skip when no ComfyUI tree is found (see ``comfy_orchestrator.local.find_comfyui_dir``).

Torch is imported only when a fixture is used, so listing this plugin costs the other tests nothing.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pytest
import pytest_asyncio

from comfy_orchestrator.local import LocalComfyUI, LocalComfyUIConfig, LocalComfyUIError, find_comfyui_dir

if TYPE_CHECKING:
    from comfy_orchestrator.testing.tiny_models import TinyModels

__all__ = ["LiveComfy", "SpawnComfy", "live_comfy", "spawn_comfy"]


@dataclass(frozen=True)
class LiveComfy:
    """A running local ComfyUI and the tiny models in its base directory."""

    process: LocalComfyUI
    models: TinyModels
    base_dir: Path

    @property
    def url(self) -> str:
        return self.process.url


class SpawnComfy(Protocol):
    """``await spawn_comfy(**config_fields)`` starts one more server (LocalComfyUIConfig fields)."""

    def __call__(self, **config: Any) -> Awaitable[LiveComfy]: ...


def comfy_dir_or_skip(what: str = "comfy_live") -> Path:
    """The local ComfyUI tree, or a skip saying ``what`` needs one."""
    try:
        return find_comfyui_dir()
    except LocalComfyUIError as exc:
        pytest.skip(f"{what} needs a real ComfyUI: {exc}")


def _prepare_or_skip() -> Callable[[Path], TinyModels]:
    pytest.importorskip("torch", reason="the tiny models for comfy_live tests need torch")
    pytest.importorskip("safetensors", reason="the tiny models for comfy_live tests need safetensors")
    from comfy_orchestrator.testing.tiny_models import prepare_base_dir

    return prepare_base_dir


def _config(comfy_dir: Path, base_dir: Path, **overrides: Any) -> LocalComfyUIConfig:
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1"}
    env.update(overrides.pop("env", {}))
    return LocalComfyUIConfig(comfy_dir=comfy_dir, base_dir=base_dir, env=env, **overrides)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def live_comfy(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LiveComfy]:
    """One real ComfyUI (CPU, ``--preview-method auto``) with the tiny models, for the whole session."""
    comfy_dir = comfy_dir_or_skip()
    prepare = _prepare_or_skip()
    base_dir = tmp_path_factory.mktemp("comfy-live")
    models = prepare(base_dir)
    process = LocalComfyUI(_config(comfy_dir, base_dir))
    await process.start()
    try:
        yield LiveComfy(process=process, models=models, base_dir=base_dir)
    finally:
        await process.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def spawn_comfy(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[SpawnComfy]:
    """Factory for extra independent servers, each in its own base dir; all stopped after the test."""
    comfy_dir = comfy_dir_or_skip()
    prepare = _prepare_or_skip()
    started: list[LocalComfyUI] = []

    async def spawn(**config: Any) -> LiveComfy:
        base_dir = tmp_path_factory.mktemp("comfy-extra")
        models = prepare(base_dir)
        process = LocalComfyUI(_config(comfy_dir, base_dir, **config))
        started.append(process)
        await process.start()
        return LiveComfy(process=process, models=models, base_dir=base_dir)

    try:
        yield spawn
    finally:
        await asyncio.gather(*(p.stop() for p in started))
