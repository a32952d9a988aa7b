"""Files written whole or not at all."""

from __future__ import annotations

import uuid
from pathlib import Path

__all__ = ["write_atomically"]


def write_atomically(path: Path, data: bytes | str) -> None:
    """Write ``data`` (text as UTF-8) to a temporary name beside ``path``, unique to this call, then
    rename it into place: a reader, or another writer of the same file, never sees half of it. The
    folder is made when missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")
    partial.write_bytes(data.encode() if isinstance(data, str) else data)
    partial.replace(path)
