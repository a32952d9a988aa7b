"""``ServiceClient``: the service's HTTP + WebSocket API from Python (scripts, notebooks, the CLI).

One ``aiohttp.ClientSession`` per client, opened by ``async with`` and closed with it; nothing here
runs an event loop of its own, so it works inside Jupyter's. Error answers become the exceptions of
``comfy_orchestrator.remote.errors``; answers are read into ``JobInfo`` / ``ServiceEvent`` /
``BackendInfo``. ``events`` reconnects a dropped socket with the last ``seq`` it saw, so a reader
misses nothing and sees nothing twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import aiohttp

from comfy_orchestrator._backoff import backoff_delay
from comfy_orchestrator._files import save_stream
from comfy_orchestrator.errors import ClientClosed, ProtocolError
from comfy_orchestrator.remote.errors import (
    ServiceError,
    ServiceTimeout,
    ServiceUnreachable,
    error_from_response,
)
from comfy_orchestrator.remote.records import BackendInfo, JobInfo, ServiceEvent
from comfy_orchestrator.store import JobState

__all__ = ["ServiceClient"]

log = logging.getLogger(__name__)

EventCallback = Callable[[ServiceEvent], Any]

_CHUNK = 1 << 16
_HANDSHAKE_ERRORS = {400: "InvalidRequest", 401: "Unauthorized", 404: "NotFound"}


class ServiceClient:
    """A client of one service, as one tenant (its bearer ``token``).

    ``timeout`` bounds connecting and each read of an answer (not a whole download, not the event
    socket). ``reconnects`` is how many times in a row ``events`` tries to reopen a dropped socket
    (with a jittered exponential backoff) before it raises ``ServiceUnreachable``."""

    def __init__(self, base_url: str, token: str, *, timeout: float = 30.0, reconnects: int = 8) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._timeout = timeout
        self._reconnects = reconnects
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    async def __aenter__(self) -> ServiceClient:
        if self._closed or self._session is not None:
            raise ClientClosed("a ServiceClient is entered once; make a new one")
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self._timeout, sock_read=self._timeout)
        self._session = aiohttp.ClientSession(timeout=timeout,
                                              headers={"Authorization": f"Bearer {self._token}"})
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._closed or self._session is None:
            raise ClientClosed("the ServiceClient is closed (or was never entered with `async with`)")
        return self._session

    # -- plumbing ---------------------------------------------------------------------------------

    def _url(self, *parts: str) -> str:
        return self.base_url + "/v1/" + "/".join(parts)

    @contextlib.asynccontextmanager
    async def _request(self, method: str, url: str, **kwargs: Any) -> AsyncIterator[aiohttp.ClientResponse]:
        try:
            async with self.session.request(method, url, **kwargs) as resp:
                if resp.status >= 400:
                    raise await _error_of(resp)
                yield resp
        except aiohttp.ClientConnectionError as exc:  # ServerTimeoutError is one: check it first
            if isinstance(exc, TimeoutError):
                raise ServiceTimeout(f"{method} {url}: no answer within {self._timeout} s") from None
            raise ServiceUnreachable(f"{method} {url}: {exc or type(exc).__name__}") from None
        except TimeoutError:
            raise ServiceTimeout(f"{method} {url}: no answer within {self._timeout} s") from None

    async def _json(self, method: str, url: str, **kwargs: Any) -> Any:
        async with self._request(method, url, **kwargs) as resp:
            try:
                return await resp.json(content_type=None)
            except ValueError:
                raise ProtocolError(f"{method} {url}: the answer is not JSON") from None

    # -- jobs ---------------------------------------------------------------------------------------

    async def submit(
        self,
        graph: Mapping[str, Any] | None = None,
        *,
        template: str | None = None,
        params: Mapping[str, Any] | None = None,
        pipeline: Mapping[str, Any] | None = None,
        inputs: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> JobInfo:
        """Queue an API-format ``graph``, a service-side ``template`` bound to ``params``, or a
        ``pipeline`` spec (``PipelineSpec`` as JSON; see :meth:`run`). ``inputs`` maps the file names
        the graph's LoadImage nodes use to ids from :meth:`upload_input`. The same
        ``idempotency_key`` with the same body gives back the same job; with another body it raises
        ``Conflict`` (422)."""
        if sum(x is not None for x in (graph, template, pipeline)) != 1:
            raise ValueError("give exactly one of `graph`, `template` or `pipeline`")
        body: dict[str, Any]
        if graph is not None:
            body = {"graph": dict(graph)}
        elif pipeline is not None:
            body = {"pipeline": dict(pipeline)}
        else:
            body = {"template": template, "params": dict(params or {})}
        if inputs:
            body["inputs"] = dict(inputs)
        if labels:
            body["labels"] = dict(labels)
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key is not None else None
        answer = await self._json("POST", self._url("jobs"), json=body, headers=headers)
        job_id = answer.get("id") if isinstance(answer, dict) else None
        if not isinstance(job_id, str):
            raise ProtocolError(f"POST /v1/jobs answered without a job id: {answer!r:.200}")
        log.info("submitted job %s to %s", job_id, self.base_url)
        return await self.job(job_id)

    async def upload_input(self, data: bytes, content_type: str = "image/png") -> str:
        """Store an input image (PNG, JPEG or WebP) on the service; its id, for ``submit(inputs=…)``."""
        answer = await self._json("POST", self._url("inputs"), data=data, headers={"Content-Type": content_type})
        input_id = answer.get("id") if isinstance(answer, dict) else None
        if not isinstance(input_id, str):
            raise ProtocolError(f"POST /v1/inputs answered without an id: {answer!r:.200}")
        return input_id

    async def run(self, job_id: str) -> dict[str, Any]:
        """A pipeline job as a run: ``cells`` (each image's step, model, prompt, seed, score and output
        name), ``steps`` and ``grid`` (fetch it with :meth:`download` of ``grid.png``)."""
        answer = await self._json("GET", self._url("runs", quote(job_id, safe="")))
        if not isinstance(answer, dict):
            raise ProtocolError(f"GET /v1/runs/{job_id} answered {answer!r:.200}")
        return answer

    async def job(self, job_id: str) -> JobInfo:
        """The job now, with its output names."""
        return JobInfo.from_json(await self._json("GET", self._url("jobs", quote(job_id, safe=""))))

    async def jobs(
        self,
        state: JobState | str | Iterable[JobState | str] | None = None,
        labels: Mapping[str, str] | None = None,
        limit: int = 50,
    ) -> AsyncIterator[JobInfo]:
        """Every job matching ``state`` (one or several) and all of ``labels``, newest first, fetched
        ``limit`` per page; the cursors are followed until the last page."""
        states = [state] if isinstance(state, str) else list(state or ())
        query: list[tuple[str, str]] = [("limit", str(limit))]
        query += [("state", JobState(s).value) for s in states]
        query += [("label", f"{k}:{v}") for k, v in (labels or {}).items()]
        cursor: str | None = None
        while True:
            page = await self._json("GET", self._url("jobs"),
                                    params=query + ([("cursor", cursor)] if cursor else []))
            for item in page.get("items") or ():
                yield JobInfo.from_json(item)
            cursor = page.get("next_cursor")
            if not cursor:
                return

    async def cancel(self, job_id: str) -> JobInfo:
        """Cancel the job (interrupting its prompt if one runs). ``Conflict`` (409) if it already ended."""
        body = await self._json("POST", self._url("jobs", quote(job_id, safe=""), "cancel"))
        return JobInfo.from_json(body)

    async def delete(self, job_id: str) -> None:
        """Delete an ended job with its events and outputs. ``Conflict`` (409) while it is queued or
        running (cancel it first), ``NotFound`` once it is gone."""
        async with self._request("DELETE", self._url("jobs", quote(job_id, safe=""))):
            pass

    async def backends(self) -> list[BackendInfo]:
        """The pool's backends: health, breaker, load, node classes and models."""
        body = await self._json("GET", self._url("backends"))
        return [BackendInfo.from_json(item) for item in body.get("items") or ()]

    # -- outputs ------------------------------------------------------------------------------------

    def _output_url(self, job_id: str, name: str) -> str:
        return self._url("jobs", quote(job_id, safe=""), "outputs", quote(name, safe="/"))

    async def iter_download(self, job_id: str, name: str) -> AsyncIterator[bytes]:
        """The output ``name`` of a job (as ``JobInfo.outputs`` lists it), in chunks."""
        async with self._request("GET", self._output_url(job_id, name)) as resp:
            try:
                async for chunk in resp.content.iter_chunked(_CHUNK):
                    yield chunk
            except aiohttp.ClientPayloadError as exc:
                raise ServiceUnreachable(f"output {name!r} of job {job_id} was cut off: {exc}") from None

    async def download(self, job_id: str, name: str) -> bytes:
        return b"".join([chunk async for chunk in self.iter_download(job_id, name)])

    async def save(self, job_id: str, name: str, path: str | os.PathLike[str]) -> Path:
        """Stream an output to ``path`` (written beside it, then renamed: never a partial file). The
        disk is written from worker threads, one chunk at a time: a slow disk holds up neither the
        event loop (other downloads, event sockets, heartbeats) nor more than a chunk of memory."""
        return await save_stream(self.iter_download(job_id, name), Path(path))

    # -- events -------------------------------------------------------------------------------------

    async def events(
        self,
        *,
        after: int = 0,
        jobs: Iterable[str] | None = None,
        reconnects: int | None = None,
        backoff: float = 0.1,
        max_backoff: float = 5.0,
    ) -> AsyncGenerator[ServiceEvent, None]:
        """The tenant's events with ``seq`` above ``after`` (only ``jobs``' if given), replayed then
        followed, forever (break out, or use ``wait``). A dropped socket is reopened from the last
        ``seq`` seen.

        Between tries it waits a jittered exponential backoff: ``backoff`` seconds doubled per failed
        try in a row, scaled by a random factor between 0.5 and 1.5, at most ``max_backoff``. A try
        fails when the socket cannot be opened, or opens and closes without a new event (a server
        that accepts and hangs up at once); one that delivers an event, or stayed open longer than
        ``max_backoff`` (a quiet job, a proxy that limits how long a connection lives), resets the count. After
        ``reconnects`` failed reconnects in a row (default: the client's, 8), ``ServiceUnreachable``.
        With the defaults that is about 8 to 16 s of a service that is down or hangs up."""
        reconnects = self._reconnects if reconnects is None else reconnects
        if reconnects < 0:
            raise ValueError(f"reconnects must be 0 or more, not {reconnects}")
        if not backoff > 0:
            raise ValueError(f"backoff must be above 0 s, not {backoff}")
        if not max_backoff >= backoff:
            raise ValueError(f"max_backoff ({max_backoff} s) must be at least backoff ({backoff} s)")
        last = after
        job_ids = list(jobs or ())
        failures = 0  # tries in a row that delivered no new event
        while True:
            params = [("after", str(last))] + [("job", j) for j in job_ids]
            delivered = False
            problem = "closed without an event"
            opened = time.monotonic()
            try:
                async with self.session.ws_connect(self._url("events"), params=params,
                                                   heartbeat=max(self._timeout, 1.0)) as ws:
                    async for msg in ws:
                        if msg.type is not aiohttp.WSMsgType.TEXT:
                            break  # an error frame: reconnect
                        event = ServiceEvent.from_json(json.loads(msg.data))
                        if event.seq <= last:
                            continue
                        last = event.seq
                        delivered = True
                        yield event
                log.info("event socket of %s closed after seq %d; reconnecting", self.base_url, last)
            except aiohttp.WSServerHandshakeError as exc:
                if exc.status not in (502, 503, 504):  # the body is not readable here: say what the status means
                    raise error_from_response(exc.status, {"error": {
                        "type": _HANDSHAKE_ERRORS.get(exc.status, "HTTPError"),
                        "message": f"the event socket was refused: {exc.message}"}}) from None
                problem = f"refused with {exc.status}"
            except (aiohttp.ClientConnectionError, TimeoutError) as exc:
                problem = str(exc) or type(exc).__name__
                log.info("event socket of %s: %s (try %d)", self.base_url, problem, failures + 1)
            failures = 0 if delivered or time.monotonic() - opened > max_backoff else failures + 1
            if failures > reconnects:
                raise ServiceUnreachable(
                    f"the event socket of {self.base_url} failed {failures} times in a row without an event "
                    f"(last: {problem}); gave up after {reconnects} reconnects")
            # Jittered, so that the clients of a restarted service do not all come back at once.
            await asyncio.sleep(backoff_delay(failures, initial=backoff, maximum=max_backoff, jitter=0.5,
                                              random=random.random()))

    async def wait(self, job_id: str, *, on_event: EventCallback | None = None) -> JobInfo:
        """Follow the job's events (from its first, through ``on_event``, which may be async) until it
        succeeds, fails or is cancelled; then the job as it ended."""
        job = await self.job(job_id)
        if job.final:
            return job
        async with contextlib.aclosing(self.events(after=0, jobs=[job_id])) as stream:
            async for event in stream:
                if on_event is not None:
                    outcome = on_event(event)
                    if inspect.isawaitable(outcome):
                        await outcome
                if event.final and event.job_id == job_id:
                    break
        return await self.job(job_id)


async def _error_of(resp: aiohttp.ClientResponse) -> ServiceError:
    try:
        body = await resp.json(content_type=None)
    except (ValueError, aiohttp.ClientError):
        body = None
    return error_from_response(resp.status, body, resp.headers.get("Retry-After"))
