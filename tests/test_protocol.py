"""The protocol layer parses everything real ComfyUI servers were recorded sending."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from comfy_orchestrator import protocol as p
from comfy_orchestrator.errors import ProtocolError
from tests.conftest import PROTOCOL_DIR, require_recordings

require_recordings()

TRANSCRIPTS = sorted(PROTOCOL_DIR.glob("**/*.jsonl"))
KNOWN = {
    "status", "feature_flags", "execution_start", "execution_cached", "executing", "progress",
    "progress_state", "executed", "execution_success", "execution_error", "execution_interrupted",
}


def _text_messages(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["msg"] for r in rows if isinstance(r.get("msg"), dict) and "type" in r["msg"]]


@pytest.mark.parametrize("path", TRANSCRIPTS, ids=lambda path: path.name)
def test_every_recorded_text_message_parses_to_a_typed_event(path: Path) -> None:
    messages = _text_messages(path)
    assert messages
    for msg in messages:
        event = p.parse_message(json.dumps(msg))
        if msg["type"] in KNOWN and not (msg["type"] == "executing" and "prompt_id" not in msg["data"]):
            assert not isinstance(event, p.UnknownMessage), msg
        if "prompt_id" in msg["data"]:
            assert event.prompt_id == msg["data"]["prompt_id"]


def test_execution_error_carries_node_and_exception() -> None:
    msgs = _text_messages(PROTOCOL_DIR / "exec_error_oom_ws.jsonl")
    (error,) = [p.parse_message(json.dumps(m)) for m in msgs if m["type"] == "execution_error"]
    assert isinstance(error, p.ExecutionError)
    assert (error.node_id, error.node_type, error.exception_type) == ("1", "EmptyImage", "RuntimeError")
    assert "can't allocate memory" in error.exception_message
    assert error.traceback


def _preview_frame(meta: dict, image: bytes) -> bytes:
    blob = json.dumps(meta).encode()
    return struct.pack(">II", 4, len(blob)) + blob + image


def test_binary_frames_of_every_type() -> None:
    rows = [json.loads(x) for x in (PROTOCOL_DIR / "sample_ws.jsonl").read_text().splitlines()]
    recorded = next(r["msg"] for r in rows if r["msg"].get("event_type") == 4)
    frame = _preview_frame(recorded["metadata"], bytes.fromhex("ffd8ffe0") + b"jpeg")
    assert bytes.fromhex(recorded["head_hex"])[:8] == frame[:8] or recorded["head_hex"].startswith("00000004")
    event = p.parse_binary(frame)
    assert isinstance(event, p.Preview)
    assert (event.prompt_id, event.node_id, event.mime) == (
        recorded["metadata"]["prompt_id"], recorded["metadata"]["node_id"], "image/jpeg"
    )
    assert event.image.startswith(b"\xff\xd8")

    legacy = p.parse_binary(struct.pack(">II", 1, 2) + b"\x89PNG", current_prompt="abc")
    assert isinstance(legacy, p.Preview)
    assert (legacy.prompt_id, legacy.node_id, legacy.mime) == ("abc", None, "image/png")

    text = p.parse_binary(struct.pack(">II", 3, 1) + b"5" + "width: 128 ✓".encode(), current_prompt="abc")
    assert text == p.Text("abc", "5", "width: 128 ✓")

    with pytest.raises(ProtocolError):
        p.parse_binary(b"\x00\x00")
    with pytest.raises(ProtocolError):
        p.parse_binary(struct.pack(">II", 4, 999) + b"{}")


def test_garbage_text_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        p.parse_message("not json")
    with pytest.raises(ProtocolError):
        p.parse_message('{"no_type": 1}')


@pytest.mark.parametrize(
    ("name", "status"),
    [
        ("basic_history.json", "success"),
        ("cached_history.json", "success"),
        ("exec_error_oom_history.json", "error"),
        ("exec_error_channel_mismatch_history.json", "error"),
    ],
)
def test_history_entries_parse(name: str, status: str) -> None:
    body = json.loads((PROTOCOL_DIR / name).read_text())
    (prompt_id,) = body
    entry = p.parse_history(prompt_id, body)
    assert entry is not None
    assert entry.status == status
    if status == "error":
        assert entry.error is not None
        assert entry.error.exception_type
    else:
        assert entry.error is None
        assert entry.outputs
        assert all(f.filename for out in entry.outputs.values() for f in out.files)
    assert p.parse_history("missing", body) is None
    assert p.parse_history("anything", {}) is None


def test_cached_history_lists_every_node() -> None:
    body = json.loads((PROTOCOL_DIR / "cached_history.json").read_text())
    (prompt_id,) = body
    entry = p.parse_history(prompt_id, body)
    assert entry is not None
    assert set(entry.cached_nodes) == set(body[prompt_id]["prompt"][2])


def test_node_output_keeps_files_text_and_other_values() -> None:
    out = p.parse_node_output(
        "8",
        {
            "images": [{"filename": "a.png", "subfolder": "s", "type": "temp"}],
            "latents": [{"filename": "a.latent", "subfolder": "latents", "type": "output"}],
            "text": ["128"],
            "animated": [False],
        },
    )
    assert out.images == (p.FileRef("a.png", "s", "temp", "images"),)
    assert p.FileRef("a.latent", "latents", "output", "latents") in out.files
    assert out.text == ("128",)
    assert out.extra == {"animated": [False]}


def test_queue_and_upload_and_system_stats() -> None:
    recorded = json.loads((PROTOCOL_DIR / "interrupt_queue.json").read_text())["queue_while_running"]
    queue = p.parse_queue({"queue_running": recorded["running"], "queue_pending": recorded["pending"][::-1]})
    assert queue.running == ("dce5caf2-da6f-44ee-9a5f-6040a9748a90",)
    assert queue.pending[0] == "b6ea563b-65f1-49f8-a8b7-9fb2e77e0e32"  # ordered by number
    assert "dce5caf2-da6f-44ee-9a5f-6040a9748a90" in queue

    upload = json.loads((PROTOCOL_DIR / "upload.json").read_text())
    assert p.parse_upload(upload["upload1_sub='orch'_overwrite=true"]["body"]) == p.FileRef(
        "orch_up.png", "orch", "input"
    )
    stats = p.parse_system_stats(json.loads((PROTOCOL_DIR / "info.json").read_text())["/system_stats"]["body"])
    assert stats.comfyui_version == "0.3.64"
    assert stats.devices[0].type == "cpu"
    with pytest.raises(ProtocolError):
        p.parse_queue({"queue_running": 3})
