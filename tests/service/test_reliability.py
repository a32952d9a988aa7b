"""The reliability suite: the service as a real ``comfy-orch serve`` process on a real socket,
killed and restarted over the same SQLite file, with FakeComfyUI doubles in the test process."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import sys
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from comfy_orchestrator._child import free_port
from comfy_orchestrator.testing import FakeComfyUI
from tests.service.conftest import TOKENS, auth, ops_graph, wait_ready


def _write_config(tmp_path: Path, port: int, doubles: Sequence[FakeComfyUI], *, workers: int = 4,
                  drain_timeout: float = 5.0, lease_s: float = 10.0, extra: str = "") -> Path:
    backends = "".join(f'[[backends]]\nname = "gpu-{n}"\nurl = "{fake.url}"\n' for n, fake in enumerate(doubles))
    config = tmp_path / "service.toml"
    config.write_text(
        f'[server]\nhost = "127.0.0.1"\nport = {port}\nworkers = {workers}\n'
        f"drain_timeout = {drain_timeout}\nlease_s = {lease_s}\n"
        f'[store]\npath = "{tmp_path / "jobs.db"}"\noutputs_dir = "{tmp_path / "out"}"\n'
        f"{backends}"
        f'[[tokens]]\ntoken = "{TOKENS["acme"]}"\ntenant = "acme"\n'
        f"[limits]\nmax_queued_per_tenant = 1000\n"
        f"{extra}"
    )
    return config


@dataclass
class Proc:
    """One ``comfy-orch serve`` process; its output goes to a log file (read on failure)."""

    process: asyncio.subprocess.Process
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@asynccontextmanager
async def _session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


async def _start(config: Path, port: int, session: aiohttp.ClientSession, *, name: str) -> Proc:
    log = config.parent / f"{name}.log"
    with log.open("wb") as sink:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "comfy_orchestrator", "-v", "serve", "--config", str(config),
            stdout=sink, stderr=asyncio.subprocess.STDOUT,
        )
    proc = Proc(process, log)
    try:
        await wait_ready(session, f"http://127.0.0.1:{port}", process, timeout=30, output=proc.output)
    except BaseException:
        await _kill(proc)
        raise
    return proc


async def _kill(proc: Proc) -> None:
    if proc.process.returncode is None:
        proc.process.kill()
    await proc.process.wait()


async def _job(session: aiohttp.ClientSession, base: str, job_id: str) -> dict[str, Any]:
    async with session.get(f"{base}/v1/jobs/{job_id}", headers=auth()) as resp:
        assert resp.status == 200, await resp.text()
        body: dict[str, Any] = await resp.json()
        return body


async def _wait_all(session: aiohttp.ClientSession, base: str, ids: Sequence[str], *states: str,
                    timeout: float) -> dict[str, dict[str, Any]]:
    done: dict[str, dict[str, Any]] = {}
    async with asyncio.timeout(timeout):
        while len(done) < len(ids):
            for job_id in ids:
                if job_id not in done:
                    job = await _job(session, base, job_id)
                    if job["state"] in states:
                        done[job_id] = job
                    elif job["state"] in ("succeeded", "failed", "cancelled"):
                        raise AssertionError(f"job {job_id} ended {job['state']}: {job}")
            if len(done) < len(ids):
                await asyncio.sleep(0.1)
    return done


def _events(db: Path, type_: str) -> Counter[str]:
    with sqlite3.connect(db) as conn:
        return Counter(row[0] for row in conn.execute("SELECT job_id FROM events WHERE type = ?", (type_,)))


def _small_graph(color: int) -> dict[str, Any]:
    return ops_graph(color=color, width=8, height=8, scale_by=1.0, blur_radius=1)


def _succeeded_prompts(fake: FakeComfyUI) -> set[str]:
    return {pid for pid, entry in fake.history.items()
            if entry.get("status", {}).get("status_str") == "success"}


async def test_sigkill_during_200_submissions_loses_and_repeats_nothing(tmp_path: Path) -> None:
    port = free_port("127.0.0.1")
    base = f"http://127.0.0.1:{port}"
    async with FakeComfyUI(name="fake-0", node_delay=0.002) as f0, \
            FakeComfyUI(name="fake-1", node_delay=0.002) as f1, _session() as session:
        config = _write_config(tmp_path, port, [f0, f1], workers=4)
        accepted: dict[int, str] = {}  # colour → job id, for every 202 (or 200 on a replayed key)
        killed, enough = asyncio.Event(), asyncio.Event()
        gate = asyncio.Semaphore(8)

        async def submit(color: int) -> None:
            async with gate:
                if killed.is_set():
                    return
                try:
                    async with session.post(f"{base}/v1/jobs", json={"graph": _small_graph(color)},
                                            headers=auth() | {"Idempotency-Key": f"c-{color}"}) as resp:
                        body = await resp.json()
                        assert resp.status in (200, 202), body
                        accepted[color] = body["id"]
                        if len(accepted) >= 80:
                            enough.set()
                except (TimeoutError, aiohttp.ClientError):
                    pass  # the process died under this request: unanswered, retried after the restart

        first = await _start(config, port, session, name="first")
        try:
            tasks = [asyncio.create_task(submit(color)) for color in range(200)]
            async with asyncio.timeout(30):
                await enough.wait()
            first.process.send_signal(signal.SIGKILL)
            killed.set()
            await first.process.wait()
            await asyncio.gather(*tasks)
        finally:
            await _kill(first)
        before_restart = dict(accepted)
        assert 80 <= len(before_restart) < 200

        second = await _start(config, port, session, name="second")
        try:
            killed.clear()
            # What went unanswered is sent again with the same key: a job committed before the kill
            # whose answer was lost comes back as itself (200), not as a second job.
            await asyncio.gather(*(submit(color) for color in range(200) if color not in accepted))
            assert len(accepted) == 200
            for color, job_id in before_restart.items():
                assert accepted[color] == job_id
            jobs = await _wait_all(session, base, list(accepted.values()), "succeeded", timeout=45)
            for job_id, job in jobs.items():
                assert job["outputs"], job
                name = job["outputs"][0]
                async with session.get(f"{base}/v1/jobs/{job_id}/outputs/{name}", headers=auth()) as resp:
                    assert resp.status == 200
                    assert (await resp.read())[:8] == b"\x89PNG\r\n\x1a\n"
        finally:
            second.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(second.process.wait(), 20)
            finally:
                await _kill(second)

        assert len(set(accepted.values())) == 200
        db = tmp_path / "jobs.db"
        with sqlite3.connect(db) as conn:
            assert conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 200
        succeeded = _events(db, "job.succeeded")
        assert set(succeeded) == set(accepted.values())
        assert set(succeeded.values()) == {1}, [j for j, n in succeeded.items() if n > 1]
        # The doubles lived through the kill: each finished prompt is one job's, none finished twice
        # for the same job.
        with sqlite3.connect(db) as conn:
            owner = dict(conn.execute("SELECT prompt_id, job_id FROM attempts").fetchall())
        finished = Counter(owner.get(pid, "?") for fake in (f0, f1) for pid in _succeeded_prompts(fake))
        assert "?" not in finished
        assert set(finished.values()) <= {1}, [j for j, n in finished.items() if n > 1]


def _attempts(db: Path, job_id: str) -> list[tuple[str, str, str]]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT backend, prompt_id, state FROM attempts WHERE job_id = ? ORDER BY n", (job_id,))
        return [(str(b), str(p), str(s)) for b, p, s in rows.fetchall()]


async def _submit_one(session: aiohttp.ClientSession, base: str, color: int) -> str:
    async with session.post(f"{base}/v1/jobs", json={"graph": _small_graph(color)}, headers=auth()) as resp:
        body = await resp.json()
        assert resp.status == 202, body
        job_id: str = body["id"]
        return job_id


async def _wait_running_on(fake: FakeComfyUI, timeout: float = 20.0) -> str:
    async with asyncio.timeout(timeout):
        while True:
            prompt_id = fake.running_prompt_id
            if prompt_id is not None:
                return prompt_id
            await asyncio.sleep(0.02)


async def _cancel_and_see_the_prompt_stop(session: aiohttp.ClientSession, base: str, job_id: str,
                                          fake: FakeComfyUI, prompt_id: str) -> None:
    """POST the cancel; the backend stops running ``prompt_id`` within 5 s of it."""
    asked = asyncio.get_running_loop().time()
    async with session.post(f"{base}/v1/jobs/{job_id}/cancel", headers=auth()) as resp:
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["state"] == "cancelled"
    async with asyncio.timeout(5):
        while True:
            if fake.running_prompt_id != prompt_id:
                break
            await asyncio.sleep(0.05)
    assert asyncio.get_running_loop().time() - asked < 5


async def _terminate(proc: Proc, timeout: float = 20.0) -> int:
    proc.process.send_signal(signal.SIGTERM)
    try:
        return await asyncio.wait_for(proc.process.wait(), timeout)
    finally:
        await _kill(proc)


async def test_sigkill_mid_generation_then_the_prompt_finishes_collects_without_rerunning(tmp_path: Path) -> None:
    port = free_port("127.0.0.1")
    base = f"http://127.0.0.1:{port}"
    async with FakeComfyUI(name="fake-0", node_delay=0.3) as fake, _session() as session:
        config = _write_config(tmp_path, port, [fake], workers=2)
        db = tmp_path / "jobs.db"
        first = await _start(config, port, session, name="first")
        try:
            job_id = await _submit_one(session, base, 0x123456)
            prompt_id = await _wait_running_on(fake)
            first.process.send_signal(signal.SIGKILL)
            await first.process.wait()
        finally:
            await _kill(first)
        assert _attempts(db, job_id) == [("gpu-0", prompt_id, "running")]
        await fake.wait_idle(timeout=20)  # the prompt finishes while the service is down
        assert _succeeded_prompts(fake) == {prompt_id}

        second = await _start(config, port, session, name="second")
        try:
            job = await _job(session, base, job_id)
            assert job["state"] == "succeeded", (job, second.output())  # settled at start-up, before ready
            assert job["outputs"]
            async with session.get(f"{base}/v1/jobs/{job_id}/outputs/{job['outputs'][0]}", headers=auth()) as resp:
                assert resp.status == 200
                assert (await resp.read())[:4] == b"\x89PNG"
            await asyncio.sleep(0.5)  # nothing may run it again
            assert list(fake.history) == [prompt_id]
            assert fake.queue_remaining == 0
        finally:
            assert await _terminate(second) == 0, second.output()
        assert _events(db, "job.succeeded") == Counter({job_id: 1})


async def test_sigkill_mid_generation_with_the_prompt_still_running_is_adopted_not_rerun(tmp_path: Path) -> None:
    port = free_port("127.0.0.1")
    base = f"http://127.0.0.1:{port}"
    # 5 nodes of 1.5 s: the prompt is still mid-run when the new process reconciles it.
    async with FakeComfyUI(name="fake-0", node_delay=1.5) as fake, _session() as session:
        config = _write_config(tmp_path, port, [fake], workers=2)
        db = tmp_path / "jobs.db"
        first = await _start(config, port, session, name="first")
        try:
            job_id = await _submit_one(session, base, 0x654321)
            prompt_id = await _wait_running_on(fake)
            first.process.send_signal(signal.SIGKILL)
            await first.process.wait()
        finally:
            await _kill(first)
        assert fake.running_prompt_id == prompt_id  # restarted while the backend still runs it

        second = await _start(config, port, session, name="second")
        try:
            (job,) = (await _wait_all(session, base, [job_id], "succeeded", timeout=30)).values()
            assert job["outputs"]
        finally:
            assert await _terminate(second) == 0, second.output()
        assert _events(db, "job.succeeded") == Counter({job_id: 1})
        # The new process followed the prompt the old one submitted: one attempt, one prompt, no rerun.
        assert _attempts(db, job_id) == [("gpu-0", prompt_id, "succeeded")]
        assert list(fake.history) == [prompt_id]
        assert _succeeded_prompts(fake) == {prompt_id}
        assert job["result"]["adopted"] is True


async def test_a_tenant_cancelling_an_adopted_job_interrupts_its_prompt_within_5_s(tmp_path: Path) -> None:
    port = free_port("127.0.0.1")
    base = f"http://127.0.0.1:{port}"
    async with FakeComfyUI(name="fake-0", node_delay=5.0) as fake, _session() as session:
        config = _write_config(tmp_path, port, [fake], workers=1, lease_s=60.0)
        first = await _start(config, port, session, name="first")
        try:
            job_id = await _submit_one(session, base, 0x0F0F0F)
            prompt_id = await _wait_running_on(fake)
            first.process.send_signal(signal.SIGKILL)
            await first.process.wait()
        finally:
            await _kill(first)
        second = await _start(config, port, session, name="second")
        try:
            assert fake.running_prompt_id == prompt_id  # adopted, still running
            await _cancel_and_see_the_prompt_stop(session, base, job_id, fake, prompt_id)
        finally:
            assert await _terminate(second) == 0, second.output()
        assert fake.history[prompt_id]["status"]["status_str"] != "success"
        assert _attempts(tmp_path / "jobs.db", job_id) == [("gpu-0", prompt_id, "cancelled")]


async def test_sigkill_between_generate_and_score_resumes_at_score(tmp_path: Path) -> None:
    """The generated images are in the pipeline cache when the service dies: the restarted job scores
    them without running any prompt again."""
    port = free_port("127.0.0.1")
    base = f"http://127.0.0.1:{port}"
    models = {"checkpoints": ["sd15.safetensors"]}
    async with FakeComfyUI(name="fake-0", models=models) as fake, _session() as session:
        # The evaluator loads (torch, the weights) when the first image is scored: the kill lands then.
        config = _write_config(tmp_path, port, [fake], workers=1,
                               extra="[quality]\nmodel = \"tiny-shapes\"\n")
        db = tmp_path / "jobs.db"
        spec = {"name": "gen-score", "steps": [
            {"name": "draw", "kind": "generate", "template": "sd15_txt2img", "models": ["sd15.safetensors"],
             "seeds": [1, 2], "params": {"prompt": "a blue square", "negative": "", "width": 64, "height": 64,
                                         "steps": 4}},
            {"name": "rate", "kind": "score", "depends_on": ["draw"]},
        ]}
        first = await _start(config, port, session, name="first")
        try:
            async with session.post(f"{base}/v1/jobs", json={"pipeline": spec}, headers=auth()) as resp:
                assert resp.status == 202, await resp.text()
                job_id = (await resp.json())["id"]
            async with asyncio.timeout(60):  # generated, not yet scored
                while True:
                    if _step_event(db, job_id, "pipeline.step_started", "rate"):
                        break
                    await asyncio.sleep(0.02)
            first.process.send_signal(signal.SIGKILL)
            await first.process.wait()
        finally:
            await _kill(first)
        assert not _step_event(db, job_id, "pipeline.step_finished", "rate")
        generated = set(fake.history)
        assert len(generated) == 2

        second = await _start(config, port, session, name="second")
        try:
            (job,) = (await _wait_all(session, base, [job_id], "succeeded", timeout=60)).values()
        finally:
            assert await _terminate(second) == 0, second.output()
        assert set(fake.history) == generated  # no prompt ran again
        assert job["result"]["steps"]["rate"]["status"] == "done"
        scored = [image for image in job["result"]["images"] if image["step"] == "rate"]
        assert len(scored) == 2
        assert all(image["score"] is not None for image in scored)
        assert all(image["cached"] for image in scored)  # served from the cache by the second process
        assert _events(db, "job.succeeded") == Counter({job_id: 1})


def _step_event(db: Path, job_id: str, type_: str, step: str) -> bool:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT data FROM events WHERE job_id = ? AND type = ?", (job_id, type_)).fetchall()
    return any(f'"step":"{step}"' in row[0].replace(" ", "") for row in rows)


async def test_sigterm_drains_unready_finishes_in_flight_work_and_exits_zero(tmp_path: Path) -> None:
    port = free_port("127.0.0.1")
    base = f"http://127.0.0.1:{port}"
    async with FakeComfyUI(name="fake-0", node_delay=0.3) as fake, _session() as session:
        config = _write_config(tmp_path, port, [fake], workers=2, drain_timeout=10.0)
        db = tmp_path / "jobs.db"
        proc = await _start(config, port, session, name="serve")
        try:
            running = await _submit_one(session, base, 0x0000FF)
            waiting = await _submit_one(session, base, 0x00FF00)  # one backend slot: this one stays queued
            await _wait_running_on(fake)
            started = asyncio.get_running_loop().time()
            proc.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.2)  # the signal is handled
            readiness: list[int | str] = []
            while proc.process.returncode is None and asyncio.get_running_loop().time() - started < 30:
                try:
                    async with session.get(f"{base}/readyz", timeout=aiohttp.ClientTimeout(total=1)) as resp:
                        readiness.append(resp.status)
                except (TimeoutError, aiohttp.ClientError):
                    readiness.append("refused")
                await asyncio.sleep(0.05)
            left = 30 - (asyncio.get_running_loop().time() - started)
            code = await asyncio.wait_for(proc.process.wait(), max(0.1, left))
        finally:
            await _kill(proc)
        assert code == 0, proc.output()
        assert "Traceback" not in proc.output()
        # Never ready again once draining; while the in-flight job finishes the service still listens
        # and answers 503, then the port closes.
        assert readiness, readiness
        assert 200 not in readiness, readiness
        assert 503 in readiness, readiness
    with sqlite3.connect(db) as conn:
        states = dict(conn.execute("SELECT id, state FROM jobs").fetchall())
    assert states[running] == "succeeded", proc.output()  # in flight: finished within drain_timeout
    assert states[waiting] in ("queued", "succeeded"), proc.output()  # never left claimed by a dead process
    assert _events(db, "job.succeeded")[running] == 1


async def test_sigterm_past_the_drain_timeout_releases_in_flight_work(tmp_path: Path) -> None:
    port = free_port("127.0.0.1")
    base = f"http://127.0.0.1:{port}"
    async with FakeComfyUI(name="fake-0", node_delay=1.0) as fake, _session() as session:
        config = _write_config(tmp_path, port, [fake], workers=2, drain_timeout=0.5)
        db = tmp_path / "jobs.db"
        proc = await _start(config, port, session, name="serve")
        try:
            job_id = await _submit_one(session, base, 0xFF0000)
            await _wait_running_on(fake)
            started = asyncio.get_running_loop().time()
            code = await _terminate(proc, timeout=30)
            assert asyncio.get_running_loop().time() - started < 30
        finally:
            await _kill(proc)
        assert code == 0, proc.output()
        assert "Traceback" not in proc.output()
        with sqlite3.connect(db) as conn:
            (state,) = conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
        assert state == "queued", proc.output()  # released to the queue, not left claimed
        assert [a[2] for a in _attempts(db, job_id)] == ["abandoned"]
        await fake.wait_idle(timeout=10)
        assert _succeeded_prompts(fake) == set()  # and cancelled on its backend

        again = await _start(config, port, session, name="again")
        try:
            await _wait_all(session, base, [job_id], "succeeded", timeout=30)
        finally:
            assert await _terminate(again) == 0, again.output()
        assert _events(db, "job.succeeded") == Counter({job_id: 1})


async def test_a_backend_dying_mid_job_is_rerouted_to_the_other(tmp_path: Path) -> None:
    port = free_port("127.0.0.1")
    base = f"http://127.0.0.1:{port}"
    async with FakeComfyUI(name="fake-0", node_delay=0.2) as f0, FakeComfyUI(name="fake-1", node_delay=0.2) as f1, \
            _session() as session:
        config = _write_config(tmp_path, port, [f0, f1], workers=4)
        db = tmp_path / "jobs.db"
        f0.faults.die_mid_job = True  # stays down: no restart_after
        proc = await _start(config, port, session, name="serve")
        try:
            # Two at once with one slot per backend: one of them starts on the dying backend.
            ids = [await _submit_one(session, base, color) for color in (0x111111, 0x222222)]
            jobs = await _wait_all(session, base, ids, "succeeded", timeout=40)
        finally:
            assert await _terminate(proc) == 0, proc.output()
        assert not f0.alive
        for job in jobs.values():
            assert job["outputs"], job
        attempts = {job_id: _attempts(db, job_id) for job_id in ids}
        rerouted = [a for a in attempts.values() if a[0][0] == "gpu-0"]
        assert len(rerouted) == 1, attempts
        assert [(b, s) for b, _, s in rerouted[0]][-1] == ("gpu-1", "succeeded"), attempts
        assert len(rerouted[0]) == 2, attempts
        assert rerouted[0][0][2] == "failed", attempts  # not "succeeded" with the retry
        assert _events(db, "job.succeeded") == Counter(dict.fromkeys(ids, 1))
