"""Loading a registry model: weights without network, the device and dtype, one load per process.

* Device: CUDA when present (fp16 by default, bf16 on request), else CPU in fp32.
* Weights: a local file or folder loads with no network at all. A hub tag is resolved from the hub's
  local cache first; the hub itself is asked only when this machine can reach it (``HF_HUB_OFFLINE``
  unset and a TCP connection to it opens); otherwise :class:`~quality.errors.WeightsUnavailable`
  says which file to fetch and where to point the registry.
* The model is put in eval mode and only ever run under ``torch.inference_mode()``.
* :class:`ModelCache` loads each (model, device, precision) once; :func:`shared_model_cache` is the
  process-wide one that evaluators use unless given their own.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from PIL import Image

from quality.errors import WeightsUnavailable
from quality.registry import ModelSpec, WeightsKind
from quality.tower import FusedImageTower

__all__ = [
    "DeviceChoice",
    "LoadedModel",
    "ModelCache",
    "Precision",
    "choose_device",
    "hub_reachable",
    "load_model",
    "shared_model_cache",
]

logger = logging.getLogger(__name__)

Precision = Literal["fp32", "fp16", "bf16"]
_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_HUB_HOST = "huggingface.co"


@dataclass(frozen=True, slots=True)
class DeviceChoice:
    device: torch.device
    precision: Precision

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.precision]


def choose_device(device: str | torch.device | None = None, precision: Precision | None = None) -> DeviceChoice:
    """CUDA when present with fp16 (or the precision asked for), else CPU in fp32.

    Half precision on a CPU is refused: it is slower there and not what scores were calibrated on.
    """
    if device is None:
        dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    else:
        dev = torch.device(device)
    if dev.type == "cuda":
        prec: Precision = precision or "fp16"
        if prec == "bf16" and not torch.cuda.is_bf16_supported():
            logger.warning("bf16 asked for on a GPU without it; using fp16")
            prec = "fp16"
    else:
        if precision not in (None, "fp32"):
            raise ValueError(f"precision {precision!r} on {dev.type}: only fp32 is supported off the GPU")
        prec = "fp32"
    return DeviceChoice(dev, prec)


def hub_reachable(host: str = _HUB_HOST, timeout: float = 2.0) -> bool:
    """Whether the model hub may be used: not forbidden by ``HF_HUB_OFFLINE``, and its port opens."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


@dataclass(frozen=True, slots=True, eq=False)
class LoadedModel:
    """An open_clip model ready for inference, with what it needs to encode images and texts."""

    spec: ModelSpec
    model: torch.nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[..., torch.Tensor]
    device: torch.device
    precision: Precision
    context_length: int
    embed_dim: int
    #: Names these weights in cache keys (for random weights: this very instance).
    weights_id: str
    #: The image tower's forward with fused attention (:mod:`quality.tower`), or None: open_clip's own.
    image_tower: torch.nn.Module | None = None

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.precision]

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings, float32 on the CPU, for a ``[N, 3, H, W]`` float batch."""
        pixels = pixels.to(self.device, dtype=self.dtype, non_blocking=True)
        if self.image_tower is not None:
            out = F.normalize(self.image_tower(pixels), dim=-1)
        else:
            out = self.model.encode_image(pixels, normalize=True)  # type: ignore[operator]
        return out.float().cpu()

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """L2-normalised text embeddings, float32 on the CPU (texts longer than the context are cut)."""
        tokens = self.tokenizer(texts).to(self.device, non_blocking=True)
        out = self.model.encode_text(tokens, normalize=True)  # type: ignore[operator]
        return out.float().cpu()  # type: ignore[no-any-return]


def _hub_cached_file(architecture: str, tag: str) -> str | None:
    """The weights of an open_clip pretrained tag if they already lie in the hub's local cache."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(architecture, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(architecture)
        raise WeightsUnavailable(f"{architecture} has no pretrained tag {tag!r}; open_clip knows {tags}")
    if cfg.get("file"):
        return str(cfg["file"])
    hub_id = str(cfg.get("hf_hub", ""))
    if not hub_id:
        return None
    from huggingface_hub import try_to_load_from_cache

    repo_id, filename = os.path.split(hub_id.rstrip("/") if hub_id.endswith("/") else hub_id)
    if hub_id.endswith("/"):
        repo_id, filename = hub_id.rstrip("/"), ""
    candidates = [filename] if filename else []
    candidates += ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    for name in candidates:
        found = try_to_load_from_cache(repo_id=repo_id, filename=name)
        if isinstance(found, str):
            return found
    return None


def _creation_args(spec: ModelSpec) -> tuple[str, str | None]:
    """(model_name, pretrained) for ``open_clip.create_model``: no call here touches the network."""
    kind = spec.weights_kind
    if kind is WeightsKind.RANDOM:
        assert spec.architecture is not None
        return spec.architecture, None
    assert spec.weights is not None
    if kind is WeightsKind.LOCAL_DIR:
        folder = Path(spec.weights)
        if not (folder / "open_clip_config.json").is_file():
            raise WeightsUnavailable(f"model {spec.name!r}: no open_clip folder at {folder}")
        return f"local-dir:{folder}", None
    if spec.architecture is None:
        raise WeightsUnavailable(f"model {spec.name!r}: weights {spec.weights!r} need an architecture")
    if kind is WeightsKind.LOCAL_FILE:
        if not Path(spec.weights).is_file():
            raise WeightsUnavailable(f"model {spec.name!r}: no weights file at {spec.weights}")
        return spec.architecture, spec.weights
    if kind is WeightsKind.HUB_TAG:
        cached = _hub_cached_file(spec.architecture, spec.weights)
        if cached is not None:
            logger.info("model %s: weights %r from the hub's local cache %s", spec.name, spec.weights, cached)
            return spec.architecture, cached
    if not hub_reachable():
        raise WeightsUnavailable(
            f"model {spec.name!r}: weights {spec.weights!r} ({spec.architecture}) are not on this machine "
            "and the model hub cannot be reached (or HF_HUB_OFFLINE is set). Download them where the hub "
            "is reachable and set this model's \"weights\" to the local file in a registry JSON."
        )
    if kind is WeightsKind.HF_HUB:
        return spec.weights, None
    return spec.architecture, spec.weights


def load_model(
    spec: ModelSpec,
    *,
    device: str | torch.device | None = None,
    precision: Precision | None = None,
) -> LoadedModel:
    """Build ``spec``'s model on the chosen device, in eval mode, with its preprocessing and tokenizer."""
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    choice = choose_device(device, precision)
    model_name, pretrained = _creation_args(spec)
    preprocess_cfg: dict[str, Any] = {"mean": spec.mean, "std": spec.std,
                                      "interpolation": spec.interpolation, "resize_mode": spec.resize_mode}
    model = open_clip.create_model(
        model_name,
        pretrained=pretrained,
        precision=choice.precision,
        device=choice.device,
        force_preprocess_cfg=preprocess_cfg,
        pretrained_text=False,  # never fetch a text tower's base weights
    )
    preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(model_name)
    size = getattr(model.visual, "image_size", spec.image_size)
    size = size[0] if isinstance(size, tuple | list) else size
    if int(size) != spec.image_size:
        raise ValueError(f"model {spec.name!r}: registry says {spec.image_size} px, the model takes {size} px")
    context_length = int(getattr(model, "context_length", 77) or 77)
    embed_dim = int(model.text_projection.shape[-1]) if isinstance(
        getattr(model, "text_projection", None), torch.Tensor) else int(spec.embed_dim or 0)
    weights_id = spec.weights_id
    if spec.weights_kind is WeightsKind.RANDOM:
        weights_id = f"random@{id(model):x}"
    logger.info("model %s loaded on %s in %s (%s)", spec.name, choice.device, choice.precision, weights_id)
    return LoadedModel(spec, model, preprocess, tokenizer, choice.device, choice.precision,
                       context_length, embed_dim, weights_id, FusedImageTower.wrap(model))


class ModelCache:
    """Loads each (model, device, precision) once and hands the same :class:`LoadedModel` back."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[tuple[ModelSpec, str, str], LoadedModel] = {}
        self._key_locks: dict[tuple[ModelSpec, str, str], threading.Lock] = {}

    def get(self, spec: ModelSpec, *, device: str | torch.device | None = None,
            precision: Precision | None = None) -> LoadedModel:
        choice = choose_device(device, precision)
        key = (spec, str(choice.device), choice.precision)
        with self._lock:
            if key in self._models:
                return self._models[key]
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:  # one load per key, other keys load in parallel
            with self._lock:
                if key in self._models:
                    return self._models[key]
            loaded = load_model(spec, device=choice.device, precision=choice.precision)
            with self._lock:
                self._models[key] = loaded
            return loaded

    def __len__(self) -> int:
        with self._lock:
            return len(self._models)

    def clear(self) -> None:
        with self._lock:
            self._models.clear()


@functools.cache
def shared_model_cache() -> ModelCache:
    """The process-wide model cache (created on first use, never at import)."""
    return ModelCache()
