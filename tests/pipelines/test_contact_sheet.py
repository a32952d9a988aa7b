"""Contact sheets: every image fills its cell, a small one enlarged with its pixels kept sharp."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from comfy_orchestrator.pipelines.contact_sheet import SheetCell, render_sheet


def test_a_small_image_is_enlarged_by_a_whole_factor_with_sharp_pixels(tmp_path: Path) -> None:
    small = Image.new("RGB", (8, 8), (255, 0, 0))
    small.putpixel((0, 0), (0, 0, 255))  # one blue pixel in the corner
    small.save(tmp_path / "small.png")
    big = Image.new("RGB", (300, 200), (0, 255, 0))
    big.save(tmp_path / "big.png")
    sheet = render_sheet(["model"], ["a", "b"],
                         [[SheetCell(tmp_path / "small.png", "s"), SheetCell(tmp_path / "big.png", "b")]], thumb=64)
    colours = sheet.getcolors(maxcolors=1 << 16)
    assert colours is not None
    counts = {colour: n for n, colour in colours}
    assert counts[(0, 0, 255)] == 8 * 8  # the blue pixel became an 8×8 block: nearest, ×8
    assert counts[(255, 0, 0)] == 64 * 64 - 8 * 8  # the small image fills the whole 64 px cell
    assert counts[(0, 255, 0)] >= 64 * 42  # the big one is shrunk to fit (64 × 42), not enlarged
