"""The evaluator's fused image tower computes what open_clip's own forward computes (fp32, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quality import ClipEvaluator, ModelCache, SharedEncoders
from quality.tower import FusedImageTower

from .conftest import TINY, shape, text_image


@pytest.mark.parametrize("fixture", ["tiny", "vit_b32"])
def test_fused_tower_gives_open_clips_embeddings(fixture: str, request: pytest.FixtureRequest) -> None:
    evaluator: ClipEvaluator = request.getfixturevalue(fixture)
    loaded = evaluator.load().model
    assert isinstance(loaded.image_tower, FusedImageTower)  # the evaluator's own path is the fused one
    size = loaded.spec.image_size
    pixels = torch.randn(5, 3, size, size, generator=torch.Generator().manual_seed(0))
    texts = loaded.encode_texts(["a photo of a red circle", "a picture of text"])
    with torch.inference_mode():
        reference = loaded.model.encode_image(pixels, normalize=True)  # type: ignore[operator]
    ours = loaded.encode_images(pixels)
    assert ours.shape == reference.shape
    assert (ours - reference).abs().max().item() < 1e-5
    assert (ours @ texts.T - reference @ texts.T).abs().max().item() < 1e-4  # cosines, fp32


async def test_scores_match_a_plain_open_clip_loop(tiny: ClipEvaluator) -> None:
    """End to end: the evaluator's cosines against open_clip's own transform, tokenizer and forward."""
    loaded = tiny.load().model
    images = [shape("red", "circle", seed=1), shape("blue", "star", seed=2), text_image(seed=3),
              shape("green", "square", size=300, seed=4)]
    prompt = "a photo of a red circle"
    with torch.inference_mode():
        model: nn.Module = loaded.model
        text = model.encode_text(loaded.tokenizer([prompt]), normalize=True)  # type: ignore[operator]
        plain_pixels = torch.stack([loaded.preprocess(im) for im in images])
        plain = (model.encode_image(plain_pixels, normalize=True) @ text.T).squeeze(1)  # type: ignore[operator]
    pil_mode = ClipEvaluator(TINY, device="cpu", preprocess="pil", encoders=SharedEncoders(ModelCache()))
    exact = [s.cosines["prompt"] for s in await pil_mode.score(images, prompt)]
    assert np.abs(np.array(exact) - plain.numpy()).max() < 1e-4  # same pixels: only the forward differs
    default = [s.cosines["prompt"] for s in await tiny.score(images, prompt)]  # batched torch resize
    assert np.abs(np.array(default) - plain.numpy()).max() < 1e-3
    as_arrays = [s.cosines["prompt"] for s in await tiny.score([np.array(im) for im in images], prompt)]
    assert as_arrays == pytest.approx(default, abs=1e-6)


@pytest.mark.parametrize("onednn", [False, True])
@pytest.mark.parametrize("quick_gelu", [False, True])
def test_both_linear_kernels_and_both_activations(tiny: ClipEvaluator, onednn: bool, quick_gelu: bool) -> None:
    """F.linear and oneDNN's fused linear(+GELU) give open_clip's output; QuickGELU towers too."""
    import copy

    from open_clip.transformer import QuickGELU

    from quality.tower import _onednn_linear_works

    if onednn and not _onednn_linear_works():
        pytest.skip("this torch has no working oneDNN linear op")
    visual = copy.deepcopy(tiny.load().model.model.visual)
    if quick_gelu:
        for block in visual.transformer.resblocks:
            block.mlp.gelu = QuickGELU()
    tower = FusedImageTower(visual, onednn=onednn)
    assert tower.onednn is onednn
    pixels = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        assert (tower(pixels) - visual(pixels)).abs().max().item() < 1e-5


def test_the_cpu_fp32_tower_uses_onednn_when_it_works(tiny: ClipEvaluator) -> None:
    from quality.tower import _onednn_linear_works

    tower = tiny.load().model.image_tower
    assert isinstance(tower, FusedImageTower)
    assert tower.onednn is _onednn_linear_works()


def test_towers_it_does_not_know_are_left_to_open_clip() -> None:
    class Other(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.visual = nn.Linear(4, 4)

    assert FusedImageTower.wrap(Other()) is None
    with pytest.raises(ValueError, match="not a plain open_clip VisionTransformer"):
        FusedImageTower(nn.Linear(4, 4))


def test_grad_checkpointing_or_token_outputs_are_not_fused(tiny: ClipEvaluator) -> None:
    visual = tiny.load().model.model.visual
    assert FusedImageTower.supports(visual)
    visual.transformer.grad_checkpointing = True
    try:
        assert not FusedImageTower.supports(visual)
    finally:
        visual.transformer.grad_checkpointing = False
    assert FusedImageTower.supports(visual)


def test_fused_forward_is_the_block_arithmetic(tiny: ClipEvaluator) -> None:
    """One block by hand (the textbook attention), against the fused block, on the shipped weights."""
    from quality.tower import _block_forward, _onednn_linear, _onednn_linear_works

    block = tiny.load().model.model.visual.transformer.resblocks[0]
    x = torch.randn(2, 65, block.attn.embed_dim, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        h, d = block.attn.num_heads, block.attn.embed_dim
        y = block.ln_1(x)
        q, k, v = F.linear(y, block.attn.in_proj_weight, block.attn.in_proj_bias).chunk(3, dim=-1)
        split = [t.view(2, 65, h, d // h).transpose(1, 2) for t in (q, k, v)]
        att = (split[0] @ split[1].transpose(-2, -1) / (d // h) ** 0.5).softmax(-1) @ split[2]
        by_hand = x + block.attn.out_proj(att.transpose(1, 2).reshape(2, 65, d))
        by_hand = by_hand + block.mlp(block.ln_2(by_hand))
        assert (_block_forward(block, x) - by_hand).abs().max().item() < 1e-4
        assert (_block_forward(block, x) - block(x)).abs().max().item() < 1e-5
        if _onednn_linear_works():
            assert (_block_forward(block, x, _onednn_linear) - block(x)).abs().max().item() < 1e-5
