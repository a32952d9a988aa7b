"""A quality loop whose evaluator raises: the failure is the step's, reported like any other."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
from PIL import Image

from comfy_orchestrator.graph import Template
from comfy_orchestrator.pipelines import (
    OnError,
    Pipeline,
    PipelineAborted,
    PipelineSpec,
    QualityLoopStep,
    Score,
    StepStatus,
)
from tests.pipelines.conftest import SD15, SMALL, Cluster


class BrokenEvaluator:
    """An evaluator whose model fails on every call (a CUDA error, a dead scoring service, …)."""

    def __init__(self) -> None:
        self.calls = 0

    async def score(self, images: Sequence[bytes | Image.Image], prompt: str, *,
                    negative: str | None = None) -> Sequence[Score]:
        self.calls += 1
        raise RuntimeError("the scoring model fell over")


def loop_pipeline(templates: dict[str, Template], **fields: object) -> Pipeline:
    step = QualityLoopStep(name="refine", template="sd15_txt2img", models=[SD15], threshold=1.0, steps=5,
                           max_attempts=3, params={**SMALL, "prompt": "a red circle"}, **fields)  # type: ignore[arg-type]
    return Pipeline(PipelineSpec(name="loop", steps=[step]), templates=templates)


async def test_an_evaluator_failure_aborts_the_run_as_a_failed_step(
    cluster: Cluster, templates: dict[str, Template], tmp_path: Path
) -> None:
    evaluator = BrokenEvaluator()
    with pytest.raises(PipelineAborted) as caught:
        await loop_pipeline(templates).run(cluster.pool, out_dir=tmp_path, evaluator=evaluator)
    aborted = caught.value
    assert aborted.step == "refine"
    assert "RuntimeError: the scoring model fell over" in aborted.reason
    assert aborted.result["refine"].status is StepStatus.FAILED
    assert evaluator.calls == 1  # no escalation on a broken evaluator: the next attempt would fail alike


async def test_with_on_error_continue_the_failure_is_recorded_and_the_run_ends(
    cluster: Cluster, templates: dict[str, Template], tmp_path: Path
) -> None:
    result = await loop_pipeline(templates, on_error=OnError.CONTINUE).run(
        cluster.pool, out_dir=tmp_path, evaluator=BrokenEvaluator())
    step = result["refine"]
    assert step.status is StepStatus.FAILED
    assert step.reason is not None
    assert "scoring failed: RuntimeError: the scoring model fell over" in step.reason
    assert not result.ok
