"""Every template in graphs/ fits a real ComfyUI's node classes and inputs."""

from __future__ import annotations

from pathlib import Path

import pytest

from comfy_orchestrator.client import ComfyClient
from comfy_orchestrator.graph import Template, check_template_against_object_info
from tests.conftest import GRAPHS_DIR

TEMPLATES = sorted(GRAPHS_DIR.glob("*.json"))


@pytest.mark.comfy_live
async def test_every_template_fits_a_real_server(live_comfy) -> None:
    assert len(TEMPLATES) >= 12
    async with ComfyClient(live_comfy.url) as client:
        info = await client.object_info()
    problems: dict[str, list[str]] = {}
    for path in TEMPLATES:
        found = check_template_against_object_info(Template.load(path), info)
        if found:
            problems[Path(path).name] = found
    assert problems == {}
