"""The exceptions the quality package raises, under the project's one root.

    ComfyOrchestratorError
    └── QualityError
        ├── UnknownModel (LookupError)          a name the registry does not hold
        ├── WeightsUnavailable (FileNotFoundError)
        │                                       no local file, and the hub cannot (or may not) be reached
        ├── AestheticHeadError (ValueError)     a head file that is not the LAION MLP, or the wrong width
        └── EvaluatorClosed (RuntimeError)      an evaluator or encoder used after close
"""

from __future__ import annotations

from comfy_orchestrator.errors import ComfyOrchestratorError

__all__ = ["AestheticHeadError", "EvaluatorClosed", "QualityError", "UnknownModel", "WeightsUnavailable"]


class QualityError(ComfyOrchestratorError):
    """Root of the quality evaluator's errors."""


class UnknownModel(QualityError, LookupError):
    """The registry holds no model of that name."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"unknown quality model {name!r}; the registry holds {', '.join(known) or 'none'}")
        self.name = name
        self.known = known


class WeightsUnavailable(QualityError, FileNotFoundError):
    """The weights are neither on disk nor in the hub's local cache, and the hub cannot be used."""


class AestheticHeadError(QualityError, ValueError):
    """An aesthetic head file that does not hold the LAION predictor's MLP, or fits another embedding width."""


class EvaluatorClosed(QualityError, RuntimeError):
    """An evaluator or a shared encoder was used after it was closed."""
