"""The values that travel between the double's nodes, and what a running node may ask of the server.

As in ComfyUI, IMAGE is a float32 array ``[batch, height, width, channels]`` in 0..1 and MASK a
float32 array ``[batch, height, width]``. Models are stand-ins that carry their file name (all the
deterministic sampler needs); a LATENT carries the picture it will decode to.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from comfy_orchestrator.testing.files import Folders

__all__ = ["Array", "Clip", "Conditioning", "Latent", "Model", "NodeContext", "NodeFn", "NodeResult", "NodeSpec",
           "UpscaleModel", "Vae", "from_pil", "map_images", "resize", "to_pil"]

Array = NDArray[np.float32]
T = TypeVar("T")
_RESAMPLE = {"nearest-exact": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
             "area": Image.Resampling.BOX, "bicubic": Image.Resampling.BICUBIC,
             "lanczos": Image.Resampling.LANCZOS, "bislerp": Image.Resampling.BILINEAR}


@dataclass(frozen=True, slots=True)
class Model:
    name: str


@dataclass(frozen=True, slots=True)
class Clip:
    names: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Vae:
    name: str


@dataclass(frozen=True, slots=True)
class Conditioning:
    text: str


@dataclass(frozen=True, slots=True)
class UpscaleModel:
    name: str
    scale: int


@dataclass(frozen=True, slots=True)
class Latent:
    """A latent of ``width`` x ``height`` pixels; ``pixels`` is what VAEDecode will return."""

    width: int
    height: int
    batch: int
    pixels: Array | None = field(default=None, repr=False)


@dataclass(slots=True)
class NodeResult:
    outputs: tuple[Any, ...] = ()
    ui: dict[str, list[Any]] | None = None


class NodeContext(Protocol):
    """What a running node may ask of the server that runs it."""

    node_id: str
    folders: Folders
    step_delay: float
    state: dict[str, Any]  # per node id, kept while the node stays in the prompts (ComfyUI's objects)

    async def progress(self, value: int, total: int, preview: Image.Image | None = None) -> None: ...

    async def send_text(self, text: str) -> None: ...

    async def work(self, fn: Callable[..., T], *args: Any, pixels: int = 0) -> T: ...


NodeFn = Callable[..., Awaitable[NodeResult]]


@dataclass(frozen=True, slots=True)
class NodeSpec:
    run: NodeFn
    is_changed: Callable[[Mapping[str, Any], Folders], str] | None = None


def to_pil(image: Array) -> Image.Image:
    # Truncates like ComfyUI's SaveImage (np.clip(255. * i, 0, 255).astype(np.uint8)), never rounds.
    data = np.clip(255.0 * image, 0, 255).astype(np.uint8)
    return Image.fromarray(data, "RGBA" if data.shape[-1] == 4 else "RGB")


def from_pil(image: Image.Image) -> Array:
    if image.mode not in ("RGB", "RGBA"):
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.float32) / 255.0


def map_images(images: Array, fn: Callable[[Image.Image], Image.Image]) -> Array:
    return np.stack([from_pil(fn(to_pil(item))) for item in images])


def resize(images: Array, width: int, height: int, method: str, crop: str = "disabled") -> Array:
    def one(item: Image.Image) -> Image.Image:
        if crop == "center":
            w, h = item.size
            old, new = w / h, width / max(height, 1)
            if old > new:
                cut = round(w - w * new / old) // 2
                item = item.crop((cut, 0, w - cut, h))
            elif old < new:
                cut = round(h - h * old / new) // 2
                item = item.crop((0, cut, w, h - cut))
        return item.resize((max(width, 1), max(height, 1)), _RESAMPLE.get(method, Image.Resampling.BILINEAR))

    return map_images(images, one)
