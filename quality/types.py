"""Aliases of the quality package. Only types live here.

``Evaluator`` — what a pipeline's score, gate and quality-loop steps call — is defined once, by the
pipelines that depend on it (``comfy_orchestrator.pipelines.types``), and re-exported here, lazily:
importing ``quality`` does not load the orchestrator. :class:`quality.ClipEvaluator` satisfies it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
import numpy.typing as npt
from PIL import Image

if TYPE_CHECKING:
    from comfy_orchestrator.pipelines.types import Evaluator

__all__ = ["Evaluator", "ImageInput"]

#: An image as a pipeline holds it: encoded bytes (PNG, JPEG, WebP…), a decoded PIL image, or an
#: ``H×W×C`` array (uint8, or float in 0..1 such as a decoded VAE output, where NaN can show up).
ImageInput: TypeAlias = bytes | Image.Image | npt.NDArray[np.generic]


def __getattr__(name: str) -> Any:
    if name == "Evaluator":
        from comfy_orchestrator.pipelines.types import Evaluator

        return Evaluator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
