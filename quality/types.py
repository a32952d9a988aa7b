"""Aliases and the protocol a quality-gated pipeline depends on. Only types live here."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, TypeAlias

import numpy as np
import numpy.typing as npt
from PIL import Image

if TYPE_CHECKING:
    from quality.scores import QualityScore

__all__ = ["Evaluator", "ImageInput"]

#: An image as a pipeline holds it: encoded bytes (PNG, JPEG, WebP…), a decoded PIL image, or an
#: ``H×W×C`` array (uint8, or float in 0..1 such as a decoded VAE output, where NaN can show up).
ImageInput: TypeAlias = bytes | Image.Image | npt.NDArray[np.generic]


class Evaluator(Protocol):
    """Scores images against the prompt they were generated from: one score per image, in order.

    A gate reads ``score.value`` (the combined score) and ``score.parts`` (what it was made of).
    """

    async def score(
        self,
        images: Sequence[bytes | Image.Image],
        prompt: str,
        *,
        negative: str | None = None,
    ) -> list[QualityScore]: ...
