from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from comfy_orchestrator.cli import main
from comfy_orchestrator.testing.shapes import ShapeSpec, draw_shape
from quality.calibration import fit_threshold, fit_weights, fit_weights_pairwise, load_labelled_folder
from quality.scores import ScoreWeights

from .conftest import TINY, text_image


def test_threshold_separates_and_reports_agreement() -> None:
    fit = fit_threshold([0.1, 0.2, 0.3, 0.7, 0.8, 0.9], [False, False, False, True, True, True], model="m")
    assert 0.3 < fit.threshold < 0.7
    assert fit.threshold == pytest.approx(0.5)  # the middle of the widest gap
    assert (fit.agreement, fit.balanced_agreement, fit.auc) == (1.0, 1.0, 1.0)
    assert (fit.n_good, fit.n_bad, fit.false_pass, fit.false_reject) == (3, 3, 0, 0)
    assert fit.to_dict()["model"] == "m"


def test_threshold_uses_balanced_agreement() -> None:
    rng = np.random.default_rng(1)
    good = rng.normal(1.0, 0.2, 90)
    bad = rng.normal(0.4, 0.2, 10)
    fit = fit_threshold([*good, *bad], [True] * 90 + [False] * 10)
    assert fit.balanced_agreement > 0.85
    assert fit.false_pass <= 2  # passing everything would agree on 90 % but is not chosen


def test_threshold_needs_both_labels() -> None:
    with pytest.raises(ValueError, match="one good and one bad"):
        fit_threshold([0.1, 0.2], [True, True])


def test_pairwise_weights_recover_the_preference() -> None:
    rng = np.random.default_rng(0)
    # The user cares about the negative part only: winners look less like the negative prompt.
    winners = [{"alignment": float(a), "negative": float(n)}
               for a, n in zip(rng.normal(0.8, 0.1, 200), rng.normal(0.3, 0.1, 200), strict=True)]
    losers = [{"alignment": float(a), "negative": float(n)}
              for a, n in zip(rng.normal(0.8, 0.1, 200), rng.normal(0.6, 0.1, 200), strict=True)]
    fit = fit_weights_pairwise(winners, losers, current=ScoreWeights(negative=0.0))
    assert fit.agreement > 0.95 > fit.agreement_before
    assert fit.weights.negative > 0
    assert fit.parts == ("alignment", "negative")
    labels = fit_weights([*winners, *losers], [True] * 200 + [False] * 200, current=ScoreWeights(negative=0.0))
    assert labels.threshold.agreement > labels.before.agreement


def _labelled_folder(root: Path) -> Path:
    """Good: red circles. Bad: other colours or shapes, and text. Prompt: 'a photo of a red circle'."""
    rng = random.Random(31)
    (root / "good").mkdir(parents=True)
    (root / "bad").mkdir()
    for i in range(8):
        draw_shape(ShapeSpec("red", "circle"), 384, rng).save(root / "good" / f"g{i}.png")
    wrong = [ShapeSpec("blue", "circle"), ShapeSpec("red", "square"), ShapeSpec("green", "star"),
             ShapeSpec("red", "triangle"), ShapeSpec("yellow", "circle"), ShapeSpec("purple", "square")]
    for i, spec in enumerate(wrong):
        draw_shape(spec, 384, rng).save(root / "bad" / f"b{i}.png")
    text_image(size=384, seed=3).save(root / "bad" / "text.png")
    return root


def test_calibrate_cli_on_labelled_folder_then_score_with_it(tmp_path: Path) -> None:
    folder = _labelled_folder(tmp_path / "set")
    assert len(load_labelled_folder(folder)) == 15
    out = tmp_path / "cal.json"
    runner = CliRunner()
    result = runner.invoke(main, ["calibrate", str(folder), "--prompt", "a photo of a red circle",
                                  "--model", TINY, "--device", "cpu", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["model"] == TINY
    assert report["kind"] == "labels"
    assert report["agreement"] >= 0.9
    assert json.loads(out.read_text())["threshold"] == report["threshold"]

    table = runner.invoke(main, ["calibrate", str(folder), "--prompt", "a photo of a red circle",
                                 "--model", TINY, "--device", "cpu"])
    assert table.exit_code == 0, table.output
    assert "agreement" in table.output
    assert "threshold" in table.output

    scored = runner.invoke(main, ["score", str(folder / "good" / "g0.png"), str(folder / "bad" / "b0.png"),
                                  "--prompt", "a photo of a red circle", "--calibration", str(out),
                                  "--device", "cpu", "--json"])
    assert scored.exit_code == 0, scored.output
    rows = json.loads(scored.output)["scores"]
    assert [r["passed"] for r in rows] == [True, False]

    wrong_model = runner.invoke(main, ["score", str(folder / "good" / "g0.png"), "--prompt", "x",
                                       "--calibration", str(out), "--model", "vit-b-32-random"])
    assert wrong_model.exit_code != 0
    assert "thresholds belong to a model" in wrong_model.output


def test_calibrate_cli_pairwise(tmp_path: Path) -> None:
    folder = _labelled_folder(tmp_path / "set")
    with (folder / "pairs.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["winner", "loser", "prompt"])
        for i in range(6):
            writer.writerow([f"good/g{i}.png", f"bad/b{i}.png", "a photo of a red circle"])
        writer.writerow(["good/g6.png", "bad/text.png", "a photo of a red circle"])
    result = CliRunner().invoke(main, ["calibrate", str(folder), "--pairs", "--negative", "a picture of text",
                                       "--model", TINY, "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["kind"] == "pairwise"
    assert report["fit"]["n_pairs"] == 7
    assert report["agreement"] >= 0.85


def test_labels_csv_with_prompts(tmp_path: Path) -> None:
    rng = random.Random(4)
    draw_shape(ShapeSpec("blue", "star"), 256, rng).save(tmp_path / "a.png")
    draw_shape(ShapeSpec("blue", "square"), 256, rng).save(tmp_path / "b.png")
    (tmp_path / "labels.csv").write_text("file,label,prompt\na.png,good,a blue star\nb.png,bad,\n")
    (tmp_path / "prompts.json").write_text(json.dumps({"b.png": "a blue star"}))
    items = load_labelled_folder(tmp_path)
    assert [(i.path.name, i.good, i.prompt) for i in items] == [("a.png", True, "a blue star"),
                                                               ("b.png", False, "a blue star")]
    (tmp_path / "labels.csv").write_text("file,label\na.png,maybe\n")
    with pytest.raises(ValueError, match="maybe"):
        load_labelled_folder(tmp_path)
