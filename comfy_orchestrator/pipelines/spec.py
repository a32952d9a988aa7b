"""The pipeline declaration: steps of six kinds in a DAG, one pydantic model for Python, JSON and YAML.

::

    steps:
      - {name: draw, kind: generate, template: sd15_txt2img, models: [sd15.safetensors], seeds: [1, 2],
         params: {prompt: "a red circle"}, cache: true}
      - {name: rate, kind: score, depends_on: [draw]}
      - {name: best, kind: select, depends_on: [rate], k: 1}

Every step has ``depends_on`` and the per-step policies (``retry``, ``timeout``, ``fallback``,
``cache``, ``skip_existing``, ``on_error``). Structure is checked here (unknown kind, unknown or
cyclic ``depends_on``, gates and selections fed by unscored steps…); template names and slots are
checked against the templates when a :class:`~comfy_orchestrator.pipelines.Pipeline` is built.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
    model_validator,
)

from comfy_orchestrator.pipelines.conditions import Condition
from comfy_orchestrator.pipelines.dag import structure_problems
from comfy_orchestrator.pipelines.errors import PipelineSpecError, readable_problems
from comfy_orchestrator.pipelines.escalation import EscalationPolicy
from comfy_orchestrator.pipelines.policies import OnError, RetryPolicy

__all__ = [
    "GateStep",
    "GenerateStep",
    "PipelineSpec",
    "QualityLoopStep",
    "ScoreStep",
    "SelectStep",
    "Step",
    "TransformStep",
]

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"  # a step's name is also its output folder


class _StepBase(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=_NAME)  # unique; also the folder of its images under out_dir
    depends_on: list[str] = Field(default_factory=list)  # steps to wait for (and take images from)
    retry: RetryPolicy = Field(default_factory=RetryPolicy.none)  # per job, on top of the pool's failover
    timeout: float | None = Field(default=None, gt=0)  # seconds per job attempt, queueing included
    fallback: list[Step] = Field(default_factory=list)  # tried in turn when the step fails
    cache: bool = False  # content-addressed disk cache: a hit does no GPU work
    skip_existing: bool = False  # a job whose images are in out_dir already is not run again
    on_error: OnError = OnError.ABORT  # what a failure (after retries and fallbacks) does to the run

    @model_serializer(mode="wrap")
    def _name_and_kind_first(self, handler: SerializerFunctionWrapHandler) -> Any:
        """Dumps lead with ``name`` and ``kind``, kept even when defaults are left out."""
        data = handler(self)
        if isinstance(data, dict):
            data = {"name": self.name, "kind": getattr(self, "kind", None), **data}
        return data

    @property
    def needs(self) -> list[str]:
        """Every step this one waits for: ``depends_on`` plus its ``inputs``."""
        inputs = getattr(self, "inputs", None) or []
        return list(dict.fromkeys([*self.depends_on, *inputs]))

    @property
    def sources(self) -> list[str]:
        """The steps whose images this one consumes: its ``inputs``, else all of ``depends_on``."""
        inputs = getattr(self, "inputs", None)
        return list(inputs) if inputs else list(self.depends_on)


class _GraphStep(_StepBase):
    """A step that runs a template: slots bound from ``params`` over models × prompts × seeds × variations."""

    template: str
    params: dict[str, Any] = Field(default_factory=dict)
    models: list[str] = Field(default_factory=list)
    prompts: list[str] = Field(default_factory=list)
    seeds: list[int] = Field(default_factory=list)
    variations: list[dict[str, Any]] = Field(default_factory=list)
    backends: list[str] | None = None
    model_slot: str = "checkpoint"
    prompt_slot: str = "prompt"
    seed_slot: str = "seed"
    negative_slot: str = "negative"


class GenerateStep(_GraphStep):
    """Run a template over ``models × prompts × seeds × variations`` (empty lists bind nothing)."""

    kind: Literal["generate"] = "generate"


class TransformStep(_GraphStep):
    """Run an image-to-image template (img2img, style edit, upscale) on every image of its inputs;
    each image is uploaded to whichever backend runs the job and bound to ``image_slot``."""

    kind: Literal["transform"] = "transform"
    inputs: list[str] | None = None
    image_slot: str = "input_image"


class ScoreStep(_StepBase):
    """Score every input image with the run's evaluator against its prompt (or ``prompt``)."""

    kind: Literal["score"] = "score"
    inputs: list[str] | None = None
    prompt: str | None = None
    negative: str | None = None


class GateStep(_StepBase):
    """Branch on ``condition`` over the input scores: dependents run when it holds, the steps named
    in ``on_fail`` (which must depend on the gate) run when it does not. ``keep="passing"`` passes on
    only the images that pass one by one."""

    kind: Literal["gate"] = "gate"
    inputs: list[str] | None = None
    condition: Condition
    on_fail: list[str] = Field(default_factory=list)
    keep: Literal["all", "passing"] = "all"


class SelectStep(_StepBase):
    """Keep the ``k`` best-scored input images (by ``by``, a score part, else the value), overall or
    per ``group_by``."""

    kind: Literal["select"] = "select"
    inputs: list[str] | None = None
    k: int = Field(default=1, ge=1)
    by: str | None = None
    group_by: Literal["prompt", "model", "parent"] | None = None


class QualityLoopStep(_GraphStep):
    """Generate, score, and escalate (new seed, more steps, next model…) until the score reaches
    ``threshold`` or the budget (``max_attempts``, ``max_seconds``) is spent; keeps the best ``keep``
    images and the whole attempt history."""

    kind: Literal["quality_loop"] = "quality_loop"
    threshold: float
    part: str | None = None
    seed: int = 0
    steps: int | None = Field(default=None, ge=1)
    steps_slot: str = "steps"
    escalation: EscalationPolicy = Field(default_factory=EscalationPolicy)
    max_attempts: int = Field(default=10, ge=1)
    max_seconds: float | None = Field(default=None, gt=0)
    keep: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _one_base_seed(self) -> QualityLoopStep:
        if self.seeds:
            raise ValueError("a quality_loop takes one base 'seed' (its escalation picks the next ones), not 'seeds'")
        return self


Step = Annotated[
    GenerateStep | TransformStep | ScoreStep | GateStep | SelectStep | QualityLoopStep,
    Field(discriminator="kind"),
]
for _model in (GenerateStep, TransformStep, ScoreStep, GateStep, SelectStep, QualityLoopStep):
    _model.model_rebuild()


class PipelineSpec(BaseModel):
    """A named DAG of steps. Build it in Python, or load it with :meth:`from_json` / :meth:`from_yaml`
    / :meth:`load`, which raise :class:`PipelineSpecError` with every problem located."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = "pipeline"
    description: str = ""
    steps: list[Step] = Field(min_length=1)

    @model_validator(mode="after")
    def _check_structure(self) -> PipelineSpec:
        problems = structure_problems(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    # -- loading ----------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "pipeline spec") -> PipelineSpec:
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise PipelineSpecError(readable_problems(exc, data), source=source) from None

    @classmethod
    def from_json(cls, text: str, *, source: str = "JSON pipeline spec") -> PipelineSpec:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise PipelineSpecError([f"not JSON: {exc}"], source=source) from None
        return cls.from_dict(_mapping(data, source), source=source)

    @classmethod
    def from_yaml(cls, text: str, *, source: str = "YAML pipeline spec") -> PipelineSpec:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise PipelineSpecError([f"not YAML: {exc}"], source=source) from None
        return cls.from_dict(_mapping(data, source), source=source)

    @classmethod
    def load(cls, path: str | Path) -> PipelineSpec:
        """Read a ``.json``, ``.yaml`` or ``.yml`` spec file."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise PipelineSpecError([f"cannot read: {exc}"], source=str(path)) from None
        if path.suffix.lower() == ".json":
            return cls.from_json(text, source=str(path))
        return cls.from_yaml(text, source=str(path))

    def to_json(self) -> str:
        return self.model_dump_json(indent=2, exclude_defaults=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_defaults=True), sort_keys=False)

    # -- reading ----------------------------------------------------------------------------------

    def step(self, name: str) -> Step:
        for step in self.all_steps():
            if step.name == name:
                return step
        raise KeyError(f"no step {name!r}; steps: {', '.join(s.name for s in self.steps)}")

    def all_steps(self) -> Iterator[Step]:
        """The steps and, after each, its fallbacks (recursively)."""
        for step in self.steps:
            yield from _with_fallbacks(step)


def _with_fallbacks(step: Step) -> Iterator[Step]:
    yield step
    for fallback in step.fallback:
        yield from _with_fallbacks(fallback)


def _mapping(data: Any, source: str) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise PipelineSpecError([f"the top level must be a mapping with 'steps', got {type(data).__name__}"],
                                source=source)
    return data
