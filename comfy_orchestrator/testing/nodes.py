"""The nodes the double really executes, with Pillow and numpy, and their /object_info entries.

Values travel between nodes as ComfyUI's do: IMAGE is a float32 array ``[batch, height, width,
channels]`` in 0..1, MASK a float32 array ``[batch, height, width]``. Models are stand-ins that
carry their file name (which is all the deterministic sampler needs); a LATENT carries the
picture it will decode to. ``NODES`` maps each class_type to its implementation, ``object_info()``
builds the entries a real 0.3.64 server serves for them, loader option lists filled from the
configured models.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from comfy_orchestrator.testing import _object_info
from comfy_orchestrator.testing.image_nodes import IMAGE_NODES
from comfy_orchestrator.testing.model_nodes import MODEL_NODES, upscale_factor
from comfy_orchestrator.testing.values import NodeSpec

__all__ = ["LOADER_FOLDERS", "NODES", "object_info", "upscale_factor"]

# loader class -> {input name: models folder}
LOADER_FOLDERS: dict[str, dict[str, str]] = {
    "CheckpointLoaderSimple": {"ckpt_name": "checkpoints"},
    "UNETLoader": {"unet_name": "diffusion_models"},
    "CLIPLoader": {"clip_name": "text_encoders"},
    "DualCLIPLoader": {"clip_name1": "text_encoders", "clip_name2": "text_encoders"},
    "VAELoader": {"vae_name": "vae"},
    "LoraLoader": {"lora_name": "loras"},
    "UpscaleModelLoader": {"model_name": "upscale_models"},
}

NODES: dict[str, NodeSpec] = {**IMAGE_NODES, **MODEL_NODES}


def object_info(models: Mapping[str, Sequence[str]], input_images: Sequence[str]) -> dict[str, Any]:
    """The /object_info of the double: real 0.3.64 entries, option lists from ``models``."""
    info: dict[str, Any] = json.loads(_object_info.OBJECT_INFO_JSON)
    for class_type, inputs in LOADER_FOLDERS.items():
        for name, folder in inputs.items():
            options = _vae_options(models) if class_type == "VAELoader" else list(models.get(folder, ()))
            _set_options(info[class_type]["input"]["required"][name], options)
    _set_options(info["LoadImage"]["input"]["required"]["image"], list(input_images))
    return info


def _vae_options(models: Mapping[str, Sequence[str]]) -> list[str]:
    """VAELoader's list: ``vae`` files, the TAESD pairs found in ``vae_approx``, then pixel_space."""
    options = list(models.get("vae", ()))
    approx = list(models.get("vae_approx", ()))
    for name in ("taesd", "taesdxl", "taesd3", "taef1"):
        if any(f.startswith(f"{name}_encoder.") for f in approx) and any(
                f.startswith(f"{name}_decoder.") for f in approx):
            options.append(name)
    return [*options, "pixel_space"]


def _set_options(spec: list[Any], options: list[str]) -> None:
    if spec[0] == "COMBO":
        spec[1]["options"] = options
    else:
        spec[0] = options
