"""ComfyUI's wire protocol, parsed once into typed values.

Everything that arrives from a ComfyUI server (WebSocket text and binary frames, /history entries,
/queue listings, upload answers) is turned into the frozen dataclasses below here, and nowhere else.
Layers above this one never index a raw wire dict.

Binary WebSocket frames start with a big-endian uint32 event type:
1 = preview (uint32 format: 1 JPEG, 2 PNG; then the image),
3 = text (uint32 node-id length, node id, UTF-8 text),
4 = preview with metadata (uint32 JSON length, JSON metadata, image), sent only to clients that
    announced ``supports_preview_metadata`` in a ``feature_flags`` message.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

from comfy_orchestrator.errors import ProtocolError

__all__ = [
    "Device",
    "Event",
    "Executed",
    "Executing",
    "ExecutionCached",
    "ExecutionError",
    "ExecutionInterrupted",
    "ExecutionStart",
    "ExecutionSuccess",
    "FeatureFlags",
    "FileRef",
    "HistoryEntry",
    "NodeOutput",
    "NodeProgress",
    "Preview",
    "Progress",
    "ProgressState",
    "QueueState",
    "SocketReconnected",
    "Status",
    "SystemStats",
    "Text",
    "UnknownMessage",
    "parse_binary",
    "parse_history",
    "parse_message",
    "parse_queue",
    "parse_system_stats",
    "parse_upload",
]

FileType: TypeAlias = Literal["output", "input", "temp"]


@dataclass(frozen=True, slots=True)
class FileRef:
    """A file a ComfyUI server holds: what GET /view needs to fetch it.

    ``kind`` is the key it was listed under in a node's output (``images``, ``latents``, ``gifs``…).
    """

    filename: str
    subfolder: str = ""
    type: FileType = "output"
    kind: str = "images"

    def view_params(self) -> dict[str, str]:
        return {"filename": self.filename, "subfolder": self.subfolder, "type": self.type}


@dataclass(frozen=True, slots=True)
class NodeOutput:
    """What one output node produced: files, text, and any other UI values it reported."""

    node_id: str
    files: tuple[FileRef, ...] = ()
    text: tuple[str, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def images(self) -> tuple[FileRef, ...]:
        return tuple(f for f in self.files if f.kind == "images")


# ---------------------------------------------------------------------------------------------
# WebSocket events


@dataclass(frozen=True, slots=True)
class Status:
    """Broadcast queue size; the first one after connecting carries the session id (``sid``)."""

    queue_remaining: int
    sid: str | None = None
    prompt_id: None = None


@dataclass(frozen=True, slots=True)
class FeatureFlags:
    """The server's feature flags, sent right after connecting (ComfyUI ≥ 0.3.6x)."""

    flags: Mapping[str, Any]
    prompt_id: None = None


@dataclass(frozen=True, slots=True)
class ExecutionStart:
    prompt_id: str
    timestamp: int | None = None


@dataclass(frozen=True, slots=True)
class ExecutionCached:
    """Nodes whose outputs came from the server's cache (all of them for an identical resubmit)."""

    prompt_id: str
    nodes: tuple[str, ...]
    timestamp: int | None = None


@dataclass(frozen=True, slots=True)
class Executing:
    """A node started; ``node is None`` means the prompt is finished (sent after /history is written)."""

    prompt_id: str
    node: str | None
    display_node: str | None = None


@dataclass(frozen=True, slots=True)
class Progress:
    """Step ``value`` of ``max`` inside a node (sampler steps, upscaler tiles)."""

    prompt_id: str
    node: str | None
    value: int
    max: int

    @property
    def fraction(self) -> float:
        return self.value / self.max if self.max else 0.0


@dataclass(frozen=True, slots=True)
class NodeProgress:
    node_id: str
    value: float
    max: float
    state: str


@dataclass(frozen=True, slots=True)
class ProgressState:
    """Per-node progress of a prompt (ComfyUI ≥ 0.3.4x)."""

    prompt_id: str
    nodes: Mapping[str, NodeProgress]


@dataclass(frozen=True, slots=True)
class Executed:
    """An output node finished; ``output`` is what its UI shows (file references, text)."""

    prompt_id: str
    node: str
    output: NodeOutput
    display_node: str | None = None


@dataclass(frozen=True, slots=True)
class ExecutionSuccess:
    prompt_id: str
    timestamp: int | None = None


@dataclass(frozen=True, slots=True)
class ExecutionError:
    prompt_id: str
    node_id: str | None
    node_type: str | None
    exception_type: str
    exception_message: str
    traceback: tuple[str, ...] = ()
    executed: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ExecutionInterrupted:
    prompt_id: str
    node_id: str | None
    node_type: str | None
    executed: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Preview:
    """A preview image from a binary frame. ``prompt_id``/``node_id`` are known for type 4 frames; for
    type 1 frames the client attributes the frame to the prompt it saw executing last."""

    prompt_id: str | None
    node_id: str | None
    image: bytes
    mime: str


@dataclass(frozen=True, slots=True)
class Text:
    """A text frame (binary type 3), e.g. a node's progress text."""

    prompt_id: str | None
    node_id: str
    text: str


@dataclass(frozen=True, slots=True)
class UnknownMessage:
    """A message type this client does not know (custom nodes send their own); kept, not dropped."""

    type: str
    data: Mapping[str, Any]
    prompt_id: str | None = None


@dataclass(frozen=True, slots=True)
class SocketReconnected:
    """Not from the server: the client's WebSocket dropped and came back; events may have been missed."""

    prompt_id: None = None


Event: TypeAlias = (
    Status
    | FeatureFlags
    | ExecutionStart
    | ExecutionCached
    | Executing
    | Progress
    | ProgressState
    | Executed
    | ExecutionSuccess
    | ExecutionError
    | ExecutionInterrupted
    | Preview
    | Text
    | UnknownMessage
    | SocketReconnected
)

TERMINAL_EVENTS = (ExecutionSuccess, ExecutionError, ExecutionInterrupted)


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def _strings(values: Any) -> tuple[str, ...]:
    if not isinstance(values, Sequence) or isinstance(values, str):
        return ()
    return tuple(str(v) for v in values)


def parse_node_output(node_id: str, ui: Any) -> NodeOutput:
    """A node's UI output dict (``{"images": [{filename, subfolder, type}], "text": [...]}``)."""
    if not isinstance(ui, Mapping):
        return NodeOutput(node_id=node_id)
    files: list[FileRef] = []
    text: tuple[str, ...] = ()
    extra: dict[str, Any] = {}
    for key, value in ui.items():
        if key == "text":
            text = _strings(value)
        elif (
            isinstance(value, list)
            and value
            and all(isinstance(v, Mapping) and "filename" in v for v in value)
        ):
            for item in value:
                ftype = item.get("type", "output")
                files.append(
                    FileRef(
                        filename=str(item["filename"]),
                        subfolder=str(item.get("subfolder") or ""),
                        type=ftype if ftype in ("output", "input", "temp") else "output",
                        kind=key,
                    )
                )
        else:
            extra[key] = value
    return NodeOutput(node_id=node_id, files=tuple(files), text=text, extra=extra)


def _error_from(data: Mapping[str, Any]) -> ExecutionError:
    return ExecutionError(
        prompt_id=str(data.get("prompt_id", "")),
        node_id=_str_or_none(data.get("node_id")),
        node_type=_str_or_none(data.get("node_type")),
        exception_type=str(data.get("exception_type", "")),
        exception_message=str(data.get("exception_message", "")),
        traceback=_strings(data.get("traceback")),
        executed=_strings(data.get("executed")),
    )


def _interrupted_from(data: Mapping[str, Any]) -> ExecutionInterrupted:
    return ExecutionInterrupted(
        prompt_id=str(data.get("prompt_id", "")),
        node_id=_str_or_none(data.get("node_id")),
        node_type=_str_or_none(data.get("node_type")),
        executed=_strings(data.get("executed")),
    )


def _message_from(kind: str, data: Mapping[str, Any]) -> Event:
    pid = data.get("prompt_id")
    if kind == "status":
        info = data.get("status", {}).get("exec_info", {})
        return Status(queue_remaining=int(info.get("queue_remaining", 0)), sid=_str_or_none(data.get("sid")))
    if kind == "feature_flags":
        return FeatureFlags(flags=dict(data))
    if pid is None:
        return UnknownMessage(type=kind, data=dict(data))
    prompt_id = str(pid)
    ts = data.get("timestamp")
    timestamp = int(ts) if isinstance(ts, int | float) else None
    if kind == "executing":
        return Executing(prompt_id, _str_or_none(data.get("node")), _str_or_none(data.get("display_node")))
    if kind == "progress":
        return Progress(
            prompt_id, _str_or_none(data.get("node")), int(data.get("value", 0)), int(data.get("max", 0))
        )
    if kind == "executed":
        node = str(data.get("node"))
        return Executed(
            prompt_id, node, parse_node_output(node, data.get("output")), _str_or_none(data.get("display_node"))
        )
    if kind == "execution_start":
        return ExecutionStart(prompt_id, timestamp)
    if kind == "execution_cached":
        return ExecutionCached(prompt_id, _strings(data.get("nodes")), timestamp)
    if kind == "execution_success":
        return ExecutionSuccess(prompt_id, timestamp)
    if kind == "execution_error":
        return _error_from(data)
    if kind == "execution_interrupted":
        return _interrupted_from(data)
    if kind == "progress_state":
        nodes = {
            str(nid): NodeProgress(
                node_id=str(nid),
                value=float(n.get("value", 0.0)),
                max=float(n.get("max", 0.0)),
                state=str(n.get("state", "")),
            )
            for nid, n in (data.get("nodes") or {}).items()
            if isinstance(n, Mapping)
        }
        return ProgressState(prompt_id, nodes)
    return UnknownMessage(type=kind, data=dict(data), prompt_id=prompt_id)


def parse_message(text: str) -> Event:
    """Parse one WebSocket text frame."""
    try:
        msg = json.loads(text)
        kind = msg["type"]
        data = msg.get("data") or {}
    except (ValueError, KeyError, TypeError) as exc:
        raise ProtocolError(f"unreadable WebSocket message: {text[:200]!r}") from exc
    if not isinstance(data, Mapping):
        return UnknownMessage(type=str(kind), data={"data": data})
    try:
        return _message_from(str(kind), data)
    except (ValueError, TypeError, AttributeError) as exc:
        raise ProtocolError(f"malformed {kind!r} message: {text[:200]!r}") from exc


_U32 = struct.Struct(">I")
_IMAGE_FORMATS = {1: "image/jpeg", 2: "image/png"}


def parse_binary(frame: bytes, *, current_prompt: str | None = None) -> Event:
    """Parse one WebSocket binary frame; type 1/3 frames are attributed to ``current_prompt``."""
    if len(frame) < 4:
        raise ProtocolError(f"binary frame of {len(frame)} bytes is too short")
    (event_type,) = _U32.unpack_from(frame, 0)
    try:
        if event_type == 1:
            (fmt,) = _U32.unpack_from(frame, 4)
            return Preview(current_prompt, None, frame[8:], _IMAGE_FORMATS.get(fmt, "application/octet-stream"))
        if event_type == 4:
            (meta_len,) = _U32.unpack_from(frame, 4)
            if 8 + meta_len > len(frame):
                raise ValueError("metadata longer than the frame")
            meta = json.loads(frame[8 : 8 + meta_len])
            return Preview(
                _str_or_none(meta.get("prompt_id")) or current_prompt,
                _str_or_none(meta.get("node_id")),
                frame[8 + meta_len :],
                str(meta.get("image_type", "image/jpeg")),
            )
        if event_type == 3:
            (id_len,) = _U32.unpack_from(frame, 4)
            if 8 + id_len > len(frame):
                raise ValueError("node id longer than the frame")
            node_id = frame[8 : 8 + id_len].decode()
            return Text(current_prompt, node_id, frame[8 + id_len :].decode(errors="replace"))
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"malformed binary frame of type {event_type}") from exc
    return UnknownMessage(type=f"binary:{event_type}", data={"length": len(frame)}, prompt_id=current_prompt)


# ---------------------------------------------------------------------------------------------
# HTTP answers


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One prompt's /history entry: written by the server after the prompt ended, however it ended."""

    prompt_id: str
    status: str  # ComfyUI's status_str: "success" or "error"
    completed: bool
    outputs: Mapping[str, NodeOutput]
    cached_nodes: tuple[str, ...] = ()
    error: ExecutionError | None = None
    interrupted: ExecutionInterrupted | None = None
    started_at_ms: int | None = None
    finished_at_ms: int | None = None


def parse_history(prompt_id: str, body: Any) -> HistoryEntry | None:
    """The entry for ``prompt_id`` in a GET /history/{id} answer, or None while it is not written."""
    if not isinstance(body, Mapping):
        raise ProtocolError(f"/history answered {type(body).__name__}, not an object")
    entry = body.get(prompt_id)
    if entry is None:
        return None
    try:
        status = entry.get("status") or {}
        outputs = {str(nid): parse_node_output(str(nid), ui) for nid, ui in (entry.get("outputs") or {}).items()}
        cached: tuple[str, ...] = ()
        error = interrupted = None
        started = finished = None
        for kind, data in status.get("messages") or []:
            ts = data.get("timestamp") if isinstance(data, Mapping) else None
            if kind == "execution_start":
                started = ts
            elif kind == "execution_cached":
                cached = _strings(data.get("nodes"))
            elif kind == "execution_error":
                error = _error_from({**data, "prompt_id": prompt_id})
                finished = ts
            elif kind == "execution_interrupted":
                interrupted = _interrupted_from({**data, "prompt_id": prompt_id})
                finished = ts
            elif kind == "execution_success":
                finished = ts
        return HistoryEntry(
            prompt_id=prompt_id,
            status=str(status.get("status_str", "")),
            completed=bool(status.get("completed", False)),
            outputs=outputs,
            cached_nodes=cached,
            error=error,
            interrupted=interrupted,
            started_at_ms=started,
            finished_at_ms=finished,
        )
    except (AttributeError, TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed /history entry for {prompt_id}") from exc


@dataclass(frozen=True, slots=True)
class QueueState:
    """Prompt ids in GET /queue: the one(s) running and those waiting, in order."""

    running: tuple[str, ...]
    pending: tuple[str, ...]

    def __contains__(self, prompt_id: object) -> bool:
        return prompt_id in self.running or prompt_id in self.pending


def parse_queue(body: Any) -> QueueState:
    """GET /queue: entries are ``[number, prompt_id, prompt, extra_data, outputs_to_execute]``."""
    try:
        running = tuple(str(item[1]) for item in body["queue_running"])
        pending_items = sorted(body["queue_pending"], key=lambda item: item[0])
        return QueueState(running=running, pending=tuple(str(item[1]) for item in pending_items))
    except (KeyError, IndexError, TypeError) as exc:
        raise ProtocolError("malformed /queue answer") from exc


def parse_upload(body: Any) -> FileRef:
    """POST /upload/image answers ``{name, subfolder, type}``."""
    try:
        ftype = body.get("type", "input")
        return FileRef(
            filename=str(body["name"]),
            subfolder=str(body.get("subfolder") or ""),
            type=ftype if ftype in ("output", "input", "temp") else "input",
        )
    except (KeyError, AttributeError) as exc:
        raise ProtocolError("malformed /upload/image answer") from exc


@dataclass(frozen=True, slots=True)
class Device:
    name: str
    type: str
    vram_total: int
    vram_free: int


@dataclass(frozen=True, slots=True)
class SystemStats:
    """GET /system_stats: versions, RAM and devices of a server."""

    comfyui_version: str
    python_version: str
    pytorch_version: str
    ram_total: int
    ram_free: int
    devices: tuple[Device, ...]


def parse_system_stats(body: Any) -> SystemStats:
    try:
        system = body["system"]
        return SystemStats(
            comfyui_version=str(system.get("comfyui_version", "")),
            python_version=str(system.get("python_version", "")),
            pytorch_version=str(system.get("pytorch_version", "")),
            ram_total=int(system.get("ram_total", 0)),
            ram_free=int(system.get("ram_free", 0)),
            devices=tuple(
                Device(str(d.get("name", "")), str(d.get("type", "")), int(d.get("vram_total") or 0),
                       int(d.get("vram_free") or 0))
                for d in body.get("devices", [])
            ),
        )
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise ProtocolError("malformed /system_stats answer") from exc
