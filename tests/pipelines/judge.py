"""A deterministic evaluator for the test double's pictures, driven by the image bytes alone.

It finds the palette colour (``testing.shapes.COLOURS``) covering most pixels and classifies that
blob's shape by how much of its bounding box it fills (square ≈ 1, circle ≈ π/4, triangle ≈ ½,
star ≈ 0.38), then compares both with what the prompt names: ``value`` is 0.5 per match.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from comfy_orchestrator.testing import COLOURS, ShapeSpec, parse_shape_prompt

_PALETTE = np.array(list(COLOURS.values()), dtype=np.int32)
_NAMES = list(COLOURS)


@dataclass(frozen=True)
class JudgeScore:
    value: float
    parts: Mapping[str, float] = field(default_factory=dict)
    seen: ShapeSpec | None = None


def look(image: bytes | Image.Image) -> ShapeSpec | None:
    """The colour and shape drawn in ``image``, or None when no palette colour covers 1 % of it."""
    if isinstance(image, bytes):
        with Image.open(io.BytesIO(image)) as opened:
            image = opened.convert("RGB")
    pixels = np.asarray(image.convert("RGB"), dtype=np.int32)
    distance = np.abs(pixels[:, :, None, :] - _PALETTE[None, None, :, :]).sum(axis=3)
    nearest = distance.argmin(axis=2)
    close = distance.min(axis=2) < 60
    counts = np.bincount(nearest[close], minlength=len(_NAMES))
    best = int(counts.argmax())
    if counts[best] < 0.01 * close.size:
        return None
    mask = close & (nearest == best)
    ys, xs = np.nonzero(mask)
    fill = mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    shape = "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle" if fill > 0.44 else "star"
    return ShapeSpec(_NAMES[best], shape)


class ShapeJudge:
    """The ``Evaluator`` protocol over :func:`look`; counts its calls and images."""

    def __init__(self) -> None:
        self.calls = 0
        self.images = 0

    async def score(self, images: Sequence[bytes | Image.Image], prompt: str, *,
                    negative: str | None = None) -> list[JudgeScore]:
        self.calls += 1
        self.images += len(images)
        wanted = parse_shape_prompt(prompt)
        scores = []
        for image in images:
            seen = look(image)
            colour = float(wanted is not None and seen is not None and seen.colour == wanted.colour)
            shape = float(wanted is not None and seen is not None and seen.shape == wanted.shape)
            scores.append(JudgeScore(0.5 * colour + 0.5 * shape, {"colour": colour, "shape": shape}, seen))
        return scores
