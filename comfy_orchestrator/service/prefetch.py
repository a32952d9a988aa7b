"""A graph job's output files, staged as its nodes report them, before its prompt has finished.

ComfyUI sends a node's ``executed`` message once the node has written its files; the prompt's
``/history`` entry, which confirms that it succeeded and lists its outputs, comes later (after
``execution_success``). A worker streams each file into the store as its node reports it (the pool's
``output`` event), so the download and the store's fsyncs overlap that wait. ``collect`` then takes
the confirmed outputs as the truth: each file staged early under the same attempt is used, anything
else is downloaded then, and what was staged but not confirmed (another attempt's, or a prompt that
failed after all) is never recorded: ``stage_output`` names nothing until ``complete_job``, and
``close`` discards it. An attempt the pool gave up on (``retried``) has its staging stopped at once
(``drop``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from comfy_orchestrator.errors import ComfyOrchestratorError
from comfy_orchestrator.pool import PoolEvent
from comfy_orchestrator.protocol import FileRef, NodeOutput
from comfy_orchestrator.store import FileSource, JobStore, OutputRecord, discard_outputs, output_files, stage_file

__all__ = ["OutputPrefetch"]

log = logging.getLogger(__name__)


class OutputPrefetch:
    """One job's early staging: ``start`` on each ``output`` event, ``collect`` once the prompt has
    finished, ``close`` always (it stops what nobody collected)."""

    def __init__(self, store: JobStore, clients: Mapping[str, FileSource], job_id: str, *, parallel: int = 4) -> None:
        self._store, self._clients, self._job_id = store, clients, job_id
        self._staging: dict[tuple[int, str, FileRef], asyncio.Task[OutputRecord]] = {}
        self._dropped: list[asyncio.Task[OutputRecord]] = []  # cancelled, waited for by ``close``
        self._slots = asyncio.Semaphore(parallel)  # a batch of 64 images is not 64 downloads at once

    def start(self, event: PoolEvent) -> None:
        """Stage the files of an ``output`` event from the backend that reported them."""
        client = self._clients.get(event.backend or "")
        if client is None or event.node is None:
            return
        for node_id, ref in output_files({event.node: NodeOutput(event.node, event.files)}):
            key = (event.attempt, node_id, ref)
            if key not in self._staging:
                self._staging[key] = asyncio.create_task(self._stage(client, node_id, ref),
                                                         name=f"prefetch:{self._job_id}:{node_id}")

    async def _stage(self, client: FileSource, node_id: str, ref: FileRef) -> OutputRecord:
        async with self._slots:
            return await stage_file(self._store, client, self._job_id, node_id, ref)

    def drop(self, attempt: int) -> None:
        """Stop staging the files of ``attempt``, which failed: nothing will name them."""
        for key in [key for key in self._staging if key[0] == attempt]:
            task = self._staging.pop(key)
            task.cancel()
            self._dropped.append(task)

    async def collect(self, backend: str, attempt: int, outputs: Mapping[str, NodeOutput]) -> list[OutputRecord]:
        """The staged records of ``outputs`` (a finished prompt's, attempt ``attempt`` on ``backend``):
        those staged early, the rest (or any whose early staging failed) staged now."""
        saved: list[OutputRecord] = []
        try:
            for node_id, ref in output_files(outputs):
                early = self._staging.pop((attempt, node_id, ref), None)
                if early is not None:
                    try:
                        saved.append(await early)
                        continue
                    except (ComfyOrchestratorError, OSError) as exc:
                        log.info("job %s: output %s/%s staged early failed (%s); fetching it again",
                                 self._job_id, node_id, ref.filename, exc)
                saved.append(await stage_file(self._store, self._clients[backend], self._job_id, node_id, ref))
        except BaseException:
            await discard_outputs(self._store, saved)
            raise
        return saved

    async def close(self) -> None:
        """Stop the staging nobody collected (a failed or cancelled job, another attempt's files)
        and discard what it had staged."""
        pending = [*self._staging.values(), *self._dropped]
        self._staging.clear()
        self._dropped.clear()
        for task in pending:
            task.cancel()
        done = await asyncio.gather(*pending, return_exceptions=True)
        await discard_outputs(self._store, [r for r in done if isinstance(r, OutputRecord)])
