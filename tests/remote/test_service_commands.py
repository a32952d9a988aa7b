"""``comfy-orch submit | status | watch | cancel`` as a user runs them: subprocesses against the
real service on a real socket."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from comfy_orchestrator.remote import ServiceClient
from comfy_orchestrator.service.keys import SOCKETS
from tests.conftest import GRAPHS_DIR, REPO
from tests.service.conftest import TOKENS, Service, ops_graph, running_service

MODEL_FREE = str(GRAPHS_DIR / "cpu_model_free_ops.json")


async def comfy_orch(*args: str, url: str | None = None, token: str | None = TOKENS["acme"]) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMFY_ORCH_")}
    env.update({"COMFY_ORCH_URL": url} if url else {})
    env.update({"COMFY_ORCH_TOKEN": token} if token else {})
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "comfy_orchestrator", *args,
        cwd=REPO, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("error:")
    return lines[0]


async def test_submit_wait_out_saves_the_jobs_outputs(service: Service, tmp_path: Path) -> None:
    out = tmp_path / "out"
    rc, stdout, err = await comfy_orch("submit", MODEL_FREE, "--set", "color=5", "--label", "run=cli", "--wait",
                                       "--out", str(out), url=service.url)
    assert rc == 0, err
    job_id, *paths = stdout.split()
    assert "succeeded" in err
    async with ServiceClient(service.url, TOKENS["acme"]) as remote:
        job = await remote.job(job_id)
        assert job.labels == {"run": "cli"}
        assert len(paths) == len(job.outputs) >= 1
        for path, name in zip(paths, job.outputs, strict=True):
            assert await asyncio.to_thread(Path(path).read_bytes) == await remote.download(job_id, name)


async def test_submit_a_service_template_then_status_and_watch(service: Service) -> None:
    rc, stdout, err = await comfy_orch("submit", "cpu_model_free_ops", "--set", "color=3", url=service.url)
    assert rc == 0, err
    job_id = stdout.strip()
    await service.wait_state(job_id, "succeeded")
    rc, stdout, err = await comfy_orch("watch", job_id, url=service.url)
    assert (rc, stdout.split()) == (0, [job_id, "succeeded"]), err
    rc, stdout, err = await comfy_orch("status", job_id, url=service.url)
    assert rc == 0, err
    assert stdout.splitlines()[0].split() == [job_id, "succeeded"]
    rc, stdout, err = await comfy_orch("status", job_id, "--json", url=service.url, token=None)
    assert rc == 2
    one_line_error(err)
    rc, stdout, _ = await comfy_orch("status", job_id, "--json", "--url", service.url)
    assert json.loads(stdout)["outputs"]


async def test_watch_follows_a_running_job_and_cancel_stops_it(tmp_path: Path) -> None:
    async with running_service(tmp_path, node_delay=1.0) as svc:
        async with ServiceClient(svc.url, TOKENS["acme"]) as remote:
            job = await remote.submit(ops_graph())
        watcher = asyncio.create_task(comfy_orch("watch", url=svc.url))  # every active job
        await svc.wait_state(job.id, "running")
        async with asyncio.timeout(30):  # the watcher has listed the job and opened its event socket
            while True:
                if svc.app[SOCKETS]:
                    break
                await asyncio.sleep(0.05)
        rc, stdout, err = await comfy_orch("cancel", job.id, url=svc.url)
        assert (rc, stdout.split()) == (0, [job.id, "cancelled"]), err
        rc, stdout, err = await watcher
        assert (rc, stdout.split()) == (6, [job.id, "cancelled"]), err
        rc, _, err = await comfy_orch("cancel", job.id, url=svc.url)
        assert rc == 9
        assert "already ended" in one_line_error(err)
        rc, stdout, err = await comfy_orch("delete", job.id, url=svc.url)
        assert (rc, stdout.split()) == (0, [job.id, "deleted"]), err
        rc, _, err = await comfy_orch("status", job.id, url=svc.url)
        assert rc == 8  # gone


async def test_errors_are_one_line_with_an_exit_code(service: Service) -> None:
    rc, _, err = await comfy_orch("status", "some-job", url=service.url, token="wrong-token")
    assert rc == 7
    assert "refused the token" in one_line_error(err)
    rc, _, err = await comfy_orch("submit", MODEL_FREE, "--wait", url=service.url, token="wrong-token")
    assert rc == 7
    one_line_error(err)
    rc, _, err = await comfy_orch("status", "no-such-job", url=service.url)
    assert rc == 8
    assert "no-such-job" in one_line_error(err)
    rc, _, err = await comfy_orch("submit", "no_such_template", url=service.url)
    assert rc == 2
    assert "UnknownTemplate" in one_line_error(err)
    rc, _, err = await comfy_orch("status", "x")
    assert rc == 2
    assert "COMFY_ORCH_URL" in one_line_error(err)
    url = service.url
    await service.stop()
    rc, _, err = await comfy_orch("status", "x", url=url)
    assert rc == 3
    assert "unreachable" in one_line_error(err)


async def test_submit_a_pipeline_spec_file(tmp_path: Path) -> None:
    spec = tmp_path / "chain.yaml"
    spec.write_text(
        "name: cli-pipeline\n"
        "steps:\n"
        "  - {name: draw, kind: generate, template: sd15_txt2img, models: [sd15.safetensors], seeds: [1],\n"
        "     params: {prompt: a red circle, width: 64, height: 64, steps: 3}}\n")
    async with running_service(tmp_path, models={"checkpoints": ["sd15.safetensors"]}) as service:
        rc, stdout, err = await comfy_orch("submit", str(spec), "--wait", url=service.url)
        assert rc == 0, err
        async with ServiceClient(service.url, TOKENS["acme"]) as remote:
            job = await remote.job(stdout.split()[0])
        assert job.kind.value == "pipeline"
        assert "grid.png" in job.outputs
        rc, _, err = await comfy_orch("submit", str(spec), "--set", "seed=2", url=service.url)
        assert rc != 0
        assert "pipeline spec" in one_line_error(err)
