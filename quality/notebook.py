"""Show images with their scores in a notebook: thumbnails in a grid, each with its parts.

::

    scores = await evaluator.score(images, prompt)
    show_scores(images, scores)          # in Jupyter: the grid renders as the cell's output

:class:`ScoreGallery` renders through ``_repr_html_`` (no IPython import needed); ``to_html()`` gives
the same page for a file.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image

from quality.scores import QualityScore
from quality.technical import decode_image
from quality.types import ImageInput

if TYPE_CHECKING:
    from quality.types import Evaluator

__all__ = ["ScoreGallery", "score_and_show", "show_scores"]


def _thumbnail_data_uri(image: ImageInput, size: int) -> str:
    pil, float_arr = decode_image(image)
    if pil is None and float_arr is not None:
        from quality.technical import check_image

        _, pil = check_image(float_arr)
    if pil is None:
        return ""
    thumb = pil.copy()
    thumb.thumbnail((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    thumb.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


@dataclass(frozen=True, slots=True)
class ScoreGallery:
    """Images and their scores, best first when ``sort`` is set, as an HTML grid."""

    images: Sequence[ImageInput]
    scores: Sequence[QualityScore]
    thumbnail: int = 192
    columns: int = 4
    threshold: float | None = None
    sort: bool = False

    def _cell(self, image: ImageInput, score: QualityScore, rank: int) -> str:
        uri = _thumbnail_data_uri(image, self.thumbnail)
        img = (f'<img src="{uri}" style="width:{self.thumbnail}px;height:auto;display:block"/>' if uri
               else f'<div style="width:{self.thumbnail}px;height:{self.thumbnail}px">undecodable</div>')
        colour = ""
        if self.threshold is not None:
            colour = "#2a7" if score.value >= self.threshold else "#c33"
        parts = "<br/>".join(f"{html.escape(k)}: {v:.3f}" for k, v in score.parts.items())
        failures = ", ".join(str(f) for f in score.technical.failures)
        flag = f'<div style="color:#c33">{html.escape(failures)}</div>' if failures else ""
        return (f'<td style="vertical-align:top;padding:6px;border:2px solid {colour or "#ddd"}">{img}'
                f'<div style="font:13px monospace"><b>#{rank} {score.value:.3f}</b><br/>{parts}{flag}</div></td>')

    def to_html(self) -> str:
        if len(self.images) != len(self.scores):
            raise ValueError("as many scores as images are needed")
        order = list(range(len(self.scores)))
        if self.sort:
            order.sort(key=lambda i: self.scores[i].value, reverse=True)
        cells = [self._cell(self.images[i], self.scores[i], rank + 1) for rank, i in enumerate(order)]
        rows = ["<tr>" + "".join(cells[i:i + self.columns]) + "</tr>"
                for i in range(0, len(cells), self.columns)]
        head = ""
        if self.scores:
            s = self.scores[0]
            head = (f'<div style="font:13px sans-serif">model <b>{html.escape(s.model)}</b> · prompt '
                    f'“{html.escape(s.prompt.cleaned)}”'
                    + (" <i>(cut at the context length)</i>" if s.prompt.truncated else "") + "</div>")
        return head + '<table style="border-collapse:collapse">' + "".join(rows) + "</table>"

    def _repr_html_(self) -> str:
        return self.to_html()


def show_scores(
    images: Sequence[ImageInput],
    scores: Sequence[QualityScore],
    *,
    thumbnail: int = 192,
    columns: int = 4,
    threshold: float | None = None,
    sort: bool = True,
) -> ScoreGallery:
    """A gallery of ``images`` with their ``scores`` (best first); the notebook renders it."""
    return ScoreGallery(images, scores, thumbnail, columns, threshold, sort)


async def score_and_show(
    evaluator: Evaluator,
    images: Sequence[ImageInput],
    prompt: str,
    *,
    negative: str | None = None,
    threshold: float | None = None,
    **gallery: int,
) -> ScoreGallery:
    """Score ``images`` and return the gallery: ``await score_and_show(evaluator, images, prompt)``."""
    scores = await evaluator.score(images, prompt, negative=negative)  # type: ignore[arg-type]
    return show_scores(images, scores, threshold=threshold, **gallery)  # type: ignore[arg-type]
