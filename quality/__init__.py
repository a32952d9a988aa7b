"""CLIP-based quality evaluation of generated images, on open-clip-torch.

The face of the package: :class:`ClipEvaluator` scores images against their prompt (CLIPScore
alignment, negative-prompt penalty, model-free technical checks, an optional LAION-format aesthetic
head) and batches concurrent callers onto one shared model. Models are data (:class:`Registry`,
``models.json``); thresholds come from :func:`fit_threshold` on the user's own labelled images.
"""

from typing import TYPE_CHECKING, Any

from quality.aesthetic import AestheticHead, load_aesthetic_head, save_aesthetic_head
from quality.batching import BatchStats, DynamicBatcher
from quality.calibration import (
    PairwiseFit,
    ThresholdFit,
    fit_threshold,
    fit_weights_pairwise,
)
from quality.encoder import ClipEncoder, SharedEncoders, TextEmbeddingCache, shared_encoders
from quality.errors import AestheticHeadError, EvaluatorClosed, QualityError, UnknownModel, WeightsUnavailable
from quality.models import (
    DeviceChoice,
    LoadedModel,
    ModelCache,
    Precision,
    choose_device,
    hub_reachable,
    load_model,
    shared_model_cache,
)
from quality.prompts import PromptInfo, clean_prompt
from quality.registry import DEFAULT_MODEL, ModelSpec, Registry, WeightsKind, default_registry
from quality.scores import CLIPSCORE_W, QualityScore, ScoreWeights, clip_score
from quality.scoring import ClipEvaluator
from quality.technical import TechnicalCheck, TechnicalLimits, TechnicalReport, check_image
from quality.types import ImageInput

if TYPE_CHECKING:
    from quality.types import Evaluator


def __getattr__(name: str) -> Any:
    if name == "Evaluator":  # lazily: it is the orchestrator's pipelines' protocol
        from quality.types import Evaluator

        return Evaluator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "CLIPSCORE_W",
    "DEFAULT_MODEL",
    "AestheticHead",
    "AestheticHeadError",
    "BatchStats",
    "ClipEncoder",
    "ClipEvaluator",
    "DeviceChoice",
    "DynamicBatcher",
    "Evaluator",
    "EvaluatorClosed",
    "ImageInput",
    "LoadedModel",
    "ModelCache",
    "ModelSpec",
    "PairwiseFit",
    "Precision",
    "PromptInfo",
    "QualityError",
    "QualityScore",
    "Registry",
    "ScoreWeights",
    "SharedEncoders",
    "TechnicalCheck",
    "TechnicalLimits",
    "TechnicalReport",
    "TextEmbeddingCache",
    "ThresholdFit",
    "UnknownModel",
    "WeightsKind",
    "WeightsUnavailable",
    "check_image",
    "choose_device",
    "clean_prompt",
    "clip_score",
    "default_registry",
    "fit_threshold",
    "fit_weights_pairwise",
    "hub_reachable",
    "load_aesthetic_head",
    "load_model",
    "save_aesthetic_head",
    "shared_encoders",
    "shared_model_cache",
]
