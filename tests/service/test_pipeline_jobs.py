"""Pipeline-kind jobs through the HTTP API: a comparison scored by the project's tiny CLIP, the run
view and its grid, and the 400s a pipeline gets before it is queued."""

from __future__ import annotations

import io
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.service.conftest import auth, running_service

SD15, DREAM = "sd15.safetensors", "dreamshaper_8.safetensors"
MODELS = {"checkpoints": [SD15, DREAM]}
TINY_CLIP = {"quality": {"model": "tiny-shapes"}}


def comparison(prompt: str = "a red circle") -> dict[str, Any]:
    """Two models × two seeds, scored, the best kept."""
    return {
        "name": "compare",
        "steps": [
            {"name": "draw", "kind": "generate", "template": "sd15_txt2img", "models": [SD15, DREAM],
             "seeds": [1, 2], "params": {"prompt": prompt, "negative": "", "width": 64, "height": 64, "steps": 4}},
            {"name": "rate", "kind": "score", "depends_on": ["draw"]},
            {"name": "best", "kind": "select", "depends_on": ["rate"], "k": 1},
        ],
    }


def _attempt_steps(db: Path, job_id: str) -> list[tuple[str, str]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT step, state FROM attempts WHERE job_id = ? ORDER BY n", (job_id,)).fetchall()


async def test_a_scored_comparison_runs_and_is_shown_as_a_run_with_its_grid(tmp_path: Path) -> None:
    async with running_service(tmp_path, models=MODELS, extra=TINY_CLIP) as svc:
        resp = await svc.submit({"pipeline": comparison(), "labels": {"case": "compare"}})
        assert resp.status == 202, await resp.text()
        job_id = (await resp.json())["id"]
        job = await svc.wait_state(job_id, "succeeded", "failed", timeout=90)
        assert job["state"] == "succeeded", job["error"]
        assert job["kind"] == "pipeline"
        assert set(job["result"]["steps"]) == {"draw", "rate", "best"}

        async with svc.session.get(f"{svc.url}/v1/runs/{job_id}", headers=auth()) as resp:
            assert resp.status == 200, await resp.text()
            run = await resp.json()
        scored = [c for c in run["cells"] if c["step"] == "rate"]
        assert {(c["model"], c["seed"]) for c in scored} == {(SD15, 1), (SD15, 2), (DREAM, 1), (DREAM, 2)}
        assert all(isinstance(c["score"], int | float) and "alignment" in c["score_parts"] for c in scored), scored
        assert all(c["prompt"] == "a red circle" for c in scored)
        (best,) = [c for c in run["cells"] if c["step"] == "best"]
        assert best["score"] == max(c["score"] for c in scored)
        assert {s["name"]: s["state"] for s in run["steps"]} == {"draw": "succeeded", "rate": "succeeded",
                                                                "best": "succeeded"}
        for cell in scored:  # every image is an output of the job
            async with svc.session.get(f"{svc.url}/v1/jobs/{job_id}/outputs/{cell['output']}",
                                       headers=auth()) as resp:
                assert resp.status == 200
                assert Image.open(io.BytesIO(await resp.read())).size == (64, 64)
        async with svc.session.get(f"{svc.url}{run['grid']}", headers=auth()) as resp:
            assert resp.status == 200
            assert resp.content_type == "image/png"
            grid = Image.open(io.BytesIO(await resp.read()))
            assert grid.width > 4 * 64
            assert grid.height > 3 * 64
        # Each prompt's attempt was stored before submission, under its step.
        steps = _attempt_steps(tmp_path / "jobs.db", job_id)
        assert steps == [("draw", "succeeded")] * 4, steps
        # Every score given is in the metrics' score distribution.
        async with svc.session.get(f"{svc.url}/metrics") as resp:
            text = await resp.text()
        assert "comfy_orchestrator_image_score_count 4.0" in text, [x for x in text.splitlines() if "score_count" in x]
        # Another tenant sees no run.
        async with svc.session.get(f"{svc.url}/v1/runs/{job_id}", headers=auth("other")) as resp:
            assert resp.status == 404


async def test_a_graph_job_is_not_a_run(tmp_path: Path) -> None:
    async with running_service(tmp_path) as svc:
        resp = await svc.submit({"template": "cpu_model_free_ops"})
        job_id = (await resp.json())["id"]
        async with svc.session.get(f"{svc.url}/v1/runs/{job_id}", headers=auth()) as resp:
            assert resp.status == 404
            assert (await resp.json())["error"]["type"] == "RunNotFound"


async def test_a_scoring_pipeline_without_an_evaluator_is_refused_before_queueing(tmp_path: Path) -> None:
    async with running_service(tmp_path, models=MODELS) as svc:
        resp = await svc.submit({"pipeline": comparison()})
        assert resp.status == 400
        error = (await resp.json())["error"]
        assert error["type"] == "NoEvaluator"
        assert "'rate'" in error["message"]
        assert "[quality] model" in error["message"]
        async with svc.session.get(f"{svc.url}/v1/jobs", headers=auth()) as listing:
            assert (await listing.json())["items"] == []


@pytest.mark.parametrize(("spec", "needle"), [
    ({"name": "x", "steps": []}, "steps"),
    ({"steps": [{"name": "a", "kind": "generate", "template": "no_such_template"}]}, "no_such_template"),
    ({"steps": [{"name": "a", "kind": "teleport"}]}, "teleport"),
    ({"steps": [{"name": "b", "kind": "score", "depends_on": ["missing"]}]}, "missing"),
])
async def test_an_invalid_pipeline_is_a_400_naming_the_problem(tmp_path: Path, spec: dict, needle: str) -> None:
    async with running_service(tmp_path, models=MODELS, extra=TINY_CLIP) as svc:
        resp = await svc.submit({"pipeline": spec})
        assert resp.status == 400, await resp.text()
        error = (await resp.json())["error"]
        assert error["type"] in ("PipelineSpecError", "InvalidRequest")
        assert needle in error["message"] or needle in str(error.get("problems"))


async def test_graph_steps_are_cached_unless_the_spec_says_otherwise(tmp_path: Path) -> None:
    async with running_service(tmp_path, models=MODELS, extra=TINY_CLIP) as svc:
        spec = comparison()
        spec["steps"][0]["cache"] = False
        first = await (await svc.submit({"pipeline": comparison()})).json()
        second = await (await svc.submit({"pipeline": spec})).json()
        for job_id in (first["id"], second["id"]):
            assert (await svc.wait_state(job_id, "succeeded", "failed", timeout=90))["state"] == "succeeded"
        # The first ran 4 prompts and cached them; the second opted out and ran its 4 again.
        assert sum(len(fake.history) for fake in svc.doubles) == 8
        third = await (await svc.submit({"pipeline": comparison()})).json()
        assert (await svc.wait_state(third["id"], "succeeded", timeout=90))["state"] == "succeeded"
        assert sum(len(fake.history) for fake in svc.doubles) == 8  # all four from the cache


async def test_the_templates_jobs_can_name_are_listed_with_their_slots(tmp_path: Path) -> None:
    async with running_service(tmp_path) as svc:
        async with svc.session.get(f"{svc.url}/v1/templates", headers=auth()) as resp:
            assert resp.status == 200
            items = {t["name"]: t for t in (await resp.json())["items"]}
        async with svc.session.get(f"{svc.url}/v1/templates") as resp:
            assert resp.status == 401  # a /v1 route like the others
        assert {"cpu_model_free_ops", "sd15_txt2img"} <= items.keys()
        sd15 = items["sd15_txt2img"]["slots"]
        assert sd15["seed"]["type"] == "int"
        assert sd15["prompt"]["type"] == "str"
        assert isinstance(sd15["prompt"]["default"], str)
        # What the listing says is what a job can bind.
        params = {k: v["default"] for k, v in items["cpu_model_free_ops"]["slots"].items()}
        resp = await svc.submit({"template": "cpu_model_free_ops", "params": params})
        assert resp.status == 202, await resp.text()
