"""Checks of a pipeline against its templates and its run arguments, before any GPU time is spent."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from comfy_orchestrator.errors import TemplateError
from comfy_orchestrator.graph import Template
from comfy_orchestrator.pipelines.spec import PipelineSpec, QualityLoopStep, Step, TransformStep, _GraphStep

__all__ = ["evaluator_problems", "template_problems"]


def template_problems(spec: PipelineSpec, templates: Mapping[str, Template]) -> list[str]:
    """Unknown templates, unknown slots and values of the wrong type, one located line each."""
    problems: list[str] = []
    for index, top in enumerate(spec.steps):
        for step in _and_fallbacks(top):
            label = f"steps[{index}] {step.name!r}" if step is top else f"steps[{index}] fallback {step.name!r}"
            if isinstance(step, _GraphStep):
                problems.extend(f"{label}: {p}" for p in _graph_step_problems(step, templates))
    return problems


def _and_fallbacks(step: Step) -> list[Step]:
    return [step, *(s for fallback in step.fallback for s in _and_fallbacks(fallback))]


def _graph_step_problems(step: _GraphStep, templates: Mapping[str, Template]) -> list[str]:
    template = templates.get(step.template)
    if template is None:
        return [f"unknown template {step.template!r}; known templates: {', '.join(sorted(templates))}"]
    problems: list[str] = []
    used: dict[str, str] = {name: "params" for name in step.params}
    for number, variation in enumerate(step.variations):
        used.update({name: f"variations[{number}]" for name in variation})
    for field, slot, given in (
        ("models", step.model_slot, step.models), ("prompts", step.prompt_slot, step.prompts),
        ("seeds", step.seed_slot, step.seeds),
    ):
        if given:
            used[slot] = f"{field} (bound to slot {slot!r})"
    if isinstance(step, TransformStep):
        used[step.image_slot] = "image_slot"
    if isinstance(step, QualityLoopStep):
        used[step.seed_slot] = "seed_slot"
        used[step.steps_slot] = "steps_slot"
        if step.models:
            used[step.model_slot] = f"models (bound to slot {step.model_slot!r})"
    for slot, where in used.items():
        if slot not in template.slots:
            problems.append(f"{where}: template {template.name!r} has no slot {slot!r}; "
                            f"its slots: {', '.join(template.slots)}")
    if problems:
        return problems
    for sample in _samples(step, template):
        try:
            template.bind(sample)
        except TemplateError as exc:
            problems.append(str(exc))
    return list(dict.fromkeys(problems))


def _samples(step: _GraphStep, template: Template) -> list[dict[str, Any]]:
    """One binding per variation, and one per model / prompt / seed value, to type-check every value."""
    base: dict[str, Any] = dict(step.params)
    if isinstance(step, TransformStep):
        base[step.image_slot] = "input.png"
    if isinstance(step, QualityLoopStep):
        base[step.seed_slot] = step.seed
        if step.steps is not None:
            base[step.steps_slot] = step.steps
    samples = [{**base, **variation} for variation in step.variations] or [base]
    for slot, values in ((step.model_slot, step.models), (step.prompt_slot, step.prompts),
                         (step.seed_slot, step.seeds)):
        samples.extend({**base, slot: value} for value in values)
    return samples


def evaluator_problems(spec: PipelineSpec) -> list[str]:
    """The steps that need an evaluator (score, quality_loop), for a run started without one."""
    return [
        f"steps[{index}] {step.name!r}: a {step.kind} step scores images: pass evaluator= to run()"
        for index, top in enumerate(spec.steps)
        for step in _and_fallbacks(top)
        if step.kind in ("score", "quality_loop")
    ]
