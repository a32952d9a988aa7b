"""Tiny random-weight models that a real ComfyUI loads, for CPU tests that run in milliseconds.

:func:`prepare_base_dir` lays out a ComfyUI ``--base-directory`` (``custom_nodes/``, ``models/…``,
``input/``) holding:

* an SD2-shaped UNet (``models/diffusion_models/``): ``model_channels`` 320, ``context_dim`` 1024 and
  linear transformer projections, which is what ComfyUI's ``model_detection`` needs to call it SD2,
  but one level with one res block, one transformer and no middle block (≈14 M parameters, stored in
  fp16). ``UNETLoader → KSampler → VAEDecode`` runs at 64 px on a CPU in well under a second. Its text
  conditioning comes from ``LotusConditioning`` (a model-free node giving a 77×1024 embedding), so no
  text encoder is needed;
* a random TAESD pair (``models/vae_approx/taesd_{encoder,decoder}.safetensors``), which ComfyUI
  offers as the VAE named ``taesd`` and uses for ``--preview-method taesd``;
* a Real-ESRGAN Compact ×2 and an ESRGAN (RRDB) ×4 upscaler (``models/upscale_models/``) that spandrel
  recognises;
* a 64×64 PNG in ``input/`` so that a ``LoadImage`` graph validates without an upload.

:func:`add_unet` writes more UNets of the same shape under other names, each from its own seed, so
that one server holds several distinct "models" to compare (their pictures differ).

The architectures are written down as data (key → shape) following ComfyUI's and spandrel's module
layouts; the weights come from a seeded generator, so the same seed writes the same bytes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from PIL import Image
from safetensors.torch import save_file

__all__ = ["TinyModels", "add_unet", "prepare_base_dir"]

Init = Literal["weight", "ones", "zeros", "prelu"]
Spec = dict[str, tuple[tuple[int, ...], Init]]

UNET_FILE = "tiny_sd2_unet.safetensors"
VAE_NAME = "taesd"
UPSCALE_X2_FILE = "tiny_compact_x2.safetensors"
UPSCALE_X4_FILE = "tiny_esrgan_x4.safetensors"
INPUT_IMAGE_FILE = "tiny_input.png"

# What ComfyUI's model_detection reads to pick its SD20 config (comfy/supported_models.py: SD20).
_MODEL_CHANNELS = 320
_CONTEXT_DIM = 1024
_LATENT_CHANNELS = 4
_TIME_EMBED_DIM = 4 * _MODEL_CHANNELS


@dataclass(frozen=True)
class TinyModels:
    """The names under which ComfyUI lists the files :func:`prepare_base_dir` wrote."""

    base_dir: Path
    unet: str = UNET_FILE  # UNETLoader.unet_name
    vae: str = VAE_NAME  # VAELoader.vae_name
    upscale_x2: str = UPSCALE_X2_FILE  # UpscaleModelLoader.model_name, a Compact ×2
    upscale_x4: str = UPSCALE_X4_FILE  # UpscaleModelLoader.model_name, an ESRGAN ×4
    input_image: str = INPUT_IMAGE_FILE  # LoadImage.image, 64×64 RGB

    @property
    def upscalers(self) -> dict[str, int]:
        """Upscaler file name → scale factor."""
        return {self.upscale_x2: 2, self.upscale_x4: 4}

    @property
    def models_dir(self) -> Path:
        return self.base_dir / "models"


def prepare_base_dir(base_dir: Path, *, seed: int = 0) -> TinyModels:
    """Create ``base_dir`` as a ComfyUI base directory holding the tiny models; return their names.

    Deterministic for a given ``seed``; existing files are overwritten. Takes about a second.
    """
    base_dir = Path(base_dir)
    models = base_dir / "models"
    for sub in ("custom_nodes", "input", "output", "temp"):
        (base_dir / sub).mkdir(parents=True, exist_ok=True)
    for sub in ("diffusion_models", "vae_approx", "upscale_models", "checkpoints", "vae"):
        (models / sub).mkdir(parents=True, exist_ok=True)

    gen = torch.Generator().manual_seed(seed)
    _write(models / "diffusion_models" / UNET_FILE, _unet_spec(), gen, torch.float16, seed)
    _write(models / "vae_approx" / "taesd_encoder.safetensors", _taesd_encoder_spec(), gen, torch.float16, seed)
    _write(models / "vae_approx" / "taesd_decoder.safetensors", _taesd_decoder_spec(), gen, torch.float16, seed)
    _write(models / "upscale_models" / UPSCALE_X2_FILE, _compact_spec(scale=2), gen, torch.float32, seed)
    _write(models / "upscale_models" / UPSCALE_X4_FILE, _esrgan_spec(scale=4), gen, torch.float32, seed)
    _input_image(seed).save(base_dir / "input" / INPUT_IMAGE_FILE)
    return TinyModels(base_dir=base_dir)


def add_unet(base_dir: Path, name: str, *, seed: int) -> str:
    """Write one more tiny UNet, the same architecture with weights from ``seed``, as
    ``models/diffusion_models/<name>`` of a base directory made by :func:`prepare_base_dir`.

    Returns ``name``, the ``UNETLoader.unet_name`` ComfyUI lists it under. Deterministic per seed.
    """
    if not name.endswith(".safetensors") or "/" in name or "\\" in name:
        raise ValueError(f"a UNet name is a plain file name ending in .safetensors, not {name!r}")
    folder = Path(base_dir) / "models" / "diffusion_models"
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    _write(folder / name, _unet_spec(), gen, torch.float16, seed)
    return name


# ---------------------------------------------------------------------------------------------
# Writing


def _write(path: Path, spec: Spec, gen: torch.Generator, dtype: torch.dtype, seed: int) -> None:
    tensors = {key: _init(shape, init, gen).to(dtype) for key, (shape, init) in spec.items()}
    # One metadata key only: safetensors writes a metadata map in no fixed order, and the bytes must
    # not change from run to run.
    save_file(tensors, str(path), metadata={"comfy_orchestrator": f"tiny random weights, seed {seed}"})


def _init(shape: tuple[int, ...], init: Init, gen: torch.Generator) -> torch.Tensor:
    if init == "ones":
        return torch.ones(shape)
    if init == "zeros":
        return torch.zeros(shape)
    if init == "prelu":
        return torch.full(shape, 0.25)
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    return torch.randn(shape, generator=gen) / math.sqrt(fan_in)


def _input_image(seed: int) -> Image.Image:
    size = 64
    img = Image.new("RGB", (size, size))
    img.putdata(
        [((4 * x + seed) % 256, (4 * y) % 256, (2 * (x + y) + 64) % 256) for y in range(size) for x in range(size)]
    )
    return img


# ---------------------------------------------------------------------------------------------
# Building blocks: each yields (key, (shape, init)) in the layout of the PyTorch module it mirrors.

Entries = Iterator[tuple[str, tuple[tuple[int, ...], Init]]]


def _conv(prefix: str, c_out: int, c_in: int, k: int = 3, *, bias: bool = True) -> Entries:
    yield f"{prefix}.weight", ((c_out, c_in, k, k), "weight")
    if bias:
        yield f"{prefix}.bias", ((c_out,), "zeros")


def _linear(prefix: str, c_out: int, c_in: int, *, bias: bool = True) -> Entries:
    yield f"{prefix}.weight", ((c_out, c_in), "weight")
    if bias:
        yield f"{prefix}.bias", ((c_out,), "zeros")


def _norm(prefix: str, channels: int) -> Entries:
    yield f"{prefix}.weight", ((channels,), "ones")
    yield f"{prefix}.bias", ((channels,), "zeros")


def _resblock(prefix: str, c_in: int, c_out: int) -> Entries:
    """comfy.ldm.modules.diffusionmodules.openaimodel.ResBlock."""
    yield from _norm(f"{prefix}.in_layers.0", c_in)
    yield from _conv(f"{prefix}.in_layers.2", c_out, c_in)
    yield from _linear(f"{prefix}.emb_layers.1", c_out, _TIME_EMBED_DIM)
    yield from _norm(f"{prefix}.out_layers.0", c_out)
    yield from _conv(f"{prefix}.out_layers.3", c_out, c_out)
    if c_in != c_out:
        yield from _conv(f"{prefix}.skip_connection", c_out, c_in, 1)


def _spatial_transformer(prefix: str, ch: int) -> Entries:
    """comfy.ldm.modules.attention.SpatialTransformer, depth 1, linear projections."""
    block = f"{prefix}.transformer_blocks.0"
    yield from _norm(f"{prefix}.norm", ch)
    yield from _linear(f"{prefix}.proj_in", ch, ch)
    for attn, kv_dim in (("attn1", ch), ("attn2", _CONTEXT_DIM)):
        yield from _linear(f"{block}.{attn}.to_q", ch, ch, bias=False)
        yield from _linear(f"{block}.{attn}.to_k", ch, kv_dim, bias=False)
        yield from _linear(f"{block}.{attn}.to_v", ch, kv_dim, bias=False)
        yield from _linear(f"{block}.{attn}.to_out.0", ch, ch)
    yield from _linear(f"{block}.ff.net.0.proj", 8 * ch, ch)  # GEGLU: 2 × 4 × ch
    yield from _linear(f"{block}.ff.net.2", ch, 4 * ch)
    for norm in ("norm1", "norm2", "norm3"):
        yield from _norm(f"{block}.{norm}", ch)
    yield from _linear(f"{prefix}.proj_out", ch, ch)


# ---------------------------------------------------------------------------------------------
# Architectures


def _unet_spec() -> Spec:
    """One level (channel_mult (1,)), one res block + transformer in, two res blocks out, no middle.

    ComfyUI detects: model_channels 320, context_dim 1024, use_linear_in_transformer, no adm →
    SD20, eps prediction; transformer_depth [1], transformer_depth_output [0, 0], middle -2.
    """
    ch = _MODEL_CHANNELS

    def entries() -> Entries:
        yield from _linear("time_embed.0", _TIME_EMBED_DIM, ch)
        yield from _linear("time_embed.2", _TIME_EMBED_DIM, _TIME_EMBED_DIM)
        yield from _conv("input_blocks.0.0", ch, _LATENT_CHANNELS)
        yield from _resblock("input_blocks.1.0", ch, ch)
        yield from _spatial_transformer("input_blocks.1.1", ch)
        # Output blocks see the skip connection concatenated: 2 × ch in.
        yield from _resblock("output_blocks.0.0", 2 * ch, ch)
        yield from _resblock("output_blocks.1.0", 2 * ch, ch)
        yield from _norm("out.0", ch)
        yield from _conv("out.2", _LATENT_CHANNELS, ch)

    return dict(entries())


def _taes_block(prefix: str) -> Entries:
    """comfy.taesd.taesd.Block(64, 64): three 3×3 convs, identity skip."""
    for i in (0, 2, 4):
        yield from _conv(f"{prefix}.conv.{i}", 64, 64)


def _taesd_encoder_spec() -> Spec:
    """comfy.taesd.taesd.Encoder: conv, block, then 3 × (stride-2 conv, 3 blocks), conv to latents."""

    def entries() -> Entries:
        yield from _conv("0", 64, 3)
        yield from _taes_block("1")
        for down in (2, 6, 10):
            yield from _conv(str(down), 64, 64, bias=False)
            for i in range(down + 1, down + 4):
                yield from _taes_block(str(i))
        yield from _conv("14", _LATENT_CHANNELS, 64)

    return dict(entries())


def _taesd_decoder_spec() -> Spec:
    """comfy.taesd.taesd.Decoder: clamp, conv, 3 × (3 blocks, upsample, conv), block, conv to RGB."""

    def entries() -> Entries:
        yield from _conv("1", 64, _LATENT_CHANNELS)
        for first in (3, 8, 13):
            for i in range(first, first + 3):
                yield from _taes_block(str(i))
            yield from _conv(str(first + 4), 64, 64, bias=False)  # after nn.Upsample at first + 3
        yield from _taes_block("18")
        yield from _conv("19", 3, 64)

    return dict(entries())


def _compact_spec(*, scale: int, num_feat: int = 16, num_conv: int = 2) -> Spec:
    """spandrel's SRVGGNetCompact: conv + PReLU pairs, then a conv to 3 × scale² for PixelShuffle."""

    def entries() -> Entries:
        yield from _conv("body.0", num_feat, 3)
        yield "body.1.weight", ((num_feat,), "prelu")
        for n in range(num_conv):
            yield from _conv(f"body.{2 + 2 * n}", num_feat, num_feat)
            yield f"body.{3 + 2 * n}.weight", ((num_feat,), "prelu")
        yield from _conv(f"body.{2 + 2 * num_conv}", 3 * scale * scale, num_feat)

    return dict(entries())


def _esrgan_spec(*, scale: int, num_filters: int = 16, num_blocks: int = 1) -> Spec:
    """spandrel's RRDBNet in the original ESRGAN key layout (``model.N``); growth channels fixed at 32."""
    if scale not in (1, 2, 4, 8):
        raise ValueError(f"ESRGAN scale must be a power of two up to 8, not {scale}")
    nf, gc = num_filters, 32
    n_up = int(math.log2(scale))

    def entries() -> Entries:
        yield from _conv("model.0", nf, 3)
        for b in range(num_blocks):
            for rdb in (1, 2, 3):
                for i in range(1, 5):
                    yield from _conv(f"model.1.sub.{b}.RDB{rdb}.conv{i}.0", gc, nf + (i - 1) * gc)
                yield from _conv(f"model.1.sub.{b}.RDB{rdb}.conv5.0", nf, nf + 4 * gc)
        yield from _conv(f"model.1.sub.{num_blocks}", nf, nf)
        for u in range(n_up):  # each: Upsample, conv, LeakyReLU
            yield from _conv(f"model.{3 + 3 * u}", nf, nf)
        hr = 3 + 3 * n_up - 1
        yield from _conv(f"model.{hr}", nf, nf)
        yield from _conv(f"model.{hr + 2}", 3, nf)

    return dict(entries())
