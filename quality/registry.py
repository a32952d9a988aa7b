"""Quality models described as data, like open_clip's own configs: a JSON registry of names.

Each entry names an open_clip architecture, where its weights come from, and the preprocessing
(image size, normalisation). The packaged ``models.json`` holds the production default and the test
models; a user's own JSON file (same shape) adds to it or overrides names.

Weights are kept apart from architectures (as in open_clip's ``pretrained.py``): ``weights`` is a
local file or an open_clip ``local-dir`` folder (a path, relative to the registry file that names
it), an open_clip pretrained tag such as ``"openai"``, ``"hf-hub:org/repo"``, or ``null`` for random
weights.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from quality.errors import UnknownModel

__all__ = [
    "DEFAULT_MODEL",
    "ModelSpec",
    "Registry",
    "WeightsKind",
    "default_registry",
]

#: The production default: OpenAI CLIP ViT-L/14 in fp16 on the GPU. One image pass serves prompt
#: alignment and the LAION aesthetic head, which is built on exactly those embeddings.
DEFAULT_MODEL = "vit-l-14-openai"

_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class WeightsKind(enum.StrEnum):
    LOCAL_FILE = "local-file"  # a .safetensors / .bin / .pt state dict for a built-in architecture
    LOCAL_DIR = "local-dir"  # an open_clip folder: open_clip_config.json + weights
    HUB_TAG = "hub-tag"  # an open_clip pretrained tag ("openai", "laion2b_s32b_b82k")
    HF_HUB = "hf-hub"  # "hf-hub:org/repo", config and weights from the Hugging Face hub
    RANDOM = "random"  # no weights: random initialisation, for shape and speed tests


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One registry entry. ``weights`` paths are already resolved against the registry's folder."""

    name: str
    architecture: str | None
    weights: str | None
    image_size: int
    mean: tuple[float, float, float] = _OPENAI_MEAN
    std: tuple[float, float, float] = _OPENAI_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    embed_dim: int | None = None
    description: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @property
    def weights_kind(self) -> WeightsKind:
        w = self.weights
        if w is None:
            return WeightsKind.RANDOM
        if w.startswith("hf-hub:"):
            return WeightsKind.HF_HUB
        path = Path(w)
        if path.is_dir() or self.architecture is None:
            return WeightsKind.LOCAL_DIR
        if path.is_file() or path.is_absolute() or path.suffix in {".safetensors", ".bin", ".pt", ".pth"}:
            return WeightsKind.LOCAL_FILE
        return WeightsKind.HUB_TAG

    @property
    def weights_id(self) -> str:
        """Names the weights in cache keys: the path (with its size and mtime) or the tag."""
        kind = self.weights_kind
        if kind in (WeightsKind.LOCAL_FILE, WeightsKind.LOCAL_DIR) and self.weights is not None:
            path = Path(self.weights)
            stat_target = path
            if path.is_dir():
                files = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))
                stat_target = files[0] if files else path
            try:
                st = stat_target.stat()
            except OSError:
                return f"{kind}:{path}"
            return f"{kind}:{path}:{st.st_size}:{int(st.st_mtime)}"
        return f"{kind}:{self.weights}"

    @classmethod
    def from_dict(cls, name: str, data: Mapping[str, Any], *, base_dir: Path) -> ModelSpec:
        known = {"architecture", "weights", "image_size", "mean", "std", "interpolation", "resize_mode",
                 "embed_dim", "description"}
        weights = data.get("weights")
        if isinstance(weights, str) and _looks_like_path(weights):
            weights = str((base_dir / Path(weights).expanduser()).resolve())
        return cls(
            name=name,
            architecture=data.get("architecture"),
            weights=weights,
            image_size=int(data["image_size"]),
            mean=_triple(data.get("mean", _OPENAI_MEAN)),
            std=_triple(data.get("std", _OPENAI_STD)),
            interpolation=str(data.get("interpolation", "bicubic")),
            resize_mode=str(data.get("resize_mode", "shortest")),
            embed_dim=data.get("embed_dim"),
            description=str(data.get("description", "")),
            extra={k: v for k, v in data.items() if k not in known},
        )

    def to_dict(self) -> dict[str, Any]:
        return {"architecture": self.architecture, "weights": self.weights, "image_size": self.image_size,
                "mean": list(self.mean), "std": list(self.std), "interpolation": self.interpolation,
                "resize_mode": self.resize_mode, "embed_dim": self.embed_dim,
                "description": self.description, **self.extra}


def _looks_like_path(weights: str) -> bool:
    if weights.startswith("hf-hub:"):
        return False
    return "/" in weights or "\\" in weights or weights.startswith(("~", ".")) or Path(weights).suffix in {
        ".safetensors", ".bin", ".pt", ".pth"}


def _triple(values: Iterable[float]) -> tuple[float, float, float]:
    a, b, c = (float(v) for v in values)
    return (a, b, c)


@dataclass(frozen=True, slots=True)
class Registry:
    """Model specs by name. Build one with :meth:`load`; it is a plain value, never global state."""

    models: Mapping[str, ModelSpec]

    @classmethod
    def load(cls, *paths: str | Path, include_packaged: bool = True) -> Registry:
        """The packaged registry, then each file in order (later names override earlier ones)."""
        models: dict[str, ModelSpec] = {}
        if include_packaged:
            packaged = resources.files("quality").joinpath("models.json")
            with resources.as_file(packaged) as packaged_path:
                models.update(_read(packaged_path))
        for path in paths:
            models.update(_read(Path(path)))
        return cls(models)

    def get(self, name: str) -> ModelSpec:
        try:
            return self.models[name]
        except KeyError:
            raise UnknownModel(name, sorted(self.models)) from None

    def names(self) -> list[str]:
        return sorted(self.models)

    def __contains__(self, name: object) -> bool:
        return name in self.models


def _read(path: Path) -> dict[str, ModelSpec]:
    data = json.loads(path.read_text(encoding="utf-8"))
    entries = data.get("models", data)
    base = path.resolve().parent
    return {name: ModelSpec.from_dict(name, entry, base_dir=base)
            for name, entry in entries.items() if not name.startswith("$")}


def default_registry() -> Registry:
    """The packaged registry (read from disk on each call; keep the value you need)."""
    return Registry.load()
