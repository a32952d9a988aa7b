"""A content-addressed disk cache of job outputs: a hit costs no GPU work.

The key is the sha256 of the graph's :func:`~comfy_orchestrator.graph.content_hash` (what it
computes, ids and titles aside), the model files it loads, and the hashes of the images uploaded
for it. An entry is a folder ``<dir>/<key[:2]>/<key>/`` holding the images and ``record.json``;
entries are written to a temporary folder and renamed into place, so a reader never sees half of one.
A hit marks its entry used (the record's mtime); ``prune`` removes those unused since a given time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from comfy_orchestrator.graph import Graph, content_hash

__all__ = ["CacheEntry", "DiskCache", "job_key"]

_KEY_VERSION = "comfy-orchestrator/job-key/1"
_RECORD = "record.json"


def job_key(graph: Graph, uploads: Mapping[str, bytes] | None = None) -> str:
    """The cache key of running ``graph`` with ``uploads`` (input file name -> bytes)."""
    models = sorted(f"{folder}/{name}" for folder, names in graph.model_references().items() for name in names)
    payload = {
        "v": _KEY_VERSION,
        "graph": content_hash(graph),
        "models": models,
        "uploads": {name: hashlib.sha256(data).hexdigest() for name, data in sorted((uploads or {}).items())},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class CacheEntry:
    key: str
    record: Mapping[str, Any]
    images: tuple[Path, ...]


class DiskCache:
    """Job outputs by key under ``directory`` (created on first write). Methods do blocking file
    I/O; async callers run them in a thread."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def __repr__(self) -> str:
        return f"<DiskCache {self.directory}>"

    def path_for(self, key: str) -> Path:
        if len(key) < 8 or not all(c in "0123456789abcdef" for c in key):
            raise ValueError(f"not a cache key: {key!r}")
        return self.directory / key[:2] / key

    def get(self, key: str) -> CacheEntry | None:
        """The entry for ``key``, or None (also when it is incomplete or unreadable); a hit marks the
        entry used now, so ``prune`` keeps it."""
        folder = self.path_for(key)
        try:
            record = json.loads((folder / _RECORD).read_text(encoding="utf-8"))
            os.utime(folder / _RECORD)
        except (OSError, ValueError):
            return None
        images = tuple(folder / name for name in record.get("images", []))
        if not images or not all(path.is_file() for path in images):
            return None
        return CacheEntry(key, record, images)

    def prune(self, unused_since: float) -> int:
        """Remove the entries not used (written or hit) since ``unused_since`` (Unix seconds), and
        writers' temporary folders as old (a writer that died); how many entries went. A reader of an
        entry removed meanwhile finds its images gone and takes it as a miss."""
        if not self.directory.is_dir():
            return 0
        removed = 0
        for shard in self.directory.iterdir():
            if not (shard.is_dir() and len(shard.name) == 2):
                continue
            for folder in shard.iterdir():
                writing = folder.name.startswith(".")  # a writer's temporary folder
                try:
                    used = (folder if writing else folder / _RECORD).stat().st_mtime
                except OSError:
                    continue
                if used < unused_since:
                    shutil.rmtree(folder, ignore_errors=True)
                    removed += not writing
        return removed

    def put(self, key: str, record: Mapping[str, Any], images: Sequence[tuple[str, bytes]]) -> CacheEntry:
        """Store ``images`` (suffix-bearing name, bytes) and ``record`` under ``key``; a concurrent
        writer of the same key wins or loses as a whole."""
        folder = self.path_for(key)
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{key[:12]}-", dir=folder.parent))
        names = []
        try:
            for index, (name, data) in enumerate(images):
                names.append(f"{index}{Path(name).suffix or '.png'}")
                (staging / names[-1]).write_bytes(data)
            stored = {**record, "key": key, "images": names}
            (staging / _RECORD).write_text(json.dumps(stored, indent=2, sort_keys=True), encoding="utf-8")
            try:
                os.replace(staging, folder)
            except OSError:  # an entry is there already (another writer); keep it
                shutil.rmtree(staging, ignore_errors=True)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        entry = self.get(key)
        if entry is None:
            raise OSError(f"cache entry {key} could not be written under {self.directory}")
        return entry

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.get(key) is not None

    def keys(self) -> Iterator[str]:
        if not self.directory.is_dir():
            return
        for shard in sorted(self.directory.iterdir()):
            if shard.is_dir() and len(shard.name) == 2:
                yield from (p.name for p in sorted(shard.iterdir()) if p.is_dir() and not p.name.startswith("."))

    def __len__(self) -> int:
        return sum(1 for _ in self.keys())

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
