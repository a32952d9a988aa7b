"""A content hash of a graph that ignores node ids, titles and key order."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from comfy_orchestrator.graph._graph import Graph

__all__ = ["canonical_form", "content_hash"]

_VERSION = "comfy-orchestrator/graph-hash/1"


def content_hash(graph: Graph | Mapping[str, Any]) -> str:
    """The sha256 (hex) of what ``graph`` computes, not of how it is written down.

    ``graph`` is a ``Graph`` or an API-format mapping. Node ids, ``_meta`` (titles), key order and
    number spelling (``1`` vs ``1.0``) do not count; classes, constants and the wiring do. Each
    node is hashed together with everything upstream of it (a Merkle hash over links), and the
    graph hash is that of the sorted list of node hashes, so renumbering the nodes cannot change
    it. Links to nodes that are not in the graph, and cycles, are hashed by id (such graphs are
    invalid anyway).
    """
    signatures = _signatures(_nodes_of(graph))
    return _sha256([_VERSION, sorted(signatures.values())])


def canonical_form(graph: Graph | Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``graph`` renumbered ``"1"``… in topological order (ties by node hash), without ``_meta``.

    For reading and diffing; two graphs that differ only in ids give the same form except when
    they hold interchangeable twin nodes. Use :func:`content_hash` to compare.
    """
    nodes = _nodes_of(graph)
    signatures = _signatures(nodes)
    depth = _depths(nodes)
    ordered = sorted(nodes, key=lambda node_id: (depth[node_id], signatures[node_id], node_id))
    new_ids = {old: str(index) for index, old in enumerate(ordered, start=1)}
    form: dict[str, dict[str, Any]] = {}
    for old in ordered:
        node = nodes[old]
        inputs = {
            name: _canonical_value(value, lambda source, slot: [new_ids.get(source, source), slot])
            for name, value in sorted((node.get("inputs") or {}).items())
        }
        form[new_ids[old]] = {"class_type": node["class_type"], "inputs": inputs}
    return form


def _nodes_of(graph: Graph | Mapping[str, Any]) -> dict[str, Any]:
    data: Any = graph.to_dict() if hasattr(graph, "to_dict") else graph
    if not isinstance(data, Mapping):
        raise TypeError(f"expected a Graph or an API-format mapping, got {type(data).__name__}")
    nodes: dict[str, Any] = json.loads(json.dumps({str(k): v for k, v in data.items()}))
    return nodes


def _signatures(nodes: Mapping[str, Any]) -> dict[str, str]:
    """Each node's hash over its class, its constants and (recursively) the hashes of its sources."""
    done: dict[str, str] = {}
    for start in nodes:
        if start in done:
            continue
        stack: list[tuple[str, bool]] = [(start, False)]
        on_path: set[str] = set()
        while stack:
            node_id, expanded = stack.pop()
            if node_id in done:
                continue
            if expanded:
                on_path.discard(node_id)
                done[node_id] = _node_signature(nodes[node_id], nodes, done)
                continue
            on_path.add(node_id)
            stack.append((node_id, True))
            for source in _sources(nodes[node_id]):
                if source in nodes and source not in done and source not in on_path:
                    stack.append((source, False))
    return done


def _node_signature(node: Mapping[str, Any], nodes: Mapping[str, Any], done: Mapping[str, str]) -> str:
    def link(source: str, slot: Any) -> Any:
        if source in done:
            return {"from": done[source], "slot": slot}
        return {"from-id": source, "slot": slot, "missing": source not in nodes}

    inputs = {name: _canonical_value(value, link) for name, value in (node.get("inputs") or {}).items()}
    return _sha256({"class_type": node.get("class_type"), "inputs": inputs})


def _canonical_value(value: Any, link: Any) -> Any:
    if _is_link(value):
        return link(value[0], _canonical_number(value[1]))
    if isinstance(value, dict):
        if set(value) == {"__value__"}:
            return _canonical_value(value["__value__"], link)
        return {key: _canonical_value(item, link) for key, item in value.items()}
    if isinstance(value, list):
        return [_canonical_value(item, link) for item in value]
    return _canonical_number(value)


def _canonical_number(value: Any) -> Any:
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer():
            return int(value)
        if not math.isfinite(value):
            return repr(value)
    return value


def _is_link(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], int | float)
        and not isinstance(value[1], bool)
    )


def _sources(node: Mapping[str, Any]) -> list[str]:
    return [value[0] for value in (node.get("inputs") or {}).values() if _is_link(value)]


def _depths(nodes: Mapping[str, Any]) -> dict[str, int]:
    """Longest distance from a node without (known) sources; nodes on or after a cycle get the largest."""
    sources = {node_id: {s for s in _sources(node) if s in nodes} for node_id, node in nodes.items()}
    consumers: dict[str, list[str]] = {node_id: [] for node_id in nodes}
    for node_id, upstream in sources.items():
        for source in upstream:
            consumers[source].append(node_id)
    waiting = {node_id: len(upstream) for node_id, upstream in sources.items()}
    ready = [node_id for node_id, count in waiting.items() if count == 0]
    depth: dict[str, int] = {}
    while ready:
        node_id = ready.pop()
        depth[node_id] = 1 + max((depth[s] for s in sources[node_id]), default=-1)
        for consumer in consumers[node_id]:
            waiting[consumer] -= 1
            if waiting[consumer] == 0:
                ready.append(consumer)
    top = 1 + max(depth.values(), default=0)
    return {node_id: depth.get(node_id, top) for node_id in nodes}


def _sha256(data: Any) -> str:
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
