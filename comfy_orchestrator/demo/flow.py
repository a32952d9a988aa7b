"""The demo's run: backends, a pool, the CLIP evaluator, the pipeline, and what it leaves in ``out_dir``.

The pipeline is one quality-gated loop per model × base seed (each runs one loop per prompt: a
cell of the grid), a selection of the best image per prompt across every cell, and an upscale of
those winners::

    m1-s0 ─┐
    m2-s0 ─┼─► winners (best per prompt) ─► upscale
    m3-s0 ─┘
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from comfy_orchestrator.demo.manifest import backend_info, build_manifest, write_json
from comfy_orchestrator.demo.report import write_contact_sheet, write_report
from comfy_orchestrator.demo.settings import LOCAL_MODELS, DemoSettings
from comfy_orchestrator.errors import BackendUnavailable, ComfyOrchestratorError
from comfy_orchestrator.graph import Template, load_templates
from comfy_orchestrator.notebook import prepare_tiny_models
from comfy_orchestrator.pipelines import (
    EscalationAction,
    EscalationPolicy,
    EscalationStage,
    EventCallback,
    OnError,
    Pipeline,
    PipelineSpec,
    QualityLoopStep,
    SelectStep,
    Step,
    TransformStep,
)
from comfy_orchestrator.pool import BackendConfig, Pool

__all__ = ["Demo", "DemoError", "DemoResult", "LoopCell", "StageCallback"]

log = logging.getLogger(__name__)

StageCallback = Callable[[str], None]

#: Below the threshold: a fresh seed, then twice the steps on it; again and again up to max_attempts.
ESCALATION = EscalationPolicy(
    stages=[EscalationStage(action=EscalationAction.NEW_SEED, times=1),
            EscalationStage(action=EscalationAction.MORE_STEPS, times=1, steps_factor=2.0)],
    max_steps=64, repeat=True,
)
_MODEL_SLOTS = ("checkpoint", "unet")
_LISTED = ("checkpoints", "diffusion_models", "upscale_models")
IMAGES_DIR = "images"


class DemoError(ComfyOrchestratorError):
    """The demo cannot run as asked: an unknown template, a missing slot, no quality package…"""


@dataclass(frozen=True, slots=True)
class LoopCell:
    """One quality-loop step of the demo: a model and a base seed, run once per prompt."""

    step: str
    model: str
    seed: int


@dataclass(frozen=True)
class DemoResult:
    """Where the demo wrote its outputs, and the manifest it wrote."""

    out_dir: Path
    report: Path
    contact_sheet: Path
    manifest_path: Path
    winners: list[Path]
    manifest: Mapping[str, Any] = field(repr=False)


class Demo:
    """A demo run, checked when built (templates, slots) before anything starts; ``await run()``."""

    def __init__(self, settings: DemoSettings, *, templates: Mapping[str, Template] | None = None) -> None:
        self.settings = settings.resolved()
        self.templates = dict(templates if templates is not None else load_templates())
        s = self.settings
        # resolved() filled these in
        self.threshold: float = s.threshold if s.threshold is not None else 0.0
        self.template_name, self.upscale_template_name = s.template or "", s.upscale_template or ""
        template = self._template(self.template_name)
        self._template(self.upscale_template_name)
        self.model_slot = s.model_slot or next((n for n in _MODEL_SLOTS if n in template.slots), "")
        if self.model_slot not in template.slots:
            raise DemoError(f"template {s.template!r} has no model slot ({' or '.join(_MODEL_SLOTS)}); "
                            f"name one with --model-slot; its slots: {', '.join(template.slots)}")
        if "prompt" not in template.slots:
            raise DemoError(f"template {s.template!r} has no 'prompt' slot to compare prompts with")
        self.cells = [LoopCell(f"m{i + 1}-s{seed}", model, seed)
                      for i, model in enumerate(s.models) for seed in s.base_seeds()]
        self.pipeline = Pipeline(self._spec(), templates=self.templates)
        self.clip_spec = self._clip_spec()

    def _template(self, name: str) -> Template:
        try:
            return self.templates[name]
        except KeyError:
            raise DemoError(f"unknown template {name!r}; known: {', '.join(sorted(self.templates))}") from None

    def _spec(self) -> PipelineSpec:
        s = self.settings
        # One variation per prompt; with a filename_prefix of its own where the template has the slot, so
        # that ComfyUI's node cache never hands one prompt's saved file (its PNG metadata naming that
        # prompt) to another prompt when the picture does not depend on the prompt (the tiny UNet's).
        template = self.templates[self.template_name]
        variations = [{"prompt": prompt} for prompt in s.prompts]
        if "filename_prefix" in template.slots and "filename_prefix" not in s.params:
            variations = [{**v, "filename_prefix": f"demo_p{i + 1}"} for i, v in enumerate(variations)]
        loops: list[Step] = [
            QualityLoopStep(
                name=cell.step, template=self.template_name, params=dict(s.params), variations=variations,
                models=[cell.model], model_slot=self.model_slot, threshold=self.threshold, seed=cell.seed,
                steps=s.steps, escalation=ESCALATION, max_attempts=s.max_attempts, keep=1, timeout=s.timeout,
                on_error=OnError.CONTINUE,
            )
            for cell in self.cells
        ]
        upscale_params = {} if s.upscaler is None else {"upscale_model": s.upscaler}
        return PipelineSpec(name="demo", steps=[
            *loops,
            SelectStep(name="winners", inputs=[cell.step for cell in self.cells], k=1, group_by="prompt",
                       on_error=OnError.CONTINUE),
            TransformStep(name="upscale", template=self.upscale_template_name, depends_on=["winners"],
                          params=upscale_params, timeout=s.timeout, on_error=OnError.CONTINUE),
        ])

    async def run(self, *, on_event: EventCallback | None = None,
                  on_stage: StageCallback | None = None) -> DemoResult:
        """Start what is needed, run the pipeline, write the contact sheet, the upscaled winners,
        ``manifest.json`` and ``report.html`` into ``out_dir``."""
        s, stage = self.settings, on_stage or (lambda _message: None)
        out = s.out_dir.resolve()
        await asyncio.to_thread(out.mkdir, parents=True, exist_ok=True)
        timings: dict[str, float] = {}
        started = time.monotonic()
        comfy_dir = None
        if s.local:  # before anything starts: no ComfyUI tree, no demo
            from comfy_orchestrator.local import find_comfyui_dir

            comfy_dir = find_comfyui_dir(s.comfyui_dir)
        async with AsyncExitStack() as stack:
            evaluator = self._evaluator()
            local: asyncio.Task[str] | None = None
            try:  # the CLIP model loads while the local ComfyUI starts
                async with asyncio.TaskGroup() as group:
                    group.create_task(self._load_clip(stack, evaluator, stage, timings))
                    if comfy_dir is not None:
                        local = group.create_task(self._start_local(stack, comfy_dir, stage, timings))
            except ExceptionGroup as failed:
                raise failed.exceptions[0] from None
            urls = [local.result()] if local is not None else list(s.backends)
            configs = [BackendConfig("local-cpu" if s.local else f"backend-{i + 1}", url, max_in_flight=2)
                       for i, url in enumerate(urls)]
            backends = await backend_info(configs)
            pool = await stack.enter_async_context(Pool(configs))
            self._check_backends(pool)
            stage(f"running {len(self.cells) * len(s.prompts)} quality-gated cells on {len(configs)} backend(s)")
            t0 = time.monotonic()
            result = await self.pipeline.run(pool, out_dir=out / IMAGES_DIR, evaluator=evaluator,
                                             on_event=on_event)
            timings["pipeline_s"] = time.monotonic() - t0
        stage("writing the contact sheet, manifest and report")
        timings["total_s"] = time.monotonic() - started
        manifest = await asyncio.to_thread(build_manifest, self, result, out, backends, evaluator.spec, timings)
        sheet = await asyncio.to_thread(write_contact_sheet, manifest, out)
        manifest["outputs"]["contact_sheet"] = sheet
        manifest_path = out / "manifest.json"
        await asyncio.to_thread(write_json, manifest_path, manifest)
        report = await asyncio.to_thread(write_report, manifest, out)
        winners = [out / w["upscaled"] for w in manifest["winners"] if w.get("upscaled")]
        return DemoResult(out, report, out / sheet["path"], manifest_path, winners, manifest)

    def _check_backends(self, pool: Pool) -> None:
        """Fail fast, before any job waits out its timeout: a backend must answer, and every compared
        model and the upscaler must be on one that does."""
        statuses = pool.backends()
        up = [b for b in statuses if b.healthy]
        if not up:
            raise BackendUnavailable("no backend answers: " + "; ".join(
                f"{b.name} at {b.url} ({b.last_error or 'down'})" for b in statuses))
        held = {name for b in up for files in b.models.values() for name in files}
        upscaler = self.settings.upscaler or self.templates[self.upscale_template_name].defaults.get("upscale_model")
        wanted = [*self.settings.models, *([upscaler] if isinstance(upscaler, str) else [])]
        missing = [name for name in wanted if name not in held]
        if missing:
            listing = "; ".join(f"{b.name} {folder}: {_some(files)}" for b in up
                                for folder, files in b.models.items() if folder in _LISTED)
            raise DemoError(f"no backend that answers holds {', '.join(missing)}; they hold {listing or 'nothing'}")

    async def _load_clip(self, stack: AsyncExitStack, evaluator: Any, stage: StageCallback,
                         timings: dict[str, float]) -> None:
        stage(f"loading the CLIP model {self.settings.clip!r}")
        t0 = time.monotonic()
        from quality import QualityError

        try:
            await stack.enter_async_context(evaluator)
        except QualityError as exc:
            raise DemoError(f"cannot load the CLIP model {self.settings.clip!r}: {exc}") from exc
        timings["clip_load_s"] = time.monotonic() - t0

    async def _start_local(self, stack: AsyncExitStack, comfy_dir: Path, stage: StageCallback,
                           timings: dict[str, float]) -> str:
        from comfy_orchestrator.local import LocalComfyUI, LocalComfyUIConfig

        base = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="comfy-orch-demo-")))
        stage("writing the tiny random-weight models")
        t0 = time.monotonic()
        await asyncio.to_thread(prepare_tiny_models, base, variants=len(LOCAL_MODELS) - 1)
        timings["models_s"] = time.monotonic() - t0
        stage(f"starting a local CPU ComfyUI from {comfy_dir}")
        t0 = time.monotonic()
        server = await stack.enter_async_context(LocalComfyUI(LocalComfyUIConfig(
            comfy_dir=comfy_dir, base_dir=base, env={"HF_HUB_OFFLINE": "1"})))
        timings["comfyui_start_s"] = time.monotonic() - t0
        log.info("demo: local ComfyUI at %s (pid %s)", server.url, server.pid)
        return server.url

    def _clip_spec(self) -> Any:
        """The registry entry of ``clip`` (with ``clip_weights`` in place of its weights)."""
        try:
            from quality import QualityError, default_registry
        except ImportError as exc:
            raise DemoError(f"the demo scores with the quality package: pip install 'comfy-orchestrator[quality]' "
                            f"({exc})") from exc
        try:
            spec = default_registry().get(self.settings.clip)
        except QualityError as exc:
            raise DemoError(str(exc)) from exc
        if self.settings.clip_weights is not None:
            spec = dataclasses.replace(spec, weights=str(self.settings.clip_weights.expanduser().resolve()))
        return spec

    def _evaluator(self) -> Any:
        from quality import ClipEvaluator

        return ClipEvaluator(self.clip_spec)

def _some(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(sorted(names)[:limit])
    return shown + (f" … ({len(names)} in all)" if len(names) > limit else "") if names else "none"
