"""The demo without a server: its settings, the pipeline it builds, and the report written from a
synthetic manifest (``test_demo_live.py`` runs the whole demo on a real ComfyUI)."""

from __future__ import annotations

import copy
import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from PIL import Image
from pydantic import ValidationError

from comfy_orchestrator._child import free_port, http_url
from comfy_orchestrator.cli import main
from comfy_orchestrator.demo import TINY_WARNING, Demo, DemoError, DemoSettings, write_contact_sheet, write_report
from comfy_orchestrator.demo.flow import ESCALATION
from comfy_orchestrator.demo.report import REAL_BACKENDS_HELP
from comfy_orchestrator.graph import load_templates
from comfy_orchestrator.pipelines import QualityLoopStep, SelectStep, TransformStep
from tests.conftest import GRAPHS_DIR

MODELS = ["alpha.safetensors", "beta.safetensors"]
PROMPTS = ["a red circle", "a <blue> square & more"]


class _Cells(HTMLParser):
    """The score cells of the report's grid table: (model, prompt, seed) -> (text, classes, attempts)."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: dict[tuple[str, str, int], tuple[str, set[str], int]] = {}
        self.images: list[str] = []
        self._open: tuple[tuple[str, str, int], set[str], int] | None = None
        self._text = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "img":
            self.images.append(a["src"])
        if tag == "td" and "data-model" in a:
            self._open = ((a["data-model"], a["data-prompt"], int(a["data-seed"])), set(a["class"].split()),
                          int(a["data-attempts"]))
            self._text = ""

    def handle_data(self, data: str) -> None:
        if self._open is not None:
            self._text += data

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._open is not None:
            key, classes, attempts = self._open
            self.cells[key] = (self._text, classes, attempts)
            self._open = None


def _png(path: Path, colour: tuple[int, int, int], size: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)
    return path.name


def _attempt(number: int, seed: int, steps: int, score: float | None, image: str | None,
             threshold: float) -> dict[str, Any]:
    return {"number": number, "seed": seed, "steps": steps, "reason": "first attempt" if number == 1 else "new seed",
            "status": "done" if score is not None else "failed", "score": score,
            "passed": score is not None and score >= threshold, "backend": "local-cpu", "job_id": f"job-{number}",
            "error": None if score is not None else "ExecutionFailed: boom", "image": image, "elapsed_s": 0.5,
            "queued_s": 0.1, "execution_s": 0.4}


def synthetic_manifest(out: Path, *, local: bool = True) -> dict[str, Any]:
    """Two models × two prompts × one seed: one cell passes at once, one after two attempts, one never,
    one failed outright; the winners upscaled ×2."""
    threshold = 1.5
    plan = {  # (model, prompt) -> attempt scores
        (MODELS[0], PROMPTS[0]): [1.61],
        (MODELS[0], PROMPTS[1]): [1.2, 1.55],
        (MODELS[1], PROMPTS[0]): [1.1, 1.3, 1.25],
        (MODELS[1], PROMPTS[1]): [None],
    }
    cells = []
    for (model, prompt), scores in plan.items():
        attempts = []
        for number, score in enumerate(scores, 1):
            image = None
            if score is not None:
                name = f"{Path(model).stem}-{PROMPTS.index(prompt)}-{number}.png"
                _png(out / "images" / name, (int(score * 100), 20 * number, 90), 64)
                image = f"images/{name}"
            attempts.append(_attempt(number, number - 1, 4, score, image, threshold))
        done = [a for a in attempts if a["score"] is not None]
        best = max(done, key=lambda a: a["score"]) if done else None
        cells.append({"step": "m1-s0", "model": model, "prompt": prompt, "seed": 0,
                      "score": None if best is None else best["score"],
                      "passed": any(a["passed"] for a in attempts),
                      "image": None if best is None else best["image"],
                      "best_seed": None if best is None else best["seed"], "attempts": attempts, "elapsed_s": 1.0})
    winners = []
    for index, prompt in enumerate(PROMPTS, 1):
        best = max((c for c in cells if c["prompt"] == prompt and c["score"] is not None), key=lambda c: c["score"])
        upscaled = f"winners/{index}.png"
        _png(out / upscaled, (200, 10, 10), 128)
        winners.append({"prompt": prompt, "model": best["model"], "seed": best["best_seed"], "score": best["score"],
                        "image": best["image"], "size": [64, 64], "upscaler": "tiny_compact_x2.safetensors",
                        "upscaled": upscaled, "upscaled_size": [128, 128], "scale": 2.0, "backend": "local-cpu",
                        "elapsed_s": 0.3})
    return {
        "format": "comfy-orchestrator/demo/1", "created_at": "2026-11-23T00:00:00Z", "local": local,
        "warning": TINY_WARNING if local else None, "models": MODELS, "prompts": PROMPTS, "seeds": [0],
        "threshold": threshold, "max_attempts": 3,
        "clip": {"model": "tiny-shapes", "weights": "/weights/tiny", "description": ""},
        "backends": [{"name": "local-cpu", "url": "http://127.0.0.1:1", "comfyui": "0.3.75", "devices": ["cpu"]}],
        "cells": cells, "winners": winners,
        "steps": {"m1-s0": {"status": "done", "reason": "threshold reached", "elapsed_s": 2.0}},
        "stats": {"completed": 7, "cached": 0, "failed": 1, "retries": 0},
        "timings": {"comfyui_start_s": 9.5, "pipeline_s": 12.25, "total_s": 25.0},
        "versions": {"python": "3.11", "comfy-orchestrator": "0.1.0"},
        "outputs": {"manifest": "manifest.json", "report": "report.html", "winners_dir": "winners"},
    }


def test_the_report_shows_the_grid_scores_history_and_warning(tmp_path: Path) -> None:
    manifest = synthetic_manifest(tmp_path)
    manifest["outputs"]["contact_sheet"] = sheet = write_contact_sheet(manifest, tmp_path)
    text = write_report(manifest, tmp_path).read_text(encoding="utf-8")

    with Image.open(tmp_path / sheet["path"]) as image:
        assert image.format == "PNG"
        assert image.size == (sheet["width"], sheet["height"])
    assert (sheet["rows"], sheet["columns"]) == (2, 2)
    assert sheet["width"] >= 2 * sheet["thumb"]
    assert sheet["height"] >= 2 * sheet["thumb"]

    parsed = _Cells()
    parsed.feed(text)
    assert sheet["path"] in parsed.images
    assert {w["upscaled"] for w in manifest["winners"]} <= set(parsed.images)
    assert all((tmp_path / src).is_file() for src in parsed.images)
    for cell in manifest["cells"]:
        shown, classes, attempts = parsed.cells[(cell["model"], cell["prompt"], cell["seed"])]
        assert shown == ("–" if cell["score"] is None else f"{cell['score']:.3f}")
        assert ("pass" in classes) is cell["passed"]
        assert attempts == len(cell["attempts"])
    winner_cells = {k for k, (_, classes, _) in parsed.cells.items() if "winner" in classes}
    assert winner_cells == {(w["model"], w["prompt"], 0) for w in manifest["winners"]}

    assert "a &lt;blue&gt; square &amp; more" in text
    assert "<blue>" not in text
    assert TINY_WARNING in text
    assert "--clip vit-l-14-openai --clip-weights" in text
    assert text.count("<details class='history'>") == len(manifest["cells"])
    assert len(re.findall(r"<tr class='attempt ", text)) == sum(len(c["attempts"]) for c in manifest["cells"])
    assert "ExecutionFailed: boom" in text
    assert "12.25" in text  # the pipeline's timing


def test_a_report_for_real_backends_has_no_noise_warning(tmp_path: Path) -> None:
    manifest = synthetic_manifest(tmp_path, local=False)
    manifest["outputs"]["contact_sheet"] = write_contact_sheet(manifest, tmp_path)
    text = write_report(manifest, tmp_path).read_text(encoding="utf-8")
    assert "Noise pictures" not in text
    assert TINY_WARNING not in text


def test_the_contact_sheet_changes_with_the_scores(tmp_path: Path) -> None:
    manifest = synthetic_manifest(tmp_path)
    write_contact_sheet(manifest, tmp_path)
    first = (tmp_path / "contact_sheet.png").read_bytes()
    changed = copy.deepcopy(manifest)
    changed["cells"][0]["score"] = 1.99
    write_contact_sheet(changed, tmp_path)
    assert (tmp_path / "contact_sheet.png").read_bytes() != first


def test_settings_fill_local_defaults_and_check_remote_ones() -> None:
    local = DemoSettings().resolved()
    assert local.local
    assert local.template == "cpu_tiny_prompt_txt2img"
    assert len(local.models) == 3
    assert local.threshold == 1.5
    assert local.upscaler == "tiny_compact_x2.safetensors"
    assert DemoSettings(seeds=3).base_seeds() == [0, 1000, 2000]

    with pytest.raises(ValidationError, match="name the models"):
        DemoSettings(backends=["http://gpu:8188"])
    with pytest.raises(ValidationError, match="give a threshold"):
        DemoSettings(clip="vit-l-14-openai")
    remote = DemoSettings(backends=["http://gpu:8188"], models=["sd15.safetensors"], clip="vit-l-14-openai",
                          threshold=0.75).resolved()
    assert (remote.template, remote.upscale_template, remote.threshold) == ("sd15_txt2img", "model_upscale", 0.75)


def test_the_demo_pipeline_gates_every_model_and_upscales_one_winner_per_prompt() -> None:
    demo = Demo(DemoSettings(seeds=2, max_attempts=4), templates=load_templates(GRAPHS_DIR))
    steps = demo.pipeline.spec.steps
    loops = [s for s in steps if isinstance(s, QualityLoopStep)]
    assert [(s.models, s.seed) for s in loops] == [([m], seed) for m in demo.settings.models for seed in (0, 1000)]
    assert all(s.threshold == 1.5 and s.max_attempts == 4 and s.model_slot == "unet" for s in loops)
    assert all(s.escalation == ESCALATION for s in loops)
    # one loop per prompt, each saving under a prefix of its own (ComfyUI's cache keeps them apart)
    assert all(s.variations == [{"prompt": "a red circle", "filename_prefix": "demo_p1"},
                                {"prompt": "a blue square", "filename_prefix": "demo_p2"}] for s in loops)
    select = next(s for s in steps if isinstance(s, SelectStep))
    assert (select.k, select.group_by, select.inputs) == (1, "prompt", [s.name for s in loops])
    upscale = next(s for s in steps if isinstance(s, TransformStep))
    assert upscale.depends_on == ["winners"]
    assert upscale.params == {"upscale_model": "tiny_compact_x2.safetensors"}

    graph = demo.templates["cpu_tiny_prompt_txt2img"].bind(prompt="a red circle").to_dict()
    prompt_nodes = [n for n in graph.values() if n["_meta"]["title"] == "Prompt"]
    assert prompt_nodes == [{"class_type": "PrimitiveStringMultiline", "inputs": {"value": "a red circle"},
                             "_meta": {"title": "Prompt"}}]
    feeding = {ref[0] for n in graph.values() for v in n["inputs"].values() if isinstance(ref := v, list)}
    assert not feeding & {k for k, n in graph.items() if n["_meta"]["title"] == "Prompt"}


def test_an_unknown_template_is_refused_before_anything_starts() -> None:
    with pytest.raises(DemoError, match="unknown template 'nope'"):
        Demo(DemoSettings(template="nope"), templates=load_templates(GRAPHS_DIR))
    with pytest.raises(DemoError, match="no model slot"):
        Demo(DemoSettings(template="cpu_model_free_ops"), templates=load_templates(GRAPHS_DIR))


def test_the_cli_refuses_remote_backends_without_models(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["demo", "--backend", "http://127.0.0.1:9", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "name the models to compare" in result.output


def test_real_backend_help_names_flags_the_command_has() -> None:
    flags = set(re.findall(r"--[a-z][a-z-]+", REAL_BACKENDS_HELP))
    options = {opt for p in main.commands["demo"].params for opt in p.opts}
    assert flags <= options, flags - options


def test_add_unet_writes_a_distinct_model(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from comfy_orchestrator.testing.tiny_models import UNET_FILE, add_unet, prepare_base_dir

    prepare_base_dir(tmp_path)
    assert add_unet(tmp_path, "other.safetensors", seed=7) == "other.safetensors"
    from safetensors.torch import load_file

    folder = tmp_path / "models" / "diffusion_models"
    base, other = load_file(folder / UNET_FILE), load_file(folder / "other.safetensors")
    assert {k: v.shape for k, v in base.items()} == {k: v.shape for k, v in other.items()}
    key = "input_blocks.0.0.weight"
    assert not base[key].equal(other[key])  # other weights, so other pictures
    other_bytes = (folder / "other.safetensors").read_bytes()
    add_unet(tmp_path, "again.safetensors", seed=7)
    assert (folder / "again.safetensors").read_bytes() == other_bytes
    with pytest.raises(ValueError, match="plain file name"):
        add_unet(tmp_path, "sub/x.safetensors", seed=1)


async def test_the_demo_on_remote_backends_gates_real_model_names_and_upscales_the_winners(tmp_path: Path) -> None:
    """The --backend path over two test doubles (their sampler draws the prompt's shape on some seeds
    only): each model goes where it is, the tiny CLIP passes exactly the attempts that drew the prompt."""
    from comfy_orchestrator.testing import FakeComfyUI, sampler_succeeds

    sd15, dream, upscaler = "sd15.safetensors", "dreamshaper_8.safetensors", "RealESRGAN_x4plus.pth"
    async with (FakeComfyUI(models={"checkpoints": [sd15], "upscale_models": [upscaler]}, name="a") as a,
                FakeComfyUI(models={"checkpoints": [dream], "upscale_models": [upscaler]}, name="b") as b):
        settings = DemoSettings(out_dir=tmp_path / "out", backends=[a.url, b.url], models=[sd15, dream],
                                prompts=["a purple triangle", "a green square"], upscaler=upscaler,
                                params={"width": 64, "height": 64, "negative": ""}, steps=5, max_attempts=3)
        stages: list[str] = []
        result = await Demo(settings).run(on_stage=stages.append)

    manifest = result.manifest
    assert json.loads(result.manifest_path.read_text()) == json.loads(json.dumps(manifest, default=str))
    assert manifest["warning"] is None
    assert manifest["template"] == "sd15_txt2img"
    assert manifest["model_slot"] == "checkpoint"
    assert [b["url"] for b in manifest["backends"]] == [a.url, b.url]
    assert not any("local" in stage for stage in stages)
    for cell in manifest["cells"]:
        attempts = cell["attempts"]
        assert {x["backend"] for x in attempts} == {"backend-1" if cell["model"] == sd15 else "backend-2"}
        for x in attempts:  # what the double drew decides the tiny CLIP's verdict
            assert x["passed"] is sampler_succeeds(x["seed"], cell["model"], x["steps"])
        assert all(not x["passed"] for x in attempts[:-1])
        assert len(attempts) == 3 or attempts[-1]["passed"]
        assert [(x["seed"], x["steps"]) for x in attempts] == [(0, 5), (1, 5), (1, 10)][: len(attempts)]
    # at 5 steps sd15 draws the prompt on seed 1, dreamshaper on none of 0, 1 (steps 5 and 10)
    assert [len(c["attempts"]) for c in manifest["cells"]] == [2, 2, 3, 3]
    for winner in manifest["winners"]:
        assert winner["model"] == sd15
        assert winner["scale"] == 4.0
        assert winner["upscaled_size"] == [256, 256]
    assert len(result.winners) == 2
    assert all(p.is_file() for p in result.winners)
    assert result.report.read_text(encoding="utf-8").count("data-model=") == 4
    verdicts = [x["passed"] for c in manifest["cells"] for x in c["attempts"]]
    assert True in verdicts
    assert False in verdicts  # the gate both passed and escalated



def test_the_cli_fails_fast_on_a_missing_comfyui_or_an_unreachable_backend(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["demo", "--comfyui-dir", str(tmp_path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 3
    assert "not a ComfyUI tree" in result.output

    refused = _free_port_url()
    result = runner.invoke(main, ["demo", "--backend", refused, "--model", "sd15.safetensors",
                                  "--out", str(tmp_path / "out")])
    assert result.exit_code == 3, result.output
    assert f"no backend answers: backend-1 at {refused}" in result.output


async def test_models_no_backend_holds_are_named_before_any_job_runs(tmp_path: Path) -> None:
    from comfy_orchestrator.testing import FakeComfyUI

    async with FakeComfyUI(models={"checkpoints": ["sd15.safetensors"]}) as server:
        settings = DemoSettings(out_dir=tmp_path, backends=[server.url],
                                models=["sd15.safetensors", "sdxl.safetensors"])
        with pytest.raises(DemoError, match=r"holds sdxl\.safetensors, RealESRGAN_x4plus\.pth; they hold "
                                            r"backend-1 checkpoints: sd15\.safetensors"):
            await Demo(settings).run()
        assert not server.history  # nothing ran
    assert not (tmp_path / "images").exists()


def _free_port_url() -> str:
    return http_url("127.0.0.1", free_port("127.0.0.1"))


def test_an_unknown_clip_model_is_refused_before_anything_starts() -> None:
    with pytest.raises(DemoError, match="no-such-clip"):
        Demo(DemoSettings(clip="no-such-clip", threshold=0.5), templates=load_templates(GRAPHS_DIR))
