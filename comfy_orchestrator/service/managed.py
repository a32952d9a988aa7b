"""Managed local backends: ComfyUI processes the service starts, watches and restarts itself.

    [managed]              # in the service's TOML (see ``ManagedSettings``)
    gpus = "auto"          # one process per GPU `nvidia-smi -L` lists, each with CUDA_VISIBLE_DEVICES=i
    # cpu = true           # or CPU processes instead: `instances` of them

Each process is a :class:`~comfy_orchestrator.local.LocalComfyUI` named ``local-0``, ``local-1``, …
in its own directory under the base dir (whose ``models/`` and ``custom_nodes/`` they share). It
joins the pool and the service's clients once it answers HTTP. When it exits, the supervisor logs its
exit code and the tail of its log and starts it again on the same port after a jittered exponential
backoff (back to the minimum once a process has stayed up ``healthy_reset_s``). Meanwhile it stays in
the pool, where it is a backend that went down, like a configured one: the pool's health checks take
it out of dispatch, queued jobs wait for it (or run elsewhere) instead of failing for want of any
backend, and the same health checks let it take jobs again once the new process answers.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import random
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from comfy_orchestrator._backoff import RestartBackoff
from comfy_orchestrator.local import LocalComfyUI, LocalComfyUIConfig, LocalComfyUIError, find_comfyui_dir
from comfy_orchestrator.pool import BackendConfig, Pool
from comfy_orchestrator.service.backends import BackendClients
from comfy_orchestrator.service.settings import ManagedSettings

__all__ = [
    "ManagedBackendError",
    "ManagedState",
    "ManagedStatus",
    "Slot",
    "Supervisor",
    "plan_slots",
    "visible_gpus",
]

log = logging.getLogger(__name__)

_JITTER = 0.2  # a restart delay is scaled by a random factor in [1 - _JITTER, 1 + _JITTER]


class ManagedBackendError(LocalComfyUIError):
    """The ``[managed]`` settings cannot be carried out: no ComfyUI tree, no GPU for ``gpus = "auto"``,
    or no managed process could be started."""


class ManagedState(enum.StrEnum):
    STARTING = "starting"  # its process is starting (waiting for HTTP to answer)
    RUNNING = "running"  # its process answers (or did at start-up and has not exited)
    BACKOFF = "backoff"  # its process exited or failed to start; waiting before the next start
    STOPPED = "stopped"  # the service is shutting down


@dataclass(frozen=True, slots=True)
class Slot:
    """Where one managed process runs: its name, its GPU (``CUDA_VISIBLE_DEVICES``) or the CPU, its port."""

    name: str
    device: str | None  # None: the CPU
    port: int | None  # None: a free port, chosen at the first start and kept across restarts


@dataclass(frozen=True, slots=True)
class ManagedStatus:
    """A snapshot of one managed backend, for ``GET /v1/backends``."""

    name: str
    state: ManagedState
    device: str | None
    pid: int | None
    url: str | None
    restarts: int  # successful starts after the first one
    last_exit: int | None  # exit code of the last process that ended (negative: killed by that signal)
    admitted: bool  # in the pool and the service's clients (from its first successful start on)

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state.value, "device": self.device, "pid": self.pid, "url": self.url,
                "restarts": self.restarts, "last_exit": self.last_exit}


def visible_gpus() -> tuple[str, ...]:
    """The GPUs a managed process may be given, as ``CUDA_VISIBLE_DEVICES`` values, without importing torch.

    ``$CUDA_VISIBLE_DEVICES`` when this process has it, else one index per line of ``nvidia-smi -L``;
    empty when there is no ``nvidia-smi`` or it fails.
    """
    inherited = os.environ.get("CUDA_VISIBLE_DEVICES")
    if inherited is not None:
        return tuple(d.strip() for d in inherited.split(",") if d.strip() and d.strip() != "-1")
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return ()
    try:
        done = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("nvidia-smi -L failed (%s); counting no GPU", exc)
        return ()
    if done.returncode != 0:
        log.warning("nvidia-smi -L exited with %d (%s); counting no GPU", done.returncode, done.stderr.strip())
        return ()
    count = sum(1 for line in done.stdout.splitlines() if line.startswith("GPU "))
    return tuple(str(i) for i in range(count))


def plan_slots(settings: ManagedSettings, gpus: Sequence[str] | None = None) -> list[Slot]:
    """The processes ``settings`` asks for. ``gpus`` are the visible GPUs (default: :func:`visible_gpus`),
    consulted only for ``gpus = "auto"``. Raises ManagedBackendError when that finds none."""
    if settings.cpu:
        devices: list[str | None] = [None] * settings.instances
    elif settings.gpus != "auto":
        devices = [str(i) for i in settings.gpus]
    else:
        found = visible_gpus() if gpus is None else gpus
        if not found:
            raise ManagedBackendError(
                '[managed] gpus = "auto" found no GPU (no nvidia-smi, or it lists none): set cpu = true '
                "to run ComfyUI on the CPU, or list the GPU indices as gpus = [0, 1]"
            )
        devices = list(found)
    base = settings.base_port
    return [Slot(f"local-{i}", device, None if base is None else base + i) for i, device in enumerate(devices)]


class _Managed:
    """One slot at run time: its process and what the supervisor knows about it."""

    def __init__(self, slot: Slot, process: LocalComfyUI) -> None:
        self.slot = slot
        self.process = process
        self.state = ManagedState.STARTING
        self.restarts = 0
        self.last_exit: int | None = None
        self.admitted = False

    def status(self) -> ManagedStatus:
        proc = self.process
        return ManagedStatus(name=self.slot.name, state=self.state, device=self.slot.device,
                             pid=proc.pid if proc.running else None, url=proc.url if proc.port else None,
                             restarts=self.restarts, last_exit=self.last_exit, admitted=self.admitted)


class Supervisor:
    """Starts the ``[managed]`` processes, admits each to ``pool`` and ``clients`` once it answers,
    restarts the ones that exit, and stops them all on :meth:`stop`. With ``settings`` None it
    manages nothing. An async context manager (``start`` / ``stop``)."""

    def __init__(
        self,
        settings: ManagedSettings | None,
        pool: Pool,
        clients: BackendClients,
        *,
        default_base_dir: Path,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self._pool, self._clients = pool, clients
        self.base_dir = (settings.base_dir if settings and settings.base_dir else default_base_dir).expanduser()
        self._rng = rng or random.Random()
        self._restarts = None if settings is None else RestartBackoff(
            settings.restart_backoff_min, settings.restart_backoff_max, settings.healthy_reset_s, jitter=_JITTER)
        self._managed: dict[str, _Managed] = {}
        self._tasks: list[asyncio.Task[None]] = []

    # -- state ---------------------------------------------------------------------------------

    def status(self, name: str) -> ManagedStatus | None:
        """The managed backend ``name``, or None when it is not one (a configured backend)."""
        managed = self._managed.get(name)
        return managed.status() if managed is not None else None

    def statuses(self) -> list[ManagedStatus]:
        return [m.status() for m in self._managed.values()]

    # -- life cycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every process at once and wait until each answers or fails; admit those that answer.
        The others keep being restarted in the background. Raises ManagedBackendError when there is no
        ComfyUI tree or GPU to run on, or when not one process started and the pool has no other backend."""
        settings = self.settings
        if settings is None or self._managed:
            return
        try:
            comfy_dir = find_comfyui_dir(settings.comfyui_dir)
        except LocalComfyUIError as exc:
            raise ManagedBackendError(f"[managed]: {exc}") from None
        gpus = None if settings.cpu or settings.gpus != "auto" else await asyncio.to_thread(visible_gpus)
        slots = plan_slots(settings, gpus)
        await asyncio.to_thread(self._prepare_dirs, slots)
        for slot in slots:
            self._managed[slot.name] = _Managed(slot, LocalComfyUI(self._process_config(slot, comfy_dir)))
        log.info("managed backends: %s from %s (base dir %s)",
                 ", ".join(f"{s.name} on {'GPU ' + s.device if s.device is not None else 'CPU'}" for s in slots),
                 comfy_dir, self.base_dir)
        started = await asyncio.gather(*(self._first_start(m) for m in self._managed.values()))
        if not any(started) and not self._pool.backends():
            await self.stop()
            first = next(iter(self._managed.values())).process
            raise ManagedBackendError(
                f"none of the managed ComfyUI processes started (logs under {self.base_dir / 'instances'}); "
                f"last lines of {first.log_path}:\n{first.log_tail(15)}"
            )
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._supervise(m), name=f"managed:{name}")
                       for name, m in self._managed.items()]
        for task in self._tasks:
            task.add_done_callback(_report_end)

    async def stop(self) -> None:
        """Stop supervising, then stop every process (SIGTERM, SIGKILL after its grace)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for managed in self._managed.values():
            managed.state = ManagedState.STOPPED
        await asyncio.gather(*(m.process.stop() for m in self._managed.values()))

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # -- internals -----------------------------------------------------------------------------

    def _process_config(self, slot: Slot, comfy_dir: Path) -> LocalComfyUIConfig:
        settings = self.settings
        assert settings is not None
        env = dict(settings.env)
        if slot.device is not None:
            env["CUDA_VISIBLE_DEVICES"] = slot.device
        return LocalComfyUIConfig(
            comfy_dir=comfy_dir, base_dir=self.base_dir / "instances" / slot.name, host=settings.host,
            port=slot.port, cpu=slot.device is None, extra_args=settings.extra_args, env=env,
            startup_timeout=settings.startup_timeout,
        )

    def _prepare_dirs(self, slots: Sequence[Slot]) -> None:
        """``base_dir/models`` and ``base_dir/custom_nodes``, linked into each process's own directory
        (its output, input, temp, user data and ``comfyui.log`` stay its own)."""
        for shared in ("models", "custom_nodes"):
            (self.base_dir / shared).mkdir(parents=True, exist_ok=True)
        for slot in slots:
            own = self.base_dir / "instances" / slot.name
            own.mkdir(parents=True, exist_ok=True)
            for shared in ("models", "custom_nodes"):
                link = own / shared
                if not link.is_symlink() and not link.exists():
                    link.symlink_to(Path("..") / ".." / shared, target_is_directory=True)

    async def _first_start(self, managed: _Managed) -> bool:
        try:
            await managed.process.start()
        except (LocalComfyUIError, OSError) as exc:
            managed.state, managed.last_exit = ManagedState.BACKOFF, managed.process.returncode
            log.error("managed backend %s: ComfyUI did not start: %s", managed.slot.name, exc)
            return False
        await self._admit(managed)
        return True

    async def _admit(self, managed: _Managed) -> None:
        managed.state = ManagedState.RUNNING
        if managed.admitted:
            return  # still in the pool: its health checks bring it back up
        settings = self.settings
        assert settings is not None
        config = BackendConfig(managed.slot.name, managed.process.url, max_in_flight=settings.max_in_flight)
        await self._pool.add_backend(config)  # first: if the pool refuses it, no client is left behind
        self._clients.add(config)
        managed.admitted = True
        log.info("managed backend %s (pid %s) joined the pool at %s", config.name, managed.process.pid, config.url)

    async def _supervise(self, managed: _Managed) -> None:
        """Wait for the process to exit, restart it after a backoff; for ever (until cancelled)."""
        restarts = self._restarts
        assert restarts is not None
        name, process = managed.slot.name, managed.process
        failures = 0 if process.running else 1  # consecutive exits / failed starts, for the backoff
        while True:
            if process.running:
                up_since, pid = time.monotonic(), process.pid
                await process.wait()
                uptime = time.monotonic() - up_since
                failures = restarts.failures_after(failures, uptime)
                managed.last_exit = process.returncode
                delay = restarts.delay(failures, self._rng)
                log.error("managed backend %s: ComfyUI pid %s exited with code %s after %.0f s; restarting it in "
                          "%.1f s. Last lines of %s:\n%s", name, pid, process.returncode, uptime, delay,
                          process.log_path, process.log_tail())
            else:
                delay = restarts.delay(failures, self._rng)
                log.info("managed backend %s: next start in %.1f s", name, delay)
            managed.state = ManagedState.BACKOFF
            await asyncio.sleep(delay)
            managed.state = ManagedState.STARTING
            try:
                await process.start()
            except (LocalComfyUIError, OSError) as exc:
                failures += 1
                managed.state, managed.last_exit = ManagedState.BACKOFF, process.returncode
                log.error("managed backend %s: restart failed: %s", name, exc)
                continue
            if managed.admitted:
                managed.restarts += 1
            await self._admit(managed)
            log.info("managed backend %s: running again as pid %s (restart %d)", name, process.pid, managed.restarts)


def _report_end(task: asyncio.Task[None]) -> None:
    """Supervision ends only when cancelled; anything else is a bug that leaves a process unwatched."""
    if not task.cancelled() and task.exception() is not None:
        log.error("%s ended: its process is no longer restarted", task.get_name(), exc_info=task.exception())
