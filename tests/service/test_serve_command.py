"""``comfy-orch serve --config FILE``: serves, and exits cleanly on SIGTERM after draining."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import aiohttp
import pytest
from click.testing import CliRunner

from comfy_orchestrator._child import free_port
from comfy_orchestrator.cli import main
from comfy_orchestrator.testing import FakeComfyUI
from tests.service.conftest import TOKENS, auth, wait_ready


def _refused(tmp_path: Path, settings: str) -> str:
    """What ``serve`` says when it refuses ``settings``: an error, never a traceback."""
    path = tmp_path / "service.toml"
    path.write_text(settings)
    result = CliRunner().invoke(main, ["serve", "--config", str(path)])
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    return result.output


def test_a_bad_config_is_one_line_naming_the_field(tmp_path: Path) -> None:
    assert "server.port" in _refused(tmp_path, "[server]\nport = -1\n")


async def test_serve_answers_then_drains_on_sigterm(tmp_path: Path) -> None:
    port = free_port("127.0.0.1")
    async with FakeComfyUI() as fake:
        config = tmp_path / "service.toml"
        config.write_text(
            f'[server]\nhost = "127.0.0.1"\nport = {port}\ndrain_timeout = 1.0\n'
            f'[store]\npath = "{tmp_path / "jobs.db"}"\noutputs_dir = "{tmp_path / "out"}"\n'
            f'[[backends]]\nname = "fake"\nurl = "{fake.url}"\n'
            f'[[tokens]]\ntoken = "{TOKENS["acme"]}"\ntenant = "acme"\n'
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "comfy_orchestrator", "-v", "serve", "--config", str(config),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        try:
            async with aiohttp.ClientSession() as session:
                await wait_ready(session, f"http://127.0.0.1:{port}", proc, timeout=30)
                async with session.get(f"http://127.0.0.1:{port}/v1/backends", headers=auth()) as resp:
                    assert resp.status == 200
            proc.send_signal(signal.SIGTERM)
            output, _ = await asyncio.wait_for(proc.communicate(), 20)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode == 0, output.decode()
        assert b"Traceback" not in output
        assert b"(event loop: uvloop)" in output  # "auto", and uvloop is a dependency here


def test_an_event_loop_that_cannot_be_had_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as where it is not installed
    wanted = '[server]\nevent_loop = "uvloop"\n[[backends]]\nname = "a"\nurl = "http://127.0.0.1:9"\n'
    assert "uvloop is not installed" in _refused(tmp_path, wanted)
    assert "server.event_loop" in _refused(tmp_path, '[server]\nevent_loop = "libuv"\n')
