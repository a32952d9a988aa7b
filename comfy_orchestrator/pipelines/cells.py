"""The grid of a comparison run: its spec, its cells, and what became of each."""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from comfy_orchestrator.pipelines.policies import RetryPolicy
from comfy_orchestrator.pipelines.spec import GenerateStep

__all__ = ["MANIFEST_FORMAT", "Cell", "CellRecord", "ComparisonSpec"]

MANIFEST_FORMAT = "comfy-orchestrator/comparison/1"
_OK = ("done", "cached")


class ComparisonSpec(BaseModel):
    """The grid: every model × prompt × seed × combination of ``grid`` values (slot -> values),
    over ``template`` with ``params`` set. Empty axes bind nothing (the template's value)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = "comparison"
    template: str
    models: list[str] = Field(default_factory=list)
    prompts: list[str] = Field(default_factory=list)
    seeds: list[int] = Field(default_factory=list)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    params: dict[str, Any] = Field(default_factory=dict)
    backends: list[str] | None = None
    model_slot: str = "checkpoint"
    prompt_slot: str = "prompt"
    seed_slot: str = "seed"
    retry: RetryPolicy = Field(default_factory=RetryPolicy.none)
    timeout: float | None = Field(default=None, gt=0)
    cache: bool = True

    def variations(self) -> list[dict[str, Any]]:
        names = list(self.grid)
        return [dict(zip(names, values, strict=True)) for values in itertools.product(*self.grid.values())]

    def cells(self) -> list[Cell]:
        """Every cell, models first (a row of the contact sheet per model)."""
        models: list[str | None] = [*self.models] or [None]
        prompts: list[str | None] = [*self.prompts] or [None]
        seeds: list[int | None] = [*self.seeds] or [None]
        return [Cell(m, p, s, v) for m in models for p in prompts for s in seeds for v in self.variations()]

    def as_step(self) -> GenerateStep:
        """The grid as a generate step (how it is validated and bound)."""
        return GenerateStep(name="cells", template=self.template, params=dict(self.params), models=list(self.models),
                            prompts=list(self.prompts), seeds=list(self.seeds), variations=self.variations(),
                            model_slot=self.model_slot, prompt_slot=self.prompt_slot, seed_slot=self.seed_slot)


@dataclass(frozen=True, slots=True)
class Cell:
    """One point of the grid."""

    model: str | None
    prompt: str | None
    seed: int | None
    params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        text = json.dumps({"m": self.model, "p": self.prompt, "s": self.seed, "v": dict(self.params)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def column(self) -> str:
        """Its column label on the contact sheet: prompt, seed and grid values."""
        parts = [] if self.prompt is None else [self.prompt if len(self.prompt) <= 28 else self.prompt[:27] + "…"]
        tail = ([] if self.seed is None else [f"seed {self.seed}"]) + [f"{k}={v}" for k, v in self.params.items()]
        return "\n".join([*parts, " ".join(tail)] if tail else parts) or "(default)"


@dataclass(frozen=True, slots=True)
class CellRecord:
    """What became of a cell. ``status``: missing, done, cached (from the disk cache) or failed."""

    id: str
    model: str | None
    prompt: str | None
    seed: int | None
    params: dict[str, Any] = field(default_factory=dict)
    status: str = "missing"
    job_id: str | None = None
    backend: str | None = None
    queued_s: float | None = None
    execution_s: float | None = None
    elapsed_s: float | None = None
    score: float | None = None
    parts: dict[str, float] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    lineage: dict[str, Any] = field(default_factory=dict)
    attempts: int = 0
    error: str | None = None
    finished_at: float | None = None

    @property
    def ok(self) -> bool:
        return self.status in _OK

    @classmethod
    def missing(cls, cell: Cell) -> CellRecord:
        return cls(cell.id, cell.model, cell.prompt, cell.seed, dict(cell.params))
