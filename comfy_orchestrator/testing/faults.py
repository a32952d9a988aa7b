"""Fault knobs of the test double: a mutable dataclass the server watches while it runs.

Change a knob at any time, from the event loop's thread, and the server reacts at once::

    server.faults.http_500 = 2          # the next two HTTP requests answer 500
    server.faults.refuse = True         # connection refused until set back to False
    server.faults.execution_error = NodeFailure.cpu_oom(node_class="KSampler")

Every knob is off by default. One-shot knobs (``http_500``, ``execution_error`` with a ``times``,
``die_mid_job``) count themselves down as they fire.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Faults", "HangMode", "NodeFailure"]

_CPU_OOM_MESSAGE = (
    "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
    "you tried to allocate {nbytes} bytes. Error code 12 (Cannot allocate memory)"
)
_CUDA_OOM_MESSAGE = (
    "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which "
    "1.02 GiB is free. Of the allocated memory 76.90 GiB is allocated by PyTorch."
)
OOM_TIPS = (
    "This error means you ran out of memory on your GPU.\n\nTIPS: If the workflow worked before you might "
    "have accidentally set the batch_size to a large number."
)


class HangMode(enum.StrEnum):
    START = "start"  # prompts are accepted and stay pending: the worker never starts the next one
    MID_RUN = "mid_run"  # the running prompt goes silent after its first node and stays running


@dataclass
class NodeFailure:
    """A node that raises while a prompt runs, reported as ComfyUI's ``execution_error``.

    ``node_class`` picks the first executed node of that class; None picks the first node that
    really executes (cached nodes never fail). ``times`` counts down per failed prompt; None fails
    every prompt until the knob is cleared. ``exception_type`` is the name sent on the wire
    (ComfyUI sends ``module.QualName`` except for builtins); a ``torch.OutOfMemoryError`` gets
    ComfyUI's OOM tips appended to the message, as the real server does.
    """

    exception_type: str = "RuntimeError"
    message: str = _CPU_OOM_MESSAGE.format(nbytes=4398046511104)
    node_class: str | None = None
    times: int | None = 1

    @classmethod
    def cpu_oom(cls, node_class: str | None = None, nbytes: int = 4398046511104) -> NodeFailure:
        """The allocation failure recorded from a real CPU server (``exec_error_oom_*``)."""
        return cls("RuntimeError", _CPU_OOM_MESSAGE.format(nbytes=nbytes), node_class)

    @classmethod
    def cuda_oom(cls, node_class: str | None = None) -> NodeFailure:
        """What a GPU server sends when VRAM runs out."""
        return cls("torch.OutOfMemoryError", _CUDA_OOM_MESSAGE, node_class)

    def exception_message(self) -> str:
        tips = OOM_TIPS if self.exception_type == "torch.OutOfMemoryError" else ""
        return f"{self.message}\n{tips}"


@dataclass
class Faults:
    """What should go wrong, and when. Each field is one knob; all are off by default.

    latency
        Seconds added before every HTTP response and WebSocket handshake.
    response_delay
        Seconds between a request being handled (a prompt queued, say) and its answer going out: a
        slow proxy, or a client cancelled while the server already acted.
    http_500
        The next N HTTP requests (any route, the WebSocket handshake included) answer
        ``500 Internal Server Error`` as aiohttp words it; counts down to 0.
    refuse
        While True the server does not listen: new connections are refused, and open HTTP and
        WebSocket connections are dropped. Queue, history and the running prompt live on (a network
        partition). Setting it back to False listens again on the same port at once.
    ws_drop_after
        Drop (abort, no close frame) every WebSocket once N messages of the running prompt have
        been sent, counting from its ``execution_start``; fires for every prompt while set.
    hang
        A ``HangMode``: ``START`` accepts prompts but never starts one; ``MID_RUN`` lets the next
        prompt emit up to its first ``executing`` and then go silent, still listed as running.
        Clearing the knob resumes where it stopped. None turns it off.
    history_delay
        Seconds between ``execution_success``/``execution_error`` going out and the /history
        write (widens the race every real ComfyUI has). ``executing {node: null}`` and the last
        ``status`` follow the write, as on the real server.
    execution_error
        A ``NodeFailure``: the next prompt (or one node class) raises at run time.
    die_mid_job
        The server dies in the middle of the next prompt, right after its first ``executing``:
        the listener and every connection close and all state (queue, history, cache) is lost.
        It stays down until ``await server.restart()``, or for ``restart_after`` seconds.
    restart_after
        When not None, a death (``die_mid_job``) is followed by an automatic restart on the same
        port after that many seconds, like a supervisor restarting the process.
    """

    latency: float = 0.0
    response_delay: float = 0.0
    http_500: int = 0
    refuse: bool = False
    ws_drop_after: int | None = None
    hang: HangMode | None = None
    history_delay: float = 0.0
    execution_error: NodeFailure | None = None
    die_mid_job: bool = False
    restart_after: float | None = None
    _listeners: list[Callable[[str], None]] = field(
        default_factory=list, init=False, repr=False, compare=False
    )

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        if not name.startswith("_"):
            for listener in list(getattr(self, "_listeners", ())):
                listener(name)

    def subscribe(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(knob_name)`` after each change (the server uses this)."""
        self._listeners.append(listener)

    def unsubscribe(self, listener: Callable[[str], None]) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def clear(self) -> None:
        """Turn every knob off."""
        defaults = Faults()
        for name in ("latency", "response_delay", "http_500", "refuse", "ws_drop_after", "hang", "history_delay",
                     "execution_error", "die_mid_job", "restart_after"):
            setattr(self, name, getattr(defaults, name))

    def take_http_500(self) -> bool:
        """Count one request against ``http_500``; True when this one must fail."""
        if self.http_500 > 0:
            self.http_500 -= 1
            return True
        return False

    def failure_for(self, class_type: str) -> NodeFailure | None:
        """The failure a node of ``class_type`` must raise now, if any (does not count down)."""
        failure = self.execution_error
        if failure is None or (failure.node_class is not None and failure.node_class != class_type):
            return None
        return failure

    def spend_failure(self) -> None:
        failure = self.execution_error
        if failure is not None and failure.times is not None:
            failure.times -= 1
            if failure.times <= 0:
                self.execution_error = None
