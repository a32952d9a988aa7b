"""`comfy-orch run` as a user runs it: a subprocess against a server on a real socket."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import sys
from pathlib import Path

import pytest
from PIL import Image

from comfy_orchestrator.cli.run_command import parse_assignment
from comfy_orchestrator.testing import FakeComfyUI, NodeFailure
from tests.conftest import GRAPHS_DIR, REPO

MODEL_FREE = str(GRAPHS_DIR / "cpu_model_free_ops.json")


async def comfy_orch(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "comfy_orchestrator", *args,
        cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def test_assignments_are_read_as_json_when_they_are_json() -> None:
    assert parse_assignment("seed=3") == ("seed", 3)
    assert parse_assignment("cfg=7.5") == ("cfg", 7.5)
    assert parse_assignment("prompt=a red circle") == ("prompt", "a red circle")
    assert parse_assignment("KSampler.seed=4") == ("KSampler.seed", 4)
    with pytest.raises(Exception, match="NAME=VALUE"):
        parse_assignment("seed")


@pytest.fixture
async def server():
    async with FakeComfyUI(name="cli") as srv:
        yield srv


async def test_run_writes_images_and_manifests(server: FakeComfyUI, tmp_path: Path) -> None:
    code, out, err = await comfy_orch(
        "run", MODEL_FREE, "--backend", server.url, "--set", "color=16711680", "--set", "width=32",
        "--set", "Blur Image.blur_radius=1", "--out", str(tmp_path),
    )
    assert code == 0, err
    (image_path,) = [Path(line) for line in out.splitlines() if line.endswith(".png")]
    manifest = json.loads(image_path.with_suffix(".json").read_text())
    assert manifest["backend"] == server.url
    assert manifest["template"] == "cpu_model_free_ops"
    assert manifest["parameters"] == {"color": 16711680, "width": 32, "Blur Image.blur_radius": 1}
    assert manifest["sha256"] == hashlib.sha256(image_path.read_bytes()).hexdigest()
    assert manifest["prompt_id"]
    assert manifest["graph_hash"]
    assert manifest["timings"]["total_s"] > 0
    assert set(manifest["graph"])
    assert manifest["source"]["type"] == "output"
    with Image.open(image_path) as opened:
        image = opened.convert("RGB")
    assert image.width == 32 * 2  # scale_by 2 in the template
    assert image.getpixel((3, 3)) == (0, 255, 255)  # red, inverted


async def test_rejected_graph_names_the_node_and_input(server: FakeComfyUI, tmp_path: Path) -> None:
    code, _, err = await comfy_orch("run", MODEL_FREE, "--backend", server.url, "--set", "width=0",
                                    "--out", str(tmp_path))
    assert code == 2
    assert "graph rejected" in err
    assert "EmptyImage" in err
    assert "'width'" in err
    assert "Traceback" not in err


async def test_unknown_slot_lists_the_valid_ones(server: FakeComfyUI, tmp_path: Path) -> None:
    code, _, err = await comfy_orch("run", MODEL_FREE, "--backend", server.url, "--set", "colour=3",
                                    "--out", str(tmp_path))
    assert code == 2
    assert "colour" in err
    assert "color" in err
    assert "Traceback" not in err


async def test_execution_error_is_one_line(server: FakeComfyUI, tmp_path: Path) -> None:
    server.faults.execution_error = NodeFailure.cpu_oom(node_class="ImageInvert")
    code, _, err = await comfy_orch("run", MODEL_FREE, "--backend", server.url, "--out", str(tmp_path))
    assert code == 4
    assert "execution failed" in err
    assert "ImageInvert" in err
    assert "Traceback" not in err


async def test_missing_server_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code, _, err = await comfy_orch("run", MODEL_FREE, "--backend", f"http://127.0.0.1:{port}",
                                    "--out", str(tmp_path))
    assert code == 3
    assert "backend unavailable" in err
    assert str(port) in err
    assert "Traceback" not in err


async def test_backend_or_local_is_required(tmp_path: Path) -> None:
    code, _, err = await comfy_orch("run", MODEL_FREE, "--out", str(tmp_path))
    assert code == 2
    assert "--backend" in err


@pytest.mark.comfy_live
async def test_run_tiny_unet_on_real_comfyui(live_comfy, tmp_path: Path) -> None:
    code, out, err = await comfy_orch(
        "run", str(GRAPHS_DIR / "cpu_tiny_unet_txt2img.json"), "--backend", live_comfy.url,
        "--set", "seed=5", "--set", "steps=2", "--out", str(tmp_path),
    )
    assert code == 0, err
    (image_path,) = [Path(line) for line in out.splitlines() if line.endswith(".png")]
    with Image.open(image_path) as image:
        assert image.size == (64, 64)
    assert json.loads(image_path.with_suffix(".json").read_text())["parameters"] == {"seed": 5, "steps": 2}


async def test_ui_format_workflow_is_converted_with_the_servers_object_info(
    server: FakeComfyUI, tmp_path: Path
) -> None:
    from tests.test_workflow_ui import model_free_ui_workflow

    workflow = tmp_path / "exported_from_the_editor.json"
    workflow.write_text(json.dumps(model_free_ui_workflow(blur_mode=0)))
    code, out, err = await comfy_orch("run", str(workflow), "--backend", server.url,
                                      "--set", "Scale.scale_by=1.5", "--out", str(tmp_path / "out"))
    assert code == 0, err
    (image_path,) = [Path(line) for line in out.splitlines() if line.endswith(".png")]
    with Image.open(image_path) as image:
        assert image.size == (96, 96)
