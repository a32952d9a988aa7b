"""The double's deterministic "diffusion": what KSampler draws, and when it gets the prompt right.

The rule, which tests can predict with ``sampler_succeeds`` and ``expected_spec``:

* A sample *succeeds* iff ``h % 4 < min(3, steps // 10 + 1)`` where ``h`` is the first 8 bytes
  (big-endian) of ``sha256(f"{model}\\x00{seed}")``. So 1-9 steps succeed for 1 seed in 4,
  10-19 steps for 2 in 4, 20 steps and more for 3 in 4; a given (seed, model) that succeeds with
  few steps also succeeds with more. ``model`` is the model name KSampler receives (the
  checkpoint or UNet file name, with ``+lora:strength`` appended per LoraLoader).
* If the positive prompt names a colour and a shape (``shapes.parse_shape_prompt``), a success
  draws exactly that shape in that colour; a failure draws a different shape in a different
  colour (``wrong_spec``). Without a shape prompt the image is an abstract colour field.
* Item ``i`` of a batch uses ``seed + i``.
* Every pixel is a pure function of (positive text, seed, steps, cfg, sampler, scheduler, model,
  width, height, denoise): the same inputs give the same bytes. With ``denoise < 1`` on a latent
  that holds an image (VAEEncode), the result is that image blended with the drawing, weighted
  by ``denoise``.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

from comfy_orchestrator.testing.shapes import COLOURS, SHAPES, ShapeSpec, draw_shape, parse_shape_prompt

__all__ = ["SampleRequest", "expected_spec", "render_sample", "sampler_succeeds", "wrong_spec"]


def _digest(*parts: object) -> bytes:
    return hashlib.sha256("\x00".join(str(p) for p in parts).encode()).digest()


def sampler_succeeds(seed: int, model: str, steps: int) -> bool:
    """Whether KSampler draws what the prompt asks for (see the module docstring)."""
    h = int.from_bytes(_digest(model, seed)[:8], "big")
    return h % 4 < min(3, steps // 10 + 1)


def wrong_spec(spec: ShapeSpec, seed: int, model: str) -> ShapeSpec:
    """The shape drawn instead of ``spec`` when a sample fails: another colour and another shape."""
    h = int.from_bytes(_digest("wrong", model, seed)[:8], "big")
    colours = [c for c in COLOURS if c != spec.colour]
    shapes = [s for s in SHAPES if s != spec.shape]
    return ShapeSpec(colours[h % len(colours)], shapes[(h // 7) % len(shapes)])


def expected_spec(text: str, seed: int, model: str, steps: int) -> ShapeSpec | None:
    """The shape KSampler will draw for this prompt text, or None when the text names none."""
    spec = parse_shape_prompt(text)
    if spec is None:
        return None
    return spec if sampler_succeeds(seed, model, steps) else wrong_spec(spec, seed, model)


@dataclass(frozen=True, slots=True)
class SampleRequest:
    text: str
    seed: int
    steps: int
    model: str
    width: int
    height: int
    denoise: float = 1.0
    cfg: float = 8.0
    sampler_name: str = "euler"
    scheduler: str = "normal"

    def rng(self) -> random.Random:
        return random.Random(_digest(self.text, self.seed, self.steps, self.model, self.width,
                                     self.height, self.denoise, self.cfg, self.sampler_name,
                                     self.scheduler))


def _abstract(request: SampleRequest) -> Image.Image:
    """A smooth colour field: an 8x8 grid of seeded colours, upscaled."""
    rng = np.random.default_rng(int.from_bytes(request.rng().randbytes(8), "big"))
    grid = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    return Image.fromarray(grid, "RGB").resize((request.width, request.height), Image.Resampling.BICUBIC)


def render_sample(request: SampleRequest, init: Image.Image | None = None) -> Image.Image:
    """Draw what the sampler "generates" for ``request``, optionally over an init image."""
    spec = expected_spec(request.text, request.seed, request.model, request.steps)
    if spec is None:
        image = _abstract(request)
    else:
        side = max(request.width, request.height)
        square = draw_shape(spec, side, request.rng())
        left, top = (side - request.width) // 2, (side - request.height) // 2
        image = square.crop((left, top, left + request.width, top + request.height))
    if init is not None and request.denoise < 1.0:
        base = init.convert("RGB").resize(image.size, Image.Resampling.BILINEAR)
        image = Image.blend(base, image, max(0.0, request.denoise))
    return image


def preview_frame(final: Image.Image, step: int, steps: int, seed: int) -> Image.Image:
    """A small, noisy look at the sample after ``step`` of ``steps`` (for the preview frames)."""
    small = final.copy()
    small.thumbnail((64, 64))
    rng = np.random.default_rng(seed % (2**63) + step)
    noise = rng.integers(0, 256, size=(small.height, small.width, 3), dtype=np.uint8)
    return Image.blend(Image.fromarray(noise, "RGB"), small, step / max(steps, 1))
