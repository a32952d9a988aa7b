"""What ``comfy-orch demo`` runs: one frozen settings object, built by the CLI or by hand.

With no ``backends`` the demo starts a local CPU ComfyUI holding the tiny random-weight models and
fills in every default for them (``resolved``); with ``backends`` it uses those servers and the
template, models and upscaler named here (a real checkpoint's file name must be given).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from comfy_orchestrator.notebook import tiny_unet_names

__all__ = [
    "DEFAULT_PROMPTS",
    "DEFAULT_THRESHOLDS",
    "LOCAL_MODELS",
    "LOCAL_TEMPLATE",
    "LOCAL_UPSCALER",
    "LOCAL_UPSCALE_TEMPLATE",
    "REMOTE_TEMPLATE",
    "REMOTE_UPSCALE_TEMPLATE",
    "DemoSettings",
]

# Captions the tiny CLIP ("tiny-shapes") was trained on: coloured shapes.
DEFAULT_PROMPTS = ("a red circle", "a blue square")
# Three tiny UNets of one architecture, each from its own random seed: the notebooks' first three.
LOCAL_MODELS: tuple[str, ...] = tuple(tiny_unet_names(2))
# The tiny UNet's text conditioning is LotusConditioning, a fixed embedding: no text encoder, so the
# prompt cannot steer the picture. The template adds a Prompt node (a PrimitiveStringMultiline that
# feeds nothing) so that each graph carries the prompt it is scored against: ComfyUI stores it in its
# history and the PNG's metadata, and the graph's content hash (the cache key) differs per prompt.
LOCAL_TEMPLATE = "cpu_tiny_prompt_txt2img"
LOCAL_UPSCALE_TEMPLATE = "cpu_tiny_upscale"
LOCAL_UPSCALER = "tiny_compact_x2.safetensors"
LOCAL_STEPS = 4
REMOTE_TEMPLATE = "sd15_txt2img"
REMOTE_UPSCALE_TEMPLATE = "model_upscale"
# Thresholds known to fit a model's scores: the tiny CLIP gives the tiny UNets' noise 0.9–1.8 against
# the default prompts, so 1.5 lets some cells pass at once, some after escalating, some never.
DEFAULT_THRESHOLDS = {"tiny-shapes": 1.5}


class DemoSettings(BaseModel):
    """Every choice of a demo run; ``None`` means "the default for local or remote backends"."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    out_dir: Path = Path("demo-out")
    backends: list[str] = Field(default_factory=list)  # ComfyUI URLs; empty: start a local CPU one
    comfyui_dir: Path | None = None  # the ComfyUI tree for the local server (default: found)
    template: str | None = None  # text-to-image template with a prompt slot
    models: list[str] = Field(default_factory=list)  # compared models (files the backends list)
    model_slot: str | None = None  # the template slot the model binds to (default: checkpoint or unet)
    prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_PROMPTS), min_length=1)
    seeds: int = Field(default=1, ge=1, le=16)  # base seeds per model × prompt (grid columns)
    threshold: float | None = None  # the gate on the CLIP score; None: the default of ``clip`` (if it has one)
    max_attempts: int = Field(default=3, ge=1, le=20)  # per cell: first try + escalations
    steps: int | None = Field(default=None, ge=1)  # sampling steps of a first attempt
    params: dict[str, Any] = Field(default_factory=dict)  # further template slots (width, cfg, negative…)
    upscale_template: str | None = None  # image-to-image template with input_image + upscale_model
    upscaler: str | None = None  # upscale model file for the winners
    clip: str = "tiny-shapes"  # quality registry model name
    clip_weights: Path | None = None  # local weights replacing the registry entry's (no download)
    timeout: float = Field(default=600.0, gt=0)  # seconds per job, queueing included

    @model_validator(mode="after")
    def _remote_needs_models(self) -> DemoSettings:
        if self.backends and not self.models:
            raise ValueError("with --backend, name the models to compare (--model FILE, repeatable): "
                             "checkpoint files those servers hold, e.g. v1-5-pruned-emaonly.safetensors")
        if len(set(self.prompts)) != len(self.prompts):
            raise ValueError("prompts must be distinct")
        if self.threshold is None and self.clip not in DEFAULT_THRESHOLDS:
            raise ValueError(f"give a threshold for the CLIP model {self.clip!r} (--threshold): a threshold belongs "
                             "to one model; fit yours with `comfy-orch calibrate FOLDER`")
        return self

    @property
    def local(self) -> bool:
        """True when the demo starts its own ComfyUI with the tiny models."""
        return not self.backends

    def resolved(self) -> DemoSettings:
        """A copy with every ``None`` / empty default filled in for local or remote backends."""
        if self.local:
            fill: dict[str, Any] = {
                "template": self.template or LOCAL_TEMPLATE,
                "models": self.models or list(LOCAL_MODELS),
                "steps": self.steps or LOCAL_STEPS,
                "upscale_template": self.upscale_template or LOCAL_UPSCALE_TEMPLATE,
                "upscaler": self.upscaler or LOCAL_UPSCALER,
            }
        else:
            fill = {"template": self.template or REMOTE_TEMPLATE,
                    "upscale_template": self.upscale_template or REMOTE_UPSCALE_TEMPLATE}
        fill["threshold"] = self.threshold if self.threshold is not None else DEFAULT_THRESHOLDS[self.clip]
        return self.model_copy(update=fill)

    def base_seeds(self) -> list[int]:
        """The first seed of each column; escalation takes the next ones (s+1, s+2…), so columns are
        spaced apart far enough never to share a seed."""
        return [1000 * index for index in range(self.seeds)]
