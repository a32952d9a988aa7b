"""Shared fixtures. Live-ComfyUI fixtures come from tests/live_fixtures.py (marker ``comfy_live``)."""

from __future__ import annotations

import os
from pathlib import Path

# No test may download weights; without this a missing hub weight retries for a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

pytest_plugins = ["tests.live_fixtures"]

REPO = Path(__file__).resolve().parent.parent
PROTOCOL_DIR = Path(os.environ.get("COMFY_PROTOCOL_DIR", REPO.parent / "shared" / "comfyui-protocol"))
GRAPHS_DIR = REPO / "graphs"
