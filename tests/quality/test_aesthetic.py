from __future__ import annotations

from pathlib import Path

import pytest
import torch

from quality import AestheticHead, AestheticHeadError, ClipEvaluator, load_aesthetic_head, save_aesthetic_head

from .conftest import TINY, shape


@pytest.fixture
def head_file(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    head = AestheticHead(128)  # the tiny model's embedding width
    path = tmp_path / "tiny-aesthetic.pth"
    save_aesthetic_head(head, path)
    return path


def test_laion_file_layout_round_trips(head_file: Path) -> None:
    state = torch.load(head_file, weights_only=True)
    assert sorted(state) == sorted(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))
    assert state["layers.0.weight"].shape == (1024, 128)
    head = load_aesthetic_head(head_file, expected_dim=128)
    x = torch.nn.functional.normalize(torch.randn(5, 128), dim=-1)
    assert head(x).shape == (5,)
    assert not head.training


def test_wrong_width_or_format_is_refused(head_file: Path, tmp_path: Path) -> None:
    with pytest.raises(AestheticHeadError, match="768"):
        load_aesthetic_head(head_file, expected_dim=768)
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(1, 128)}, bad)
    with pytest.raises(AestheticHeadError, match="not a LAION"):
        load_aesthetic_head(bad)
    with pytest.raises(AestheticHeadError, match="no aesthetic head"):
        load_aesthetic_head(tmp_path / "missing.pth")


async def test_aesthetic_part_joins_the_combined_score(head_file: Path) -> None:
    evaluator = ClipEvaluator(TINY, device="cpu", aesthetic_head=head_file, weights={"aesthetic": 0.5})
    [s] = await evaluator.score([shape("red", "circle")], "a photo of a red circle")
    assert set(s.parts) == {"alignment", "aesthetic", "technical"}
    assert s.value == pytest.approx(s.parts["alignment"] + 0.5 * s.parts["aesthetic"], abs=1e-5)
    # The same head on the embedding directly gives the same rating.
    head = load_aesthetic_head(head_file)
    enc = evaluator.encoder
    assert enc is not None
    _, emb, _ = await enc.embed_image(shape("red", "circle"), evaluator.limits)
    assert emb is not None
    assert float(head(emb[None])[0]) == pytest.approx(s.parts["aesthetic"], abs=1e-4)
