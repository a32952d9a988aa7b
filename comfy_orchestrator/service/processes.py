"""``[server] processes = N``: one service on one port, run by N processes.

One event loop answers a few hundred jobs a second; past that the service needs more cores. With
``processes`` above 1, ``comfy-orch serve`` becomes a small supervisor:

* it binds the listening socket itself and hands it to N children (``comfy-orch serve`` again, with
  ``--process I/N``), so the kernel spreads connections over them and any port works, 0 included;
* every child is a whole service over the one store: it accepts jobs, serves reads and event
  sockets, and runs ``ProcessRole.share`` of the ``workers`` and of each backend's
  ``max_in_flight`` (so the backends see the slots configured, not N times as many);
* process 0 starts alone and reconciles what a previous run left running; the others start once it
  is ready, so no job one of them has just claimed is mistaken for a leftover;
* the children wake each other through ``service.peers`` (events appended, jobs queued, cancels);
  the store stays the only shared state, and its writers take turns on a file lock;
* Prometheus metrics are kept in ``PROMETHEUS_MULTIPROC_DIR``: counters, histograms and backend
  in-flight gauges are summed over the children, the store's gauges are the latest reading, so any
  of them answers ``/metrics`` for all;
* a child that dies is started again (jittered backoff from 1 s to 30 s); its jobs are taken over by the
  others once their leases run out, each reconciled with the backends first (a prompt still running is
  followed and a finished one collected, rather than run again). SIGTERM or SIGINT drains every
  child (``/readyz`` 503, running jobs finished or handed back) and waits for them. The children
  run as ``ChildProcess``es, each in a session of its own: a Ctrl-C reaches the supervisor alone,
  which passes it on as SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from comfy_orchestrator._backoff import RestartBackoff
from comfy_orchestrator._child import ChildProcess, http_url

__all__ = ["ProcessRole", "run_processes"]

log = logging.getLogger(__name__)

_RESTARTS = RestartBackoff(minimum=1.0, maximum=30.0, healthy_reset=60.0)
_EXIT_GRACE_S = 20.0  # beyond drain_timeout, before a child that ignores SIGTERM is killed


@dataclass(frozen=True, slots=True)
class ProcessRole:
    """Which process of a multi-process service this one is."""

    index: int
    count: int
    bus_dir: Path
    reconcile: bool = False  # settle what a previous run left running (process 0, at the first start only)

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"process index {self.index} is not in 0..{self.count - 1}")

    def share(self, total: int) -> int:
        """This process's part of ``total`` (workers, one backend's slots): as even as the count
        allows, and never below 1 (a backend with fewer slots than processes is then oversubscribed
        by the difference; ComfyUI queues what it cannot start)."""
        return max(1, total // self.count + (1 if self.index < total % self.count else 0))

    @property
    def label(self) -> str:
        return f"{self.index}/{self.count}"

    @classmethod
    def parse(cls, text: str, bus_dir: Path, *, reconcile: bool) -> ProcessRole:
        """From ``I/N`` (the hidden ``--process`` option)."""
        index, sep, count = text.partition("/")
        if not sep or not index.isdigit() or not count.isdigit():
            raise ValueError(f"--process takes INDEX/COUNT, got {text!r}")
        return cls(int(index), int(count), bus_dir, reconcile=reconcile)


@dataclass(slots=True)
class _Child:
    index: int
    process: ChildProcess
    started: float = 0.0  # time.monotonic() of the last launch
    running: bool = False  # launched and not yet seen to exit


async def run_processes(config_path: Path, host: str, port: int, *, processes: int, drain_timeout: float) -> None:
    """Bind ``host:port``, run ``processes`` children of ``comfy-orch serve --config config_path``
    on it until SIGINT/SIGTERM, then drain them. Raises RuntimeError when process 0 exits before
    it is ready (its own log says why)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.create_server((host, port), family=family, backlog=2048, dualstack_ipv6=host == "::")
    listener.set_inheritable(True)
    bound = listener.getsockname()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # a short path: Unix socket names are limited to about 100 bytes
    with listener, tempfile.TemporaryDirectory(prefix="comfy-orch-") as tmp:
        bus_dir, metrics_dir = Path(tmp) / "bus", Path(tmp) / "metrics"
        bus_dir.mkdir(mode=0o700)
        metrics_dir.mkdir(mode=0o700)
        # every child reads the settings as they were at start, a restarted one too, whatever
        # happens to the file meanwhile
        config = Path(tmp) / "service.toml"
        shutil.copyfile(config_path, config)
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}

        async def spawn(child: _Child, reconcile: bool) -> None:
            args = [sys.executable, "-m", "comfy_orchestrator", *_verbosity(), "serve", "--config", str(config),
                    "--process", f"{child.index}/{processes}", "--listen-fd", str(listener.fileno()),
                    "--bus-dir", str(bus_dir), "--supervisor-pid", str(os.getpid())]
            if reconcile:
                args.append("--reconcile")
            pid = await child.process.launch(args, log_path=None, env=env, pass_fds=(listener.fileno(),))
            child.started, child.running = time.monotonic(), True
            log.info("process %d/%d started (pid %d)", child.index, processes, pid)

        children = [_Child(i, ChildProcess(f"service process {i}")) for i in range(processes)]
        try:
            await spawn(children[0], True)
            if not await _wait_ready(children[0], http_url(bound[0], bound[1]) + "/readyz", stop):
                return
            for child in children[1:]:
                await spawn(child, False)
            log.info("serving on http://%s:%d with %d processes", bound[0], bound[1], processes)
            rng = random.Random()
            keepers = [asyncio.create_task(_keep_running(c, spawn, stop, metrics_dir, rng)) for c in children]
            try:
                await stop.wait()
            finally:
                for keeper in keepers:
                    keeper.cancel()
                await asyncio.gather(*keepers, return_exceptions=True)
        finally:
            # SIGTERM: each drains; killed if still there after its drain and a grace
            await asyncio.gather(*(c.process.terminate(drain_timeout + _EXIT_GRACE_S) for c in children))


def _verbosity() -> list[str]:
    """The ``-v`` flags that give a child this process's log level."""
    level = logging.getLogger().getEffectiveLevel()
    return ["-vv"] if level <= logging.DEBUG else ["-v"] if level <= logging.INFO else []


async def _wait_ready(child: _Child, url: str, stop: asyncio.Event) -> bool:
    """Until ``child`` (alone on the socket) answers ``url`` with 200: True; False when a signal
    came first. RuntimeError when it exits first (its own log, on this process's stderr, says why)."""
    ready = asyncio.ensure_future(child.process.wait_ready(url, timeout=None, error=RuntimeError))
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({ready, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if not ready.done():
        ready.cancel()
        return False
    ready.result()
    return True


async def _keep_running(child: _Child, spawn: Callable[[_Child, bool], Awaitable[None]], stop: asyncio.Event,
                        metrics_dir: Path, rng: random.Random) -> None:
    """Start ``child`` again each time it exits, after a backoff, until ``stop`` is set (one task
    per child: one child's backoff never holds up another's restart)."""
    from prometheus_client import multiprocess

    failures = 0
    while not stop.is_set():
        if child.running:
            pid = child.process.pid
            code = await child.process.wait()
            child.running = False
            with contextlib.suppress(OSError):
                multiprocess.mark_process_dead(pid, str(metrics_dir))  # type: ignore[no-untyped-call]
            if stop.is_set():
                return
            failures = _RESTARTS.failures_after(failures, time.monotonic() - child.started)
            what = f"(pid {pid}) exited with code {code}"
        else:
            failures += 1
            what = "could not be started"
        delay = _RESTARTS.delay(failures, rng)
        log.warning("process %d %s; starting it again in %.1f s", child.index, what, delay)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
        if stop.is_set():
            return
        try:
            await spawn(child, False)
        except OSError as exc:
            log.error("process %d could not be started: %s", child.index, exc)
