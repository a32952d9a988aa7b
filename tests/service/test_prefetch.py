"""Output files staged as their nodes report them, before the prompt's /history entry confirms them."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from comfy_orchestrator import ComfyClient
from comfy_orchestrator.pool import BackendConfig, EventKind, Pool, PoolEvent
from comfy_orchestrator.protocol import FileRef
from comfy_orchestrator.service.backends import BackendClients
from comfy_orchestrator.service.notifier import Notifier
from comfy_orchestrator.service.prefetch import OutputPrefetch
from comfy_orchestrator.service.worker import Worker
from comfy_orchestrator.store import Claim, JobRecord, JobState, OutputRecord, SQLiteJobStore
from comfy_orchestrator.testing import FakeComfyUI, NodeFailure
from tests.service.conftest import ops_graph


def blobs(root: Path) -> list[Path]:
    """What lies at a content address."""
    return sorted(root.glob("??/*"))


def staged_files(root: Path) -> list[Path]:
    """Bytes staged for a name they do not have yet (the store's temporary files)."""
    return sorted(root.glob(".tmp/*/blob-*"))


async def test_a_jobs_outputs_are_stored_before_its_backend_confirms_the_prompt(tmp_path: Path) -> None:
    """The double writes /history half a second after ``execution_success`` (the race every real
    ComfyUI has, widened): the output's bytes are on disk, staged, well before that, and the job ends
    with them at their address once the history entry confirms them."""
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
                        if staged_files(out):
                            break
                        await asyncio.sleep(0.01)
                assert fake.history == {}  # not confirmed yet
                assert blobs(out) == []  # nor named
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
        assert staged_files(out) == []


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
            assert record.staged is not None
            assert record.staged.read_bytes() == on_server
        assert await store.list_outputs("acme", job.id) == []  # staged, named by nobody yet
        # what the other attempt staged early and nobody collected was discarded by its close
        assert staged_files(tmp_path / "out") == sorted(r.staged for r in (early, fetched, again) if r.staged)


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


async def processed(store: SQLiteJobStore, fake: FakeComfyUI, job: JobRecord) -> JobRecord:
    """``job`` run to its end by a worker over ``fake``; its record then."""
    clients = BackendClients([BackendConfig("gpu-0", fake.url)])
    try:
        async with Pool([BackendConfig("gpu-0", fake.url)]) as pool:
            await Worker(store, pool, clients, {}, Notifier(), worker_id="w", lease_s=60).process(job)
    finally:
        await clients.close()
    ended = await store.get_job("acme", job.id)
    assert ended is not None
    return ended


async def test_what_a_failed_prompt_staged_before_it_failed_leaves_nothing_on_disk(tmp_path: Path) -> None:
    """The first SaveImage runs and its file is staged while the next node runs (0.3 s a node); a
    node after that raises, the job fails, and the staged bytes are dropped: no address holds them, no
    temporary file is left."""
    out = tmp_path / "out"
    async with SQLiteJobStore(tmp_path / "jobs.db", out) as store, \
            FakeComfyUI(name="fake-0", node_delay=0.3) as fake:
        fake.faults.execution_error = NodeFailure("ValueError", "broken", node_class="ImageInvert", times=None)
        graph = {
            "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 99}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "first"}},
            "3": {"class_type": "ImageScaleBy", "inputs": {"image": ["1", 0], "upscale_method": "nearest-exact",
                                                           "scale_by": 1.0}},  # 0.3 s: the file is staged meanwhile
            "4": {"class_type": "ImageInvert", "inputs": {"image": ["3", 0]}},  # then this raises
            "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "second"}},
        }
        job, _ = await store.create_job("acme", "graph", graph, claim=Claim("w", 60))
        staged: list[OutputRecord] = []
        stage_output = store.stage_output

        async def counted(*args: Any, **kwargs: Any) -> OutputRecord:
            staged.append(await stage_output(*args, **kwargs))
            return staged[-1]

        store.stage_output = counted  # type: ignore[method-assign]
        failed = await processed(store, fake, job)
        assert failed.state is JobState.FAILED
        assert [r.name.split("/")[0] for r in staged] == ["2"]  # the first output was staged early
        assert blobs(out) == []
        assert staged_files(out) == []


async def test_a_disk_that_refuses_to_move_the_outputs_fails_the_job_and_keeps_nothing(tmp_path: Path) -> None:
    """The move to the content address happens in the transaction that names the outputs: when the
    disk refuses it, the job fails (as a failed download fails it) and the staged bytes go."""
    out = tmp_path / "out"
    async with SQLiteJobStore(tmp_path / "jobs.db", out) as store, FakeComfyUI(name="fake-0") as fake:
        job, _ = await store.create_job("acme", "graph", ops_graph(color=0x445566, width=8, height=8, scale_by=1.0,
                                                                   blur_radius=1), claim=Claim("w", 60))

        def full_disk(blobs: Any) -> None:
            raise OSError(28, "No space left on device")

        store.blobs.settle = full_disk  # type: ignore[method-assign]
        failed = await processed(store, fake, job)
        assert failed.state is JobState.FAILED
        assert failed.error is not None
        assert "No space left on device" in failed.error["message"]
        assert await store.list_outputs("acme", job.id) == []
        assert blobs(out) == []
        assert staged_files(out) == []
