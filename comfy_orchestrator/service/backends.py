"""The service's own client per backend: ``/object_info`` for validating a graph before it is
queued, streamed downloads of outputs, and start-up reconciliation. The pool keeps its clients to
itself; these are separate, long-lived ones (one session per backend, never one per request)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection, Iterable, Iterator, Mapping
from typing import Any

from comfy_orchestrator.client import ComfyClient
from comfy_orchestrator.errors import BackendError, ComfyTimeout
from comfy_orchestrator.graph import Graph, validate
from comfy_orchestrator.pool import BackendConfig, BackendStatus, Capabilities, NoCapableBackend, Requirements
from comfy_orchestrator.pool.uploads import IMAGE_LOADERS

__all__ = ["BackendClients", "NoBackendReachable"]

log = logging.getLogger(__name__)

_OBJECT_INFO_TTL = 60.0


class NoBackendReachable(BackendError):
    """No healthy backend answered ``/object_info``: the graph cannot be checked now."""


class BackendClients(Mapping[str, ComfyClient]):
    """Backend name → client. A mapping, so it is also what ``reconcile_running`` takes."""

    def __init__(self, configs: Iterable[BackendConfig]) -> None:
        self._clients = {c.name: ComfyClient(c.url, headers=c.headers) for c in configs}
        self._fetched: dict[str, float] = {}
        self._capabilities: dict[str, tuple[dict[str, Any], Capabilities]] = {}  # name -> (info read, its caps)

    def __getitem__(self, name: str) -> ComfyClient:
        return self._clients[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._clients)

    def __len__(self) -> int:
        return len(self._clients)

    def add(self, config: BackendConfig) -> None:
        """A client for a backend that joins at run time (a managed local ComfyUI once it answers)."""
        if config.name in self._clients:
            raise ValueError(f"there is already a client for backend {config.name!r}")
        self._clients[config.name] = ComfyClient(config.url, headers=config.headers)

    async def close(self) -> None:
        await asyncio.gather(*(client.close() for client in self._clients.values()))

    async def object_info(self, name: str) -> dict[str, Any]:
        client = self._clients[name]
        refresh = time.monotonic() - self._fetched.get(name, 0.0) > _OBJECT_INFO_TTL
        info = await client.object_info(refresh=refresh)
        if refresh:
            self._fetched[name] = time.monotonic()
        return info

    def _capabilities_of(self, name: str, info: dict[str, Any]) -> Capabilities:
        cached = self._capabilities.get(name)
        if cached is None or cached[0] is not info:
            cached = (info, Capabilities.from_object_info(info))
            self._capabilities[name] = cached
        return cached[1]

    async def check(self, graph: Graph, statuses: Iterable[BackendStatus], *, input_files: Collection[str] = ()
                    ) -> str:
        """Validate ``graph`` against the first healthy backend that has what it needs; its name.
        ``input_files`` are image names the job uploads before it runs: taken as present there.

        Raises NoCapableBackend (what each backend lacks), GraphValidationError (ComfyUI's body,
        from that backend's /object_info) or NoBackendReachable."""
        needs = Requirements.of(graph)
        missing: dict[str, list[str]] = {}
        reachable = False
        for status in statuses:
            if status.draining or status.name not in self._clients:
                continue
            try:
                info = await self.object_info(status.name)
            except (BackendError, ComfyTimeout) as exc:
                log.info("backend %s: /object_info failed while validating: %s", status.name, exc)
                continue
            reachable = True
            lacking = self._capabilities_of(status.name, info).missing(needs)
            if lacking:
                missing[status.name] = lacking
                continue
            validate(graph, _with_input_files(info, input_files) if input_files else info)
            return status.name
        if not reachable:
            raise NoBackendReachable("no backend answered /object_info; try again shortly")
        raise NoCapableBackend(missing)


def _with_input_files(info: Mapping[str, Any], names: Collection[str]) -> dict[str, Any]:
    """``info`` whose image loaders also list ``names`` (as they will once the job's uploads are there)."""
    out = dict(info)
    for class_type, input_name in IMAGE_LOADERS.items():
        entry = (((info.get(class_type) or {}).get("input") or {}).get("required") or {}).get(input_name)
        if not isinstance(entry, list) or not entry:
            continue
        if isinstance(entry[0], list):
            new_entry = [[*entry[0], *names], *entry[1:]]
        elif entry[0] == "COMBO" and len(entry) > 1 and isinstance(entry[1], Mapping):
            new_entry = ["COMBO", {**entry[1], "options": [*(entry[1].get("options") or []), *names]}, *entry[2:]]
        else:
            continue
        node = dict(info[class_type])
        node["input"] = {**node["input"], "required": {**node["input"]["required"], input_name: new_entry}}
        out[class_type] = node
    return out
