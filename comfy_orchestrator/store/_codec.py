"""What every store implementation shares: canonical body hashes, page cursors, times, JSON."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from comfy_orchestrator.store.errors import InvalidCursor
from comfy_orchestrator.store.types import JobKind

__all__ = [
    "body_hash", "datetime_us", "decode_cursor", "dumps", "encode_cursor", "error_info", "from_us", "loads", "to_us",
]

_CURSOR_PREFIX = "c1."
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def dumps(value: Any) -> str:
    """Canonical JSON: sorted keys, no spaces, UTF-8 kept, NaN refused."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def body_hash(
    kind: JobKind | str, spec: Mapping[str, Any], labels: Mapping[str, str] | None, *, spec_json: str | None = None
) -> str:
    """SHA-256 of the canonical JSON of what a create call asked for: same request, same hash,
    whatever the key order (the idempotency check compares these). ``spec_json``, when the caller
    already has ``dumps(spec)``, saves encoding the spec twice (the text is the same)."""
    if spec_json is None:
        spec_json = dumps(spec)
    # dumps({"kind": …, "labels": …, "spec": …}) spelled out: keys sorted, no spaces
    body = f'{{"kind":{dumps(str(kind))},"labels":{dumps(dict(labels or {}))},"spec":{spec_json}}}'
    return hashlib.sha256(body.encode()).hexdigest()


def to_us(t: float) -> int:
    """Unix seconds to integer microseconds (what the database stores)."""
    return round(t * 1_000_000)


def from_us(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)  # exact, and half the cost of fromtimestamp


def datetime_us(t: datetime) -> int:
    """``from_us``'s inverse, exact."""
    return (t - _EPOCH) // timedelta(microseconds=1)


def encode_cursor(created_us: int, job_id: str) -> str:
    """An opaque cursor naming a position in (created, id) order."""
    raw = dumps([created_us, job_id]).encode()
    return _CURSOR_PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, str]:
    if not cursor.startswith(_CURSOR_PREFIX):
        raise InvalidCursor(f"not a job list cursor: {cursor!r}")
    body = cursor[len(_CURSOR_PREFIX):]
    try:
        value = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except (binascii.Error, ValueError) as exc:
        raise InvalidCursor(f"not a job list cursor: {cursor!r}") from exc
    match value:
        case [int(created_us), str(job_id)]:
            return created_us, job_id
    raise InvalidCursor(f"not a job list cursor: {cursor!r}")


def error_info(exc: BaseException, **extra: Any) -> dict[str, Any]:
    """An exception as the JSON a job or an attempt stores: its type name, message, and the
    typed fields comfy_orchestrator's errors carry (node, backend, prompt id) when present."""
    info: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc)}
    for attr in ("backend", "prompt_id", "node_id", "node_type", "exception_type", "exception_message"):
        value = getattr(exc, attr, None)
        if value is not None:
            info[attr] = value
    info.update(extra)
    return info
