"""The declaration: Python, JSON and YAML give the same spec; every mistake is named and located."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from comfy_orchestrator.graph import Template
from comfy_orchestrator.pipelines import (
    Backoff,
    Condition,
    GateStep,
    GenerateStep,
    OnError,
    Pipeline,
    PipelineSpec,
    PipelineSpecError,
    QualityLoopStep,
    RetryPolicy,
    ScoreStep,
    SelectStep,
    TransformStep,
)
from tests.pipelines.conftest import SD15, UPSCALER

YAML_SPEC = f"""
name: fox
steps:
  - name: draw
    kind: generate
    template: sd15_txt2img
    params: {{prompt: a red circle, width: 64, height: 64, steps: 20}}
    models: [{SD15}]
    seeds: [1, 2]
    cache: true
    retry: {{backoff: linear, max_attempts: 4, initial_interval: 0.5, coefficient: 1, max_interval: 3}}
  - name: rate
    kind: score
    depends_on: [draw]
  - name: good
    kind: gate
    depends_on: [rate]
    condition: {{threshold: 0.9, of: best}}
    on_fail: [retry_bigger]
  - name: retry_bigger
    kind: generate
    depends_on: [good]
    template: sd15_txt2img
    params: {{prompt: a red circle, steps: 40}}
    on_error: continue
  - name: best
    kind: select
    depends_on: [good]
    k: 1
  - name: big
    kind: transform
    depends_on: [best]
    template: model_upscale
    params: {{upscale_model: {UPSCALER}}}
    timeout: 30
    fallback:
      - {{name: big_again, kind: transform, template: model_upscale}}
"""


def python_spec() -> PipelineSpec:
    return PipelineSpec(name="fox", steps=[
        GenerateStep(name="draw", template="sd15_txt2img", params={"prompt": "a red circle", "width": 64,
                     "height": 64, "steps": 20}, models=[SD15], seeds=[1, 2], cache=True,
                     retry=RetryPolicy(backoff=Backoff.LINEAR, max_attempts=4, initial_interval=0.5, coefficient=1,
                                       max_interval=3)),
        ScoreStep(name="rate", depends_on=["draw"]),
        GateStep(name="good", depends_on=["rate"], condition=Condition(threshold=0.9), on_fail=["retry_bigger"]),
        GenerateStep(name="retry_bigger", depends_on=["good"], template="sd15_txt2img",
                     params={"prompt": "a red circle", "steps": 40}, on_error=OnError.CONTINUE),
        SelectStep(name="best", depends_on=["good"], k=1),
        TransformStep(name="big", depends_on=["best"], template="model_upscale",
                      params={"upscale_model": UPSCALER}, timeout=30,
                      fallback=[TransformStep(name="big_again", template="model_upscale")]),
    ])


def test_yaml_json_and_python_declare_the_same_pipeline(tmp_path: Path) -> None:
    from_yaml = PipelineSpec.from_yaml(YAML_SPEC)
    assert from_yaml == python_spec()
    from_json = PipelineSpec.from_json(json.dumps(json.loads(python_spec().to_json())))
    assert from_json == python_spec()
    (tmp_path / "p.yaml").write_text(python_spec().to_yaml())
    (tmp_path / "p.json").write_text(python_spec().to_json())
    assert PipelineSpec.load(tmp_path / "p.yaml") == PipelineSpec.load(tmp_path / "p.json") == python_spec()


def test_a_valid_spec_binds_to_the_templates(templates: dict[str, Template]) -> None:
    pipeline = Pipeline(PipelineSpec.from_yaml(YAML_SPEC), templates=templates)
    assert [s.name for s in pipeline.spec.steps] == ["draw", "rate", "good", "retry_bigger", "best", "big"]
    assert pipeline.spec.step("big_again").kind == "transform"


def problems_of(yaml_text: str) -> list[str]:
    with pytest.raises(PipelineSpecError) as caught:
        PipelineSpec.from_yaml(yaml_text)
    return caught.value.problems


def test_unknown_step_kind_is_named_with_the_known_ones() -> None:
    (problem,) = problems_of("steps: [{name: a, kind: paint, template: t}]")
    assert problem.startswith("steps[0] 'a':")
    assert all(word in problem for word in ("'paint'", "'generate'", "'quality_loop'"))


def test_missing_depends_on_target_lists_the_known_steps() -> None:
    (problem,) = problems_of("""
steps:
  - {name: draw, kind: generate, template: sd15_txt2img}
  - {name: rate, kind: score, depends_on: [drwa]}
""")
    assert problem == "steps[1] 'rate': depends_on names unknown step 'drwa'; known steps: draw, rate"


def test_cycles_are_shown_as_a_path() -> None:
    problems = problems_of("""
steps:
  - {name: a, kind: generate, template: t, depends_on: [c]}
  - {name: b, kind: transform, template: t, depends_on: [a]}
  - {name: c, kind: transform, template: t, depends_on: [b]}
""")
    assert problems == ["depends_on forms a cycle: a -> c -> b -> a"]


def test_structural_mistakes_are_all_reported_at_once() -> None:
    problems = problems_of("""
steps:
  - {name: a, kind: generate, template: t}
  - {name: a, kind: score}
  - {name: g, kind: gate, depends_on: [a], condition: {threshold: 1}, on_fail: [z]}
  - {name: f, kind: generate, template: t, fallback: [{name: f2, kind: generate, template: t, depends_on: [a]}]}
""")
    assert "steps[1] 'a': the name 'a' is used twice" in problems
    assert "steps[1] 'a': a score step needs images: set depends_on" in problems
    assert "steps[2] 'g': on_fail names 'z', which does not depend on the gate" in problems
    assert "steps[3] fallback 'f2': a fallback takes its step's inputs; remove its depends_on/inputs" in problems


def test_gates_and_selections_need_scored_inputs() -> None:
    (problem,) = problems_of("""
steps:
  - {name: draw, kind: generate, template: t}
  - {name: best, kind: select, depends_on: [draw]}
""")
    assert problem.startswith("steps[1] 'best': a select step compares scores, but 'draw' gives unscored images")


def test_field_errors_are_located_by_step_name() -> None:
    problems = problems_of("""
steps:
  - {name: draw, kind: generate, template: t, timeout: -1, retry: {max_attempts: 0}}
  - {name: best, kind: select, depends_on: [draw], k: 0, colour: red}
""")
    assert any(p.startswith("steps[0] 'draw': timeout:") for p in problems)
    assert any(p.startswith("steps[0] 'draw': retry.max_attempts:") for p in problems)
    assert any(p.startswith("steps[1] 'best': k:") for p in problems)
    assert any(p.startswith("steps[1] 'best': colour: Extra inputs are not permitted") for p in problems)


def test_not_yaml_and_not_a_mapping() -> None:
    assert problems_of("steps: [unclosed")[0].startswith("not YAML")
    assert problems_of("- just a list")[0].startswith("the top level must be a mapping")


def template_problems(spec: PipelineSpec, templates: dict[str, Template]) -> list[str]:
    with pytest.raises(PipelineSpecError) as caught:
        Pipeline(spec, templates=templates)
    return caught.value.problems


def test_unknown_template_slot_lists_the_slots(templates: dict[str, Template]) -> None:
    spec = PipelineSpec(steps=[
        GenerateStep(name="draw", template="sd15_txt2img", params={"promt": "a cat"}),
        TransformStep(name="big", template="model_upscale", depends_on=["draw"], models=["x4.pth"]),
    ])
    first, second = template_problems(spec, templates)
    assert first.startswith("steps[0] 'draw': params: template 'sd15_txt2img' has no slot 'promt'; its slots: prompt,")
    assert second.startswith(
        "steps[1] 'big': models (bound to slot 'checkpoint'): template 'model_upscale' has no slot 'checkpoint'"
    )


def test_unknown_template_and_wrong_value_types(templates: dict[str, Template]) -> None:
    spec = PipelineSpec(steps=[
        GenerateStep(name="draw", template="sd15_txt2imgg"),
        GenerateStep(name="draw2", template="sd15_txt2img", variations=[{"steps": "many"}]),
        QualityLoopStep(name="loop", template="model_upscale", threshold=0.5, fallback=[
            GenerateStep(name="plan_b", template="sd15_txt2img", params={"cfg": "high"})]),
    ])
    problems = template_problems(spec, templates)
    assert problems[0].startswith("steps[0] 'draw': unknown template 'sd15_txt2imgg'; known templates:")
    assert "steps[1] 'draw2': template 'sd15_txt2img': slot 'steps' takes int, got str 'many'" in problems
    assert any(p.startswith("steps[2] 'loop': seed_slot: template 'model_upscale' has no slot 'seed'")
               for p in problems)
    assert "steps[2] fallback 'plan_b': template 'sd15_txt2img': slot 'cfg' takes float, got str 'high'" in problems


def test_python_declaration_errors_are_spec_errors_too(templates: dict[str, Template]) -> None:
    with pytest.raises(PipelineSpecError, match="depends_on names unknown step 'nope'"):
        Pipeline([GenerateStep(name="a", template="sd15_txt2img", depends_on=["nope"])], templates=templates)


async def test_a_run_without_the_evaluator_it_needs_fails_before_any_work(
    templates: dict[str, Template], tmp_path: Path
) -> None:
    pipeline = Pipeline([GenerateStep(name="a", template="sd15_txt2img"), ScoreStep(name="s", depends_on=["a"])],
                        templates=templates)
    with pytest.raises(PipelineSpecError, match="steps\\[1\\] 's': a score step scores images: pass evaluator="):
        await pipeline.run(object(), out_dir=tmp_path)  # type: ignore[arg-type]  # never touched
