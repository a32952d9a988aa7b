"""``ComfyClient``: one ComfyUI server, one aiohttp session, one WebSocket.

The socket is open (and the server has acknowledged it) before the first prompt is submitted, and
every prompt id is chosen here, so no event of a fast prompt is missed. Completion never rests on
the socket alone: "done" messages are a hint, /history is the record (it is written *after*
``execution_success``), and a silent or dropped socket is reconciled against /queue and /history.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import aiohttp

from comfy_orchestrator import protocol as p
from comfy_orchestrator._files import save_stream
from comfy_orchestrator._http import HttpTransport
from comfy_orchestrator.config import RunResult, Timeouts, Timings
from comfy_orchestrator.errors import (
    BackendUnavailable,
    ClientClosed,
    ComfyOrchestratorError,
    DeadlineExceeded,
    ExecutionFailed,
    JobCancelled,
    PromptLost,
    StalledTimeout,
)
from comfy_orchestrator.graph import validate

__all__ = ["ComfyClient", "GraphLike"]

log = logging.getLogger(__name__)

_E = TypeVar("_E")
Callback = Callable[[_E], Awaitable[None] | None]


class _HasToDict(Protocol):
    def to_dict(self) -> dict[str, Any]: ...


GraphLike = Mapping[str, Any] | _HasToDict
_FINISHED_KEPT = 256  # finished prompts whose events stay readable after submit()


class _Tracked:
    """Events of one prompt this client submitted, readable by any number of consumers."""

    __slots__ = ("_waiters", "events", "finished", "foreign", "last_event", "prompt_id")

    def __init__(self, prompt_id: str, *, foreign: bool = False) -> None:
        self.prompt_id = prompt_id
        # Submitted by another client id (``follow``): the server sends this client none of its
        # events, so silence is not a stall; /queue and /history tell how it goes.
        self.foreign = foreign
        self.events: list[p.Event] = []
        self.last_event = time.monotonic()
        self.finished = False
        self._waiters: list[asyncio.Future[None]] = []

    def push(self, event: p.Event) -> None:
        self.events.append(event)
        self.last_event = time.monotonic()
        if isinstance(event, p.TERMINAL_EVENTS):
            self.finished = True
        self.wake()

    def wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def wait(self, seen: int, timeout: float | None) -> None:
        """Return when there are events past ``seen``, or after ``timeout`` seconds.

        A bare future and a loop timer: no task is created per wake-up on this hot path."""
        if seen < len(self.events):
            return
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        timer = None if timeout is None else loop.call_later(timeout, _resolve, waiter)
        try:
            await waiter
        finally:
            if timer is not None:
                timer.cancel()


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def _call(callback: Callback[_E] | None, event: _E) -> None:
    if callback is None:
        return
    result = callback(event)
    if inspect.isawaitable(result):
        await result


@dataclass(slots=True)
class _RunState:
    """What ``run`` learns about its prompt from the events, for the result."""

    submitted_at: float
    started: float
    exec_started: float | None = None
    success_at: float | None = None
    finished_at: float | None = None
    cached: tuple[str, ...] = ()
    executed_nodes: list[str] = field(default_factory=list)
    previews: int = 0

    def record(self, event: p.Event, at: float) -> None:
        if isinstance(event, p.ExecutionStart):
            self.exec_started = at
        elif isinstance(event, p.ExecutionCached):
            self.cached = event.nodes
        elif isinstance(event, p.Executing):
            if event.node is not None:
                self.executed_nodes.append(event.node)
            else:  # sent after the history write
                self.finished_at = at
                self.success_at = self.success_at or at
        elif isinstance(event, p.Preview):
            self.previews += 1
        elif isinstance(event, p.ExecutionSuccess):
            self.success_at = at


class ComfyClient:
    """An async client of one ComfyUI server.

    ::

        async with ComfyClient("http://127.0.0.1:8188") as comfy:
            result = await comfy.run(graph, timeout=600, on_progress=print)
            png = await comfy.download(result.output_images[0])

    A client is used once: after :meth:`close` every call raises :class:`ClientClosed`.
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeouts: Timeouts | None = None,
        headers: Mapping[str, str] | None = None,
        client_id: str | None = None,
        preview_metadata: bool = True,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.client_id = client_id or uuid.uuid4().hex
        self.timeouts = timeouts or Timeouts()
        self.preview_metadata = preview_metadata
        self._http = HttpTransport(self.base_url, self.timeouts, headers)
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._tracked: dict[str, _Tracked] = {}
        self._finished: OrderedDict[str, None] = OrderedDict()
        self._current_prompt: str | None = None
        self._object_info: dict[str, Any] | None = None
        self._object_info_lock = asyncio.Lock()
        self._connect_lock = asyncio.Lock()
        self._closed = False
        self.queue_remaining: int | None = None
        self.reconnects = 0

    # -- life cycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> ComfyClient:
        try:
            await self.connect()
        except BaseException:
            await self.close()  # the HTTP session opened before the socket failed
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def connected(self) -> bool:
        return self._ws is not None and not self._ws.closed

    async def connect(self) -> None:
        """Open the HTTP session and the WebSocket (idempotent)."""
        self._check_open()
        async with self._connect_lock:
            if self._reader is not None:
                return
            await self._open_socket()
            self._reader = asyncio.create_task(self._read_loop(), name=f"comfy-ws:{self.base_url}")

    async def close(self) -> None:
        """Stop following prompts, close the socket and the session. Prompts already queued stay queued."""
        if self._closed:
            return
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._ws is not None:
            await self._ws.close()
        for tracked in self._tracked.values():
            tracked.wake()
        await self._http.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ClientClosed(f"client of {self.base_url} is closed; make a new one")

    async def _open_socket(self) -> None:
        url = self._http.ws_url(self.client_id)
        ws = await self._http.ws_connect(url)
        try:
            # The server registers the socket, then sends `status` with our sid: after that no event
            # of ours can be missed. The feature flag must be the first message we send.
            if self.preview_metadata:
                await ws.send_json({"type": "feature_flags", "data": {"supports_preview_metadata": True}})
            await self._await_greeting(ws)
        except BaseException:
            await ws.close()
            raise
        self._ws = ws

    async def _await_greeting(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        want_flags = self.preview_metadata
        got_status = False
        deadline = time.monotonic() + (self.timeouts.connect or 10.0)
        while not got_status or want_flags:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if got_status:  # an older server that does not answer feature flags
                    return
                raise BackendUnavailable("WebSocket opened but the server sent no status", backend=self.base_url)
            try:
                msg = await ws.receive(timeout=min(remaining, 1.0) if got_status else remaining)
            except TimeoutError:
                if got_status:
                    return
                continue
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                raise BackendUnavailable("WebSocket closed during the handshake", backend=self.base_url)
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            event = p.parse_message(msg.data)
            self._dispatch(event)
            if isinstance(event, p.Status):
                got_status = True
            elif isinstance(event, p.FeatureFlags):
                want_flags = False

    async def _read_loop(self) -> None:
        delay = 0.05
        while not self._closed:
            ws = self._ws
            if ws is not None:
                await self._pump(ws)
            if self.closed:  # close() ran while we were reading
                return
            log.warning("WebSocket to %s dropped; reconnecting as client %s", self.base_url, self.client_id)
            self._ws = None
            while not self._closed:
                try:
                    await self._open_socket()
                    break
                except ComfyOrchestratorError as exc:
                    log.info("reconnect to %s failed (%s); next try in %.2fs", self.base_url, exc, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
            delay = 0.05
            self.reconnects += 1
            for tracked in list(self._tracked.values()):
                tracked.push(p.SocketReconnected())

    async def _pump(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for msg in ws:
            try:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    self._dispatch(p.parse_message(msg.data))
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    self._dispatch(p.parse_binary(msg.data, current_prompt=self._current_prompt))
                elif msg.type == aiohttp.WSMsgType.ERROR:
                    break
            except ComfyOrchestratorError as exc:
                log.warning("ignoring a message from %s: %s", self.base_url, exc)

    def _dispatch(self, event: p.Event) -> None:
        if isinstance(event, p.Status):
            self.queue_remaining = event.queue_remaining
            return
        if isinstance(event, p.ExecutionStart):
            self._current_prompt = event.prompt_id
        elif isinstance(event, p.Executing):
            self._current_prompt = event.prompt_id if event.node is not None else None
        prompt_id = event.prompt_id
        if prompt_id is not None and (tracked := self._tracked.get(prompt_id)) is not None:
            tracked.push(event)
            if tracked.finished:
                self._finished[prompt_id] = None
                while len(self._finished) > _FINISHED_KEPT:
                    old, _ = self._finished.popitem(last=False)
                    self._tracked.pop(old, None)

    # -- submitting and following ----------------------------------------------------------------

    def _track(self, prompt_id: str, *, foreign: bool = False) -> _Tracked:
        tracked = self._tracked.get(prompt_id)
        if tracked is None or tracked.finished:
            tracked = self._tracked[prompt_id] = _Tracked(prompt_id, foreign=foreign)
            self._finished.pop(prompt_id, None)
        return tracked

    def _forget(self, prompt_id: str) -> None:
        self._tracked.pop(prompt_id, None)
        self._finished.pop(prompt_id, None)

    async def submit(
        self,
        graph: GraphLike,
        *,
        prompt_id: str | None = None,
        front: bool = False,
        extra_data: Mapping[str, Any] | None = None,
    ) -> str:
        """Queue ``graph`` (API format) and return its prompt id; follow it with :meth:`events`."""
        if self._reader is None:
            await self.connect()
        self._check_open()
        prompt_id = prompt_id or str(uuid.uuid4())
        self._track(prompt_id)
        body: dict[str, Any] = {
            "prompt": graph.to_dict() if hasattr(graph, "to_dict") else dict(graph),
            "client_id": self.client_id,
            "prompt_id": prompt_id,
        }
        if extra_data:
            body["extra_data"] = dict(extra_data)
        if front:
            body["front"] = True
        try:
            await self._http.submit(body)
        except asyncio.CancelledError:
            self._forget(prompt_id)
            # cancelled with the request on its way: the server may have queued the prompt already
            await asyncio.shield(self._abandon(prompt_id))
            raise
        except BaseException:
            self._forget(prompt_id)
            raise
        log.debug("submitted %s to %s", prompt_id, self.base_url)
        return prompt_id

    async def events(self, prompt_id: str) -> AsyncIterator[p.Event]:
        """The events of a prompt this client submitted, from the first, ending after the terminal one
        (success, error or interrupted). Another client's prompts send this client nothing."""
        tracked = self._tracked.get(prompt_id)
        if tracked is None:
            raise KeyError(f"prompt {prompt_id} was not submitted by this client (or is long finished)")
        seen = 0
        while True:
            self._check_open()
            while seen < len(tracked.events):
                event = tracked.events[seen]
                seen += 1
                yield event
                if isinstance(event, p.TERMINAL_EVENTS):
                    return
            await tracked.wait(seen, None)

    async def run(
        self,
        graph: GraphLike,
        *,
        timeout: float | None = None,
        on_progress: Callback[p.Progress] | None = None,
        on_event: Callback[p.Event] | None = None,
        prompt_id: str | None = None,
        front: bool = False,
        extra_data: Mapping[str, Any] | None = None,
    ) -> RunResult:
        """Submit ``graph`` and wait until its /history entry exists; return the typed result.

        Raises GraphValidationError (rejected), ExecutionFailed (a node raised), JobCancelled
        (interrupted or dequeued), BackendUnavailable (server gone, or the prompt vanished with it),
        StalledTimeout / DeadlineExceeded (both TimeoutError; the prompt is interrupted and dequeued).
        Cancelling the awaiting task interrupts and dequeues this prompt only.
        """
        deadline_s = timeout if timeout is not None else self.timeouts.deadline
        deadline = None if deadline_s is None else time.monotonic() + deadline_s
        submitted_at = time.time()
        started = time.monotonic()
        prompt_id = await self.submit(graph, prompt_id=prompt_id, front=front, extra_data=extra_data)
        tracked = self._tracked[prompt_id]
        try:
            return await self._follow(tracked, deadline, submitted_at, started, on_progress, on_event)
        except (StalledTimeout, DeadlineExceeded):
            await self._abandon(prompt_id)
            raise
        except asyncio.CancelledError:
            await asyncio.shield(self._abandon(prompt_id))
            raise
        finally:
            self._forget(prompt_id)

    async def follow(
        self,
        prompt_id: str,
        *,
        timeout: float | None = None,
        on_progress: Callback[p.Progress] | None = None,
        on_event: Callback[p.Event] | None = None,
    ) -> RunResult:
        """Wait for a prompt already on the server, submitted by another client (a previous process
        of the caller's), and return its result as :meth:`run` would.

        The server sends its events only to the client id that submitted it, so unless that was this
        client's id, ``follow`` learns how it goes from /queue and /history every ``timeouts.poll``
        seconds and the stall watchdog does not apply. Raises PromptLost when the server does not know
        the prompt (not queued, not running, no history), and otherwise what :meth:`run` raises.
        Cancelling the awaiting task stops following; the prompt is left running."""
        if self._reader is None:
            await self.connect()
        self._check_open()
        known = self._tracked.get(prompt_id)
        if known is not None and not known.foreign and not known.finished:
            raise ValueError(f"prompt {prompt_id} was submitted by this client: await run() instead")
        deadline = None if timeout is None else time.monotonic() + timeout
        tracked = self._track(prompt_id, foreign=True)
        started = time.monotonic()
        try:  # the first check is at once: the prompt may have ended while nobody listened
            return await self._follow(tracked, deadline, time.time(), started, on_progress, on_event,
                                      check_now=True)
        finally:
            self._forget(prompt_id)

    async def _follow(
        self,
        tracked: _Tracked,
        deadline: float | None,
        submitted_at: float,
        started: float,
        on_progress: Callback[p.Progress] | None,
        on_event: Callback[p.Event] | None,
        *,
        check_now: bool = False,
    ) -> RunResult:
        prompt_id = tracked.prompt_id
        run = _RunState(submitted_at=submitted_at, started=started)
        seen = 0
        last_activity = time.monotonic()  # last event, or last time the queue showed it waiting
        # when to ask /queue and /history (``check_now``: at once, for a prompt followed late)
        next_check = last_activity + (0.0 if check_now else self.timeouts.poll)
        unreachable_since: float | None = None
        while True:
            self._check_open()
            reconcile = False
            while seen < len(tracked.events):
                event = tracked.events[seen]
                seen += 1
                last_activity = time.monotonic()
                next_check = last_activity + self.timeouts.poll
                await _call(on_event, event)
                if isinstance(event, p.Progress):
                    await _call(on_progress, event)
                elif isinstance(event, p.ExecutionError):
                    raise self._execution_failed(event)
                elif isinstance(event, p.ExecutionInterrupted):
                    raise JobCancelled(f"prompt {prompt_id} was interrupted", prompt_id=prompt_id)
                elif isinstance(event, p.SocketReconnected):
                    reconcile = True
                else:
                    run.record(event, last_activity)
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise DeadlineExceeded(f"prompt {prompt_id} on {self.base_url} passed its deadline")
            entry: p.HistoryEntry | None = None
            if run.success_at is not None:
                # "Done" is a hint: `executing {node: null}` follows the history write; wait briefly for it.
                if run.finished_at is not None or reconcile or now - run.success_at > 0.05:
                    entry = await self._await_history(prompt_id, deadline)
                next_check = now + 0.05
            elif reconcile or now >= next_check:
                try:
                    entry, last_activity = await self._reconcile(tracked, last_activity)
                    unreachable_since = None
                    next_check = now + self.timeouts.poll
                except PromptLost:
                    raise
                except BackendUnavailable as exc:
                    unreachable_since = unreachable_since or now
                    if now - unreachable_since >= self.timeouts.unreachable:
                        raise
                    log.info("%s unreachable while following %s: %s", self.base_url, prompt_id, exc)
                    next_check = now + min(self.timeouts.poll, 0.25)
            if entry is not None:
                return self._result(entry, run)
            wait = next_check - now
            if deadline is not None:
                wait = min(wait, deadline - now)
            await tracked.wait(seen, max(wait, 0.0))

    async def _reconcile(self, tracked: _Tracked, last_activity: float) -> tuple[p.HistoryEntry | None, float]:
        """Ask the server where a silent prompt is. Queue first, then history: a prompt leaves the queue
        and enters history in one step on the server, so absent from both means lost."""
        prompt_id = tracked.prompt_id
        queue = await self.queue()
        now = time.monotonic()
        if prompt_id in queue.pending:
            return None, now  # waiting behind others is not a stall
        if prompt_id in queue.running:
            stall = self.timeouts.stall
            if stall is not None and not tracked.foreign and now - max(last_activity, tracked.last_event) >= stall:
                raise StalledTimeout(
                    f"prompt {prompt_id} on {self.base_url} sent no event for {stall:.0f}s while running"
                )
            return None, last_activity
        entry = await self.history(prompt_id)
        if entry is None:
            raise PromptLost(
                f"prompt {prompt_id} vanished from {self.base_url}: not queued, not running, no history "
                "(the server restarted and lost its queue?)",
                backend=self.base_url,
            )
        return entry, now

    async def _await_history(self, prompt_id: str, deadline: float | None) -> p.HistoryEntry:
        """Poll /history after the socket said "done" until the entry is written."""
        delay = 0.002
        waited = 0.0
        while True:
            entry = await self.history(prompt_id)
            if entry is not None:
                return entry
            if deadline is not None and time.monotonic() + delay > deadline:
                raise DeadlineExceeded(f"prompt {prompt_id}: history not written before the deadline")
            if waited > 5.0:  # far longer than the race: make sure it was not lost
                queue = await self.queue()
                if prompt_id not in queue:
                    entry = await self.history(prompt_id)
                    if entry is not None:
                        return entry
                    raise PromptLost(
                        f"prompt {prompt_id} reported done but has no history on {self.base_url}",
                        backend=self.base_url,
                    )
                waited = 0.0
            await asyncio.sleep(delay)
            waited += delay
            delay = min(delay * 2, 0.25)

    def _execution_failed(self, event: p.ExecutionError) -> ExecutionFailed:
        return ExecutionFailed(
            prompt_id=event.prompt_id,
            node_id=event.node_id,
            node_type=event.node_type,
            exception_type=event.exception_type,
            exception_message=event.exception_message,
            traceback=list(event.traceback),
            backend=self.base_url,
        )

    def _result(self, entry: p.HistoryEntry, run: _RunState) -> RunResult:
        if entry.error is not None:
            raise self._execution_failed(entry.error)
        if entry.interrupted is not None:
            raise JobCancelled(f"prompt {entry.prompt_id} was interrupted", prompt_id=entry.prompt_id)
        if entry.status != "success":
            raise ExecutionFailed(
                prompt_id=entry.prompt_id,
                node_id=None,
                node_type=None,
                exception_type="unknown",
                exception_message=f"history status {entry.status!r}",
                backend=self.base_url,
            )
        end = time.monotonic()
        exec_started = run.exec_started if run.exec_started is not None else run.started
        return RunResult(
            prompt_id=entry.prompt_id,
            backend=self.base_url,
            outputs=entry.outputs,
            cached_nodes=entry.cached_nodes or run.cached,
            timings=Timings(run.submitted_at, exec_started - run.started, end - exec_started, end - run.started),
            preview_count=run.previews,
            node_order=tuple(run.executed_nodes),
        )

    async def _abandon(self, prompt_id: str) -> None:
        """Best effort: take a prompt we gave up on off the server (dequeue, then interrupt)."""
        try:
            async with asyncio.timeout(5):
                await self.cancel(prompt_id)
        except (ComfyOrchestratorError, TimeoutError) as exc:
            log.warning("could not cancel %s on %s: %s", prompt_id, self.base_url, exc)

    # -- server state and files -------------------------------------------------------------------

    async def history(self, prompt_id: str) -> p.HistoryEntry | None:
        """The prompt's /history entry, or None while it is not written."""
        self._check_open()
        return p.parse_history(prompt_id, await self._http.get_json(f"/history/{prompt_id}"))

    async def queue(self) -> p.QueueState:
        self._check_open()
        return p.parse_queue(await self._http.get_json("/queue"))

    async def system_stats(self) -> p.SystemStats:
        self._check_open()
        return p.parse_system_stats(await self._http.get_json("/system_stats"))

    async def object_info(self, *, refresh: bool = False) -> dict[str, Any]:
        """The server's node catalogue (cached after the first call; ``refresh`` fetches it again)."""
        self._check_open()
        async with self._object_info_lock:
            if self._object_info is None or refresh:
                info = await self._http.get_json("/object_info")
                if not isinstance(info, dict):
                    raise BackendUnavailable("/object_info is not an object", backend=self.base_url)
                self._object_info = info
            return self._object_info

    async def validate(self, graph: GraphLike) -> None:
        """Check ``graph`` against this server's /object_info without running it; raises
        GraphValidationError with the body ComfyUI's POST /prompt would answer."""
        validate(graph.to_dict() if hasattr(graph, "to_dict") else graph, await self.object_info())

    async def interrupt(self, prompt_id: str | None = None) -> None:
        """Interrupt ``prompt_id`` if it is running (a no-op otherwise). ``None`` interrupts whatever runs."""
        self._check_open()
        await self._http.post_json("/interrupt", {"prompt_id": prompt_id} if prompt_id else {})

    async def delete_from_queue(self, *prompt_ids: str) -> None:
        """Remove waiting prompts from the queue (the running one is not touched)."""
        self._check_open()
        await self._http.post_json("/queue", {"delete": list(prompt_ids)})

    async def cancel(self, prompt_id: str) -> None:
        """Take a prompt off the server: dequeue it, and interrupt it if it already runs."""
        await self.delete_from_queue(prompt_id)
        await self.interrupt(prompt_id)

    async def free(self, *, unload_models: bool = True, free_memory: bool = True) -> None:
        self._check_open()
        await self._http.post_json("/free", {"unload_models": unload_models, "free_memory": free_memory})

    async def upload_image(
        self,
        image: bytes | str | Path,
        *,
        filename: str | None = None,
        subfolder: str = "",
        overwrite: bool = True,
    ) -> p.FileRef:
        """Upload an input image (for LoadImage); returns the name the server stored it under."""
        self._check_open()
        if isinstance(image, str | Path):
            path = Path(image)
            data = await asyncio.to_thread(path.read_bytes)
            filename = filename or path.name
        else:
            data = image
        return p.parse_upload(
            await self._http.upload("/upload/image", data, filename or f"{uuid.uuid4().hex}.png", subfolder, overwrite)
        )

    async def iter_download(self, ref: p.FileRef, *, chunk_size: int = 1 << 16) -> AsyncIterator[bytes]:
        """Stream a file from /view in chunks."""
        self._check_open()
        async for chunk in self._http.stream("/view", ref.view_params(), chunk_size):
            yield chunk

    async def download(self, ref: p.FileRef) -> bytes:
        return b"".join([chunk async for chunk in self.iter_download(ref)])

    async def save(self, ref: p.FileRef, path: str | Path) -> Path:
        """Stream a file from /view to ``path`` (written beside it off the event loop, then renamed)."""
        return await save_stream(self.iter_download(ref), Path(path))
