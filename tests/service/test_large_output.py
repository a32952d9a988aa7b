"""A 50 MB output goes from the backend through the service's store to the client in chunks: the
``comfy-orch serve`` process (a real subprocess) grows by far less than the file while it does.

The double in this process turns a 4200×4200 random-noise PNG in its input folder into an output
PNG of the same noise (LoadImage → SaveImage): about 53 MB that no compression can shrink. The
service's peak RSS (``VmHWM``, reset through ``/proc/<pid>/clear_refs`` after a warm-up job) is read
once the job has been stored and downloaded; the download is checked byte for byte (SHA-256)
against the double's file.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from PIL import Image

from comfy_orchestrator._child import free_port
from comfy_orchestrator.testing import FakeComfyUI
from tests.service.conftest import TOKENS, auth, ops_graph

SIDE = 4200  # 4200 × 4200 × 3 bytes of noise: 52.9 MB, over 50 MiB
MIN_SIZE = 50 * 1024 * 1024
MAX_GROWTH = 25 * 1024 * 1024


def _write_noise_png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(50).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, compress_level=0)


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def _reset_peak(pid: int) -> int:
    """Reset the process's peak RSS where the kernel allows it; the baseline to measure growth from."""
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    return _status_kb(pid, "VmHWM")


@contextlib.asynccontextmanager
async def _serve(tmp_path: Path, fake: FakeComfyUI, session: aiohttp.ClientSession) -> AsyncIterator[tuple[str, int]]:
    port = free_port("127.0.0.1")
    config = tmp_path / "service.toml"
    config.write_text(
        f'[server]\nhost = "127.0.0.1"\nport = {port}\nworkers = 1\n'
        f'[store]\npath = "{tmp_path / "jobs.db"}"\noutputs_dir = "{tmp_path / "out"}"\n'
        f'[[backends]]\nname = "gpu-0"\nurl = "{fake.url}"\n'
        f'[[tokens]]\ntoken = "{TOKENS["acme"]}"\ntenant = "acme"\n'
    )
    log = tmp_path / "serve.log"
    with log.open("wb") as sink:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "comfy_orchestrator", "serve", "--config", str(config),
            stdout=sink, stderr=asyncio.subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        async with asyncio.timeout(60):
            while True:
                assert process.returncode is None, log.read_text(errors="replace")
                with contextlib.suppress(aiohttp.ClientConnectionError):
                    async with session.get(f"{base}/readyz") as resp:
                        if resp.status == 200:
                            break
                await asyncio.sleep(0.1)
        yield base, process.pid
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                async with asyncio.timeout(30):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()


async def _run(session: aiohttp.ClientSession, base: str, graph: dict[str, Any]) -> dict[str, Any]:
    async with session.post(f"{base}/v1/jobs", json={"graph": graph}, headers=auth()) as resp:
        assert resp.status == 202, await resp.text()
        job_id = (await resp.json())["id"]
    async with asyncio.timeout(240):
        while True:
            async with session.get(f"{base}/v1/jobs/{job_id}", headers=auth()) as resp:
                job: dict[str, Any] = await resp.json()
            if job["state"] in ("succeeded", "failed", "cancelled"):
                assert job["state"] == "succeeded", job
                return job
            await asyncio.sleep(0.2)


async def _download(session: aiohttp.ClientSession, base: str, job: dict[str, Any]) -> tuple[str, int]:
    [name] = job["outputs"]
    digest, size = hashlib.sha256(), 0
    async with session.get(f"{base}/v1/jobs/{job['id']}/outputs/{name}", headers=auth()) as resp:
        assert resp.status == 200, await resp.text()
        async for chunk in resp.content.iter_chunked(1 << 16):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


@pytest.mark.timeout(420)
async def test_a_50mb_output_streams_through_with_bounded_memory(tmp_path: Path) -> None:
    base_dir = tmp_path / "comfy"
    await asyncio.to_thread(_write_noise_png, base_dir / "input" / "noise.png")
    timeout = aiohttp.ClientTimeout(total=300, sock_read=120)
    async with FakeComfyUI(name="fake-0", base_dir=base_dir) as fake, \
            aiohttp.ClientSession(timeout=timeout) as session, \
            _serve(tmp_path, fake, session) as (base, pid):
        warm = await _run(session, base, ops_graph(width=16, height=16))  # every code path loaded once
        await _download(session, base, warm)
        baseline = _reset_peak(pid)

        job = await _run(session, base, {
            "1": {"class_type": "LoadImage", "inputs": {"image": "noise.png"}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "big"}},
        })
        served_sha, served_size = await _download(session, base, job)
        growth = _status_kb(pid, "VmHWM") - baseline

        [produced] = [p for p in fake.output_dir.iterdir() if p.name.startswith("big")]
        expected = await asyncio.to_thread(lambda: hashlib.sha256(produced.read_bytes()).hexdigest())
        assert served_size == produced.stat().st_size >= MIN_SIZE
        assert served_sha == expected
        assert growth < MAX_GROWTH, f"the service's peak RSS grew by {growth / 2**20:.1f} MiB"
