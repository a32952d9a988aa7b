from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from PIL import Image

from quality import (
    ClipEvaluator,
    Evaluator,
    EvaluatorClosed,
    ModelCache,
    QualityScore,
    ScoreWeights,
    SharedEncoders,
)

from .conftest import TINY, png, shape, text_image


def test_satisfies_the_pipeline_protocol(tiny: ClipEvaluator) -> None:
    evaluator: Evaluator = tiny  # checked statically; the call below checks the runtime shape
    scores = evaluator.score  # noqa: F841


async def test_parts_and_combined_value(tiny: ClipEvaluator) -> None:
    [s] = await tiny.score([png(shape("red", "circle"))], "a photo of a red circle")
    assert isinstance(s, QualityScore)
    assert set(s.parts) == {"alignment", "technical"}
    assert s.parts["alignment"] == pytest.approx(2.5 * max(s.cosines["prompt"], 0.0))
    assert s.value == pytest.approx(s.parts["alignment"])
    assert s.weights == {"alignment": 1.0}
    assert s.model == TINY
    assert s.ok
    assert "alignment" in s.explain()
    assert s.to_dict()["prompt"]["cleaned"] == "a photo of a red circle"  # type: ignore[index]


async def test_negative_prompt_is_a_penalty(tiny: ClipEvaluator) -> None:
    image = shape("green", "star", seed=3)
    [plain] = await tiny.score([image], "a photo of a green star")
    [same] = await tiny.score([image], "a photo of a green star", negative="a photo of a green star")
    assert same.parts["negative"] == pytest.approx(same.parts["alignment"])
    assert same.value == pytest.approx(0.0, abs=1e-6)
    [penalised] = await tiny.score([image], "a photo of a green star", negative="a green star")
    assert penalised.value < plain.value
    assert penalised.weights == {"alignment": 1.0, "negative": -1.0}
    [text_neg] = await tiny.score([text_image(seed=4)], "a picture of text", negative="a picture of text")
    assert text_neg.value == pytest.approx(0.0, abs=1e-6)


async def test_configurable_weights(tiny: ClipEvaluator) -> None:
    weighted = ClipEvaluator(TINY, device="cpu", weights={"alignment": 2.0, "negative": 0.5})
    image = shape("yellow", "triangle", seed=9)
    [a] = await tiny.score([image], "a yellow triangle", negative="a blue square")
    [b] = await weighted.score([image], "a yellow triangle", negative="a blue square")
    assert b.value == pytest.approx(2.0 * a.parts["alignment"] - 0.5 * a.parts["negative"], abs=1e-5)
    with pytest.raises(ValueError, match="unknown score weights"):
        ScoreWeights.from_mapping({"beauty": 1.0})


async def test_technical_failures_score_zero_without_the_model(tiny: ClipEvaluator) -> None:
    images = [
        Image.new("RGB", (512, 512), (0, 0, 0)),
        b"not an image",
        np.full((128, 128, 3), np.nan, dtype=np.float32),
        shape("red", "circle", size=32),
        shape("red", "circle"),
    ]
    scores = await tiny.score(images, "a photo of a red circle")
    assert [s.ok for s in scores] == [False, False, False, False, True]
    for s in scores[:4]:
        assert s.value == 0.0
        assert s.parts == {"technical": 0.0}
        assert s.weights == {}
    assert [str(f) for f in scores[1].technical.failures] == ["undecodable"]
    assert "failed" in scores[0].explain()


async def test_comfyui_syntax_hits_the_same_cache_entry(tiny: ClipEvaluator) -> None:
    enc = tiny.encoder
    assert enc is not None
    image = shape("purple", "square", seed=1)
    [plain] = await tiny.score([image], "a photo of a purple square")
    hits = enc.text_cache.hits
    [fancy] = await tiny.score([image], "a photo of a (purple:1.3) ((square)), embedding:neg <lora:x:0.6>")
    assert enc.text_cache.hits == hits + 1
    assert fancy.value == pytest.approx(plain.value)
    assert fancy.prompt.cleaned == "a photo of a purple square"


async def test_long_prompt_is_flagged(tiny: ClipEvaluator) -> None:
    prompt = "a photo of a red circle, " + ", ".join(f"detail {i}" for i in range(60))
    [s] = await tiny.score([shape("red", "circle")], prompt)
    assert s.prompt.truncated
    assert s.prompt.n_tokens > 77
    assert s.prompt.context_length == 77


async def test_evaluators_share_one_model_and_batch_together() -> None:
    encoders = SharedEncoders(ModelCache())
    a = ClipEvaluator(TINY, device="cpu", encoders=encoders, max_wait_ms=200)
    b = ClipEvaluator(TINY, device="cpu", encoders=encoders)
    async with a, b:
        assert a.encoder is b.encoder
        assert a.encoder is not None
        assert a.encoder.model is b.encoder.model
        assert len(encoders.models) == 1
        prompts = ["a photo of a red circle", "a photo of a blue star", "a picture of text"]
        images = [shape("red", "circle", seed=i) for i in range(4)]
        await a.score(images[:1], prompts[0])  # warm the cache and the worker
        before = a.encoder.stats.batches
        results = await asyncio.gather(*(ev.score(images, p) for ev in (a, b) for p in prompts))
        assert [len(r) for r in results] == [4] * 6
        stats = a.encoder.stats
        assert stats.largest_batch > 4  # requests of different callers in one batch
        assert stats.batches - before < 6
    with pytest.raises(EvaluatorClosed):
        await a.score(images, prompts[0])
    encoders.close_all()


async def test_event_loop_is_never_blocked_by_model_work(vit_b32: ClipEvaluator) -> None:
    """A ViT-B/32 batch takes about a second on a CPU; the loop must keep ticking through it."""
    evaluator = vit_b32
    assert evaluator.encoder is not None
    busy_before = evaluator.encoder.stats.busy_seconds
    gaps: list[float] = []
    stop = asyncio.Event()

    async def heartbeat() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    beat = asyncio.create_task(heartbeat())
    images = [png(shape("red", "circle", seed=i)) for i in range(4)]
    scores = await evaluator.score(images, "a photo of a red circle")
    stop.set()
    await beat
    assert len(scores) == 4
    assert all(s.ok for s in scores)
    busy = evaluator.encoder.stats.busy_seconds - busy_before
    assert max(gaps) < max(0.25, busy / 2), (max(gaps), busy)


async def test_tensor_preprocessing_matches_open_clips_pil_path() -> None:
    """The batched on-device path (the default on CUDA), run here on the CPU: same scores within ~1e-3."""
    from .conftest import CLASS_CAPTIONS

    images = [shape("red", "circle", seed=1), shape("blue", "star", size=300, seed=2), text_image(seed=5),
              Image.new("RGB", (256, 256), (0, 0, 0))]
    pil = ClipEvaluator(TINY, device="cpu", preprocess="pil", encoders=SharedEncoders(ModelCache()))
    tensor = ClipEvaluator(TINY, device="cpu", preprocess="tensor", encoders=SharedEncoders(ModelCache()))
    a = await pil.similarities(images, list(CLASS_CAPTIONS))
    b = await tensor.similarities(images, list(CLASS_CAPTIONS))
    assert np.isnan(a[3]).all()
    assert np.isnan(b[3]).all()  # the blank image fails its checks either way
    assert np.abs(a[:3] - b[:3]).max() < 0.01
    assert (a[:3].argmax(axis=1) == b[:3].argmax(axis=1)).all()
    assert tensor.encoder is not None
    assert tensor.encoder.preprocess_mode == "tensor"


async def test_one_call_is_one_model_batch() -> None:
    """A caller's images reach the model together, however slowly they are decoded (no max_wait)."""
    encoders = SharedEncoders(ModelCache())
    evaluator = ClipEvaluator(TINY, device="cpu", encoders=encoders, max_batch=16, max_wait_ms=0)
    async with evaluator:
        images = [png(shape("red", "circle", seed=i)) for i in range(12)] + [Image.new("RGB", (96, 96))]
        await evaluator.score(images[:1], "a photo of a red circle")
        assert evaluator.encoder is not None
        stats = evaluator.encoder.stats
        before, items = stats.batches, stats.items
        scores = await evaluator.score(images, "a photo of a red circle")
        assert [s.ok for s in scores] == [True] * 12 + [False]  # the blank one costs no model time
        assert (stats.batches - before, stats.items - items) == (1, 12)
        more = await evaluator.score(images[:12] * 2, "a photo of a red circle")  # 24 > max_batch
        assert stats.batches - before == 3
        assert stats.largest_batch == 16
        assert [s.value for s in more[12:]] == pytest.approx([s.value for s in more[:12]], abs=1e-5)
    encoders.close_all()
