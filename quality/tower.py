"""open_clip's image tower run for inference with one fused attention call per block.

open_clip's ``ResidualAttentionBlock`` hands its input to ``nn.MultiheadAttention`` (``batch_first``),
which transposes it to ``[L, N, D]`` and projects q, k and v from that strided view (a batched matmul
over a non-contiguous tensor, plus copies on the way in and out). :class:`FusedImageTower` runs the
same blocks, with the same parameters, as: layer norm, one 2-D GEMM for q/k/v, one
``F.scaled_dot_product_attention`` over ``[N, heads, L, head_dim]`` views, the output projection and
the MLP — the arithmetic of ``nn.MultiheadAttention``'s own SDPA path, without its layout round
trips. The patch embedding, pooling and projection are the tower's own methods.

On the CPU in fp32 the linear layers go through oneDNN (``torch.ops.mkldnn._linear_pointwise``, the
kernel ``torch.compile`` itself lowers linear layers to on the CPU), with the MLP's GELU fused into
its first GEMM, instead of the BLAS behind ``F.linear``. Same fp32 arithmetic (outputs agree to
~1e-6); on this project's AMD EPYC machines MKL's sgemm runs at about a third of oneDNN's speed, and
the image tower is nearly all GEMMs. The op is probed once when the tower is built; if it is
missing or disagrees with ``F.linear``, the tower keeps ``F.linear``.

Nothing in open_clip is patched: the model keeps its forward for every other caller (the evaluator's
tests compare the two). A tower this does not know (timm towers, attention pooling with extra
outputs, cross-attention blocks, grad checkpointing) is left to ``model.encode_image``:
:meth:`FusedImageTower.wrap` returns None for it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FusedImageTower"]

logger = logging.getLogger(__name__)


def _plain_block(block: nn.Module) -> bool:
    attn = getattr(block, "attn", None)
    mlp: Any = getattr(block, "mlp", None)
    return (
        type(block).__name__ == "ResidualAttentionBlock"
        and isinstance(attn, nn.MultiheadAttention)
        and attn.batch_first
        and attn._qkv_same_embed_dim
        and attn.in_proj_bias is not None
        and attn.bias_k is None
        and not attn.add_zero_attn
        and not hasattr(block, "ln_1_kv")
        and all(hasattr(block, name) for name in ("ln_1", "ln_2", "mlp", "ls_1", "ls_2"))
        and isinstance(mlp, nn.Sequential)
        and [name for name, _ in mlp.named_children()] == ["c_fc", "gelu", "c_proj"]
        and isinstance(mlp.c_fc, nn.Linear)
        and isinstance(mlp.c_proj, nn.Linear)
    )


class FusedImageTower(nn.Module):
    """The forward of an open_clip ``VisionTransformer`` (unnormalised image features), fused.

    Holds the tower, not a copy of its weights: loading new weights into the model is seen here.
    """

    def __init__(self, visual: nn.Module, *, onednn: bool | None = None) -> None:
        """``onednn``: route the linear layers through oneDNN (default: when on the CPU in fp32 and the
        op passes its probe)."""
        super().__init__()
        if not self.supports(visual):
            raise ValueError(f"{type(visual).__name__} is not a plain open_clip VisionTransformer")
        self.visual = visual
        weight = next(visual.parameters())
        if onednn is None:
            onednn = weight.device.type == "cpu" and weight.dtype == torch.float32 and _onednn_linear_works()
        self.onednn = onednn

    @staticmethod
    def supports(visual: nn.Module) -> bool:
        transformer = getattr(visual, "transformer", None)
        blocks = getattr(transformer, "resblocks", None)
        return (
            type(visual).__name__ == "VisionTransformer"
            and all(hasattr(visual, name) for name in ("_embeds", "_pool", "proj"))
            and not getattr(visual, "output_tokens", False)
            and transformer is not None
            and getattr(transformer, "batch_first", False)
            and not getattr(transformer, "grad_checkpointing", False)
            and isinstance(blocks, nn.ModuleList)
            and len(blocks) > 0
            and all(_plain_block(b) for b in blocks)
        )

    @classmethod
    def wrap(cls, model: nn.Module) -> FusedImageTower | None:
        """The fused tower of an open_clip ``CLIP`` model, or None when its image tower is another kind."""
        visual = getattr(model, "visual", None)
        if visual is None or not cls.supports(visual):
            logger.info("image tower %s: no fused path, open_clip's own forward is used",
                        type(visual).__name__)
            return None
        return cls(visual).eval()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        visual: Any = self.visual  # open_clip's modules are untyped
        x: torch.Tensor = visual._embeds(pixels)
        linear = _onednn_linear if self.onednn else _torch_linear
        for block in visual.transformer.resblocks:
            x = _block_forward(block, x, linear)
        pooled: torch.Tensor = visual._pool(x)[0]
        if visual.proj is not None:
            pooled = pooled @ visual.proj
        return pooled


Linear = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, str], torch.Tensor]


def _torch_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: str) -> torch.Tensor:
    y = F.linear(x, weight, bias)
    return F.gelu(y, approximate=act) if act != "" else y


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: str) -> torch.Tensor:
    """``F.linear`` (then ``F.gelu(approximate=act)`` when ``act`` is not empty) in one oneDNN call."""
    if act == "":
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    else:
        out = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], act)
    return out


@functools.cache
def _onednn_linear_works() -> bool:
    """Whether this torch has oneDNN's linear op and it gives ``F.linear``'s (and GELU's) results."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):  # type: ignore[no-untyped-call]
        return False
    gen = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*shape, generator=gen) for shape in ((2, 7, 48), (40, 48), (40,)))
    try:
        with torch.inference_mode():
            for act in ("", "none", "tanh"):
                if not torch.allclose(_onednn_linear(x, w, b, act), _torch_linear(x, w, b, act), atol=1e-5):
                    logger.warning("oneDNN linear disagrees with F.linear (act %r): not used", act)
                    return False
    except RuntimeError as exc:  # an op this build of torch does not have or run
        logger.info("oneDNN linear unavailable (%s): F.linear is used", exc)
        return False
    return True


def _block_forward(block: Any, x: torch.Tensor, linear: Linear = _torch_linear) -> torch.Tensor:
    n, length, width = x.shape
    attn: nn.MultiheadAttention = block.attn
    heads = attn.num_heads
    qkv = linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias, "")  # [N, L, 3D], one GEMM
    q, k, v = qkv.view(n, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v)  # [N, heads, L, head_dim]
    out = linear(out.transpose(1, 2).reshape(n, length, width), attn.out_proj.weight, attn.out_proj.bias, "")
    x = x + block.ls_1(out)
    return x + block.ls_2(_mlp(block.mlp, block.ln_2(x), linear))  # type: ignore[no-any-return]


def _mlp(mlp: Any, x: torch.Tensor, linear: Linear) -> torch.Tensor:
    """open_clip's ``c_fc → act → c_proj``, with an exact or tanh GELU fused into the first GEMM."""
    act = mlp.gelu
    if type(act) is nn.GELU:
        hidden = linear(x, mlp.c_fc.weight, mlp.c_fc.bias, act.approximate)
    else:  # QuickGELU and the like: their own forward
        hidden = act(linear(x, mlp.c_fc.weight, mlp.c_fc.bias, ""))
    return linear(hidden, mlp.c_proj.weight, mlp.c_proj.bias, "")
