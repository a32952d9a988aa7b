"""Images per second: the quality evaluator vs torchmetrics' CLIPScore vs a straightforward open_clip loop.

One run, the same architecture and the same weights for all three, prompts repeated as a gate would
(one prompt, many candidate images):

* ``evaluator``: ``quality.ClipEvaluator.score(images, prompt)`` (cached text embedding; on the CPU
  each picture resized straight from its array, the checks read at the model's scale, one batch
  through the fused image tower of :mod:`quality.tower`; on a GPU one uint8 stack resized on the
  device; model work off the event loop). Fed uint8 ``H×W×3`` arrays; ``evaluator_pil`` is the
  same evaluator fed the PIL images (it then pays the PIL-to-array copy the others are spared);
* ``naive``: the open_clip loop everyone writes first: tokenise and encode the prompt, preprocess
  each image, encode the batch, on every call (same open_clip model object as the evaluator's);
* ``torchmetrics``: ``torchmetrics.multimodal.CLIPScore`` over a transformers ``CLIPModel`` built
  offline from a ``CLIPConfig`` of the same shape, with the open_clip weights converted into it
  (and a ``CLIPProcessor`` whose tokenizer is made from open_clip's own BPE vocabulary), fed the
  uint8 ``[3, H, W]`` tensors it asks for, on the model's device.

Inputs are procedurally drawn 512 px pictures, decoded once and untimed, each in the form its API
takes (the tensors are views of the evaluator's arrays): decoding a file would cost the same for all.
The contestants take turns for ``--rounds`` rounds (order reversed every other round), so a shared
machine's load falls on all alike; img/s is the median over rounds, and ``speedup`` the median of
the per-round ratios. The cosines of the three are compared on the same images as a check that they
compute the same thing.

    python bench/clip_throughput.py                       # CPU: tiny-shapes and vit-b-32-random
    python bench/clip_throughput.py --models vit-b-32-random vit-l-14-random --precision fp16
    python bench/clip_throughput.py --out bench.json

Targets (issue 1, item 6): ≥ 1.5× torchmetrics at batch 32 on the CPU; on a GPU, ViT-B-32 and
ViT-L-14 in fp16 ≥ 2× torchmetrics. Prints JSON.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import asyncio
import json
import platform
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quality import ClipEvaluator, default_registry
from quality.train_tiny import CLASS_CAPTIONS, draw_example

PROMPT = "a photo of a red circle, highly detailed"


def make_images(n: int, size: int, seed: int = 0) -> list[Image.Image]:
    rng = random.Random(seed)
    return [draw_example(rng.randrange(len(CLASS_CAPTIONS)), size, rng) for _ in range(n)]


# -- the open_clip model as a transformers CLIPModel -------------------------------------------------


def _act(block: torch.nn.Module) -> str:
    return "quick_gelu" if type(block.mlp.gelu).__name__ == "QuickGELU" else "gelu"


def hf_clip_from_open_clip(model: torch.nn.Module) -> Any:
    """A transformers ``CLIPModel`` of the same shape as an open_clip ``CLIP``, with its weights."""
    from transformers import CLIPConfig, CLIPModel

    vis, vblocks = model.visual, model.visual.transformer.resblocks
    tblocks = model.transformer.resblocks
    patch = vis.conv1.kernel_size[0]
    image_size = vis.image_size[0] if isinstance(vis.image_size, tuple | list) else vis.image_size
    cfg = CLIPConfig(
        text_config={
            "vocab_size": model.token_embedding.num_embeddings,
            "hidden_size": model.token_embedding.embedding_dim,
            "intermediate_size": tblocks[0].mlp.c_fc.out_features,
            "num_attention_heads": tblocks[0].attn.num_heads,
            "num_hidden_layers": len(tblocks),
            "max_position_embeddings": model.positional_embedding.shape[0],
            "hidden_act": _act(tblocks[0]),
            "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407,
        },
        vision_config={
            "hidden_size": vis.conv1.out_channels,
            "intermediate_size": vblocks[0].mlp.c_fc.out_features,
            "num_attention_heads": vblocks[0].attn.num_heads,
            "num_hidden_layers": len(vblocks),
            "image_size": image_size,
            "patch_size": patch,
            "hidden_act": _act(vblocks[0]),
        },
        projection_dim=model.text_projection.shape[1],
    )
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {"logit_scale": sd["logit_scale"].reshape(())}

    def blocks(src: str, dst: str, n: int) -> None:
        for i in range(n):
            s, d = f"{src}.{i}", f"{dst}.{i}"
            q, k, v = sd[f"{s}.attn.in_proj_weight"].chunk(3)
            qb, kb, vb = sd[f"{s}.attn.in_proj_bias"].chunk(3)
            out.update({
                f"{d}.self_attn.q_proj.weight": q, f"{d}.self_attn.k_proj.weight": k,
                f"{d}.self_attn.v_proj.weight": v, f"{d}.self_attn.q_proj.bias": qb,
                f"{d}.self_attn.k_proj.bias": kb, f"{d}.self_attn.v_proj.bias": vb,
                f"{d}.self_attn.out_proj.weight": sd[f"{s}.attn.out_proj.weight"],
                f"{d}.self_attn.out_proj.bias": sd[f"{s}.attn.out_proj.bias"],
                f"{d}.layer_norm1.weight": sd[f"{s}.ln_1.weight"], f"{d}.layer_norm1.bias": sd[f"{s}.ln_1.bias"],
                f"{d}.layer_norm2.weight": sd[f"{s}.ln_2.weight"], f"{d}.layer_norm2.bias": sd[f"{s}.ln_2.bias"],
                f"{d}.mlp.fc1.weight": sd[f"{s}.mlp.c_fc.weight"], f"{d}.mlp.fc1.bias": sd[f"{s}.mlp.c_fc.bias"],
                f"{d}.mlp.fc2.weight": sd[f"{s}.mlp.c_proj.weight"], f"{d}.mlp.fc2.bias": sd[f"{s}.mlp.c_proj.bias"],
            })

    blocks("transformer.resblocks", "text_model.encoder.layers", len(tblocks))
    blocks("visual.transformer.resblocks", "vision_model.encoder.layers", len(vblocks))
    out.update({
        "text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
        "text_model.final_layer_norm.weight": sd["ln_final.weight"],
        "text_model.final_layer_norm.bias": sd["ln_final.bias"],
        "text_projection.weight": sd["text_projection"].T.contiguous(),
        "vision_model.embeddings.class_embedding": sd["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": sd["visual.conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": sd["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": sd["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": sd["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": sd["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": sd["visual.ln_post.bias"],
        "visual_projection.weight": sd["visual.proj"].T.contiguous(),
    })
    class TensorFeaturesCLIP(CLIPModel):  # type: ignore[misc]
        """transformers 5 returns a ModelOutput from get_*_features; torchmetrics 1.9 wants the tensor."""

        def get_image_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
            out = super().get_image_features(*args, **kwargs)
            return out if isinstance(out, torch.Tensor) else out.pooler_output

        def get_text_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
            out = super().get_text_features(*args, **kwargs)
            return out if isinstance(out, torch.Tensor) else out.pooler_output

    hf = TensorFeaturesCLIP(cfg)
    missing, unexpected = hf.load_state_dict(out, strict=False)
    missing = [m for m in missing if not m.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"weight conversion: missing {missing}, unexpected {unexpected}")
    return hf.eval()


def hf_processor(image_size: int, mean: Sequence[float], std: Sequence[float]) -> Any:
    """A ``CLIPProcessor`` built offline: the image processor's defaults, open_clip's BPE vocabulary."""
    import open_clip
    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizer

    simple = open_clip.SimpleTokenizer()
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(tok, tok): idx for tok, idx in simple.encoder.items()}
    merges = [" ".join(pair) for pair, _ in sorted(simple.bpe_ranks.items(), key=lambda kv: kv[1])]
    folder = Path(tempfile.mkdtemp(prefix="clip-bpe-"))
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    images = CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": image_size}, resample=3, do_center_crop=True,
        crop_size={"height": image_size, "width": image_size}, do_rescale=True, do_normalize=True,
        image_mean=list(mean), image_std=list(std), do_convert_rgb=True,
    )
    return CLIPProcessor(image_processor=images, tokenizer=tokenizer)


# -- the three contestants ---------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(calls: dict[str, Callable[[], Any]], n_images: int, device: torch.device, *, rounds: int,
            min_seconds: float, warmup: int = 1) -> dict[str, list[float]]:
    """Images/s of each call in each of ``rounds`` rounds. The contestants take turns (the order
    reversed every other round), each for at least ``min_seconds / rounds`` and one call per round,
    so that a neighbour's load on a shared machine falls on all of them alike."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    _sync(device)
    rates: dict[str, list[float]] = {name: [] for name in calls}
    for r in range(rounds):
        for name in (list(calls) if r % 2 == 0 else list(reversed(calls))):
            iters, started = 0, time.perf_counter()
            while iters < 1 or time.perf_counter() - started < min_seconds / rounds:
                calls[name]()
                iters += 1
            _sync(device)
            rates[name].append(iters * n_images / (time.perf_counter() - started))
    return rates


def naive_scorer(loaded: Any) -> Callable[[Sequence[Image.Image], str], torch.Tensor]:
    model, preprocess, tokenizer = loaded.model, loaded.preprocess, loaded.tokenizer
    device, dtype = loaded.device, loaded.dtype

    @torch.inference_mode()
    def score(images: Sequence[Image.Image], prompt: str) -> torch.Tensor:
        text = model.encode_text(tokenizer([prompt]).to(device), normalize=True)
        pixels = torch.stack([preprocess(im) for im in images]).to(device, dtype)
        image = model.encode_image(pixels, normalize=True)
        return (image @ text.T).squeeze(1).float().cpu()  # cosines; CLIPScore is 2.5 · max(cos, 0)

    return score


def run_model(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from torchmetrics.functional.multimodal.clip_score import _clip_score_update
    from torchmetrics.multimodal import CLIPScore

    spec = default_registry().get(name)
    precision = args.precision or ("fp16" if device.type == "cuda" else "fp32")
    t0 = time.perf_counter()
    evaluator = ClipEvaluator(spec, device=device, precision=precision, max_batch=max(args.batches),
                              max_wait_ms=args.max_wait_ms)
    encoder = evaluator.load()
    loaded = encoder.model
    hf = hf_clip_from_open_clip(loaded.model).to(device, loaded.dtype)
    processor = hf_processor(spec.image_size, spec.mean, spec.std)
    metric = CLIPScore(model_name_or_path=lambda: (hf, processor)).to(device)
    naive = naive_scorer(loaded)
    setup_s = time.perf_counter() - t0

    pool = make_images(max(args.batches), args.image_size)
    # The same decoded pixels for everyone, each in the form its API takes, made once, untimed: uint8
    # H×W×3 arrays for the evaluator, the [3, H, W] tensor views of those arrays for torchmetrics, PIL
    # images for the naive loop (open_clip's transform takes PIL). The evaluator is also timed on the
    # PIL images (``evaluator_pil_img_s``): that adds its PIL-to-array conversion, which the others
    # are spared.
    arrays = [np.array(im) for im in pool]
    tensors = [torch.from_numpy(a).permute(2, 0, 1).to(device) for a in arrays]

    # Same thing computed? Cosines of the three on the same images.
    n_check = min(8, len(pool))
    ours = [s.cosines["prompt"] for s in evaluator.score_sync(arrays[:n_check], PROMPT)]
    ours_pil = [s.cosines["prompt"] for s in evaluator.score_sync(pool[:n_check], PROMPT)]
    with torch.inference_mode():
        theirs = (_clip_score_update(tensors[:n_check], [PROMPT] * n_check, hf, processor)[0] / 100).float().cpu()
    plain = naive(pool[:n_check], PROMPT).tolist()
    agreement = {
        "cos_range": [round(min(ours), 4), round(max(ours), 4)],
        "max_abs_cos_diff_vs_naive": max(abs(a - b) for a, b in zip(ours, plain, strict=True)),
        "max_abs_cos_diff_array_vs_pil_input": max(abs(a - b) for a, b in zip(ours, ours_pil, strict=True)),
        "max_abs_cos_diff_vs_torchmetrics": max(abs(a - float(b)) for a, b in zip(ours, theirs, strict=True)),
    }

    rows = []
    loop = asyncio.new_event_loop()
    try:
        for batch in args.batches:
            images, arrs, tens = pool[:batch], arrays[:batch], tensors[:batch]
            prompts = [PROMPT] * batch

            def tm(tens: list[torch.Tensor] = tens, prompts: list[str] = prompts) -> None:
                with torch.inference_mode():
                    metric.update(tens, prompts)

            rates = measure({
                "evaluator": lambda arrs=arrs: loop.run_until_complete(evaluator.score(arrs, PROMPT)),
                "evaluator_pil": lambda images=images: loop.run_until_complete(evaluator.score(images, PROMPT)),
                "naive": lambda images=images: naive(images, PROMPT),
                "torchmetrics": tm,
            }, batch, device, rounds=args.rounds, min_seconds=args.min_seconds)
            med = {name: statistics.median(r) for name, r in rates.items()}

            def ratio(a: str, b: str, rates: dict[str, list[float]] = rates) -> float:
                """Median over rounds of a ÷ b measured side by side in the same round."""
                return round(statistics.median(x / y for x, y in zip(rates[a], rates[b], strict=True)), 2)

            rows.append({"batch": batch, "evaluator_img_s": round(med["evaluator"], 2),
                         "evaluator_pil_img_s": round(med["evaluator_pil"], 2),
                         "naive_img_s": round(med["naive"], 2), "torchmetrics_img_s": round(med["torchmetrics"], 2),
                         "speedup_vs_torchmetrics": ratio("evaluator", "torchmetrics"),
                         "speedup_vs_torchmetrics_pil_input": ratio("evaluator_pil", "torchmetrics"),
                         "speedup_vs_naive": ratio("evaluator", "naive"),
                         "speedup_vs_torchmetrics_each_round": [
                             round(x / y, 2) for x, y in zip(rates["evaluator"], rates["torchmetrics"], strict=True)]})
            print(f"# {name} {precision} batch {batch}: {rows[-1]}", file=sys.stderr, flush=True)
    finally:
        loop.close()
    stats = encoder.stats
    result = {
        "model": name, "architecture": spec.architecture or "local-dir", "weights": spec.weights_kind.value,
        "precision": precision, "image_size": spec.image_size, "setup_s": round(setup_s, 1),
        "evaluator_preprocess": encoder.preprocess_mode,
        "agreement": agreement, "results": rows,
        "evaluator_batches": {"count": stats.batches, "mean": round(stats.mean_batch, 2),
                              "largest": stats.largest_batch},
    }
    encoder.close()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--models", nargs="+", default=None,
                        help="Registry names (default: tiny-shapes and vit-b-32-random on CPU, "
                             "vit-b-32-random and vit-l-14-random on CUDA).")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--device", default=None, help="Default: CUDA when present.")
    parser.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default=None)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--min-seconds", type=float, default=3.0,
                        help="Least time per contestant and batch size, over all rounds.")
    parser.add_argument("--rounds", type=int, default=5, help="Turns each contestant takes (at least one call each).")
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=None, help="Also write the JSON here.")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    models = args.models or (["vit-b-32-random", "vit-l-14-random"] if device.type == "cuda"
                             else ["tiny-shapes", "vit-b-32-random"])
    import open_clip
    import torchmetrics
    import transformers

    report: dict[str, Any] = {
        "bench": "clip_throughput",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "open_clip": open_clip.__version__,
                     "torchmetrics": torchmetrics.__version__, "transformers": transformers.__version__},
        "prompt": PROMPT, "image_px": args.image_size,
        "models": [run_model(name, args, device) for name in models],
    }
    largest = max(args.batches)
    target = 2.0 if device.type == "cuda" else 1.5
    report["target"] = {"batch": largest, "speedup_vs_torchmetrics": target, "met": {
        m["model"]: next(r["speedup_vs_torchmetrics"] for r in m["results"] if r["batch"] == largest) >= target
        for m in report["models"]}}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
