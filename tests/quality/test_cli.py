from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner
from PIL import Image

from comfy_orchestrator.cli import main

from .conftest import TINY, shape, text_image


def _files(tmp_path: Path) -> list[Path]:
    paths = [tmp_path / "red-circle.png", tmp_path / "text.png", tmp_path / "blank.png"]
    shape("red", "circle").save(paths[0])
    text_image().save(paths[1])
    Image.new("RGB", (256, 256), (240, 240, 240)).save(paths[2])
    return paths


def test_score_prints_a_table(tmp_path: Path) -> None:
    paths = _files(tmp_path)
    result = CliRunner().invoke(main, ["score", *map(str, paths), "--prompt", "a (red:1.2) circle",
                                       "--negative", "text", "--model", TINY, "--threshold", "0.5"])
    assert result.exit_code == 0, result.output
    for needle in ("red-circle.png", "text.png", "blank.png", "alignment", "negative", "uniform", "pass"):
        assert needle in result.output


def test_score_json(tmp_path: Path) -> None:
    paths = _files(tmp_path)
    result = CliRunner().invoke(main, ["score", *map(str, paths), "-p", "a photo of a red circle",
                                       "-m", TINY, "--device", "cpu", "-w", "alignment=2", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["model"] == TINY
    first, second, blank = data["scores"]
    assert first["image"].endswith("red-circle.png")
    assert first["weights"] == {"alignment": 2.0}
    assert first["value"] > second["value"] >= blank["value"] == 0.0
    assert blank["technical"]["failures"] == ["uniform"]


def test_score_errors_are_readable(tmp_path: Path) -> None:
    paths = _files(tmp_path)
    runner = CliRunner()
    unknown = runner.invoke(main, ["score", str(paths[0]), "-p", "x", "-m", "no-such-model"])
    assert unknown.exit_code != 0
    assert "unknown quality model" in unknown.output
    offline = runner.invoke(main, ["score", str(paths[0]), "-p", "x", "--device", "cpu"])  # the default model
    assert offline.exit_code != 0
    assert "cannot be reached" in offline.output
    bad_weight = runner.invoke(main, ["score", str(paths[0]), "-p", "x", "-m", TINY, "-w", "alignment"])
    assert bad_weight.exit_code != 0
    assert "PART=WEIGHT" in bad_weight.output
