"""``/v1/runs/{id}``: a pipeline job seen as a run — its images with model, prompt, seed and score, and
its grid (a contact sheet with the scores). A run's id is its job's id; other kinds of job are not runs."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from comfy_orchestrator.service.errors import ApiError
from comfy_orchestrator.service.keys import STORE, TENANT
from comfy_orchestrator.service.outputs import stream_output
from comfy_orchestrator.service.pipeline_jobs import GRID_OUTPUT
from comfy_orchestrator.store import JobKind, JobRecord, JobState

__all__ = ["routes", "run_json"]

routes = web.RouteTableDef()


def run_json(job: JobRecord, steps: list[dict[str, Any]], has_grid: bool) -> dict[str, Any]:
    result = job.result or {}
    cells = [{"step": image.get("step"), "model": image.get("model"), "prompt": image.get("prompt"),
              "seed": image.get("seed"), "score": image.get("score"), "score_parts": image.get("score_parts", {}),
              "output": image.get("output")}
             for image in result.get("images", [])]
    return {
        "id": job.id,
        "state": job.state.value,
        "pipeline": job.spec.get("name", "pipeline"),
        "cells": cells,
        "steps": steps,
        "grid": f"/v1/runs/{job.id}/grid.png" if has_grid else None,
        "stats": result.get("stats"),
        "error": job.error,
    }


async def _run_or_404(request: web.Request) -> JobRecord:
    run_id = request.match_info["run_id"]
    job = await request.app[STORE].get_job(request[TENANT], run_id)
    if job is None or job.kind is not JobKind.PIPELINE:
        raise ApiError(404, "RunNotFound", f"no run {run_id!r} (a run is a pipeline job)")
    return job


@routes.get("/v1/runs/{run_id}")
async def get_run(request: web.Request) -> web.Response:
    job = await _run_or_404(request)
    store = request.app[STORE]
    steps = [{"name": s.name, "state": s.state.value, "outputs": list(s.outputs), **dict(s.data)}
             for s in await store.list_steps(job.id)]
    grid = await store.get_output(request[TENANT], job.id, GRID_OUTPUT) if job.state is JobState.SUCCEEDED else None
    has_grid = grid is not None
    return web.json_response(run_json(job, steps, has_grid))


@routes.get("/v1/runs/{run_id}/grid.png")
async def get_grid(request: web.Request) -> web.StreamResponse:
    job = await _run_or_404(request)
    return await stream_output(request, job.id, GRID_OUTPUT)
