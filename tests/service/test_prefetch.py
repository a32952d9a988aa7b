"""Output files staged as their nodes report them, before the prompt's /history entry confirms them."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from pathlib import Path

from comfy_orchestrator import ComfyClient
from comfy_orchestrator.pool import BackendConfig, EventKind, Pool, PoolEvent
from comfy_orchestrator.protocol import FileRef
from comfy_orchestrator.service.backends import BackendClients
from comfy_orchestrator.service.notifier import Notifier
from comfy_orchestrator.service.prefetch import OutputPrefetch
from comfy_orchestrator.service.worker import Worker
from comfy_orchestrator.store import Claim, JobState, SQLiteJobStore
from comfy_orchestrator.testing import FakeComfyUI
from tests.service.conftest import ops_graph


def blobs(root: Path) -> list[Path]:
    return sorted(root.glob("??/*"))


async def test_a_jobs_outputs_are_stored_before_its_backend_confirms_the_prompt(tmp_path: Path) -> None:
    """The double writes /history half a second after ``execution_success`` (the race every real
    ComfyUI has, widened): the output's bytes are in the store well before that, and the job ends
    with them once the history entry confirms them."""
    out = tmp_path / "out"
    async with SQLiteJobStore(tmp_path / "jobs.db", out) as store, FakeComfyUI(name="fake-0") as fake:
        fake.faults.history_delay = 0.5
        graph = ops_graph(color=0x2468AC, width=8, height=8, scale_by=1.0, blur_radius=1)
        job, _ = await store.create_job("acme", "graph", graph, claim=Claim("w", 60))
        clients = BackendClients([BackendConfig("gpu-0", fake.url)])
        try:
            async with Pool([BackendConfig("gpu-0", fake.url)]) as pool:
                worker = Worker(store, pool, clients, {}, Notifier(), worker_id="w", lease_s=60)
                processing = asyncio.create_task(worker.process(job))
                async with asyncio.timeout(5):
                    for _ in itertools.count():
                        if blobs(out):
                            break
                        await asyncio.sleep(0.01)
                assert fake.history == {}  # not confirmed yet
                await processing
        finally:
            await clients.close()
        done = await store.get_job("acme", job.id)
        assert done is not None
        assert done.state is JobState.SUCCEEDED
        assert done.result is not None
        [attempt] = await store.list_attempts(job.id)  # submitted under the claim's plan
        assert (attempt.backend, attempt.prompt_id) == ("gpu-0", job.planned_prompt_id)
        [output] = await store.list_outputs("acme", job.id)
        [entry] = fake.history.values()
        [saved] = [f for node in entry["outputs"].values() for f in node["images"]]
        assert output.name.endswith("/" + saved["filename"])
        assert output.path.read_bytes() == (fake.output_dir / saved["filename"]).read_bytes()
        assert blobs(out) == [output.path]


class CountingClient:
    """A real client that counts the downloads it starts."""

    def __init__(self, client: ComfyClient) -> None:
        self.client, self.downloads = client, 0

    def iter_download(self, ref: FileRef, *, chunk_size: int = 1 << 16) -> AsyncIterator[bytes]:
        self.downloads += 1
        return self.client.iter_download(ref, chunk_size=chunk_size)


async def test_collect_uses_what_was_staged_for_the_same_attempt_and_fetches_the_rest(tmp_path: Path) -> None:
    async with SQLiteJobStore(tmp_path / "jobs.db", tmp_path / "out") as store, \
            FakeComfyUI(name="fake-0") as fake, ComfyClient(fake.url) as client:
        job, _ = await store.create_job("acme", "graph", {"1": {"class_type": "X", "inputs": {}}},
                                        claim=Claim("w", 60))
        result = await client.run(ops_graph(color=0x13579B, width=8, height=8, scale_by=1.0, blur_radius=1))
        [(node_id, output)] = result.outputs.items()
        reported = PoolEvent(job.id, EventKind.OUTPUT, backend="gpu-0", attempt=1, node=node_id, files=output.files)
        counting = CountingClient(client)
        clients = {"gpu-0": counting}

        staged = OutputPrefetch(store, clients, job.id)
        staged.start(reported)
        staged.start(reported)  # reported twice: staged once
        [early] = await staged.collect("gpu-0", 1, result.outputs)
        assert counting.downloads == 1

        other_attempt = OutputPrefetch(store, clients, job.id)
        other_attempt.start(reported)
        [fetched] = await other_attempt.collect("gpu-0", 2, result.outputs)  # attempt 1's are not attempt 2's
        await other_attempt.close()
        assert counting.downloads == 3

        fake.faults.http_500 = 1  # the early download fails: collect fetches the file again
        failed_early = OutputPrefetch(store, clients, job.id)
        failed_early.start(reported)
        [again] = await failed_early.collect("gpu-0", 1, result.outputs)
        assert counting.downloads == 5

        on_server = (fake.output_dir / output.files[0].filename).read_bytes()
        for record in (early, fetched, again):
            assert (record.name, record.size) == (f"{node_id}/{output.files[0].filename}", len(on_server))
            assert record.path.read_bytes() == on_server
        assert await store.list_outputs("acme", job.id) == []  # staged, named by nobody yet


class GaugedClient:
    """A real client that counts the downloads under way at once."""

    def __init__(self, client: ComfyClient) -> None:
        self.client, self.active, self.most = client, 0, 0

    async def iter_download(self, ref: FileRef, *, chunk_size: int = 1 << 16) -> AsyncIterator[bytes]:
        self.active += 1
        self.most = max(self.most, self.active)
        try:
            async for chunk in self.client.iter_download(ref, chunk_size=chunk_size):
                await asyncio.sleep(0.02)  # a slower network: downloads overlap
                yield chunk
        finally:
            self.active -= 1


async def test_a_batch_of_files_is_staged_a_few_at_a_time(tmp_path: Path) -> None:
    async with SQLiteJobStore(tmp_path / "jobs.db", tmp_path / "out") as store, \
            FakeComfyUI(name="fake-0") as fake, ComfyClient(fake.url) as client:
        job, _ = await store.create_job("acme", "graph", {"1": {"class_type": "X", "inputs": {}}},
                                        claim=Claim("w", 60))
        result = await client.run({
            "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 6, "color": 77}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "batch"}},
        })
        [(node_id, output)] = result.outputs.items()
        assert len(output.files) == 6
        gauged = GaugedClient(client)
        prefetch = OutputPrefetch(store, {"gpu-0": gauged}, job.id, parallel=2)
        prefetch.start(PoolEvent(job.id, EventKind.OUTPUT, backend="gpu-0", attempt=1, node=node_id,
                                 files=output.files))
        records = await prefetch.collect("gpu-0", 1, result.outputs)
        await prefetch.close()
        assert gauged.most == 2
        assert [r.name for r in records] == [f"{node_id}/{f.filename}" for f in output.files]


class StalledClient:
    """A download that sends its first chunk, then waits until it is cancelled."""

    def __init__(self) -> None:
        self.started, self.cancelled = asyncio.Event(), asyncio.Event()

    async def iter_download(self, ref: FileRef, *, chunk_size: int = 1 << 16) -> AsyncIterator[bytes]:
        self.started.set()
        yield b"x" * 10
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        yield b""  # never reached


async def test_an_attempt_the_pool_retries_has_its_staging_stopped(tmp_path: Path) -> None:
    """The worker's recorder passes ``retried`` on: the failed attempt's downloads stop then, not
    when the job ends, and a later attempt's staging goes on."""
    async with SQLiteJobStore(tmp_path / "jobs.db", tmp_path / "out") as store:
        job, _ = await store.create_job("acme", "graph", {"1": {"class_type": "X", "inputs": {}}},
                                        claim=Claim("w", 60))
        first, second = StalledClient(), StalledClient()
        prefetch = OutputPrefetch(store, {"gpu-0": first, "gpu-1": second}, job.id)
        ref = FileRef("a.png", "", "output")
        prefetch.start(PoolEvent(job.id, EventKind.OUTPUT, backend="gpu-0", attempt=1, node="9", files=(ref,)))
        prefetch.start(PoolEvent(job.id, EventKind.OUTPUT, backend="gpu-1", attempt=2, node="9", files=(ref,)))
        async with asyncio.timeout(5):
            await first.started.wait()
            await second.started.wait()
        worker = Worker(store, Pool(), BackendClients([]), {}, Notifier(), worker_id="w", lease_s=60)
        await worker.recorder(job, prefetch)(PoolEvent(job.id, EventKind.RETRIED, backend="gpu-0", attempt=1,
                                                       reason="backend died", delay=0.0))
        async with asyncio.timeout(5):
            await first.cancelled.wait()
        assert not second.cancelled.is_set()
        await prefetch.close()
        assert second.cancelled.is_set()
        assert list((tmp_path / "out" / ".tmp").glob("*")) == []
