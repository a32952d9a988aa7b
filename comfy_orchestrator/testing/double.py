"""``FakeComfyUI``: a ComfyUI server double on a real socket, with fault knobs.

    async with FakeComfyUI(models={"checkpoints": ["sd15.safetensors"]}) as server:
        ...  # talk to server.url exactly as to a real ComfyUI

It speaks the protocol recorded from real ComfyUI 0.3.64 / 0.3.75 servers (routes at ``/x`` and
``/api/x``, WebSocket events and binary frames, /history written after ``execution_success``),
executes its nodes for real with Pillow (see ``nodes`` and the deterministic sampler in
``sampler``), and can be made to fail through ``server.faults`` (see ``Faults``). One server
lifetime (queue, history, cache, sockets) ends with ``die_mid_job``, ``kill()`` or ``restart()``;
files under ``base_dir`` outlive it, except the temp folder, which a start wipes as ComfyUI does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import tempfile
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from aiohttp import web

from comfy_orchestrator.testing.execution import Engine, QueueItem
from comfy_orchestrator.testing.faults import Faults
from comfy_orchestrator.testing.files import Folders
from comfy_orchestrator.testing.routes import build_app
from comfy_orchestrator.testing.sockets import SocketHub

__all__ = ["FakeComfyUI"]

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Life:
    """What one server process holds; all of it is lost when the process dies."""

    runner: web.AppRunner
    engine: Engine
    hub: SocketHub
    listener: asyncio.AbstractServer | None = None


class FakeComfyUI:
    """A ComfyUI server double bound to ``host`` on a free (or the given) port.

    ``models`` maps a models folder (``checkpoints``, ``diffusion_models``, ``text_encoders``,
    ``vae``, ``loras``, ``upscale_models``) to the file names the loaders offer. ``step_delay`` is
    slept per sampler step and ``node_delay`` per executed (not cached) node. ``base_dir`` holds
    ``output/``, ``input/`` and ``temp/`` (a temporary folder, removed on ``stop()``, by default).
    """

    def __init__(
        self,
        *,
        models: Mapping[str, Sequence[str]] | None = None,
        step_delay: float = 0.0,
        node_delay: float = 0.0,
        name: str = "fake-comfyui",
        faults: Faults | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        base_dir: str | Path | None = None,
    ) -> None:
        self.name = name
        self.models: dict[str, list[str]] = {k: list(v) for k, v in (models or {}).items()}
        self.step_delay, self.node_delay = step_delay, node_delay
        self.host, self._port = host, port
        self._faults = faults if faults is not None else Faults()
        self._base_dir = Path(base_dir) if base_dir is not None else None
        self._own_dir: str | None = None
        self._folders: Folders | None = None
        self._life: _Life | None = None
        self._started = False
        self._burials: set[asyncio.Task[None]] = set()
        self._revivals: set[asyncio.Task[None]] = set()
        self._relisten: tuple[asyncio.Task[None], socket.socket] | None = None

    # public surface --------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self._port}"

    @property
    def port(self) -> int:
        return self._port

    def ws_url(self, client_id: str | None = None) -> str:
        query = f"?clientId={client_id}" if client_id else ""
        return f"ws://{self.host}:{self._port}/ws{query}"

    @property
    def faults(self) -> Faults:
        """The live fault knobs; change them in place (``server.faults.refuse = True``)."""
        return self._faults

    @property
    def folders(self) -> Folders:
        if self._folders is None:
            raise RuntimeError("the server is not started")
        return self._folders

    @property
    def output_dir(self) -> Path:
        return self.folders.output

    @property
    def input_dir(self) -> Path:
        return self.folders.input

    @property
    def temp_dir(self) -> Path:
        return self.folders.temp

    @property
    def alive(self) -> bool:
        """False between a death and the restart that follows."""
        return self._life is not None

    @property
    def history(self) -> dict[str, Any]:
        """The /history of this lifetime (the live mapping; do not keep it across a restart)."""
        return self._life.engine.history if self._life is not None else {}

    @property
    def queue_remaining(self) -> int:
        return 0 if self._life is None else int(self._life.engine.queue_info()["exec_info"]["queue_remaining"])

    @property
    def running_prompt_id(self) -> str | None:
        running = None if self._life is None else self._life.engine.running
        return None if running is None else running.prompt_id

    def object_info(self) -> dict[str, Any]:
        if self._life is None:
            raise RuntimeError("the server is not running")
        return self._life.engine.object_info()

    async def wait_idle(self, timeout: float | None = None) -> None:
        """Wait until nothing is queued or running."""
        async with asyncio.timeout(timeout):
            while self._life is not None and not self._life.engine.idle.is_set():
                await self._life.engine.idle.wait()

    # lifecycle -------------------------------------------------------------------------------

    async def __aenter__(self) -> FakeComfyUI:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    async def start(self) -> None:
        if self._started:
            raise RuntimeError(f"{self.name} is already started")
        if self._base_dir is None:
            self._own_dir = tempfile.mkdtemp(prefix="fake-comfyui-")
        self._folders = Folders(self._base_dir or Path(self._own_dir or "."))
        self._started = True
        self._faults.subscribe(self._on_fault)
        sock: socket.socket | None = self._bind()
        assert sock is not None
        self._port = sock.getsockname()[1]
        if self._faults.refuse:
            sock.close()
            sock = None
        await self._boot(sock, None)
        logger.info("%s: listening on %s", self.name, self.url)

    async def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        self._faults.unsubscribe(self._on_fault)
        for task in self._revivals:
            task.cancel()
        await asyncio.gather(*self._revivals, *self._burials, return_exceptions=True)
        life, self._life = self._life, None
        if life is not None:
            self._unlisten(life)
            await self._bury(life)
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)
            self._own_dir = None

    async def kill(self) -> None:
        """Die now, as ``die_mid_job`` does: connections cut, queue, history and cache lost."""
        self._die()
        await self._settle()

    async def restart(self, lose_queue: bool = True) -> None:
        """Come back on the same port. With ``lose_queue`` (what a real ComfyUI does) the queue
        and the history are empty afterwards; without it, pending prompts and history survive
        (the running prompt is lost either way)."""
        carried: tuple[list[QueueItem], dict[str, Any], int] | None = None
        if self._life is not None:
            engine = self._life.engine
            if not lose_queue:
                carried = (list(engine.queue), dict(engine.history), engine.number)
            self._die()
        await self._settle()
        self.folders.wipe_temp()
        sock = None if self._faults.refuse else self._bind()
        await self._boot(sock, carried)
        logger.info("%s: restarted on %s", self.name, self.url)

    # internals -------------------------------------------------------------------------------

    def _bind(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self._port))
        sock.listen(128)
        sock.setblocking(False)
        return sock

    async def _boot(self, sock: socket.socket | None, carried: tuple[list[QueueItem], dict[str, Any], int] | None,
                    ) -> None:
        hub = SocketHub()
        engine = Engine(hub, self.folders, self.models, self._faults, step_delay=self.step_delay,
                        node_delay=self.node_delay, name=self.name, on_death=self._die)
        if carried is not None:
            engine.queue, engine.history, engine.number = carried
        argv = ["main.py", "--cpu", "--listen", self.host, "--port", str(self._port)]
        runner = web.AppRunner(build_app(engine, hub, self.folders, self._faults, argv), access_log=None,
                               handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        self._life = _Life(runner, engine, hub)
        engine.start()
        if carried is not None and carried[0]:
            engine.idle.clear()
        if sock is not None:
            await self._listen(self._life, sock)

    async def _listen(self, life: _Life, sock: socket.socket) -> None:
        server = life.runner.server
        assert server is not None
        try:
            listener = await asyncio.get_running_loop().create_server(server, sock=sock)
        except BaseException:
            sock.close()
            raise
        if self._life is life and not self._faults.refuse and life.listener is None:
            life.listener = listener
        else:
            listener.close()

    def _unlisten(self, life: _Life) -> None:
        if self._relisten is not None:
            task, sock = self._relisten
            task.cancel()
            sock.close()
            self._relisten = None
        if life.listener is not None:
            life.listener.close()
            life.listener = None
        server = life.runner.server
        for connection in server.connections if server is not None else ():
            connection.force_close()
        life.hub.drop_all()

    def _on_fault(self, name: str) -> None:
        life = self._life
        if name != "refuse" or life is None:
            return
        if self._faults.refuse and (life.listener is not None or self._relisten is not None):
            logger.info("%s: refusing connections (fault)", self.name)
            self._unlisten(life)
        elif not self._faults.refuse and life.listener is None and self._relisten is None:
            sock = self._bind()  # listening again from here on: connections wait in the backlog
            task = asyncio.get_running_loop().create_task(self._listen(life, sock))
            self._relisten = (task, sock)
            task.add_done_callback(self._relistened)

    def _relistened(self, task: asyncio.Task[None]) -> None:
        if self._relisten is not None and self._relisten[0] is task:
            self._relisten = None

    def _die(self) -> None:
        life, self._life = self._life, None
        if life is None:
            return
        logger.warning("%s: the server process dies; queue, history and cache are lost", self.name)
        self._unlisten(life)
        self._spawn(self._burials, self._bury(life))
        if self._faults.restart_after is not None and self._started:
            self._spawn(self._revivals, self._restart_later(self._faults.restart_after))

    async def _bury(self, life: _Life) -> None:
        await life.engine.stop()
        with contextlib.suppress(RuntimeError, ConnectionError):
            await life.runner.cleanup()

    async def _restart_later(self, delay: float) -> None:
        await asyncio.sleep(delay)
        if self._started and self._life is None:
            await self.restart()

    @staticmethod
    def _spawn(tasks: set[asyncio.Task[None]], coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def _settle(self) -> None:
        """Wait until the dead lifetimes are buried (their sockets closed, their worker gone)."""
        await asyncio.gather(*self._burials, return_exceptions=True)
