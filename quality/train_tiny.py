"""Train the project's tiny CLIP on procedurally drawn pictures, so the evaluator can be proven offline.

No package ships real CLIP weights and no model hub is reachable from CI, and random weights prove
nothing about ranking. So this script trains a small open_clip model (a custom configuration with the
stock BPE tokenizer, whose vocabulary ships in the open-clip-torch wheel) on the drawing vocabulary
shared with the ComfyUI test double (:mod:`comfy_orchestrator.testing.shapes`): a coloured shape on a
plain background, captioned ``"a photo of a red circle"``, plus a ``text`` class (random letters and
words, captioned ``"a picture of text"``).

The loss is CLIP's contrastive loss with every class caption in each step (25 captions, a random
template each), image→text as a softmax over captions and text→image over the batch's images with
every image of that class a positive, so that both the caption ranking of one image and the image
ranking of one prompt are learnt.

Run::

    python -m quality.train_tiny --out quality/weights/tiny-shapes-clip

It writes an open_clip ``local-dir:`` folder: ``open_clip_config.json`` (architecture and
preprocessing), ``open_clip_model.safetensors`` (fp16 weights) and ``train_report.json`` (steps,
time, held-out top-1 measured on freshly drawn 512 px images through open_clip's own preprocessing).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import string
import time
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from comfy_orchestrator.testing.shapes import COLOURS, SHAPES, ShapeSpec, caption, draw_shape

__all__ = [
    "CLASS_CAPTIONS",
    "TEXT_CAPTION",
    "TINY_MODEL_CFG",
    "TINY_PREPROCESS_CFG",
    "draw_example",
    "draw_text",
    "evaluate_top1",
    "main",
    "train",
]

logger = logging.getLogger(__name__)

#: The architecture: a 64 px ViT with 3 layers and a 2-layer text tower over the stock 49408-token
#: vocabulary and 77-token context (so open_clip's stock tokenizer applies). About 3.6 M parameters,
#: most of them the token embedding.
TINY_MODEL_CFG: dict[str, Any] = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 96, "head_width": 32, "layers": 3},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
#: open_clip's default (OpenAI) normalisation and bicubic shortest-side resize with a centre crop.
TINY_PREPROCESS_CFG: dict[str, Any] = {
    "mean": [0.48145466, 0.4578275, 0.40821073],
    "std": [0.26862954, 0.26130258, 0.27577711],
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}

TEXT_CAPTION = "a picture of text"
SHAPE_SPECS: tuple[ShapeSpec, ...] = tuple(ShapeSpec(c, s) for c in COLOURS for s in SHAPES)
#: The canonical caption of every class, in class order: the 24 shapes, then the text class.
CLASS_CAPTIONS: tuple[str, ...] = (*(caption(s) for s in SHAPE_SPECS), TEXT_CAPTION)

_SHAPE_TEMPLATES: tuple[str, ...] = (
    "{}",  # the shared caption(): "a photo of a red circle"
    "a {colour} {shape}",
    "{colour} {shape}",
    "a picture of a {colour} {shape}",
    "a drawing of a {colour} {shape}",
    "a {colour} {shape} on a plain background",
    "a photo of a {colour} {shape}, highly detailed",
    "an image of one {colour} {shape}",
)
_TEXT_TEMPLATES: tuple[str, ...] = (
    TEXT_CAPTION,
    "text",
    "a page of text",
    "a photo of text",
    "letters and words",
    "an image of written words",
    "a picture of text, highly detailed",
    "printed text on a plain background",
)


def _class_caption(label: int, rng: random.Random) -> str:
    if label == len(SHAPE_SPECS):
        return rng.choice(_TEXT_TEMPLATES)
    spec = SHAPE_SPECS[label]
    template = rng.choice(_SHAPE_TEMPLATES)
    if template == "{}":
        return caption(spec)
    return template.format(colour=spec.colour, shape=spec.shape)


@cache
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def draw_text(size: int, rng: random.Random) -> Image.Image:
    """A few lines of random words in a dark (sometimes coloured) ink on a light background."""
    bg = tuple(rng.randint(200, 250) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    font_px = max(8, int(size * rng.uniform(0.07, 0.14)))
    font = _font(font_px)
    if rng.random() < 0.6:
        ink = tuple(rng.randint(0, 60) for _ in range(3))
    else:
        ink = tuple(max(0, min(255, c + rng.randint(-20, 20)))
                    for c in rng.choice(list(COLOURS.values())))
    y = size * rng.uniform(0.05, 0.2)
    while y < size * rng.uniform(0.7, 0.9):
        x = size * rng.uniform(0.03, 0.12)
        words = []
        for _ in range(rng.randint(2, 6)):
            letters = string.ascii_letters if rng.random() < 0.5 else string.ascii_lowercase
            words.append("".join(rng.choice(letters) for _ in range(rng.randint(2, 8))))
        draw.text((x, y), " ".join(words), fill=ink, font=font)
        y += font_px * rng.uniform(1.2, 1.8)
    return img


def draw_example(label: int, size: int, rng: random.Random) -> Image.Image:
    """The picture of class ``label`` (an index into :data:`CLASS_CAPTIONS`) at ``size`` px."""
    if label == len(SHAPE_SPECS):
        return draw_text(size, rng)
    return draw_shape(SHAPE_SPECS[label], size, rng)


def _build_model() -> tuple[torch.nn.Module, Callable[[Image.Image], torch.Tensor], Any]:
    import open_clip

    model = open_clip.CLIP(**TINY_MODEL_CFG)
    transform = open_clip.image_transform(
        TINY_MODEL_CFG["vision_cfg"]["image_size"],
        is_train=False,
        mean=tuple(TINY_PREPROCESS_CFG["mean"]),
        std=tuple(TINY_PREPROCESS_CFG["std"]),
        interpolation=TINY_PREPROCESS_CFG["interpolation"],
        resize_mode=TINY_PREPROCESS_CFG["resize_mode"],
    )
    tokenizer = open_clip.get_tokenizer("ViT-B-32")  # the stock SimpleTokenizer, 77 tokens
    return model, transform, tokenizer


def _batch(
    batch_size: int, rng: random.Random, transform: Callable[[Image.Image], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    n_classes = len(CLASS_CAPTIONS)
    labels = [rng.randrange(n_classes) for _ in range(batch_size)]
    # Drawn at varied sizes, then through the same preprocessing as inference (bicubic resize, crop).
    images = [transform(draw_example(lab, rng.choice((96, 128, 192, 256, 384)), rng)) for lab in labels]
    return torch.stack(images), torch.tensor(labels)


def _loss(image_emb: torch.Tensor, text_emb: torch.Tensor, labels: torch.Tensor,
          logit_scale: torch.Tensor) -> torch.Tensor:
    logits = logit_scale.exp().clamp(max=100) * image_emb @ text_emb.T  # [B, C]
    i2t = F.cross_entropy(logits, labels)
    # text→image: each caption against the batch's images, all images of its class positive.
    positives = F.one_hot(labels, num_classes=text_emb.shape[0]).T.float()  # [C, B]
    present = positives.sum(dim=1) > 0
    log_p = F.log_softmax(logits.T, dim=1)
    t2i = -((log_p * positives).sum(dim=1)[present] / positives.sum(dim=1)[present]).mean()
    return (i2t + t2i) / 2


def train(steps: int, batch_size: int, lr: float, seed: int) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train from scratch and return the fp32 model with a report of how it went."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model, transform, tokenizer = _build_model()
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("tiny CLIP: %.2f M parameters", n_params / 1e6)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.98), eps=1e-6,
    )
    warmup = max(1, steps // 12)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return lr * 0.5 * (1 + math.cos(math.pi * progress))

    model.train()
    start = time.perf_counter()
    last_loss = float("nan")
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        images, labels = _batch(batch_size, rng, transform)
        captions = [_class_caption(c, rng) for c in range(len(CLASS_CAPTIONS))]
        image_emb = model.encode_image(images, normalize=True)  # type: ignore[operator]
        text_emb = model.encode_text(tokenizer(captions), normalize=True)  # type: ignore[operator]
        loss = _loss(image_emb, text_emb, labels, model.logit_scale)  # type: ignore[arg-type]
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        last_loss = float(loss.detach())
        if step % 50 == 0 or step == steps - 1:
            logger.info("step %d/%d loss %.4f lr %.2e (%.0f s)", step, steps, last_loss, lr_at(step),
                        time.perf_counter() - start)
    elapsed = time.perf_counter() - start
    model.eval()
    report = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
              "train_seconds": round(elapsed, 1), "final_loss": round(last_loss, 4),
              "parameters": n_params, "torch_threads": torch.get_num_threads()}
    return model, report


def save(model: torch.nn.Module, out: Path) -> int:
    """Write an open_clip ``local-dir:`` folder with fp16 safetensors; return the weights' size in bytes."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": TINY_MODEL_CFG, "preprocess_cfg": TINY_PREPROCESS_CFG}
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    path = out / "open_clip_model.safetensors"
    save_file(state, str(path), metadata={"format": "pt"})
    return path.stat().st_size


@torch.inference_mode()
def evaluate_top1(
    model: torch.nn.Module,
    preprocess: Callable[[Image.Image], torch.Tensor],
    tokenizer: Callable[[Sequence[str]], torch.Tensor],
    *,
    n_per_class: int = 8,
    size: int = 512,
    seed: int = 12345,
) -> float:
    """Zero-shot top-1 over :data:`CLASS_CAPTIONS` on freshly drawn ``size`` px images."""
    rng = random.Random(seed)
    text = model.encode_text(tokenizer(list(CLASS_CAPTIONS)), normalize=True)  # type: ignore[operator]
    labels = [c for c in range(len(CLASS_CAPTIONS)) for _ in range(n_per_class)]
    correct = 0
    for i in range(0, len(labels), 50):
        chunk = labels[i:i + 50]
        images = torch.stack([preprocess(draw_example(c, size, rng)) for c in chunk])
        image = model.encode_image(images.to(text.dtype), normalize=True)  # type: ignore[operator]
        pred = (image @ text.T).argmax(dim=1)
        correct += int((pred == torch.tensor(chunk)).sum())
    return correct / len(labels)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "weights" / "tiny-shapes-clip")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    import open_clip

    model, report = train(args.steps, args.batch_size, args.lr, args.seed)
    report["weights_bytes"] = save(model, args.out)
    # Held-out check through the shipped artefact itself: open_clip's local-dir loader and preprocessing.
    loaded, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{args.out}")
    loaded.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{args.out}")
    report["heldout_top1_512px"] = evaluate_top1(loaded, preprocess, tokenizer, n_per_class=20)
    report["classes"] = len(CLASS_CAPTIONS)
    (args.out / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    logger.info("done: %s", json.dumps(report))


if __name__ == "__main__":
    main()
