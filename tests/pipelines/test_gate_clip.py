"""The quality-gated loop driven by real CLIP scores: the project's tiny CLIP looks at the pictures the
test double's sampler drew and the loop regenerates until the picture matches the prompt."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from comfy_orchestrator.graph import Template
from comfy_orchestrator.pipelines import EscalationPolicy
from comfy_orchestrator.pipelines.patterns import quality_gated
from comfy_orchestrator.testing import ShapeSpec
from quality import ClipEvaluator
from tests.pipelines.conftest import DREAM, SD15, SMALL, Cluster
from tests.pipelines.judge import look
from tests.pipelines.test_patterns import first_success

THRESHOLD = 1.5  # tiny-shapes: matching pictures score ≥ 2.2, wrong ones ≤ 0.4 (CLIPScore = 2.5·max(cos, 0))


@pytest.fixture(scope="module")
async def tiny_clip() -> AsyncIterator[ClipEvaluator]:
    evaluator = ClipEvaluator("tiny-shapes")
    yield evaluator
    await evaluator.aclose()


async def test_gate_regenerates_until_clip_sees_the_prompt(
    cluster: Cluster, templates: dict[str, Template], tmp_path: Path, tiny_clip: ClipEvaluator
) -> None:
    # No negative prompt: the template's default one ("… text, signature") would be scored as a penalty.
    models, policy = [SD15, DREAM], EscalationPolicy()
    seed = next(s for s in range(1000) if 3 <= first_success(s, 5, models, policy) <= 6)
    expected = first_success(seed, 5, models, policy)
    pipeline = quality_gated("a purple triangle", models, threshold=THRESHOLD, seed=seed, steps=5,
                             escalation=policy, params={**SMALL, "negative": ""}, templates=templates)
    result = await pipeline.run(cluster.pool, out_dir=tmp_path, evaluator=tiny_clip)

    step = result["refine"]
    assert step.passed is True
    history = step.history
    assert len(history) == expected  # exactly as many attempts as the sampler needed
    assert cluster.prompts_run() == expected
    scores = [h.score or 0.0 for h in history]
    assert all(s < THRESHOLD for s in scores[:-1])
    assert scores[-1] >= THRESHOLD
    (best,) = step.artifacts
    assert look(best.read_bytes()) == ShapeSpec("purple", "triangle")
    assert best.score == scores[-1]
