from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from quality.technical import TechnicalCheck, TechnicalLimits, check_image

from .conftest import png, shape, text_image


def failures(image: object, limits: TechnicalLimits | None = None) -> set[TechnicalCheck]:
    report, _ = check_image(image, limits)  # type: ignore[arg-type]
    return set(report.failures)


def test_drawings_pass() -> None:
    assert failures(shape("red", "circle")) == set()
    assert failures(png(shape("yellow", "star", size=128))) == set()
    assert failures(text_image()) == set()


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (Image.new("RGB", (512, 512), (120, 80, 200)), {TechnicalCheck.UNIFORM}),
        (Image.new("RGB", (512, 512), (0, 0, 0)), {TechnicalCheck.UNIFORM, TechnicalCheck.NEAR_BLACK}),
        (Image.new("RGB", (512, 512), (255, 255, 255)), {TechnicalCheck.UNIFORM, TechnicalCheck.NEAR_WHITE}),
        (Image.new("L", (512, 512), 128), {TechnicalCheck.UNIFORM}),
    ],
)
def test_blank_black_white(image: Image.Image, expected: set[TechnicalCheck]) -> None:
    assert failures(image) == expected


def test_near_black_with_noise_is_still_near_black() -> None:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 8, size=(256, 256, 3), dtype=np.uint8)
    assert TechnicalCheck.NEAR_BLACK in failures(arr)
    dark_scene = np.zeros((256, 256, 3), dtype=np.uint8)
    dark_scene[64:192, 64:192] = 12  # a dim but real shape on black: dark, not blank
    assert failures(dark_scene) == {TechnicalCheck.NEAR_BLACK}


def test_too_small() -> None:
    assert failures(shape("blue", "square", size=48)) == {TechnicalCheck.TOO_SMALL}
    assert failures(shape("blue", "square", size=48), TechnicalLimits(min_side=32)) == set()


def test_nan_in_a_float_image() -> None:
    arr = np.asarray(shape("green", "triangle"), dtype=np.float32) / 255.0
    assert failures(arr) == set()
    arr[100:140, 100:140] = np.nan
    assert TechnicalCheck.NON_FINITE in failures(arr)
    all_nan = np.full((256, 256, 3), np.nan, dtype=np.float32)
    assert failures(all_nan) >= {TechnicalCheck.NON_FINITE, TechnicalCheck.NEAR_BLACK}


def test_undecodable_bytes() -> None:
    report, image = check_image(b"definitely not a png")
    assert image is None
    assert report.failures == (TechnicalCheck.UNDECODABLE,)
    assert not report.ok
    assert report.to_dict()["failures"] == ["undecodable"]


def test_rgba_and_palette_images_are_read() -> None:
    rgba = shape("orange", "star").convert("RGBA")
    assert failures(rgba) == set()
    assert failures(png(shape("purple", "circle").convert("P"))) == set()


def _reports_both_ways(images: list[np.ndarray], size: int) -> tuple[list[object], list[object]]:
    """The strided-sample reports (GPU tensor path) and the model-scale ones (CPU tensor path)."""
    import torch

    from quality.preprocess import TensorPreprocess
    from quality.technical import decode_rgb_array, judge_batch, judge_resized

    limits = TechnicalLimits()
    decoded = [decode_rgb_array(a, limits)[0] for a in images]
    sampled = judge_batch(decoded, np.stack(images), limits)
    prep = TensorPreprocess(size, [0.5] * 3, [0.5] * 3)
    with torch.inference_mode():
        resized = judge_resized(decoded, [prep.resize_one(a) for a in images], limits)
    return sampled, resized  # type: ignore[return-value]


@pytest.mark.parametrize("size", [64, 224])
def test_model_scale_checks_agree_with_the_sampled_ones(size: int) -> None:
    """The CPU path reads the statistics from the picture at the model's scale: same verdicts, same
    brightness within a grey level, on drawings, blanks, near-black noise and a dim shape. (Pixel
    noise averages out at that scale: the noisy black frame is also blank there, as the model sees it.)"""
    rng = np.random.default_rng(1)
    dark_scene = np.zeros((512, 512, 3), dtype=np.uint8)
    dark_scene[128:384, 128:384] = 12
    images = [
        np.array(shape("red", "circle")), np.array(text_image(seed=3)), np.array(shape("blue", "star", seed=4)),
        np.full((512, 512, 3), (120, 80, 200), dtype=np.uint8), np.zeros((512, 512, 3), dtype=np.uint8),
        np.full((512, 512, 3), 255, dtype=np.uint8), rng.integers(0, 8, size=(512, 512, 3), dtype=np.uint8),
        dark_scene,
    ]
    sampled, resized = _reports_both_ways(images, size)
    expected = [set(), set(), set(), {TechnicalCheck.UNIFORM}, {TechnicalCheck.UNIFORM, TechnicalCheck.NEAR_BLACK},
                {TechnicalCheck.UNIFORM, TechnicalCheck.NEAR_WHITE}, {TechnicalCheck.NEAR_BLACK},
                {TechnicalCheck.NEAR_BLACK}]
    assert [set(r.failures) for r in sampled] == expected  # type: ignore[attr-defined]
    at_scale = [set(r.failures) for r in resized]  # type: ignore[attr-defined]
    assert at_scale[:6] + at_scale[7:] == expected[:6] + expected[7:]
    assert at_scale[6] - {TechnicalCheck.UNIFORM} == expected[6]
    for a, b in zip(sampled, resized, strict=True):
        assert abs(a.mean - b.mean) < 1.0  # type: ignore[attr-defined]
