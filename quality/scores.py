"""What a score is made of: the parts, their weights, and the combined value."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from quality.prompts import PromptInfo
from quality.technical import TechnicalReport

__all__ = ["CLIPSCORE_W", "QualityScore", "ScoreWeights", "clip_score"]

#: The rescaling of CLIPScore (Hessel et al. 2021): ``CLIPScore = w · max(cos, 0)`` with w = 2.5.
CLIPSCORE_W = 2.5


def clip_score(cosine: float) -> float:
    """CLIPScore (Hessel et al. 2021) of one image-text cosine: ``2.5 · max(cos, 0)``."""
    return CLIPSCORE_W * max(cosine, 0.0)


@dataclass(frozen=True, slots=True)
class ScoreWeights:
    """How parts combine: ``value = alignment·a − negative·n + aesthetic·s`` (technical failures give 0).

    * ``alignment``: CLIPScore of the image against the prompt (0..2.5).
    * ``negative``: CLIPScore against the negative prompt, subtracted (only when one is given).
    * ``aesthetic``: the aesthetic head's rating (LAION scale ≈ 1..10; only with a head).
    """

    alignment: float = 1.0
    negative: float = 1.0
    aesthetic: float = 0.1

    def as_dict(self) -> dict[str, float]:
        return {f.name: float(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_mapping(cls, values: Mapping[str, float]) -> ScoreWeights:
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown score weights {sorted(unknown)}; known: {sorted(known)}")
        return cls(**{k: float(v) for k, v in values.items()})

    def combine(self, parts: Mapping[str, float]) -> tuple[float, dict[str, float]]:
        """(value, the signed weight each present part entered with)."""
        signed = {"alignment": self.alignment, "negative": -self.negative, "aesthetic": self.aesthetic}
        used = {name: w for name, w in signed.items() if name in parts}
        return sum(w * parts[name] for name, w in used.items()), used


@dataclass(frozen=True, slots=True)
class QualityScore:
    """One image's score. ``value`` is the combined score; ``parts`` what it was made of.

    ``weights`` holds the signed weight each part entered ``value`` with (``technical`` is a gate:
    1.0 passed, 0.0 failed, and a failed image scores 0 with no model parts). Scores of different
    models are not comparable: ``model`` says whose this is.
    """

    value: float
    parts: Mapping[str, float]
    weights: Mapping[str, float]
    model: str
    technical: TechnicalReport
    prompt: PromptInfo
    negative: PromptInfo | None = None
    #: Raw cosine similarities behind the CLIPScores (``prompt``, ``negative``).
    cosines: Mapping[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when the technical checks passed."""
        return self.technical.ok

    def explain(self) -> str:
        """``"0.812 = +1×alignment 0.900 −1×negative 0.088"`` or the failed checks."""
        if not self.ok:
            return f"{self.value:.3f}: failed {', '.join(str(f) for f in self.technical.failures)}"
        terms = " ".join(f"{w:+g}×{name} {self.parts[name]:.3f}" for name, w in self.weights.items())
        return f"{self.value:.3f} = {terms}"

    def to_dict(self) -> dict[str, object]:
        return {
            "value": self.value,
            "parts": dict(self.parts),
            "weights": dict(self.weights),
            "model": self.model,
            "technical": self.technical.to_dict(),
            "prompt": self.prompt.to_dict(),
            "negative": self.negative.to_dict() if self.negative else None,
            "cosines": dict(self.cosines),
        }
