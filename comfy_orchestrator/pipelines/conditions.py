"""Gate conditions: a comparison over the scores of a step's images."""

from __future__ import annotations

import enum
import operator
import statistics
from collections.abc import Callable, Sequence

from pydantic import BaseModel, ConfigDict

__all__ = ["Aggregate", "Comparison", "Condition"]


class Aggregate(enum.StrEnum):
    BEST = "best"  # the highest score passes
    WORST = "worst"  # the lowest score passes
    MEAN = "mean"  # the mean score passes
    ALL = "all"  # every image passes
    ANY = "any"  # at least one image passes


class Comparison(enum.StrEnum):
    GE = ">="
    GT = ">"
    LE = "<="
    LT = "<"


_OPS: dict[Comparison, Callable[[float, float], bool]] = {
    Comparison.GE: operator.ge,
    Comparison.GT: operator.gt,
    Comparison.LE: operator.le,
    Comparison.LT: operator.lt,
}


class Condition(BaseModel):
    """``{"of": "best", "op": ">=", "threshold": 0.8}``; ``part`` compares one part of the score
    (``score.parts[part]``) instead of its combined value."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    threshold: float
    op: Comparison = Comparison.GE
    of: Aggregate = Aggregate.BEST
    part: str | None = None

    def passes(self, value: float) -> bool:
        """Whether one score passes."""
        return _OPS[self.op](value, self.threshold)

    def holds(self, values: Sequence[float]) -> bool:
        """Whether a step's scores pass (no score at all never passes)."""
        if not values:
            return False
        if self.of is Aggregate.ALL:
            return all(self.passes(v) for v in values)
        if self.of is Aggregate.ANY:
            return any(self.passes(v) for v in values)
        if self.of is Aggregate.BEST:
            return self.passes(max(values))
        if self.of is Aggregate.WORST:
            return self.passes(min(values))
        return self.passes(statistics.fmean(values))

    def describe(self) -> str:
        what = f"{self.of.value} {self.part or 'score'}"
        return f"{what} {self.op.value} {self.threshold:g}"
