from __future__ import annotations

import numpy as np
from PIL import Image

from quality import ClipEvaluator
from quality.notebook import show_scores

from .conftest import png, shape


async def test_gallery_html_shows_images_and_scores(tiny: ClipEvaluator) -> None:
    images = [png(shape("red", "circle")), shape("blue", "star"), Image.new("RGB", (300, 300)),
              np.full((100, 100, 3), np.nan, dtype=np.float32), b"junk"]
    scores = await tiny.score(images, "a photo of a red circle")
    gallery = show_scores(images, scores, threshold=0.3, columns=2)
    page = gallery._repr_html_()
    assert page.count("data:image/png;base64,") == 4  # the junk bytes show as "undecodable"
    assert "undecodable" in page
    assert "tiny-shapes" in page
    assert "a photo of a red circle" in page
    assert f"{max(s.value for s in scores):.3f}" in page
    assert page.index("#1 ") < page.index("#5 ")
    assert page.count("<tr>") == 3
