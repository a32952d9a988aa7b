"""Procedural pictures: a coloured shape on a plain background, drawn with Pillow.

Shared by the test double's deterministic sampler (which draws what a prompt names, right or wrong
depending on the seed) and by the training data of the project's tiny CLIP, so that the evaluator
and the double speak the same small visual vocabulary.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

from PIL import Image, ImageDraw

__all__ = ["COLOURS", "SHAPES", "ShapeSpec", "caption", "draw_shape", "parse_shape_prompt"]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 180),
    "orange": (245, 140, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")


@dataclass(frozen=True, slots=True)
class ShapeSpec:
    colour: str
    shape: str


def caption(spec: ShapeSpec) -> str:
    return f"a photo of a {spec.colour} {spec.shape}"


def parse_shape_prompt(text: str) -> ShapeSpec | None:
    """The first colour and the first shape a prompt names, or None when it names neither pair."""
    words = re.findall(r"[a-z]+", text.lower())
    colour = next((w for w in words if w in COLOURS), None)
    shape = next((w for w in words if w in SHAPES), None)
    if colour is None or shape is None:
        return None
    return ShapeSpec(colour, shape)


def draw_shape(spec: ShapeSpec, size: int, rng: random.Random) -> Image.Image:
    """Draw ``spec`` at a random place and scale on a light, slightly noisy background."""
    bg = tuple(rng.randint(200, 250) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    radius = size * rng.uniform(0.22, 0.38)
    cx = size / 2 + rng.uniform(-0.1, 0.1) * size
    cy = size / 2 + rng.uniform(-0.1, 0.1) * size
    fill = tuple(max(0, min(255, c + rng.randint(-15, 15))) for c in COLOURS[spec.colour])
    if spec.shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    elif spec.shape == "square":
        draw.rectangle((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    elif spec.shape == "triangle":
        pts = [(cx + radius * math.cos(a), cy + radius * math.sin(a))
               for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        draw.polygon(pts, fill=fill)
    elif spec.shape == "star":
        pts = []
        for i in range(10):
            r = radius if i % 2 == 0 else radius * 0.45
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
        draw.polygon(pts, fill=fill)
    else:
        raise ValueError(f"unknown shape {spec.shape!r}; expected one of {SHAPES}")
    return img
