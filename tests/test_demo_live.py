"""``comfy-orch demo`` end to end, as the README runs it: one local real ComfyUI with the tiny models,
the quality-gated comparison scored by the tiny CLIP, the upscaled winners, the report."""

from __future__ import annotations

import asyncio
import json
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from PIL import Image

from comfy_orchestrator.cli import main
from tests.live_fixtures import comfy_dir_or_skip

pytestmark = pytest.mark.comfy_live


class _Report(HTMLParser):
    """Image sources and the grid's score cells ((model, prompt, seed) -> shown text)."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.scores: dict[tuple[str, str, int], str] = {}
        self._key: tuple[str, str, int] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "img":
            self.images.append(a["src"])
        elif tag == "td" and "data-model" in a:
            self._key = (a["data-model"], a["data-prompt"], int(a["data-seed"]))
            self.scores[self._key] = ""

    def handle_data(self, data: str) -> None:
        if self._key is not None:
            self.scores[self._key] += data

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._key = None


def _rescore(images: list[tuple[Path, str]]) -> list[float]:
    from quality import ClipEvaluator

    async def score() -> list[float]:
        async with ClipEvaluator("tiny-shapes") as evaluator:
            return [(await evaluator.score([path.read_bytes()], prompt))[0].value for path, prompt in images]

    return asyncio.run(score())


@pytest.mark.timeout(600)
def test_the_demo_runs_end_to_end_and_its_report_shows_the_scored_grid(tmp_path: Path) -> None:
    comfy_dir_or_skip("the demo")
    out = tmp_path / "demo-out"
    result = CliRunner().invoke(main, ["demo", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"report:        {out.resolve() / 'report.html'}" in result.output
    assert "noise" in result.output

    manifest: dict[str, Any] = json.loads((out / "manifest.json").read_text())
    threshold, max_attempts = manifest["threshold"], manifest["max_attempts"]
    assert (threshold, max_attempts) == (1.5, 3)
    assert len(manifest["models"]) == 3
    assert manifest["prompts"] == ["a red circle", "a blue square"]
    assert len(manifest["cells"]) == 3 * 2
    assert manifest["backends"][0]["comfyui"]  # what the real server said about itself

    # The report opens on the grid image, a valid PNG of the size recorded, one thumbnail per cell.
    report = _Report()
    report.feed((out / "report.html").read_text(encoding="utf-8"))
    sheet = manifest["outputs"]["contact_sheet"]
    assert sheet["path"] in report.images
    with Image.open(out / sheet["path"]) as image:
        assert image.format == "PNG"
        assert image.size == (sheet["width"], sheet["height"])
    assert (sheet["rows"], sheet["columns"]) == (3, 2)
    assert sheet["width"] >= 2 * sheet["thumb"]
    assert sheet["height"] >= 3 * sheet["thumb"]
    assert all((out / src).is_file() for src in report.images)

    for cell in manifest["cells"]:
        attempts = cell["attempts"]
        # Every model's score is in the report as the manifest has it.
        assert report.scores[(cell["model"], cell["prompt"], cell["seed"])] == f"{cell['score']:.3f}"
        # The gate: at least one attempt; it stops early only once a score reaches the threshold, and
        # every attempt before the last stayed below it.
        assert 1 <= len(attempts) <= max_attempts
        assert all(a["status"] == "done" and a["score"] is not None for a in attempts)
        assert all(a["score"] < threshold for a in attempts[:-1])
        if len(attempts) < max_attempts:
            assert attempts[-1]["score"] >= threshold
        assert cell["passed"] is (attempts[-1]["score"] >= threshold)
        assert cell["score"] == max(a["score"] for a in attempts)
        # The escalation plan: the base seed, then a new seed, then twice the steps on it.
        plan = [(cell["seed"], 4), (cell["seed"] + 1, 4), (cell["seed"] + 1, 8)]
        assert [(a["seed"], a["steps"]) for a in attempts] == plan[: len(attempts)]
        assert all(a["backend"] == "local-cpu" and a["elapsed_s"] > 0 for a in attempts)
        # The prompt travelled with the graph: ComfyUI wrote it into the PNG's metadata.
        with Image.open(out / cell["image"]) as image:
            assert cell["prompt"] in image.info["prompt"]

    # The scores are the tiny CLIP's, not made up: scoring the kept images again gives them back.
    rescored = _rescore([(out / c["image"], c["prompt"]) for c in manifest["cells"]])
    assert rescored == pytest.approx([c["score"] for c in manifest["cells"]], abs=1e-3)

    # One winner per prompt, the best cell of that prompt, upscaled ×2 by the tiny Compact upscaler.
    assert [w["prompt"] for w in manifest["winners"]] == manifest["prompts"]
    for winner in manifest["winners"]:
        best = max((c for c in manifest["cells"] if c["prompt"] == winner["prompt"]), key=lambda c: c["score"])
        assert (winner["model"], winner["image"], winner["score"]) == (best["model"], best["image"], best["score"])
        assert winner["upscaled"] in report.images
        with Image.open(out / winner["image"]) as small, Image.open(out / winner["upscaled"]) as big:
            assert big.size == (2 * small.width, 2 * small.height)
        assert winner["scale"] == 2.0
        assert f"upscaled:      {out.resolve() / winner['upscaled']}" in result.output
    assert manifest["timings"]["pipeline_s"] > 0
    assert manifest["stats"]["failed"] == 0

    # Opened in a real browser, the report shows the grid (decoded, at its size) and every score.
    shown = asyncio.run(_open_in_chromium((out / "report.html").resolve().as_uri()))
    assert shown["sheet"] == [sheet["width"], sheet["height"]]
    assert all(f"{cell['score']:.3f}" in shown["text"] for cell in manifest["cells"])
    assert shown["broken_images"] == 0


async def _open_in_chromium(url: str) -> dict[str, Any]:
    from playwright.async_api import async_playwright

    from tests.service.test_dashboard_browser import chromium_path

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium_path(), headless=True)
        try:
            page = await browser.new_page()
            await page.goto(url)
            await page.wait_for_load_state("load")
            result: dict[str, Any] = await page.evaluate("""() => {
                const sheet = document.querySelector('img.sheet');
                const images = [...document.images];
                return {
                    sheet: sheet && sheet.complete ? [sheet.naturalWidth, sheet.naturalHeight] : null,
                    text: document.body.innerText,
                    broken_images: images.filter(i => !i.complete || i.naturalWidth === 0).length,
                };
            }""")
            return result
        finally:
            await browser.close()
