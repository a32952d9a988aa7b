"""Escalation: what the quality-gated loop tries next when an image scores below the threshold.

An :class:`EscalationPolicy` is a list of stages applied in order, each ``times`` times; every
application is one more attempt::

    EscalationPolicy(stages=[
        EscalationStage(action="new_seed", times=2),    # same model and steps, a fresh seed
        EscalationStage(action="more_steps", times=1),  # steps × steps_factor (+ steps_add)
        EscalationStage(action="next_model", times=1),  # the next model, base seed and steps again
    ])

With ``repeat`` the list starts over after its last stage (on the new model). The plan ends when a
``next_model`` stage finds no model left, when a pass over the stages adds nothing, or when the
loop's budget is spent. Seeds are never reused: each ``new_seed`` takes the next unused one.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["Candidate", "EscalationAction", "EscalationPolicy", "EscalationStage"]


class EscalationAction(enum.StrEnum):
    NEW_SEED = "new_seed"  # same model and steps, the next unused seed
    MORE_STEPS = "more_steps"  # same model and seed, more sampling steps
    NEXT_MODEL = "next_model"  # the next model of the list, base seed and base steps


class EscalationStage(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    action: EscalationAction
    times: int = Field(default=1, ge=1)
    steps_factor: float = Field(default=2.0, ge=1.0)
    steps_add: int = Field(default=0, ge=0)


def _default_stages() -> list[EscalationStage]:
    return [
        EscalationStage(action=EscalationAction.NEW_SEED, times=2),
        EscalationStage(action=EscalationAction.MORE_STEPS, times=1),
        EscalationStage(action=EscalationAction.NEXT_MODEL, times=1),
    ]


@dataclass(frozen=True, slots=True)
class Candidate:
    """One attempt the loop will make, and why (which stage produced it)."""

    model: str | None
    seed: int
    steps: int
    reason: str


class EscalationPolicy(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    stages: list[EscalationStage] = Field(default_factory=_default_stages, min_length=1)
    max_steps: int = Field(default=150, ge=1)
    repeat: bool = True

    def plan(self, *, models: Sequence[str | None], seed: int, steps: int) -> Iterator[Candidate]:
        """Every attempt in order, the first one (``models[0]``, ``seed``, ``steps``) included."""
        order = list(models) or [None]
        index, current_seed, current_steps = 0, seed, steps
        next_seed = seed + 1
        yield Candidate(order[0], seed, steps, "first attempt")
        while True:
            produced = False
            for stage in self.stages:
                for _ in range(stage.times):
                    if stage.action is EscalationAction.NEW_SEED:
                        current_seed, next_seed = next_seed, next_seed + 1
                        reason = f"new seed {current_seed}"
                    elif stage.action is EscalationAction.MORE_STEPS:
                        more = min(self.max_steps, round(current_steps * stage.steps_factor) + stage.steps_add)
                        if more <= current_steps:
                            break  # at the ceiling: this stage has nothing to add
                        current_steps = more
                        reason = f"more steps ({current_steps})"
                    else:
                        if index + 1 >= len(order):
                            return
                        index, current_seed, current_steps = index + 1, seed, steps
                        reason = f"next model {order[index]}"
                    produced = True
                    yield Candidate(order[index], current_seed, current_steps, reason)
            if not (self.repeat and produced):
                return
