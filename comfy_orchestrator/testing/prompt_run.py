"""One prompt's execution (ComfyUI's ``PromptExecutor.execute_async``), event by event.

Node order follows ComfyUI's ``ExecutionList``: a topological dissolve of what the outputs need,
skipping cached nodes, that picks an output node first among the ready ones (then a node that
unblocks an output, then one two steps from an output). Events that ComfyUI sends to the submitting
client only are skipped when the prompt came without a ``client_id``; the ones it addresses to
``server.client_id`` (progress, progress_state, previews, interruptions) are then broadcast.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from PIL import Image

from comfy_orchestrator.testing.faults import HangMode, NodeFailure
from comfy_orchestrator.testing.nodes import NODES
from comfy_orchestrator.testing.values import NodeContext, NodeResult

if TYPE_CHECKING:
    from comfy_orchestrator.testing.execution import Engine, QueueItem

__all__ = ["CacheEntry", "Died", "PromptRun", "is_link"]

logger = logging.getLogger(__name__)
T = TypeVar("T")
_THREAD_PIXELS = 256 * 256  # Pillow work above this many pixels runs in a thread


def _now_ms() -> int:
    return int(time.time() * 1000)


def is_link(value: Any) -> bool:
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
            and isinstance(value[1], int | float) and not isinstance(value[1], bool))


@dataclass
class CacheEntry:
    ui: dict[str, Any] | None
    outputs: tuple[Any, ...]


class _Interrupted(Exception):
    pass


class Died(Exception):
    pass


class _Injected(Exception):
    def __init__(self, failure: NodeFailure) -> None:
        super().__init__(failure.message)
        self.failure = failure


class _Plan:
    """ComfyUI's topological dissolve (``ExecutionList``) over the nodes that must run."""

    def __init__(self, prompt: Mapping[str, Any], cached: set[str], is_output: Callable[[str], bool]) -> None:
        self.prompt, self.cached, self.is_output = prompt, cached, is_output
        self.pending: dict[str, None] = {}
        self.waiting: dict[str, int] = {}
        self.blocking: dict[str, dict[str, None]] = {}

    def add(self, node_id: str) -> None:
        stack, links = [node_id], []
        while stack:
            current = stack.pop()
            if current in self.pending:
                continue
            self.pending[current], self.waiting[current], self.blocking[current] = None, 0, {}
            for value in self.prompt[current]["inputs"].values():
                if is_link(value):
                    if value[0] not in self.cached:
                        stack.append(value[0])
                    links.append((value[0], current))
        for source, target in links:
            if source not in self.cached and target not in self.blocking[source]:
                self.blocking[source][target] = None
                self.waiting[target] += 1

    def pick(self) -> str | None:
        ready = [n for n in self.pending if self.waiting[n] == 0]
        if not ready:
            return None
        for node_id in ready:
            if self.is_output(node_id):
                return node_id
        for node_id in ready:
            if any(self.is_output(b) for b in self.blocking[node_id]):
                return node_id
        for node_id in ready:
            if any(self.is_output(c) for b in self.blocking[node_id] for c in self.blocking[b]):
                return node_id
        return ready[0]

    def complete(self, node_id: str) -> None:
        del self.pending[node_id]
        for target in self.blocking.pop(node_id):
            self.waiting[target] -= 1


class PromptRun:
    """The execution of one prompt (ComfyUI's ``PromptExecutor.execute_async``)."""

    def __init__(self, engine: Engine, item: QueueItem) -> None:
        self.engine, self.item = engine, item
        self.prompt_id, self.client_id, self.prompt = item.prompt_id, item.client_id, item.prompt
        self.messages: list[list[Any]] = []
        self.executed: dict[str, None] = {}
        self.ui_outputs: dict[str, dict[str, Any]] = {}
        self.values: dict[str, tuple[Any, ...]] = {}
        self.progress: dict[str, dict[str, Any]] = {}
        self.sent = 0
        self.first_executing = True

    async def _emit(self, event: str, data: Any, sid: str | None) -> None:
        await self.engine.hub.send_json(event, data, sid)
        self._count()

    async def _emit_bytes(self, event_type: int, payload: bytes, sid: str | None) -> None:
        await self.engine.hub.send_bytes(event_type, payload, sid)
        self._count()

    def _count(self) -> None:
        self.sent += 1
        limit = self.engine.faults.ws_drop_after
        if limit is not None and self.sent == limit:
            logger.info("%s: dropping every socket after %d messages of %s", self.engine.name, limit,
                        self.prompt_id)
            self.engine.hub.drop_all()

    async def _message(self, event: str, data: dict[str, Any], broadcast: bool) -> None:
        data = {**data, "timestamp": _now_ms()}
        self.messages.append([event, data])
        if self.client_id is not None or broadcast:
            await self._emit(event, data, self.client_id)

    async def _progress_state(self, node_id: str, state: str, value: float, maximum: float) -> None:
        self.progress[node_id] = {"value": value, "max": maximum, "state": state}
        nodes = {n: {**s, "node_id": n, "prompt_id": self.prompt_id, "display_node_id": n,
                     "parent_node_id": None, "real_node_id": n} for n, s in self.progress.items()}
        await self._emit("progress_state", {"prompt_id": self.prompt_id, "nodes": nodes}, self.client_id)

    async def execute(self) -> bool:
        engine = self.engine
        engine.interrupted = False
        await self._message("execution_start", {"prompt_id": self.prompt_id}, False)
        keys = engine.signatures(self.prompt)
        used = set(keys.values())
        engine.cache = {k: v for k, v in engine.cache.items() if k in used}
        engine.objects = {k: v for k, v in engine.objects.items()
                           if self.prompt.get(k[0], {}).get("class_type") == k[1]}
        cached = [n for n in self.prompt if keys[n] in engine.cache]
        await self._message("execution_cached", {"nodes": cached, "prompt_id": self.prompt_id}, False)
        for node_id in cached:
            self.values[node_id] = engine.cache[keys[node_id]].outputs
        info = engine.node_info
        plan = _Plan(self.prompt, set(cached), lambda n: bool(info[self.prompt[n]["class_type"]]["output_node"]))
        for node_id in self.item.outputs:
            plan.add(node_id)
        current_outputs = list(self.prompt)
        while plan.pending:
            picked = plan.pick()
            if picked is None:
                await self._error(next(iter(plan.pending)), "graph.DependencyCycleError",
                                  "Dependency cycle detected", [], [], current_outputs)
                return False
            node_id = picked
            try:
                await self._node(node_id, keys[node_id])
            except _Interrupted:
                logger.info("%s: processing interrupted (%s)", engine.name, self.prompt_id)
                data = {"prompt_id": self.prompt_id, "node_id": node_id,
                        "node_type": self.prompt[node_id]["class_type"], "executed": list(self.executed)}
                await self._message("execution_interrupted", data, True)
                return False
            except _NodeFailed as failed:
                await self._error(node_id, failed.exception_type, failed.message, failed.traceback,
                                  failed.inputs, current_outputs)
                return False
            plan.complete(node_id)
        await self._message("execution_success", {"prompt_id": self.prompt_id}, False)
        return True

    async def _error(self, node_id: str, exception_type: str, message: str, tb: list[str], inputs: Any,
                     current_outputs: list[str]) -> None:
        data = {"prompt_id": self.prompt_id, "node_id": node_id,
                "node_type": self.prompt[node_id]["class_type"], "executed": list(self.executed),
                "exception_message": message, "exception_type": exception_type, "traceback": tb,
                "current_inputs": inputs, "current_outputs": current_outputs}
        await self._message("execution_error", data, False)

    async def _node(self, node_id: str, key: str) -> None:
        engine, node = self.engine, self.prompt[node_id]
        class_type = node["class_type"]
        entry = engine.cache.get(key)
        if entry is not None:
            if self.client_id is not None:
                output = (entry.ui or {}).get("output")
                await self._emit("executed", {"node": node_id, "display_node": node_id, "output": output,
                                              "prompt_id": self.prompt_id}, self.client_id)
                if entry.ui is not None:
                    self.ui_outputs[node_id] = entry.ui
            previous = self.progress.get(node_id, {"max": 1})
            await self._progress_state(node_id, "finished", previous["max"], previous["max"])
            self.values[node_id] = entry.outputs
            return
        await self._progress_state(node_id, "running", 0.0, 1.0)
        declared = engine.node_info[class_type]["input"]
        names = set(declared.get("required", {})) | set(declared.get("optional", {}))
        inputs = {k: (self.values[v[0]][int(v[1])] if is_link(v) else v)
                  for k, v in node["inputs"].items() if k in names}
        if self.client_id is not None:
            engine.last_node_id = node_id
            await self._emit("executing", {"node": node_id, "display_node": node_id,
                                           "prompt_id": self.prompt_id}, self.client_id)
        if self.first_executing:
            self.first_executing = False
            await self._after_first_executing()
        try:
            if engine.interrupted:
                raise _Interrupted
            failure = engine.faults.failure_for(class_type)
            if failure is not None:
                engine.faults.spend_failure()
                raise _Injected(failure)
            if engine.node_delay > 0:
                await asyncio.sleep(engine.node_delay)
            context: NodeContext = _Context(self, node_id, engine.objects.setdefault((node_id, class_type), {}))
            result: NodeResult = await NODES[class_type].run(context, **inputs)
        except (_Interrupted, Died, asyncio.CancelledError):
            raise
        except Exception as ex:
            raise _NodeFailed(ex, inputs) from ex
        if result.ui:
            meta = {"node_id": node_id, "display_node": node_id, "parent_node": None, "real_node_id": node_id}
            self.ui_outputs[node_id] = {"meta": meta, "output": result.ui}
            if self.client_id is not None:
                await self._emit("executed", {"node": node_id, "display_node": node_id, "output": result.ui,
                                              "prompt_id": self.prompt_id}, self.client_id)
        engine.cache[key] = CacheEntry(self.ui_outputs.get(node_id), result.outputs)
        self.values[node_id] = result.outputs
        maximum = self.progress[node_id]["max"]
        await self._progress_state(node_id, "finished", maximum, maximum)
        self.executed[node_id] = None

    async def _after_first_executing(self) -> None:
        engine = self.engine
        if engine.faults.die_mid_job:
            engine.faults.die_mid_job = False
            logger.warning("%s: dying in the middle of %s (fault)", engine.name, self.prompt_id)
            engine.on_death()
            raise Died
        while engine.faults.hang is HangMode.MID_RUN:
            engine.wake.clear()
            await engine.wake.wait()


class _NodeFailed(Exception):
    def __init__(self, ex: Exception, inputs: Mapping[str, Any]) -> None:
        super().__init__(str(ex))
        if isinstance(ex, _Injected):
            self.exception_type, self.message = ex.failure.exception_type, ex.failure.exception_message()
        else:
            module = type(ex).__module__
            qualname = type(ex).__qualname__
            self.exception_type = qualname if module == "builtins" else f"{module}.{qualname}"
            self.message = f"{ex}\n"
        self.traceback = traceback.format_tb(ex.__traceback__)
        self.inputs = {k: [v if v is None or isinstance(v, int | float | bool | str) else str(v)]
                       for k, v in inputs.items()}


class _Context:
    """What ``nodes`` may ask of the run (``nodes.NodeContext``)."""

    def __init__(self, run: PromptRun, node_id: str, state: dict[str, Any]) -> None:
        self.run, self.node_id, self.state = run, node_id, state
        self.folders = run.engine.folders
        self.step_delay = run.engine.step_delay

    async def work(self, fn: Callable[..., T], *args: Any, pixels: int = 0) -> T:
        if pixels > _THREAD_PIXELS:
            return await asyncio.to_thread(fn, *args)
        return fn(*args)

    async def send_text(self, text: str) -> None:
        node = self.node_id.encode()
        await self.run._emit_bytes(3, len(node).to_bytes(4, "big") + node + text.encode(), None)

    async def progress(self, value: int, total: int, preview: Image.Image | None = None) -> None:
        run = self.run
        if run.engine.interrupted:
            raise _Interrupted
        await run._progress_state(self.node_id, "running", value, total)
        jpeg = b""
        if preview is not None:
            buffer = io.BytesIO()
            preview.convert("RGB").save(buffer, format="JPEG", quality=95)
            jpeg = buffer.getvalue()
        metadata = jpeg and run.engine.hub.supports_preview_metadata(run.client_id)
        if metadata:
            meta = json.dumps({"node_id": self.node_id, "prompt_id": run.prompt_id, "display_node_id": self.node_id,
                               "parent_node_id": None, "real_node_id": self.node_id,
                               "image_type": "image/jpeg"}).encode()
            await run._emit_bytes(4, len(meta).to_bytes(4, "big") + meta + jpeg, run.client_id)
        await run._emit("progress", {"value": value, "max": total, "prompt_id": run.prompt_id,
                                     "node": self.node_id}, run.client_id)
        if jpeg and not metadata:
            await run._emit_bytes(1, (1).to_bytes(4, "big") + jpeg, run.client_id)
