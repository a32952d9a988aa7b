"""The deterministic sampler: a predictable rule, the same bytes for the same inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from PIL import Image

from comfy_orchestrator.testing import (
    COLOURS,
    FakeComfyUI,
    SampleRequest,
    ShapeSpec,
    expected_spec,
    parse_shape_prompt,
    render_sample,
    sampler_succeeds,
)
from tests.double.conftest import WsClient, sampler_prompt, submit

MODEL = "sd15.safetensors"


def test_success_rule_rates_and_monotonic_in_steps() -> None:
    seeds = range(2000)
    rates = {steps: sum(sampler_succeeds(s, MODEL, steps) for s in seeds) / len(seeds) for steps in (5, 15, 30)}
    assert rates[5] == pytest.approx(0.25, abs=0.04)
    assert rates[15] == pytest.approx(0.5, abs=0.04)
    assert rates[30] == pytest.approx(0.75, abs=0.04)
    for seed in seeds:
        few, more, most = (sampler_succeeds(seed, MODEL, steps) for steps in (5, 15, 30))
        assert few <= more <= most
    assert any(sampler_succeeds(s, MODEL, 5) != sampler_succeeds(s, "other.safetensors", 5) for s in seeds)


def test_expected_spec_is_right_on_success_and_wrong_otherwise() -> None:
    spec = ShapeSpec("red", "circle")
    for seed in range(50):
        got = expected_spec("a photo of a red circle", seed, MODEL, 20)
        assert got is not None
        if sampler_succeeds(seed, MODEL, 20):
            assert got == spec
        else:
            assert got.colour != "red"
            assert got.shape != "circle"
    assert expected_spec("a landscape", 1, MODEL, 20) is None


def _seed(succeeds: bool, steps: int = 4) -> int:
    return next(s for s in range(1000) if sampler_succeeds(s, MODEL, steps) is succeeds)


async def _run(session: aiohttp.ClientSession, server: FakeComfyUI, client: WsClient,
               prompt: dict[str, Any]) -> list[Path]:
    messages = await client.until_done(await submit(session, server, prompt, "client-a"))
    outputs = [m.data["output"] for m in messages if m.type == "executed"]
    return [server.output_dir / i["subfolder"] / i["filename"] for o in outputs for i in o.get("images", [])]


def _centre(path: Path) -> tuple[int, int, int]:
    with Image.open(path) as image:
        pixel = image.convert("RGB").getpixel((image.width // 2, image.height // 2))
    assert isinstance(pixel, tuple)
    return (int(pixel[0]), int(pixel[1]), int(pixel[2]))


def _nearest_colour(rgb: tuple[int, int, int]) -> str:
    return min(COLOURS, key=lambda name: sum((a - b) ** 2 for a, b in zip(COLOURS[name], rgb, strict=True)))


@pytest.mark.parametrize("succeeds", [True, False])
async def test_the_prompt_shape_is_drawn_when_the_rule_says_so(
    session: aiohttp.ClientSession, server: FakeComfyUI, client: WsClient, succeeds: bool
) -> None:
    seed = _seed(succeeds)
    text = "a photo of a green square, high quality"
    (path,) = await _run(session, server, client, sampler_prompt(text, seed, prefix=f"shape_{succeeds}"))
    want = expected_spec(text, seed, MODEL, 4)
    assert want is not None
    assert (want == parse_shape_prompt(text)) is succeeds
    assert _nearest_colour(_centre(path)) == want.colour
    expected = render_sample(SampleRequest(text, seed, 4, MODEL, 64, 64, 1.0, 7.0, "euler", "normal"))
    with Image.open(path) as image:
        saved = np.asarray(image.convert("RGB"), dtype=np.int16)
    assert np.abs(saved - np.asarray(expected, dtype=np.int16)).max() <= 1  # ComfyUI truncates floats to uint8


async def test_same_inputs_give_the_same_bytes(session: aiohttp.ClientSession, server: FakeComfyUI,
                                               client: WsClient) -> None:
    first = await _run(session, server, client, sampler_prompt("a blue star", 11, prefix="det_a"))
    second = await _run(session, server, client, sampler_prompt("a blue star", 11, prefix="det_b"))
    other = await _run(session, server, client, sampler_prompt("a blue star", 12, prefix="det_c"))
    assert first[0].read_bytes() == second[0].read_bytes()
    assert first[0].read_bytes() != other[0].read_bytes()


async def test_prompts_without_a_shape_get_a_seeded_pattern(session: aiohttp.ClientSession,
                                                             server: FakeComfyUI, client: WsClient) -> None:
    a = await _run(session, server, client, sampler_prompt("misty mountains", 1, size=96, prefix="pat_a"))
    b = await _run(session, server, client, sampler_prompt("misty mountains", 2, size=96, prefix="pat_b"))
    with Image.open(a[0]) as one, Image.open(b[0]) as two:
        assert one.size == two.size == (96, 96)
        assert not np.array_equal(np.asarray(one), np.asarray(two))


async def test_batches_lora_and_img2img(session: aiohttp.ClientSession, server: FakeComfyUI,
                                        client: WsClient) -> None:
    prompt = sampler_prompt("a yellow triangle", 3, prefix="lora")
    prompt["4"]["inputs"]["batch_size"] = 2
    prompt["8"] = {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                          "lora_name": "style.safetensors",
                                                          "strength_model": 0.5, "strength_clip": 1.0}}
    prompt["5"]["inputs"]["model"] = ["8", 0]
    paths = await _run(session, server, client, prompt)
    assert len(paths) == 2
    for offset, path in enumerate(paths):
        want = expected_spec("a yellow triangle", 3 + offset, "sd15.safetensors+style.safetensors:0.5", 4)
        assert want is not None
        assert _nearest_colour(_centre(path)) == want.colour

    img2img = sampler_prompt("a purple circle", _seed(True), prefix="i2i", denoise=0.5)
    img2img["10"] = {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1,
                                                            "color": 0xFFFFFF}}
    img2img["11"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["1", 2]}}
    img2img["5"]["inputs"]["latent_image"] = ["11", 0]
    (path,) = await _run(session, server, client, img2img)
    centre = _centre(path)
    purple = COLOURS["purple"]
    assert all(abs(c - (p + 255) / 2) <= 12 for c, p in zip(centre, purple, strict=True))


async def test_ksampler_advanced_runs_its_step_window(session: aiohttp.ClientSession, server: FakeComfyUI,
                                                      client: WsClient) -> None:
    prompt = sampler_prompt("a red star", 5, prefix="adv")
    prompt["5"] = {"class_type": "KSamplerAdvanced", "inputs": {
        "model": ["1", 0], "add_noise": "enable", "noise_seed": 5, "steps": 10, "cfg": 7.0,
        "sampler_name": "euler", "scheduler": "normal", "positive": ["2", 0], "negative": ["3", 0],
        "latent_image": ["4", 0], "start_at_step": 2, "end_at_step": 6, "return_with_leftover_noise": "disable"}}
    messages = await client.until_done(await submit(session, server, prompt, "client-a"))
    assert [(m.data["value"], m.data["max"]) for m in messages if m.type == "progress"] == [
        (1, 4), (2, 4), (3, 4), (4, 4)]
