"""One child process of ours, the way ``LocalComfyUI`` (a ComfyUI server) and the notebooks'
``ServiceProcess`` (a ``comfy-orch serve``) run theirs: in a session of its own (a Ctrl-C meant for
the owner does not reach it; the owner stops it), its output appended to a log file, ready once an
HTTP probe answers 200, stopped with SIGTERM then SIGKILL, and killed if its owner is garbage
collected or the interpreter exits with it still running.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path

import aiohttp

__all__ = ["ChildProcess", "free_port", "http_url", "log_tail"]

logger = logging.getLogger(__name__)

_LOG_TAIL_LINES = 40


class ChildProcess:
    """``what`` names the process in logs and errors ("local ComfyUI", "service")."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.log_path: Path | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._reaper: weakref.finalize[[int, str], ChildProcess] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        """The exit status of the last process, None while it runs or before the first start."""
        return self._proc.returncode if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of the log, or '' when there is none."""
        return log_tail(self.log_path, lines)

    async def launch(self, cmd: Sequence[str], *, log_path: Path | None, env: Mapping[str, str],
                     cwd: Path | None = None, pass_fds: Sequence[int] = ()) -> int:
        """Start ``cmd``, its stdout and stderr appended to ``log_path`` after a line naming the
        command (None: this process's own stdout and stderr), with ``pass_fds`` inherited; its pid."""
        self.log_path = log_path
        fd = None if log_path is None else os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            if fd is not None:
                os.write(fd, f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
            self._proc = await asyncio.create_subprocess_exec(
                *cmd, cwd=cwd, env=dict(env), stdin=subprocess.DEVNULL, stdout=fd,
                stderr=None if fd is None else subprocess.STDOUT, pass_fds=tuple(pass_fds), start_new_session=True)
        finally:
            if fd is not None:
                os.close(fd)
        self._reaper = weakref.finalize(self, _kill_at_exit, self._proc.pid, self.what)
        return self._proc.pid

    async def wait_ready(self, url: str, *, timeout: float | None, error: type[Exception]) -> None:
        """Until ``GET url`` answers 200; ``error`` (with the log's last lines) when the process
        exits first or ``timeout`` seconds (``startup_timeout``; None: no limit) pass."""
        deadline = None if timeout is None else time.monotonic() + timeout
        proc = self._proc
        if proc is None:
            raise error(f"the {self.what} was not started")
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5.0)) as session:
            while True:
                if proc.returncode is not None:
                    raise error(f"the {self.what} (pid {proc.pid}) exited with code {proc.returncode} during "
                                f"start-up{self._last_lines()}")
                try:
                    async with session.get(url) as resp:
                        if resp.status == 200:
                            return
                except (aiohttp.ClientError, TimeoutError):
                    pass  # not listening yet
                if deadline is not None and time.monotonic() > deadline:
                    raise error(f"the {self.what} (pid {proc.pid}) did not answer {url} within {timeout:.0f} s "
                                f"(startup_timeout){self._last_lines()}")
                await asyncio.sleep(0.2)

    def _last_lines(self) -> str:
        return f"; last lines of {self.log_path}:\n{self.log_tail()}" if self.log_path is not None else ""

    async def wait(self) -> int | None:
        """Until the process exits (its exit status); None when none was started."""
        return await self._proc.wait() if self._proc is not None else None

    async def terminate(self, grace: float) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds (at once with 0); returns once it exited."""
        proc = self._proc
        if proc is not None and proc.returncode is None:
            if grace > 0:
                proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), grace)
                except TimeoutError:
                    logger.warning("%s pid %d ignored SIGTERM for %.0f s; killing it", self.what, proc.pid, grace)
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            logger.info("%s pid %d exited with %s", self.what, proc.pid, proc.returncode)
        if self._reaper is not None:
            self._reaper.detach()
            self._reaper = None


def _kill_at_exit(pid: int, what: str) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return  # already gone
    logger.warning("killed the %s pid %d left running at exit", what, pid)


def log_tail(path: Path | None, lines: int = _LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of the file at ``path`` (read from its last 64 KiB), or ''."""
    if path is None or not path.is_file():
        return ""
    with path.open("rb") as fh:
        fh.seek(max(0, path.stat().st_size - 64 * 1024))
        text = fh.read().decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])


def http_url(host: str, port: int) -> str:
    """``http://host:port`` to reach a server listening on ``host`` (a wildcard: on loopback)."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def free_port(host: str) -> int:
    """A TCP port nothing listens on now, on ``host`` (IPv4 or IPv6)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port
