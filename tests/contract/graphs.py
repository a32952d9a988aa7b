"""API-format graphs the contract suite sends to both servers (the double and a real ComfyUI)."""

from __future__ import annotations

import itertools
import time
from typing import Any

Graph = dict[str, Any]
_colours = itertools.count(int(time.time() * 1000) % 1_000_000)


def fresh_colour() -> int:
    """A colour never sent before in this process, so a server's cache cannot answer."""
    return next(_colours) % 16_777_215


def model_free(colour: int | None = None, *, prefix: str = "contract") -> Graph:
    """EmptyImage → ImageScaleBy ×2 → ImageInvert → SaveImage, plus a preview and a text output."""
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1,
                                                     "color": fresh_colour() if colour is None else colour}},
        "2": {"class_type": "ImageScaleBy", "inputs": {"image": ["1", 0], "upscale_method": "bilinear",
                                                       "scale_by": 2.0}},
        "3": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}},
        "5": {"class_type": "GetImageSize", "inputs": {"image": ["3", 0]}},
        "6": {"class_type": "PreviewAny", "inputs": {"source": ["5", 0]}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": prefix}},
    }


def invert_upload(image_name: str, subfolder: str = "") -> Graph:
    name = f"{subfolder}/{image_name}" if subfolder else image_name
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": name}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "contract_inv"}},
    }


def tiny_unet(unet: str, vae: str, *, steps: int = 4, seed: int = 0, size: int = 64) -> Graph:
    """UNETLoader → KSampler → VAEDecode (TAESD) → SaveImage, conditioned with a model-free node."""
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
        "2": {"class_type": "LotusConditioning", "inputs": {}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "4": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["2", 0], "latent_image": ["3", 0],
            "seed": seed, "steps": steps, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1.0}},
        "5": {"class_type": "VAELoader", "inputs": {"vae_name": vae}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["5", 0]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "contract_unet"}},
    }


def upscale(model_name: str, size: int = 64) -> Graph:
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": size, "height": size, "batch_size": 1,
                                                     "color": fresh_colour()}},
        "2": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": model_name}},
        "3": {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["2", 0], "image": ["1", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "contract_up"}},
    }


def oom() -> Graph:
    """An allocation no machine can make (4 TiB): the portable way to get an execution_error."""
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 16384, "height": 16384, "batch_size": 4096,
                                                     "color": fresh_colour()}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "contract_oom"}},
    }
