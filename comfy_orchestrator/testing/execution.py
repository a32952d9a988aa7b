"""The double's prompt queue, history and caches, and the single worker that runs one prompt at a time.

Lowest ``number`` first (``front`` gives a negative one). For each prompt: ``status`` (picked up),
then what ``prompt_run.PromptRun`` emits, then the /history write, ``status``, and last
``executing {node: null}``, in that order, as on the real server.

Caching follows ComfyUI's classic cache: a node's key is its class, IS_CHANGED value, constants and
its inputs' keys; only entries the current prompt uses survive it, so an identical resubmission
runs nothing and a changed one reruns only what changed downstream.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from comfy_orchestrator.testing.faults import Faults, HangMode
from comfy_orchestrator.testing.files import Folders
from comfy_orchestrator.testing.nodes import NODES, object_info
from comfy_orchestrator.testing.prompt_run import CacheEntry, Died, PromptRun, is_link
from comfy_orchestrator.testing.sockets import SocketHub

__all__ = ["Engine", "QueueItem"]

logger = logging.getLogger(__name__)
_MAX_HISTORY = 10000


@dataclass(eq=False)
class QueueItem:
    """One queued prompt; ``wire()`` is the list ComfyUI serves in /queue and /history."""

    number: float
    prompt_id: str
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    outputs: list[str]

    def __lt__(self, other: QueueItem) -> bool:
        return (self.number, self.prompt_id) < (other.number, other.prompt_id)

    @property
    def client_id(self) -> str | None:
        value = self.extra_data.get("client_id")
        return None if value is None else str(value)

    def wire(self) -> list[Any]:
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs]



class Engine:
    """Queue, history, caches and the worker of one server lifetime."""

    def __init__(self, hub: SocketHub, folders: Folders, models: Mapping[str, Sequence[str]],
                 faults: Faults, *, step_delay: float, node_delay: float, name: str,
                 on_death: Callable[[], None]) -> None:
        self.hub, self.folders, self.models, self.faults = hub, folders, models, faults
        self.step_delay, self.node_delay, self.name, self.on_death = step_delay, node_delay, name, on_death
        self.queue: list[QueueItem] = []
        self.running: QueueItem | None = None
        self.history: dict[str, dict[str, Any]] = {}
        self.number = 0
        self.last_node_id: str | None = None
        self.interrupted = False
        self.cache: dict[str, CacheEntry] = {}
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self._free = False
        self.wake = asyncio.Event()
        self.idle = asyncio.Event()
        self.idle.set()
        self._task: asyncio.Task[None] | None = None
        self._info_key: tuple[str, ...] | None = None
        self.node_info: dict[str, Any] = {}
        self.object_info()

    def start(self) -> None:
        self.faults.subscribe(self._on_fault)
        self._task = asyncio.get_running_loop().create_task(self._worker(), name=f"{self.name}-worker")

    async def stop(self) -> None:
        self.faults.unsubscribe(self._on_fault)
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def _on_fault(self, name: str) -> None:
        self.wake.set()

    def object_info(self) -> dict[str, Any]:
        """/object_info, rebuilt only when the input folder's image list changes."""
        key = tuple(self.folders.input_images())
        if key != self._info_key:
            self._info_key, self.node_info = key, object_info(self.models, key)
        return self.node_info

    # queue -----------------------------------------------------------------------------------

    def queue_info(self) -> dict[str, Any]:
        return {"exec_info": {"queue_remaining": len(self.queue) + (self.running is not None)}}

    async def _status(self) -> None:
        await self.hub.send_json("status", {"status": self.queue_info()})

    async def put(self, item: QueueItem) -> None:
        heapq.heappush(self.queue, item)
        self.idle.clear()
        self.wake.set()
        await self._status()

    async def wipe_queue(self) -> None:
        self.queue = []
        if self.running is None:
            self.idle.set()
        await self._status()

    async def delete(self, prompt_id: str) -> None:
        for index, item in enumerate(self.queue):
            if item.prompt_id == prompt_id:
                if len(self.queue) == 1:
                    await self.wipe_queue()
                else:
                    self.queue.pop(index)
                    heapq.heapify(self.queue)
                await self._status()
                return

    def interrupt(self, prompt_id: str | None) -> None:
        if prompt_id and (self.running is None or self.running.prompt_id != prompt_id):
            logger.info("%s: prompt %s is not running, skipping interrupt", self.name, prompt_id)
            return
        self.interrupted = True

    def free(self, free_memory: bool) -> None:
        if free_memory:
            self._free = True
            if self.running is None:
                self._reset_caches()

    def _reset_caches(self) -> None:
        self._free = False
        self.cache.clear()
        self.objects.clear()

    # worker ----------------------------------------------------------------------------------

    async def _next(self) -> QueueItem:
        while not self.queue or self.faults.hang is HangMode.START:
            self.wake.clear()
            await self.wake.wait()
        return heapq.heappop(self.queue)

    async def _worker(self) -> None:
        while True:
            item = await self._next()
            self.running = item
            await self._status()
            run = PromptRun(self, item)
            try:
                success = await run.execute()
            except Died:
                return
            except Exception:
                logger.exception("%s: the double failed while running %s", self.name, item.prompt_id)
                success = False
            self.last_node_id = None
            if self.faults.history_delay > 0:
                await asyncio.sleep(self.faults.history_delay)
            self._write_history(item, run, success)
            self.running = None
            await self._status()
            if item.client_id is not None:
                await self.hub.send_json("executing", {"node": None, "prompt_id": item.prompt_id},
                                         item.client_id)
            if self._free:
                self._reset_caches()
            if not self.queue:
                self.idle.set()

    def _write_history(self, item: QueueItem, run: PromptRun, success: bool) -> None:
        if len(self.history) > _MAX_HISTORY:
            self.history.pop(next(iter(self.history)))
        self.history[item.prompt_id] = {
            "prompt": item.wire(),
            "outputs": {n: ui["output"] for n, ui in run.ui_outputs.items()},
            "status": {"status_str": "success" if success else "error", "completed": success,
                       "messages": run.messages},
            "meta": {n: ui["meta"] for n, ui in run.ui_outputs.items()},
        }

    def signatures(self, prompt: Mapping[str, Any]) -> dict[str, str]:
        """Each node's cache key: class, IS_CHANGED, constants, and its inputs' keys."""
        memo: dict[str, str] = {}

        def key(node_id: str, path: frozenset[str]) -> str:
            if node_id in memo:
                return memo[node_id]
            node = prompt.get(node_id)
            if node is None or node_id in path:
                return f"nan-{node_id}"
            class_type = node["class_type"]
            spec = NODES.get(class_type)
            changed = spec.is_changed(node["inputs"], self.folders) if spec and spec.is_changed else False
            parts: list[Any] = [class_type, changed]
            if "UNIQUE_ID" in self.node_info.get(class_type, {}).get("input", {}).get("hidden", {}).values():
                parts.append(node_id)
            for name in sorted(node["inputs"]):
                value = node["inputs"][name]
                if is_link(value):
                    parts.append([name, key(value[0], path | {node_id}), int(value[1])])
                else:
                    parts.append([name, value])
            text = json.dumps(parts, sort_keys=True, default=str)
            memo[node_id] = hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()
            return memo[node_id]

        return {node_id: key(node_id, frozenset()) for node_id in prompt}
