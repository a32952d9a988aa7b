"""The demo's ``manifest.json``: every cell and attempt (seed, steps, score, backend, timings), the
winners and their upscales, the timings of each stage, the versions that made them.

Paths in the manifest are relative to the output folder, so the folder can be moved or shared.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import platform
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from comfy_orchestrator._files import write_atomically
from comfy_orchestrator.client import ComfyClient
from comfy_orchestrator.errors import ComfyOrchestratorError
from comfy_orchestrator.pipelines import Artifact, JobOutcome, LoopAttempt, PipelineResult
from comfy_orchestrator.pool import BackendConfig

if TYPE_CHECKING:
    from comfy_orchestrator.demo.flow import Demo

__all__ = ["MANIFEST_FORMAT", "TINY_WARNING", "backend_info", "build_manifest", "write_json"]

MANIFEST_FORMAT = "comfy-orchestrator/demo/1"
WINNERS_DIR = "winners"
TINY_WARNING = (
    "These pictures are noise: the local demo runs tiny random-weight models (a 14 M-parameter UNet with "
    "random weights, no text encoder) so that it runs in seconds on any CPU. The prompt cannot steer them, "
    "and the tiny CLIP that scores them was trained only on coloured shapes: the scores show the machinery "
    "(gating, escalation, selection, upscaling), not image quality."
)


async def backend_info(configs: Sequence[BackendConfig]) -> list[dict[str, Any]]:
    """Name, URL and what each server says about itself (ComfyUI, Python and PyTorch versions, devices)."""

    async def one(config: BackendConfig) -> dict[str, Any]:
        info: dict[str, Any] = {"name": config.name, "url": config.url}
        client = ComfyClient(config.url, headers=config.headers)  # HTTP only: no socket to open
        try:
            stats = await client.system_stats()
        except ComfyOrchestratorError as exc:
            info["error"] = f"{type(exc).__name__}: {exc}"
            return info
        finally:
            await client.close()
        info.update(comfyui=stats.comfyui_version, python=stats.python_version, pytorch=stats.pytorch_version,
                    devices=[d.name for d in stats.devices])
        return info

    return list(await asyncio.gather(*(one(c) for c in configs)))


def build_manifest(demo: Demo, result: PipelineResult, out: Path, backends: list[dict[str, Any]],
                   clip: Any, timings: Mapping[str, float]) -> dict[str, Any]:
    """The manifest as JSON-ready data; copies the upscaled winners to ``out/winners/``. Blocking."""
    s = demo.settings
    cells = []
    for loop in demo.cells:
        step = result.steps.get(loop.step)
        history = step.history if step is not None else ()
        jobs = {job.job_id: job for job in step.jobs} if step is not None else {}
        kept = step.artifacts if step is not None else ()
        for prompt in s.prompts:
            attempts = [_attempt(a, jobs.get(a.job_id), demo.threshold, out) for a in history if a.prompt == prompt]
            best = next((a for a in kept if a.prompt == prompt), None)
            scores = [a["score"] for a in attempts if a["score"] is not None]
            cells.append({
                "step": loop.step, "model": loop.model, "prompt": prompt, "seed": loop.seed,
                "score": None if best is None else best.score,
                "passed": any(v >= demo.threshold for v in scores),
                "image": None if best is None else _rel(best.path, out),
                "best_seed": None if best is None else best.seed,
                "attempts": attempts,
                "elapsed_s": round(sum(a["elapsed_s"] or 0.0 for a in attempts), 4),
            })
    winners = _winners(result, out, s.upscaler)
    return {
        "format": MANIFEST_FORMAT,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "local": s.local,
        "warning": TINY_WARNING if s.local else None,
        "settings": s.model_dump(mode="json"),
        "template": s.template,
        "model_slot": demo.model_slot,
        "models": list(s.models),
        "prompts": list(s.prompts),
        "seeds": s.base_seeds(),
        "threshold": demo.threshold,
        "max_attempts": s.max_attempts,
        "clip": {"model": clip.name, "weights": clip.weights, "description": clip.description},
        "backends": backends,
        "cells": cells,
        "winners": winners,
        "steps": {name: {"status": r.status.value, "reason": r.reason, "elapsed_s": round(r.elapsed, 4)}
                  for name, r in result.steps.items()},
        "stats": result.stats.as_dict(),
        "timings": {name: round(value, 4) for name, value in timings.items()},
        "versions": _versions(),
        "outputs": {"manifest": "manifest.json", "report": "report.html", "winners_dir": WINNERS_DIR,
                    "images_dir": _rel(result.out_dir, out)},
    }


def _attempt(attempt: LoopAttempt, job: JobOutcome | None, threshold: float, out: Path) -> dict[str, Any]:
    timings = job.timings if job is not None else None
    return {
        "number": attempt.number, "seed": attempt.seed, "steps": attempt.steps, "reason": attempt.reason,
        "status": attempt.status.value, "score": attempt.score,
        "passed": attempt.score is not None and attempt.score >= threshold,
        "backend": attempt.backend, "job_id": attempt.job_id, "error": attempt.error,
        "image": None if attempt.artifact is None else _rel(attempt.artifact.path, out),
        "elapsed_s": None if job is None else round(job.elapsed, 4),
        "queued_s": None if timings is None else round(timings.queued_s, 4),
        "execution_s": None if timings is None else round(timings.execution_s, 4),
    }


def _winners(result: PipelineResult, out: Path, upscaler: str | None) -> list[dict[str, Any]]:
    selected = result.steps["winners"].artifacts if "winners" in result.steps else ()
    upscale = result.steps.get("upscale")
    upscaled: dict[str, Artifact] = {a.parents[0]: a for a in upscale.artifacts if a.parents} if upscale else {}
    jobs = {job.job_id: job for job in upscale.jobs} if upscale else {}
    folder = out / WINNERS_DIR
    if folder.is_dir():
        shutil.rmtree(folder)  # a winner of an earlier run must not linger
    folder.mkdir(parents=True)
    winners = []
    for index, winner in enumerate(selected, 1):
        entry: dict[str, Any] = {
            "prompt": winner.prompt, "model": winner.model, "seed": winner.seed, "score": winner.score,
            "image": _rel(winner.path, out), "size": _size(winner.path), "upscaler": upscaler,
            "upscaled": None, "upscaled_size": None, "scale": None, "backend": None, "elapsed_s": None,
        }
        big = upscaled.get(winner.id)
        if big is not None:
            target = folder / f"{index}-{_slug(winner.prompt or 'image')}{big.path.suffix or '.png'}"
            shutil.copyfile(big.path, target)
            size, small = _size(target), entry["size"]
            job = jobs.get(big.job_id)
            entry.update(upscaled=_rel(target, out), upscaled_size=size, scale=size[0] / small[0],
                         backend=big.backend, elapsed_s=None if job is None else round(job.elapsed, 4))
        winners.append(entry)
    return winners


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("comfy-orchestrator", "torch", "open_clip_torch", "pillow"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def _size(path: Path) -> list[int]:
    with Image.open(path) as image:
        return [image.width, image.height]


def _rel(path: Path, out: Path) -> str:
    try:
        return path.resolve().relative_to(out.resolve()).as_posix()
    except ValueError:
        return str(path)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "image"


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write atomically: a reader never sees half a manifest."""
    write_atomically(path, json.dumps(data, indent=2, default=str))
