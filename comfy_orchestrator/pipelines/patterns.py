"""Ready pipelines for the common patterns; each returns a :class:`Pipeline` to ``await .run(pool, …)``.

    text_to_upscaled      text → image → style edit → upscale (a sequential chain)
    model_comparison      the same prompt and seed on N models, in parallel (scored when ``score``)
    quality_gated         regenerate with an escalation policy until the score reaches a threshold
    best_of_variations    styles × models, scored, the best ``k`` kept
    prompt_batch          N prompts, skip-existing, continue-on-error; read ``result.stats``

``params`` sets further template slots (``{"steps": 20, "width": 768}``); ``templates`` defaults to
``load_templates()``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from comfy_orchestrator.graph import Template
from comfy_orchestrator.pipelines.conditions import Condition
from comfy_orchestrator.pipelines.escalation import EscalationPolicy
from comfy_orchestrator.pipelines.pipeline import Pipeline
from comfy_orchestrator.pipelines.policies import OnError, RetryPolicy
from comfy_orchestrator.pipelines.spec import (
    GateStep,
    GenerateStep,
    PipelineSpec,
    QualityLoopStep,
    ScoreStep,
    SelectStep,
    Step,
    TransformStep,
)

__all__ = ["best_of_variations", "model_comparison", "prompt_batch", "quality_gated", "text_to_upscaled"]

DEFAULT_STYLE = "an oil painting in the style of Vincent van Gogh, swirling thick brush strokes"


def text_to_upscaled(
    prompt: str,
    *,
    model: str | None = None,
    seed: int = 0,
    style: str = DEFAULT_STYLE,
    upscale_model: str | None = None,
    params: Mapping[str, Any] | None = None,
    style_params: Mapping[str, Any] | None = None,
    cache: bool = True,
    retry: RetryPolicy | None = None,
    templates: Mapping[str, Template] | None = None,
) -> Pipeline:
    """``draw`` (sd15_txt2img) → ``stylise`` (sd15_style_edit on draw's image) → ``upscale``
    (model_upscale on stylise's image). Each image is uploaded to whichever backend runs the next step."""
    policy = retry or RetryPolicy.none()
    upscale: dict[str, Any] = {} if upscale_model is None else {"upscale_model": upscale_model}
    steps: list[Step] = [
        GenerateStep(name="draw", template="sd15_txt2img", params={**(params or {}), "prompt": prompt},
                     models=[model] if model else [], seeds=[seed], cache=cache, retry=policy),
        TransformStep(name="stylise", template="sd15_style_edit", depends_on=["draw"],
                      params={"prompt": style, "seed": seed, **(style_params or {})},
                      models=[model] if model else [], cache=cache, retry=policy),
        TransformStep(name="upscale", template="model_upscale", depends_on=["stylise"], params=upscale,
                      cache=cache, retry=policy),
    ]
    return Pipeline(PipelineSpec(name="text_to_upscaled", steps=steps), templates=templates)


def model_comparison(
    prompt: str,
    models: Sequence[str],
    *,
    seed: int = 0,
    template: str = "sd15_txt2img",
    params: Mapping[str, Any] | None = None,
    score: bool = True,
    cache: bool = True,
    on_error: OnError = OnError.CONTINUE,
    templates: Mapping[str, Template] | None = None,
) -> Pipeline:
    """``generate`` the same prompt and seed on every model at once (the pool routes each to a backend
    holding it), then ``score`` them when ``score`` (needs an evaluator at run time)."""
    steps: list[Step] = [
        GenerateStep(name="generate", template=template, params={**(params or {}), "prompt": prompt},
                     models=list(models), seeds=[seed], cache=cache, on_error=on_error),
    ]
    if score:
        steps.append(ScoreStep(name="score", depends_on=["generate"], on_error=on_error))
    return Pipeline(PipelineSpec(name="model_comparison", steps=steps), templates=templates)


def quality_gated(
    prompt: str,
    models: Sequence[str] = (),
    *,
    threshold: float,
    seed: int = 0,
    steps: int | None = None,
    escalation: EscalationPolicy | None = None,
    max_attempts: int = 10,
    max_seconds: float | None = None,
    keep: int = 1,
    template: str = "sd15_txt2img",
    params: Mapping[str, Any] | None = None,
    cache: bool = True,
    templates: Mapping[str, Template] | None = None,
) -> Pipeline:
    """``refine``: generate, score, escalate (by default: two new seeds, then twice the steps, then the
    next model) until the score reaches ``threshold`` or the budget is spent; keeps the best ``keep``.
    ``result["refine"].history`` is the attempt history."""
    loop = QualityLoopStep(
        name="refine", template=template, params={**(params or {}), "prompt": prompt}, models=list(models),
        threshold=threshold, seed=seed, steps=steps, escalation=escalation or EscalationPolicy(),
        max_attempts=max_attempts, max_seconds=max_seconds, keep=keep, cache=cache,
    )
    return Pipeline(PipelineSpec(name="quality_gated", steps=[loop]), templates=templates)


def best_of_variations(
    prompt: str,
    styles: Sequence[str],
    models: Sequence[str] = (),
    *,
    k: int = 1,
    seed: int = 0,
    threshold: float | None = None,
    template: str = "sd15_txt2img",
    params: Mapping[str, Any] | None = None,
    cache: bool = True,
    templates: Mapping[str, Template] | None = None,
) -> Pipeline:
    """``generate`` ``prompt, <style>`` for every style × model, ``score`` each, ``select`` the best
    ``k``; with ``threshold`` a final ``gate`` says whether the best one is good enough."""
    variations = [{"prompt": f"{prompt}, {style}" if style else prompt} for style in styles]
    steps: list[Step] = [
        GenerateStep(name="generate", template=template, params=dict(params or {}), models=list(models),
                     seeds=[seed], variations=variations, cache=cache, on_error=OnError.CONTINUE),
        ScoreStep(name="score", depends_on=["generate"]),
        SelectStep(name="select", depends_on=["score"], k=k),
    ]
    if threshold is not None:
        steps.append(GateStep(name="good_enough", depends_on=["select"], condition=Condition(threshold=threshold)))
    return Pipeline(PipelineSpec(name="best_of_variations", steps=steps), templates=templates)


def prompt_batch(
    prompts: Sequence[str],
    *,
    model: str | None = None,
    seed: int = 0,
    template: str = "sd15_txt2img",
    params: Mapping[str, Any] | None = None,
    skip_existing: bool = True,
    cache: bool = False,
    retry: RetryPolicy | None = None,
    on_error: OnError = OnError.CONTINUE,
    templates: Mapping[str, Template] | None = None,
) -> Pipeline:
    """``generate`` every prompt; a prompt whose image is already in ``out_dir`` is skipped, a failed
    one does not stop the others. ``result.stats`` counts completed / skipped / cached / failed."""
    step = GenerateStep(
        name="batch", template=template, params=dict(params or {}), prompts=list(prompts),
        models=[model] if model else [], seeds=[seed], skip_existing=skip_existing, cache=cache,
        retry=retry or RetryPolicy.none(), on_error=on_error,
    )
    return Pipeline(PipelineSpec(name="prompt_batch", steps=[step]), templates=templates)
