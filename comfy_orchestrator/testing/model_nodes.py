"""Latent, loader and sampler nodes of the double: stand-in models and the deterministic KSampler."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import numpy as np

from comfy_orchestrator.testing.sampler import SampleRequest, preview_frame, render_sample
from comfy_orchestrator.testing.values import (
    Array,
    Clip,
    Conditioning,
    Latent,
    Model,
    NodeContext,
    NodeResult,
    NodeSpec,
    UpscaleModel,
    Vae,
    from_pil,
    resize,
    to_pil,
)

__all__ = ["MODEL_NODES", "upscale_factor"]


async def _empty_latent(ctx: NodeContext, width: int, height: int, batch_size: int) -> NodeResult:
    return NodeResult((Latent(width // 8 * 8, height // 8 * 8, batch_size),))


def _scale_latent(samples: Latent, width: int, height: int, method: str, crop: str = "disabled") -> Latent:
    width, height = max(8, width // 8 * 8), max(8, height // 8 * 8)
    pixels = None if samples.pixels is None else resize(samples.pixels, width, height, method, crop)
    return Latent(width, height, samples.batch, pixels)


async def _latent_upscale(ctx: NodeContext, samples: Latent, upscale_method: str, width: int, height: int,
                          crop: str) -> NodeResult:
    if width == 0 and height == 0:
        return NodeResult((samples,))
    width = width or max(64, round(samples.width * height / samples.height))
    height = height or max(64, round(samples.height * width / samples.width))
    out = await ctx.work(_scale_latent, samples, width, height, upscale_method, crop, pixels=width * height)
    return NodeResult((out,))


async def _latent_upscale_by(ctx: NodeContext, samples: Latent, upscale_method: str, scale_by: float) -> NodeResult:
    width, height = round(samples.width / 8 * scale_by) * 8, round(samples.height / 8 * scale_by) * 8
    out = await ctx.work(_scale_latent, samples, width, height, upscale_method, pixels=width * height)
    return NodeResult((out,))


async def _vae_encode(ctx: NodeContext, pixels: Array, vae: Vae) -> NodeResult:
    h, w = pixels.shape[1] // 8 * 8, pixels.shape[2] // 8 * 8
    return NodeResult((Latent(w, h, len(pixels), pixels[:, :h, :w, :3].copy()),))


async def _vae_decode(ctx: NodeContext, samples: Latent, vae: Vae) -> NodeResult:
    if samples.pixels is not None:
        return NodeResult((samples.pixels,))
    grey = np.array([0.45, 0.42, 0.40], dtype=np.float32)
    return NodeResult((np.broadcast_to(grey, (samples.batch, samples.height, samples.width, 3)).copy(),))


def _write_latent(samples: Latent, path: Path) -> None:
    pixels = samples.pixels if samples.pixels is not None else np.zeros(
        (samples.batch, samples.height, samples.width, 3), dtype=np.float32)
    small = pixels[:, ::8, ::8, :]
    tensor = np.concatenate((small, np.zeros((*small.shape[:3], 1), np.float32)), -1).transpose(0, 3, 1, 2)
    data = np.ascontiguousarray(tensor, dtype="<f4").tobytes()
    header = json.dumps({"latent_tensor": {"dtype": "F32", "shape": list(tensor.shape),
                                           "data_offsets": [0, len(data)]},
                         "latent_format_version_0": {"dtype": "F32", "shape": [0],
                                                      "data_offsets": [len(data), len(data)]}})
    raw = header.encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as out:
        out.write(len(raw).to_bytes(8, "little") + raw + data)


async def _save_latent(ctx: NodeContext, samples: Latent, filename_prefix: str = "latents/ComfyUI") -> NodeResult:
    ((path, filename, subfolder),) = ctx.folders.reserve("output", filename_prefix, 1, ".latent")
    await ctx.work(_write_latent, samples, path, pixels=samples.width * samples.height)
    return NodeResult(ui={"latents": [{"filename": filename, "subfolder": subfolder, "type": "output"}]})


async def _checkpoint_loader(ctx: NodeContext, ckpt_name: str) -> NodeResult:
    return NodeResult((Model(ckpt_name), Clip((ckpt_name,)), Vae(ckpt_name)))


async def _unet_loader(ctx: NodeContext, unet_name: str, weight_dtype: str) -> NodeResult:
    return NodeResult((Model(unet_name),))


async def _clip_loader(ctx: NodeContext, clip_name: str, type: str, device: str = "default") -> NodeResult:
    return NodeResult((Clip((clip_name,)),))


async def _dual_clip_loader(ctx: NodeContext, clip_name1: str, clip_name2: str, type: str,
                            device: str = "default") -> NodeResult:
    return NodeResult((Clip((clip_name1, clip_name2)),))


async def _vae_loader(ctx: NodeContext, vae_name: str) -> NodeResult:
    return NodeResult((Vae(vae_name),))


async def _lora_loader(ctx: NodeContext, model: Model, clip: Clip, lora_name: str, strength_model: float,
                       strength_clip: float) -> NodeResult:
    return NodeResult((Model(f"{model.name}+{lora_name}:{strength_model:g}"), clip))


def upscale_factor(model_name: str) -> int:
    """The scale an upscaler file name announces (``x2``, ``4x``...), 2 when it names none."""
    match = re.search(r"(?:^|[^a-z0-9])x(\d)|(\d)x(?:[^a-z0-9]|$)", model_name.lower())
    return int(match[1] or match[2]) if match else 2


async def _upscale_model_loader(ctx: NodeContext, model_name: str) -> NodeResult:
    return NodeResult((UpscaleModel(model_name, upscale_factor(model_name)),))


async def _upscale_with_model(ctx: NodeContext, upscale_model: UpscaleModel, image: Array) -> NodeResult:
    h, w = image.shape[1:3]
    s = upscale_model.scale
    out = await ctx.work(resize, image, w * s, h * s, "lanczos", pixels=w * h * s * s * len(image))
    await ctx.progress(1, 1)
    return NodeResult((out,))


async def _clip_text_encode(ctx: NodeContext, text: str, clip: Clip) -> NodeResult:
    return NodeResult((Conditioning(text),))


def _render_batch(request: SampleRequest, latent: Latent) -> Array:
    items = []
    for i in range(latent.batch):
        item = SampleRequest(request.text, request.seed + i, request.steps, request.model, latent.width,
                             latent.height, request.denoise, request.cfg, request.sampler_name, request.scheduler)
        init = None if latent.pixels is None else to_pil(latent.pixels[min(i, len(latent.pixels) - 1)])
        items.append(from_pil(render_sample(item, init)))
    return np.stack(items)


async def _sample(ctx: NodeContext, request: SampleRequest, latent: Latent, run_steps: int) -> NodeResult:
    pixels = await ctx.work(_render_batch, request, latent, pixels=latent.width * latent.height * latent.batch)
    first = to_pil(pixels[0])
    for step in range(1, run_steps + 1):
        if ctx.step_delay > 0:
            await asyncio.sleep(ctx.step_delay)
        await ctx.progress(step, run_steps, preview_frame(first, step, run_steps, request.seed))
    return NodeResult((Latent(latent.width, latent.height, latent.batch, pixels),))


async def _ksampler(ctx: NodeContext, model: Model, seed: int, steps: int, cfg: float, sampler_name: str,
                    scheduler: str, positive: Conditioning, negative: Conditioning, latent_image: Latent,
                    denoise: float = 1.0) -> NodeResult:
    request = SampleRequest(positive.text, seed, steps, model.name, latent_image.width, latent_image.height,
                            denoise, cfg, sampler_name, scheduler)
    return await _sample(ctx, request, latent_image, steps)


async def _ksampler_advanced(ctx: NodeContext, model: Model, add_noise: str, noise_seed: int, steps: int,
                             cfg: float, sampler_name: str, scheduler: str, positive: Conditioning,
                             negative: Conditioning, latent_image: Latent, start_at_step: int,
                             end_at_step: int, return_with_leftover_noise: str) -> NodeResult:
    run_steps = min(end_at_step, steps) - start_at_step
    if run_steps <= 0:
        return NodeResult((latent_image,))
    request = SampleRequest(positive.text, noise_seed, steps, model.name, latent_image.width,
                            latent_image.height, run_steps / steps, cfg, sampler_name, scheduler)
    return await _sample(ctx, request, latent_image, run_steps)


async def _lotus_conditioning(ctx: NodeContext) -> NodeResult:
    return NodeResult((Conditioning(""),))


async def _conditioning_zero_out(ctx: NodeContext, conditioning: Conditioning) -> NodeResult:
    return NodeResult((Conditioning(""),))


MODEL_NODES: dict[str, NodeSpec] = {
    "EmptyLatentImage": NodeSpec(_empty_latent),
    "LatentUpscale": NodeSpec(_latent_upscale),
    "LatentUpscaleBy": NodeSpec(_latent_upscale_by),
    "VAEEncode": NodeSpec(_vae_encode),
    "VAEDecode": NodeSpec(_vae_decode),
    "SaveLatent": NodeSpec(_save_latent),
    "CheckpointLoaderSimple": NodeSpec(_checkpoint_loader),
    "UNETLoader": NodeSpec(_unet_loader),
    "CLIPLoader": NodeSpec(_clip_loader),
    "DualCLIPLoader": NodeSpec(_dual_clip_loader),
    "VAELoader": NodeSpec(_vae_loader),
    "LoraLoader": NodeSpec(_lora_loader),
    "UpscaleModelLoader": NodeSpec(_upscale_model_loader),
    "ImageUpscaleWithModel": NodeSpec(_upscale_with_model),
    "CLIPTextEncode": NodeSpec(_clip_text_encode),
    "LotusConditioning": NodeSpec(_lotus_conditioning),
    "ConditioningZeroOut": NodeSpec(_conditioning_zero_out),
    "KSampler": NodeSpec(_ksampler),
    "KSamplerAdvanced": NodeSpec(_ksampler_advanced),
}
