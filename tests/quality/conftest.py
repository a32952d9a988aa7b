"""Fixtures of the quality tests. No test downloads anything: the hub is off for the whole session."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import io
import random
from collections.abc import Iterator

import pytest
from PIL import Image

from comfy_orchestrator.testing.shapes import ShapeSpec, draw_shape
from quality import ClipEvaluator, Registry, default_registry
from quality.train_tiny import CLASS_CAPTIONS, draw_example, draw_text

TINY = "tiny-shapes"


@pytest.fixture(scope="session")
def registry() -> Registry:
    return default_registry()


@pytest.fixture(scope="session")
def tiny() -> Iterator[ClipEvaluator]:
    """The tiny shapes CLIP on the CPU, loaded once for the session (shared with other evaluators)."""
    evaluator = ClipEvaluator(TINY, device="cpu")
    evaluator.load()
    return evaluator


@pytest.fixture(scope="session")
def vit_b32() -> Iterator[ClipEvaluator]:
    """A full-size architecture with random weights: for loading, batching and shapes, not ranking."""
    evaluator = ClipEvaluator("vit-b-32-random", device="cpu")
    evaluator.load()
    return evaluator


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def shape(colour: str, kind: str, *, size: int = 512, seed: int = 0) -> Image.Image:
    return draw_shape(ShapeSpec(colour, kind), size, random.Random(seed))


def text_image(*, size: int = 512, seed: int = 0) -> Image.Image:
    return draw_text(size, random.Random(seed))


__all__ = ["CLASS_CAPTIONS", "TINY", "draw_example", "png", "shape", "text_image"]
