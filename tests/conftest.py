"""Shared fixtures. Live-ComfyUI fixtures come from tests/live_fixtures.py (marker ``comfy_live``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

# No test may download weights; without this a missing hub weight retries for a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

pytest_plugins = ["tests.live_fixtures"]

REPO = Path(__file__).resolve().parent.parent
PROTOCOL_DIR = Path(os.environ.get("COMFY_PROTOCOL_DIR", REPO.parent / "shared" / "comfyui-protocol"))


def require_recordings() -> None:
    """Skip the calling test module when the ComfyUI protocol recordings are not in this checkout."""
    if not (PROTOCOL_DIR / "invalid.json").is_file():  # pragma: no cover - depends on the checkout
        pytest.skip(f"ComfyUI protocol recordings not found at {PROTOCOL_DIR} (set COMFY_PROTOCOL_DIR)",
                    allow_module_level=True)
GRAPHS_DIR = REPO / "graphs"


@pytest.fixture(scope="session")
def object_info() -> dict[str, Any]:
    """The full /object_info recorded from a real ComfyUI 0.3.64 (CPU, no model files)."""
    path = PROTOCOL_DIR / "object_info.json"
    if not path.is_file():  # pragma: no cover - depends on the checkout
        pytest.skip(f"no recorded /object_info at {path}")
    info: dict[str, Any] = json.loads(path.read_text())
    return info
