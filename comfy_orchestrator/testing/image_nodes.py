"""Image, mask, file and text nodes of the double, with Pillow and numpy."""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from comfy_orchestrator.testing.files import Folders
from comfy_orchestrator.testing.values import (
    Array,
    NodeContext,
    NodeResult,
    NodeSpec,
    from_pil,
    map_images,
    resize,
    to_pil,
)

__all__ = ["IMAGE_NODES"]

_MAX_ALLOC = 1 << 34  # bytes; beyond this a tensor allocation fails like the recorded CPU OOM

async def _empty_image(ctx: NodeContext, width: int, height: int, batch_size: int, color: int) -> NodeResult:
    nbytes = batch_size * height * width * 4
    if nbytes > _MAX_ALLOC:
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
            f"you tried to allocate {nbytes} bytes. Error code 12 (Cannot allocate memory)"
        )
    rgb = np.array([(color >> 16) & 0xFF, (color >> 8) & 0xFF, color & 0xFF], dtype=np.float32) / 255.0
    return NodeResult((np.broadcast_to(rgb, (batch_size, height, width, 3)).copy(),))


async def _image_scale_by(ctx: NodeContext, image: Array, upscale_method: str, scale_by: float) -> NodeResult:
    width, height = round(image.shape[2] * scale_by), round(image.shape[1] * scale_by)
    out = await ctx.work(resize, image, width, height, upscale_method, pixels=width * height * len(image))
    return NodeResult((out,))


async def _image_scale(ctx: NodeContext, image: Array, upscale_method: str, width: int, height: int,
                       crop: str) -> NodeResult:
    if width == 0 and height == 0:
        return NodeResult((image,))
    h, w = image.shape[1:3]
    width = width or max(1, round(w * height / h))
    height = height or max(1, round(h * width / w))
    out = await ctx.work(resize, image, width, height, upscale_method, crop, pixels=width * height * len(image))
    return NodeResult((out,))


async def _image_invert(ctx: NodeContext, image: Array) -> NodeResult:
    return NodeResult((1.0 - image,))


async def _image_blur(ctx: NodeContext, image: Array, blur_radius: int, sigma: float) -> NodeResult:
    if blur_radius == 0:
        return NodeResult((image,))
    blur = ImageFilter.GaussianBlur(radius=min(float(blur_radius), sigma * 3))
    out = await ctx.work(map_images, image, lambda item: item.filter(blur), pixels=image[..., 0].size)
    return NodeResult((out,))


async def _image_crop(ctx: NodeContext, image: Array, width: int, height: int, x: int, y: int) -> NodeResult:
    x, y = min(x, image.shape[2] - 1), min(y, image.shape[1] - 1)
    return NodeResult((image[:, y:y + height, x:x + width, :].copy(),))


async def _image_batch(ctx: NodeContext, image1: Array, image2: Array) -> NodeResult:
    pad = ((0, 0), (0, 0), (0, 0), (0, 1))
    if image1.shape[-1] > image2.shape[-1]:
        image2 = np.pad(image2, pad, constant_values=1.0)
    elif image1.shape[-1] < image2.shape[-1]:
        image1 = np.pad(image1, pad, constant_values=1.0)
    if image1.shape[1:] != image2.shape[1:]:
        image2 = resize(image2, image1.shape[2], image1.shape[1], "bilinear", "center")
    return NodeResult((np.concatenate((image1, image2)),))


async def _get_image_size(ctx: NodeContext, image: Array) -> NodeResult:
    batch, height, width = image.shape[:3]
    await ctx.send_text(f"width: {width}, height: {height}\n batch size: {batch}")
    return NodeResult((width, height, batch))


async def _join_image_with_alpha(ctx: NodeContext, image: Array, alpha: Array) -> NodeResult:
    h, w = image.shape[1:3]
    masks = np.stack([np.asarray(Image.fromarray(m).resize((w, h)), dtype=np.float32) for m in alpha])
    masks = np.resize(masks, (len(image), h, w))
    return NodeResult((np.concatenate((image[..., :3], (1.0 - masks)[..., None]), axis=-1),))


async def _solid_mask(ctx: NodeContext, value: float, width: int, height: int) -> NodeResult:
    return NodeResult((np.full((1, height, width), value, dtype=np.float32),))


async def _image_to_mask(ctx: NodeContext, image: Array, channel: str) -> NodeResult:
    index = ["red", "green", "blue", "alpha"].index(channel)
    if index >= image.shape[-1]:
        raise IndexError(f"index {index} is out of bounds for dimension 3 with size {image.shape[-1]}")
    return NodeResult((image[..., index].copy(),))


async def _mask_to_image(ctx: NodeContext, mask: Array) -> NodeResult:
    mask = mask.reshape((-1, *mask.shape[-2:]))
    return NodeResult((np.repeat(mask[..., None], 3, axis=-1),))


def _load(path: str) -> tuple[Array, Array]:
    with Image.open(path) as img:
        rgb = from_pil(img.convert("RGB"))[None]
        if "A" in img.getbands():
            mask = 1.0 - np.asarray(img.getchannel("A"), dtype=np.float32)[None] / 255.0
        else:
            mask = np.zeros((1, 64, 64), dtype=np.float32)
    return rgb, mask


async def _load_image(ctx: NodeContext, image: str) -> NodeResult:
    rgb, mask = await ctx.work(_load, str(ctx.folders.annotated(image)), pixels=1 << 20)
    return NodeResult((rgb, mask))


def _write_pngs(images: Array, paths: Sequence[Path], compress_level: int) -> None:
    for item, path in zip(images, paths, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        to_pil(item).save(path, compress_level=compress_level)


async def _save(ctx: NodeContext, images: Array, kind: str, prefix: str, level: int) -> NodeResult:
    slots = ctx.folders.reserve(kind, prefix, len(images), ".png")
    await ctx.work(_write_pngs, images, [s[0] for s in slots], level, pixels=images[..., 0].size)
    return NodeResult(ui={"images": [{"filename": f, "subfolder": sub, "type": kind} for _, f, sub in slots]})


async def _save_image(ctx: NodeContext, images: Array, filename_prefix: str = "ComfyUI") -> NodeResult:
    return await _save(ctx, images, "output", filename_prefix, 4)


async def _preview_image(ctx: NodeContext, images: Array) -> NodeResult:
    if "suffix" not in ctx.state:  # PreviewImage picks its random suffix once per node object
        ctx.state["suffix"] = "".join(random.choice("abcdefghijklmnopqrstupvxyz") for _ in range(5))
    return await _save(ctx, images, "temp", f"ComfyUI_temp_{ctx.state['suffix']}", 1)


async def _preview_any(ctx: NodeContext, source: Any = None) -> NodeResult:
    if isinstance(source, str):
        value = source
    elif isinstance(source, int | float | bool):
        value = str(source)
    elif source is None:
        value = "None"
    else:
        try:
            value = json.dumps(source, indent=4)
        except (TypeError, ValueError):
            value = str(source)
    return NodeResult(ui={"text": [value]})


async def _primitive(ctx: NodeContext, value: Any) -> NodeResult:
    return NodeResult((value,))


async def _string_concatenate(ctx: NodeContext, string_a: str, string_b: str, delimiter: str) -> NodeResult:
    return NodeResult((delimiter.join((string_a, string_b)),))


def _loaded_file_hash(inputs: Mapping[str, Any], folders: Folders) -> str:
    return folders.file_hash(str(inputs["image"]))


IMAGE_NODES: dict[str, NodeSpec] = {
    "EmptyImage": NodeSpec(_empty_image),
    "ImageScaleBy": NodeSpec(_image_scale_by),
    "ImageScale": NodeSpec(_image_scale),
    "ImageInvert": NodeSpec(_image_invert),
    "ImageBlur": NodeSpec(_image_blur),
    "ImageCrop": NodeSpec(_image_crop),
    "ImageBatch": NodeSpec(_image_batch),
    "GetImageSize": NodeSpec(_get_image_size),
    "JoinImageWithAlpha": NodeSpec(_join_image_with_alpha),
    "SolidMask": NodeSpec(_solid_mask),
    "ImageToMask": NodeSpec(_image_to_mask),
    "MaskToImage": NodeSpec(_mask_to_image),
    "LoadImage": NodeSpec(_load_image, is_changed=_loaded_file_hash),
    "SaveImage": NodeSpec(_save_image),
    "PreviewImage": NodeSpec(_preview_image),
    "PreviewAny": NodeSpec(_preview_any),
    "PrimitiveString": NodeSpec(_primitive),
    "PrimitiveInt": NodeSpec(_primitive),
    "StringConcatenate": NodeSpec(_string_concatenate),
}
