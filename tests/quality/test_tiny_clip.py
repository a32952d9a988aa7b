"""The proof that the evaluator discriminates, offline: the shipped tiny CLIP on held-out drawings."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

from comfy_orchestrator.testing.shapes import COLOURS, SHAPES, ShapeSpec, caption, draw_shape
from quality import ClipEvaluator, default_registry

from .conftest import CLASS_CAPTIONS, draw_example, png


def test_fixture_is_small_fp16_and_loadable_as_local_dir() -> None:
    spec = default_registry().get("tiny-shapes")
    folder = Path(spec.weights or "")
    weights = folder / "open_clip_model.safetensors"
    assert (folder / "open_clip_config.json").is_file()
    assert weights.stat().st_size < 8 * 1024 * 1024
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        dtypes = {str(f.get_slice(k).get_dtype()) for k in f.keys()}  # noqa: SIM118
    assert dtypes == {"F16"}
    report = json.loads((folder / "train_report.json").read_text())
    assert report["heldout_top1_512px"] >= 0.9


async def test_ranks_the_matching_caption_first_on_held_out_images(tiny: ClipEvaluator) -> None:
    rng = random.Random(2024)  # not the training stream (seed 0) nor the report's (12345)
    labels = [c for c in range(len(CLASS_CAPTIONS)) for _ in range(4)]
    images = [png(draw_example(c, 512, rng)) for c in labels]
    sims = await tiny.similarities(images, list(CLASS_CAPTIONS))
    top1 = float((sims.argmax(axis=1) == np.array(labels)).mean())
    assert top1 >= 0.9, f"held-out top-1 {top1:.3f}"


async def test_matching_prompt_outscores_a_wrong_colour_or_shape(tiny: ClipEvaluator) -> None:
    rng = random.Random(77)
    wins = total = 0
    for colour in COLOURS:
        for kind in SHAPES:
            image = draw_shape(ShapeSpec(colour, kind), 512, rng)
            other_colour = next(c for c in COLOURS if c != colour)
            other_shape = next(s for s in SHAPES if s != kind)
            right = (await tiny.score([image], caption(ShapeSpec(colour, kind))))[0].value
            for wrong in (ShapeSpec(other_colour, kind), ShapeSpec(colour, other_shape)):
                total += 1
                wins += right > (await tiny.score([image], caption(wrong)))[0].value
    assert wins / total >= 0.9


async def test_best_of_n_picks_the_image_that_matches(tiny: ClipEvaluator) -> None:
    """A gate's use: several candidates for one prompt; the right one ranks first, the blank one last."""
    from PIL import Image

    rng = random.Random(5)
    candidates = [
        draw_shape(ShapeSpec("blue", "circle"), 512, rng),
        draw_shape(ShapeSpec("red", "square"), 512, rng),
        draw_shape(ShapeSpec("red", "circle"), 512, rng),
        draw_example(len(CLASS_CAPTIONS) - 1, 512, rng),  # text
        Image.new("RGB", (512, 512), (235, 235, 235)),  # blank
    ]
    scores = await tiny.score(candidates, "a photo of a red circle")
    values = [s.value for s in scores]
    assert int(np.argmax(values)) == 2
    assert scores[4].value == 0.0
    assert scores[4].parts == {"technical": 0.0}
    assert all(s.parts["alignment"] >= 0 for s in scores[:4])
