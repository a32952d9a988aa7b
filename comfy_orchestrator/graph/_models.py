"""Which model files a graph names, by model folder: what a backend must have to run it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

__all__ = ["LOADER_INPUTS", "model_file_present", "model_input_folder", "model_references_of"]

# Built-in loader class -> (input name -> model folder of ComfyUI's models/ tree).
LOADER_INPUTS: Mapping[str, Mapping[str, str]] = MappingProxyType({
    "CheckpointLoaderSimple": {"ckpt_name": "checkpoints"},
    "CheckpointLoader": {"ckpt_name": "checkpoints", "config_name": "configs"},
    "ImageOnlyCheckpointLoader": {"ckpt_name": "checkpoints"},
    "unCLIPCheckpointLoader": {"ckpt_name": "checkpoints"},
    "DiffusersLoader": {"model_path": "diffusers"},
    "UNETLoader": {"unet_name": "diffusion_models"},
    "VAELoader": {"vae_name": "vae"},
    "LoraLoader": {"lora_name": "loras"},
    "LoraLoaderModelOnly": {"lora_name": "loras"},
    "CLIPLoader": {"clip_name": "text_encoders"},
    "DualCLIPLoader": {"clip_name1": "text_encoders", "clip_name2": "text_encoders"},
    "TripleCLIPLoader": {
        "clip_name1": "text_encoders", "clip_name2": "text_encoders", "clip_name3": "text_encoders",
    },
    "QuadrupleCLIPLoader": {
        "clip_name1": "text_encoders", "clip_name2": "text_encoders",
        "clip_name3": "text_encoders", "clip_name4": "text_encoders",
    },
    "CLIPVisionLoader": {"clip_name": "clip_vision"},
    "ControlNetLoader": {"control_net_name": "controlnet"},
    "DiffControlNetLoader": {"control_net_name": "controlnet"},
    "UpscaleModelLoader": {"model_name": "upscale_models"},
    "StyleModelLoader": {"style_model_name": "style_models"},
    "GLIGENLoader": {"gligen_name": "gligen"},
    "HypernetworkLoader": {"hypernetwork_name": "hypernetworks"},
    "PhotoMakerLoader": {"photomaker_model_name": "photomaker"},
    "ModelPatchLoader": {"name": "model_patches"},
    "AudioEncoderLoader": {"audio_encoder_name": "audio_encoders"},
})

# For loaders not in the table (custom nodes): input names that say which folder they read.
_BY_INPUT_NAME: Mapping[str, str] = MappingProxyType({
    "ckpt_name": "checkpoints",
    "unet_name": "diffusion_models",
    "lora_name": "loras",
    "vae_name": "vae",
    "control_net_name": "controlnet",
    "clip_name1": "text_encoders",
    "clip_name2": "text_encoders",
    "clip_name3": "text_encoders",
    "clip_name4": "text_encoders",
    "upscale_model_name": "upscale_models",
    "style_model_name": "style_models",
})

# VAELoader offers these names when the TAESD encoder/decoder pair is in models/vae_approx/.
_VAE_APPROX = frozenset({"taesd", "taesdxl", "taesd3", "taef1"})
# ... and lists video TAE files of models/vae_approx/ under their own file names.
_VIDEO_TAE_PREFIXES = ("taehv", "lighttaew2_2", "lighttaew2_1", "lighttaehy1_5")
_NO_FILE = frozenset({"pixel_space", "None", ""})


def model_input_folder(
    class_type: str, input_name: str, object_info: Mapping[str, Any] | None = None
) -> str | None:
    """The model folder an input of a node reads from, or None when it names no model file."""
    known = LOADER_INPUTS.get(class_type)
    if known is not None:
        return known.get(input_name)
    folder = _BY_INPUT_NAME.get(input_name)
    if folder is None or object_info is None:
        return folder
    info = object_info.get(class_type) or {}
    spec = info.get("input") or {}
    entry = (spec.get("required") or {}).get(input_name) or (spec.get("optional") or {}).get(input_name)
    if not entry:
        return None
    kind = entry[0]
    return folder if isinstance(kind, list) or kind == "COMBO" else None


def model_references_of(
    nodes: Mapping[str, Mapping[str, Any]], object_info: Mapping[str, Any] | None = None
) -> dict[str, set[str]]:
    """Model folder -> file names, for every constant loader input of ``nodes`` (API format)."""
    found: dict[str, set[str]] = {}
    for node in nodes.values():
        class_type = node.get("class_type")
        if not isinstance(class_type, str):
            continue
        for input_name, value in (node.get("inputs") or {}).items():
            if not isinstance(value, str) or value in _NO_FILE:
                continue
            folder = model_input_folder(class_type, input_name, object_info)
            if folder is None:
                continue
            if folder == "vae" and (value in _VAE_APPROX or value.startswith(_VIDEO_TAE_PREFIXES)):
                folder = "vae_approx"
            found.setdefault(folder, set()).add(value)
    return found


def model_file_present(folder: str, name: str, files: Iterable[str]) -> bool:
    """Whether ``name`` (as :func:`model_references_of` reports it) is among a server's ``files`` of ``folder``.

    ``files`` is what ``GET /models/{folder}`` lists. A TAESD name in ``vae_approx`` (``taesd``)
    needs both ``taesd_encoder.*`` and ``taesd_decoder.*``, as ComfyUI's VAELoader does; other
    names must be listed as they are (``/`` and ``\\`` count as the same separator).
    """
    listed = {f.replace("\\", "/") for f in files}
    if folder == "vae_approx" and name in _VAE_APPROX:
        return all(any(f.startswith(f"{name}_{part}.") for f in listed) for part in ("encoder", "decoder"))
    return name.replace("\\", "/") in listed
