"""The contract suite runs every test against the test double and against a real ComfyUI."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from comfy_orchestrator.testing import FakeComfyUI
from comfy_orchestrator.testing.tiny_models import UNET_FILE, UPSCALE_X2_FILE, UPSCALE_X4_FILE, VAE_NAME


@dataclass(frozen=True)
class Backend:
    kind: str  # "double" or "live"
    url: str
    unet: str = UNET_FILE
    vae: str = VAE_NAME
    upscalers: tuple[tuple[str, int], ...] = ((UPSCALE_X2_FILE, 2), (UPSCALE_X4_FILE, 4))


DOUBLE_MODELS = {
    "diffusion_models": [UNET_FILE],
    "vae_approx": ["taesd_decoder.safetensors", "taesd_encoder.safetensors"],
    "upscale_models": [UPSCALE_X2_FILE, UPSCALE_X4_FILE],
}


@pytest.fixture(scope="session")
async def session_double() -> AsyncIterator[FakeComfyUI]:
    async with FakeComfyUI(models=DOUBLE_MODELS, step_delay=0.01, name="contract-double") as server:
        yield server


@pytest.fixture(
    scope="session",
    params=["double", pytest.param("live", marks=pytest.mark.comfy_live)],
)
def backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "double":
        server = request.getfixturevalue("session_double")
        return Backend("double", server.url)
    live = request.getfixturevalue("live_comfy")
    models = live.models
    return Backend(
        "live", live.url, models.unet, models.vae, tuple(sorted(models.upscalers.items()))
    )
