"""What the notebooks in ``notebooks/`` share: ComfyUI servers to run on, and the service as a subprocess.

::

    comfy = NotebookBackends("work")           # $COMFYUI_URL's servers, else a local ComfyUI with tiny models
    await comfy.start()
    async with Pool(comfy.configs()) as pool:
        ...
    service = ServiceProcess(comfy.urls, "work/service")   # `comfy-orch serve` on a free port
    await service.start()                                  # answers /readyz now
    async with ServiceClient(service.url, service.token) as client:
        ...
    await service.stop()
    await comfy.stop()

Both are async context managers too, and both SIGKILL their process at interpreter exit (a kernel
shut down after a failed cell) when nobody stopped it. Nothing here runs an event loop of its own,
so it works in Jupyter's running loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import secrets
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Self

import aiohttp

from comfy_orchestrator._child import ChildProcess, free_port, log_tail
from comfy_orchestrator.errors import ComfyOrchestratorError
from comfy_orchestrator.local import LocalComfyUI, LocalComfyUIConfig
from comfy_orchestrator.pool import BackendConfig

if TYPE_CHECKING:
    from comfy_orchestrator.testing.tiny_models import TinyModels

__all__ = [
    "COMFYUI_URL_ENV",
    "NotebookBackends",
    "ServiceProcess",
    "ServiceProcessError",
    "prepare_tiny_models",
    "tiny_unet_names",
    "urls_from_env",
]

logger = logging.getLogger(__name__)

COMFYUI_URL_ENV = "COMFYUI_URL"
_BASE_UNET = "tiny_sd2_unet.safetensors"  # tiny_models.UNET_FILE, named here so that no torch import is needed
_VARIANT_UNET = "tiny_sd2_unet_seed{seed}.safetensors"
_LOG_TAIL_LINES = 30


class ServiceProcessError(ComfyOrchestratorError):
    """``comfy-orch serve`` exited during start-up or did not answer ``/readyz`` in time."""


# -- ComfyUI servers -------------------------------------------------------------------------------


def urls_from_env(env: Mapping[str, str] | None = None) -> list[str]:
    """The servers in ``$COMFYUI_URL`` (comma- or space-separated), without trailing slashes."""
    value = (env if env is not None else os.environ).get(COMFYUI_URL_ENV, "")
    return [url.rstrip("/") for url in re.split(r"[,\s]+", value) if url]


def tiny_unet_names(variants: int = 2) -> list[str]:
    """The UNet files :func:`prepare_tiny_models` writes: the tiny UNet, then ``variants`` more
    with other random weights (seeds 1, 2, …), so a comparison has several "models" to compare."""
    return [_BASE_UNET, *(_VARIANT_UNET.format(seed=seed) for seed in range(1, variants + 1))]


def prepare_tiny_models(base_dir: str | os.PathLike[str], *, variants: int = 2) -> TinyModels:
    """:func:`~comfy_orchestrator.testing.tiny_models.prepare_base_dir` (tiny UNet, TAESD, upscalers,
    an input image) plus ``variants`` more UNets (:func:`tiny_unet_names`, weights from seeds 1, 2, …).
    Needs torch; takes a second or two per model."""
    from comfy_orchestrator.testing.tiny_models import add_unet, prepare_base_dir

    models = prepare_base_dir(Path(base_dir))
    for seed, name in enumerate(tiny_unet_names(variants)[1:], 1):
        add_unet(models.base_dir, name, seed=seed)
    return models


class NotebookBackends:
    """The ComfyUI servers a notebook runs on: ``urls`` (default: ``$COMFYUI_URL``), else one local
    ComfyUI started in ``work_dir/comfyui`` with the tiny models of :func:`prepare_tiny_models`."""

    def __init__(self, work_dir: str | os.PathLike[str], *, urls: Sequence[str] | None = None,
                 variants: int = 2, startup_timeout: float = 180.0) -> None:
        self.work_dir = Path(work_dir).resolve()  # ComfyUI runs in its own tree: no relative paths
        self._given = [u.rstrip("/") for u in urls] if urls is not None else urls_from_env()
        self.variants = variants
        self.startup_timeout = startup_timeout
        self.local: LocalComfyUI | None = None
        self.models: TinyModels | None = None

    @property
    def is_local(self) -> bool:
        """True when this object starts (and stops) a local ComfyUI: no URL was given."""
        return not self._given

    @property
    def urls(self) -> list[str]:
        if self._given:
            return list(self._given)
        if self.local is None:
            raise ComfyOrchestratorError("NotebookBackends: start() first; no local ComfyUI is running")
        return [self.local.url]

    def configs(self, *, max_in_flight: int = 1) -> list[BackendConfig]:
        """A ``BackendConfig`` per server: ``local``, or ``comfy-1``, ``comfy-2``… for ``$COMFYUI_URL``."""
        if self.is_local:
            return [BackendConfig("local", self.urls[0], max_in_flight=max_in_flight)]
        return [BackendConfig(f"comfy-{n}", url, max_in_flight=max_in_flight) for n, url in enumerate(self.urls, 1)]

    async def start(self) -> None:
        """Start the local ComfyUI (with the tiny models), or check that every given server answers."""
        if not self.is_local:
            await _check_answers(self._given)
            logger.info("using the ComfyUI servers in $%s: %s", COMFYUI_URL_ENV, ", ".join(self._given))
            return
        if self.local is not None and self.local.running:
            return
        base_dir = self.work_dir / "comfyui"
        self.models = await asyncio.to_thread(prepare_tiny_models, base_dir, variants=self.variants)
        env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1"}
        self.local = LocalComfyUI(LocalComfyUIConfig(base_dir=base_dir, env=env,
                                                     startup_timeout=self.startup_timeout))
        await self.local.start()

    async def stop(self) -> None:
        """Stop the local ComfyUI, if this object started one (a server of ``$COMFYUI_URL`` is left alone)."""
        if self.local is not None:
            await self.local.stop()

    def __repr__(self) -> str:
        if not self.is_local:
            return f"<NotebookBackends ${COMFYUI_URL_ENV}: {', '.join(self._given)}>"
        if self.local is None or not self.local.running:
            return f"<NotebookBackends local ComfyUI in {self.work_dir / 'comfyui'}, not running>"
        return f"<NotebookBackends local ComfyUI pid {self.local.pid} at {self.local.url} (tiny models)>"

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()


async def _check_answers(urls: Sequence[str]) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10.0)) as session:
        for url in urls:
            try:
                async with session.get(f"{url}/system_stats") as resp:
                    if resp.status == 200:
                        continue
                    problem = f"HTTP {resp.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                problem = str(exc) or type(exc).__name__
            raise ComfyOrchestratorError(f"${COMFYUI_URL_ENV} names {url}, which does not answer "
                                         f"GET /system_stats: {problem}")


# -- the service -----------------------------------------------------------------------------------


class ServiceProcess:
    """``comfy-orch serve`` over ``backends`` (URLs, or name → URL) as a subprocess, configured by a
    TOML file written in ``work_dir`` (``service.toml``; ``jobs.db``, ``outputs/`` and ``service.log``
    beside it). One bearer ``token`` (random unless given) acts for ``tenant``."""

    def __init__(self, backends: Sequence[str] | Mapping[str, str], work_dir: str | os.PathLike[str], *,
                 token: str | None = None, tenant: str = "notebook", host: str = "127.0.0.1",
                 port: int | None = None, startup_timeout: float = 60.0, stop_timeout: float = 30.0,
                 python: str = sys.executable) -> None:
        self.backends = dict(backends) if isinstance(backends, Mapping) else {
            f"comfy-{n}": url for n, url in enumerate(backends, 1)}
        self.work_dir = Path(work_dir).resolve()
        self.token = token or secrets.token_urlsafe(24)
        self.tenant = tenant
        self.host = host
        self.port = port
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.python = python
        self._child = ChildProcess("service")  # killed at exit or when this is collected, if still running

    @property
    def url(self) -> str:
        if self.port is None:
            raise ServiceProcessError("the service has not been started yet; no port chosen")
        return f"http://{self.host}:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.work_dir / "service.toml"

    @property
    def log_path(self) -> Path:
        return self.work_dir / "service.log"

    @property
    def pid(self) -> int | None:
        return self._child.pid

    @property
    def returncode(self) -> int | None:
        return self._child.returncode

    @property
    def running(self) -> bool:
        return self._child.running

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        return log_tail(self.log_path, lines)

    def settings_toml(self) -> str:
        """The settings file :meth:`start` writes (``[server]``, ``[store]``, ``[[backends]]``, ``[[tokens]]``)."""
        def q(value: object) -> str:  # a TOML basic string; JSON's escapes are TOML's
            return json.dumps(str(value))

        lines = ["[server]", f"host = {q(self.host)}", f"port = {self.port or 0}", "drain_timeout = 5.0", "",
                 "[store]", f"path = {q(self.work_dir / 'jobs.db')}", f"outputs_dir = {q(self.work_dir / 'outputs')}"]
        for name, url in self.backends.items():
            lines += ["", "[[backends]]", f"name = {q(name)}", f"url = {q(url)}"]
        lines += ["", "[[tokens]]", f"token = {q(self.token)}", f"tenant = {q(self.tenant)}"]
        return "\n".join(lines) + "\n"

    async def start(self) -> None:
        """Write the settings, spawn the service and wait until ``GET /readyz`` answers 200."""
        if self.running:
            raise ServiceProcessError(f"the service at {self.url} is already running (pid {self.pid})")
        if self.port is None:
            self.port = free_port(self.host)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.settings_toml(), encoding="utf-8")
        cmd = [self.python, "-m", "comfy_orchestrator", "serve", "--config", str(self.config_path)]
        pid = await self._child.launch(cmd, log_path=self.log_path, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        logger.info("service pid %d starting at %s (log %s)", pid, self.url, self.log_path)
        try:
            await self._child.wait_ready(f"{self.url}/readyz", timeout=self.startup_timeout,
                                         error=ServiceProcessError)
        except BaseException:
            await self._child.terminate(0.0)
            raise

    async def stop(self) -> None:
        """SIGTERM (the service drains, then exits), SIGKILL after ``stop_timeout`` seconds."""
        await self._child.terminate(self.stop_timeout)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()
