from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from quality import (
    DEFAULT_MODEL,
    ClipEvaluator,
    ModelCache,
    Registry,
    SharedEncoders,
    UnknownModel,
    WeightsKind,
    WeightsUnavailable,
    choose_device,
    hub_reachable,
    load_model,
)

from .conftest import png, shape


def test_packaged_registry(registry: Registry) -> None:
    assert DEFAULT_MODEL == "vit-l-14-openai"
    prod = registry.get(DEFAULT_MODEL)
    assert (prod.architecture, prod.weights, prod.image_size) == ("ViT-L-14-quickgelu", "openai", 224)
    assert prod.weights_kind is WeightsKind.HUB_TAG
    tiny = registry.get("tiny-shapes")
    assert tiny.weights_kind is WeightsKind.LOCAL_DIR
    assert Path(tiny.weights or "").is_absolute()
    assert registry.get("vit-b-32-random").weights_kind is WeightsKind.RANDOM
    assert {"vit-b-32-openai", "vit-l-14-random"} <= set(registry.names())
    with pytest.raises(UnknownModel, match="tiny-shapes"):
        registry.get("nope")


def test_user_registry_with_relative_local_weights(tmp_path: Path, registry: Registry) -> None:
    tiny = registry.get("tiny-shapes")
    shutil.copytree(tiny.weights or "", tmp_path / "weights" / "mine")
    (tmp_path / "models.json").write_text(json.dumps({"models": {"my-shapes": {
        "architecture": None, "weights": "weights/mine", "image_size": 64}}}))
    mine = Registry.load(tmp_path / "models.json").get("my-shapes")
    assert mine.weights == str((tmp_path / "weights" / "mine").resolve())
    loaded = load_model(mine, device="cpu")
    assert loaded.embed_dim == 128
    assert loaded.context_length == 77
    assert loaded.precision == "fp32"
    assert not loaded.model.training
    assert loaded.weights_id.startswith("local-dir:")


def test_hub_tag_offline_fails_fast_and_says_what_to_do(registry: Registry) -> None:
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert not hub_reachable()
    started = time.perf_counter()
    with pytest.raises(WeightsUnavailable, match="local file"):
        load_model(registry.get(DEFAULT_MODEL), device="cpu")
    assert time.perf_counter() - started < 5


def test_missing_local_weights(tmp_path: Path) -> None:
    (tmp_path / "r.json").write_text(json.dumps({"models": {
        "gone": {"architecture": "ViT-B-32", "weights": "nowhere/model.safetensors", "image_size": 224},
        "gone-dir": {"architecture": None, "weights": "nowhere", "image_size": 64}}}))
    reg = Registry.load(tmp_path / "r.json", include_packaged=False)
    assert reg.names() == ["gone", "gone-dir"]
    assert reg.get("gone").weights_kind is WeightsKind.LOCAL_FILE
    with pytest.raises(WeightsUnavailable):
        load_model(reg.get("gone"))
    with pytest.raises(WeightsUnavailable):
        load_model(reg.get("gone-dir"))


def test_device_choice() -> None:
    choice = choose_device("cpu")
    assert (choice.device.type, choice.precision, choice.dtype) == ("cpu", "fp32", torch.float32)
    with pytest.raises(ValueError, match="fp32"):
        choose_device("cpu", "fp16")
    auto = choose_device()
    assert auto.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    if auto.device.type == "cuda":
        assert auto.precision == "fp16"


def test_model_cache_loads_once(registry: Registry) -> None:
    cache = ModelCache()
    spec = registry.get("tiny-shapes")
    first = cache.get(spec, device="cpu")
    assert cache.get(spec, device="cpu") is first
    assert len(cache) == 1


async def test_vit_b32_random_weights_load_batch_and_shape(vit_b32: ClipEvaluator) -> None:
    enc = vit_b32.encoder
    assert enc is not None
    assert (enc.model.embed_dim, enc.model.context_length, enc.model.spec.image_size) == (512, 77, 224)
    images = [png(shape("red", "circle", seed=i)) for i in range(3)]
    sims = await vit_b32.similarities(images, ["a red circle", "a blue star"])
    assert sims.shape == (3, 2)
    assert np.isfinite(sims).all()
    assert (np.abs(sims) <= 1.0001).all()
    scores = await vit_b32.score(images, "a red circle", negative="a blue star")
    assert [set(s.parts) for s in scores] == [{"alignment", "negative", "technical"}] * 3


async def test_vit_l14_random_weights_load_and_shape() -> None:
    """The production architecture (random weights), once, at batch 2: about 15 s on one CPU thread."""
    encoders = SharedEncoders(ModelCache())  # not the process-wide one: 1.7 GB freed after the test
    evaluator = ClipEvaluator("vit-l-14-random", device="cpu", encoders=encoders)
    sims = await evaluator.similarities([shape("red", "circle"), shape("blue", "star")], ["a red circle"])
    assert sims.shape == (2, 1)
    assert np.isfinite(sims).all()
    assert evaluator.encoder is not None
    assert evaluator.encoder.model.embed_dim == 768
    assert evaluator.encoder.stats.largest_batch >= 2  # both images in one batch (with the text)
    encoders.close_all()


@pytest.mark.gpu
async def test_tiny_on_gpu_in_fp16_still_ranks() -> None:
    import random

    from .conftest import CLASS_CAPTIONS, draw_example

    evaluator = ClipEvaluator("tiny-shapes")  # automatic: CUDA, fp16
    rng = random.Random(99)
    labels = [c for c in range(len(CLASS_CAPTIONS)) for _ in range(4)]
    sims = await evaluator.similarities([draw_example(c, 512, rng) for c in labels], list(CLASS_CAPTIONS))
    assert evaluator.encoder is not None
    assert evaluator.encoder.model.precision == "fp16"
    assert float((sims.argmax(axis=1) == np.array(labels)).mean()) >= 0.9


@pytest.mark.gpu
async def test_vit_l14_random_on_gpu_fp16() -> None:
    evaluator = ClipEvaluator("vit-l-14-random")
    scores = await evaluator.score([shape("red", "circle", seed=i) for i in range(8)], "a red circle")
    assert len(scores) == 8
    assert all(np.isfinite(s.value) for s in scores)
