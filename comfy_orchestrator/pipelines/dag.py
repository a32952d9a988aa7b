"""The DAG checks of a pipeline spec: unique names, known and acyclic ``depends_on``, gate branches,
fallbacks without inputs of their own, and gates and selections fed with scored images."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from comfy_orchestrator.pipelines.spec import PipelineSpec, Step

__all__ = ["CONSUMERS", "structure_problems"]

_SCORED_KINDS = frozenset({"score", "quality_loop"})
#: Step kinds that work on the images of the steps they depend on.
CONSUMERS = frozenset({"transform", "score", "gate", "select"})


def _with_fallbacks(step: Step) -> Iterator[Step]:
    yield step
    for fallback in step.fallback:
        yield from _with_fallbacks(fallback)


def structure_problems(spec: PipelineSpec) -> list[str]:
    """Every structural problem of ``spec``, one located line each (empty when it is sound)."""
    where = {step.name: f"steps[{i}] {step.name!r}" for i, step in enumerate(spec.steps)}
    by_name = {step.name: step for step in spec.steps}
    problems: list[str] = []
    seen: set[str] = set()
    for i, top in enumerate(spec.steps):
        for step in _with_fallbacks(top):
            label = where.get(step.name, f"steps[{i}] fallback {step.name!r}")
            if step.name in seen:
                problems.append(f"{label}: the name {step.name!r} is used twice")
            seen.add(step.name)
            if step is not top and step.needs:
                problems.append(f"{label}: a fallback takes its step's inputs; remove its depends_on/inputs")
    known = ", ".join(by_name)
    for step in spec.steps:
        for need in step.needs:
            if need == step.name:
                problems.append(f"{where[step.name]}: depends on itself")
            elif need not in by_name:
                problems.append(f"{where[step.name]}: depends_on names unknown step {need!r}; known steps: {known}")
        if step.kind in CONSUMERS and not step.sources:
            problems.append(f"{where[step.name]}: a {step.kind} step needs images: set depends_on")
        if step.kind == "gate":
            for name in getattr(step, "on_fail", ()):
                target = by_name.get(name)
                if target is None or step.name not in target.needs:
                    problems.append(f"{where[step.name]}: on_fail names {name!r}, which does not depend on the gate")
    cycle = _find_cycle(by_name)
    if cycle:
        problems.append(f"depends_on forms a cycle: {' -> '.join(cycle)}")
    elif not problems:
        for step in spec.steps:
            if step.kind in ("gate", "select"):
                unscored = [s for s in step.sources if not _scored(by_name, s)]
                if unscored:
                    problems.append(f"{where[step.name]}: a {step.kind} step compares scores, but "
                                    f"{', '.join(map(repr, unscored))} gives unscored images; add a score step")
    return problems


def _scored(by_name: Mapping[str, Step], name: str) -> bool:
    step = by_name[name]
    if step.kind in _SCORED_KINDS:
        return True
    return step.kind in ("gate", "select") and all(_scored(by_name, s) for s in step.sources)


def _find_cycle(by_name: Mapping[str, Step]) -> list[str]:
    state: dict[str, int] = {}  # 1 = on the path, 2 = done
    path: list[str] = []

    def visit(name: str) -> list[str]:
        state[name] = 1
        path.append(name)
        for need in by_name[name].needs:
            if need not in by_name:
                continue
            if state.get(need) == 1:
                return [*path[path.index(need):], need]
            if need not in state and (found := visit(need)):
                return found
        path.pop()
        state[name] = 2
        return []

    for name in by_name:
        if name not in state and (found := visit(name)):
            return found
    return []
