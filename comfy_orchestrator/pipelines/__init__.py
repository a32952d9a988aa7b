"""Pipelines and comparison runs over a pool of ComfyUI backends.

    Pipeline             a DAG of steps (spec + templates); ``await pipeline.run(pool, out_dir=…)``
    PipelineSpec         the declaration, the same in Python, JSON and YAML; steps:
      GenerateStep       a template over models × prompts × seeds × variations
      TransformStep      img2img / edit / upscale on a previous step's images (uploaded for you)
      ScoreStep          scores through an Evaluator (``quality.ClipEvaluator`` or your own)
      GateStep           branches on a Condition over scores (``on_fail`` names the other branch)
      SelectStep         keeps the best k
      QualityLoopStep    regenerates per an EscalationPolicy until the score reaches a threshold
    RetryPolicy, OnError per-step policies (with ``timeout``, ``fallback``, ``cache``, ``skip_existing``)
    DiskCache            content-addressed outputs: a hit does no GPU work
    PipelineResult       step results, Artifacts with lineage and scores, RunStats
    PipelineEvent        job and step events for ``on_event``
    ComparisonRun        models × prompts × seeds (× parameters), resumable, with a manifest,
                         a contact sheet, ``to_pandas()`` and a progress bar
    patterns             ready pipelines: text_to_upscaled, model_comparison, quality_gated,
                         best_of_variations, prompt_batch

Everything that runs is ``async`` and runs inside an already-running loop (a notebook's) as it is.
"""

from comfy_orchestrator.pipelines.cache import CacheEntry, DiskCache, job_key
from comfy_orchestrator.pipelines.cells import Cell, CellRecord, ComparisonSpec
from comfy_orchestrator.pipelines.comparison import ComparisonRun
from comfy_orchestrator.pipelines.conditions import Aggregate, Comparison, Condition
from comfy_orchestrator.pipelines.errors import NoImages, PipelineAborted, PipelineError, PipelineSpecError
from comfy_orchestrator.pipelines.escalation import Candidate, EscalationAction, EscalationPolicy, EscalationStage
from comfy_orchestrator.pipelines.events import EventCallback, EventKind, PipelineEvent
from comfy_orchestrator.pipelines.patterns import (
    best_of_variations,
    model_comparison,
    prompt_batch,
    quality_gated,
    text_to_upscaled,
)
from comfy_orchestrator.pipelines.pipeline import Pipeline
from comfy_orchestrator.pipelines.policies import Backoff, OnError, RetryPolicy
from comfy_orchestrator.pipelines.results import (
    Artifact,
    AttemptRecord,
    BackendTry,
    JobOutcome,
    JobStatus,
    LoopAttempt,
    PipelineResult,
    StepResult,
    StepStatus,
)
from comfy_orchestrator.pipelines.spec import (
    GateStep,
    GenerateStep,
    PipelineSpec,
    QualityLoopStep,
    ScoreStep,
    SelectStep,
    Step,
    TransformStep,
)
from comfy_orchestrator.pipelines.stats import BackendStats, ModelStats, RunStats
from comfy_orchestrator.pipelines.types import Evaluator, PoolLike, Score

__all__ = [
    "Aggregate",
    "Artifact",
    "AttemptRecord",
    "BackendStats",
    "BackendTry",
    "Backoff",
    "CacheEntry",
    "Candidate",
    "Cell",
    "CellRecord",
    "Comparison",
    "ComparisonRun",
    "ComparisonSpec",
    "Condition",
    "DiskCache",
    "EscalationAction",
    "EscalationPolicy",
    "EscalationStage",
    "Evaluator",
    "EventCallback",
    "EventKind",
    "GateStep",
    "GenerateStep",
    "JobOutcome",
    "JobStatus",
    "LoopAttempt",
    "ModelStats",
    "NoImages",
    "OnError",
    "Pipeline",
    "PipelineAborted",
    "PipelineError",
    "PipelineEvent",
    "PipelineResult",
    "PipelineSpec",
    "PipelineSpecError",
    "PoolLike",
    "QualityLoopStep",
    "RetryPolicy",
    "RunStats",
    "Score",
    "ScoreStep",
    "SelectStep",
    "Step",
    "StepResult",
    "StepStatus",
    "TransformStep",
    "best_of_variations",
    "job_key",
    "model_comparison",
    "prompt_batch",
    "quality_gated",
    "text_to_upscaled",
]
