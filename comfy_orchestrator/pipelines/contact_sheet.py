"""A contact sheet: a grid of thumbnails, a label on every row and column, a caption under each image."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

__all__ = ["SheetCell", "render_sheet"]

_BACKGROUND = (255, 255, 255)
_EMPTY = (225, 225, 225)
_INK = (20, 20, 20)
_PAD = 6
_LINE = 13  # the default bitmap font's line height


@dataclass(frozen=True, slots=True)
class SheetCell:
    """One place of the grid: an image file (None: nothing to show) and the caption under it."""

    image: Path | None
    caption: str


def render_sheet(
    rows: Sequence[str],
    columns: Sequence[str],
    cells: Sequence[Sequence[SheetCell]],
    *,
    thumb: int = 128,
    title: str | None = None,
) -> Image.Image:
    """``cells[r][c]`` under row label ``rows[r]`` and column label ``columns[c]`` (labels may hold
    newlines). Images are fitted into ``thumb``×``thumb``; a missing one is a grey box."""
    font = ImageFont.load_default()
    row_label_w = max((_text_width(font, label) for label in rows), default=0) + 2 * _PAD
    header_h = (max((label.count("\n") + 1 for label in columns), default=1)) * _LINE + 2 * _PAD
    title_h = (_LINE + 2 * _PAD) if title else 0
    caption_h = max((c.caption.count("\n") + 1 for row in cells for c in row), default=1) * _LINE + _PAD
    cell_w, cell_h = thumb + 2 * _PAD, thumb + caption_h + 2 * _PAD
    sheet = Image.new("RGB", (row_label_w + cell_w * len(columns), title_h + header_h + cell_h * len(rows)),
                      _BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((_PAD, _PAD), title, fill=_INK, font=font)
    for c, label in enumerate(columns):
        draw.multiline_text((row_label_w + c * cell_w + _PAD, title_h + _PAD), label, fill=_INK, font=font,
                            spacing=1)
    for r, label in enumerate(rows):
        top = title_h + header_h + r * cell_h
        draw.multiline_text((_PAD, top + _PAD + thumb // 2 - _LINE // 2), label, fill=_INK, font=font)
        for c, cell in enumerate(cells[r]):
            left = row_label_w + c * cell_w + _PAD
            _paste(sheet, draw, cell.image, (left, top + _PAD), thumb)
            draw.multiline_text((left, top + _PAD + thumb + 2), cell.caption, fill=_INK, font=font, spacing=1)
    return sheet


def _paste(sheet: Image.Image, draw: ImageDraw.ImageDraw, path: Path | None, at: tuple[int, int], size: int) -> None:
    if path is not None and path.is_file():
        with Image.open(path) as image:
            small = image.convert("RGB")
        factor = size // max(small.width, small.height)
        if factor >= 2:  # a small image (a tiny model's, a preview): enlarged by a whole factor, pixels kept sharp
            small = small.resize((small.width * factor, small.height * factor), Image.Resampling.NEAREST)
        small.thumbnail((size, size))
        sheet.paste(small, (at[0] + (size - small.width) // 2, at[1] + (size - small.height) // 2))
    else:
        draw.rectangle((at[0], at[1], at[0] + size - 1, at[1] + size - 1), fill=_EMPTY)


def _text_width(font: ImageFont.ImageFont | ImageFont.FreeTypeFont, text: str) -> int:
    return max((int(font.getlength(line)) for line in text.splitlines() or [""]), default=0)
