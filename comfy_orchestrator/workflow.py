"""Converting a workflow saved from ComfyUI's editor (UI format) into the API format the server runs.

The editor saves ``{"nodes": [...], "links": [...], ...}``: nodes carry their widget values as a
positional ``widgets_values`` list and their connections as link ids. The server takes
``{node_id: {"class_type", "inputs", "_meta"}}``. Converting needs the server's ``/object_info``
(which inputs are widgets, in which order), and follows what the editor's own "Export (API)" does:

* widget values are matched to the node's widget inputs in ``/object_info`` order; the
  ``control_after_generate`` pseudo-widget (``fixed``/``increment``/``decrement``/``randomize``)
  that follows a seed is skipped;
* links become ``[origin_id, origin_slot]``; ``Reroute`` nodes are followed through, a
  ``PrimitiveNode`` gives its value, ``Note``/``MarkdownNote`` are dropped;
* a muted node (mode 2) is left out together with the links from it; a bypassed node (mode 4) is
  left out and each link from it is re-attached to the bypassed node's input of the same type.

Group nodes, subgraphs and custom nodes the server does not have cannot be converted: the error
says to export the workflow with ComfyUI's Workflow menu → Export (API) instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from comfy_orchestrator.errors import WorkflowFormatError

__all__ = ["VIRTUAL_NODE_TYPES", "is_ui_workflow", "ui_to_api"]

VIRTUAL_NODE_TYPES = frozenset({"PrimitiveNode", "Reroute", "Note", "MarkdownNote"})
"""Editor-only node types: they never reach the server."""

_MUTED = 2
_BYPASSED = 4
_WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
_CONTROL_VALUES = frozenset({"fixed", "increment", "decrement", "randomize"})
_EXPORT_HINT = "export the workflow in API format instead: in ComfyUI, Workflow menu → Export (API)"


def is_ui_workflow(data: object) -> bool:
    """True for the editor's format: top-level ``nodes`` and ``links`` lists."""
    return isinstance(data, Mapping) and isinstance(data.get("nodes"), list) and isinstance(
        data.get("links"), list
    )


def ui_to_api(workflow: Mapping[str, Any], object_info: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The API-format prompt for a UI-format ``workflow``, using the server's ``/object_info``."""
    if not is_ui_workflow(workflow):
        raise WorkflowFormatError("not a UI-format workflow (expected top-level 'nodes' and 'links' lists)")
    return _Converter(workflow, object_info).convert()


@dataclass(frozen=True)
class _Link:
    origin: str
    origin_slot: int
    type: Any


@dataclass(frozen=True)
class _Value:
    value: Any


class _Converter:
    def __init__(self, workflow: Mapping[str, Any], object_info: Mapping[str, Any]) -> None:
        self.object_info = object_info
        self.nodes: dict[str, Mapping[str, Any]] = {}
        for node in workflow["nodes"]:
            if not isinstance(node, Mapping) or "id" not in node or "type" not in node:
                raise WorkflowFormatError(f"a UI workflow node needs 'id' and 'type': {node!r:.200}")
            self.nodes[str(node["id"])] = node
        self.links: dict[str, _Link] = {}
        for raw in workflow["links"]:
            link_id, link = _parse_link(raw)
            self.links[link_id] = link

    def convert(self) -> dict[str, dict[str, Any]]:
        emitted = [
            (node_id, node)
            for node_id, node in self.nodes.items()
            if node["type"] not in VIRTUAL_NODE_TYPES and node.get("mode", 0) not in (_MUTED, _BYPASSED)
        ]
        unknown = sorted({str(node["type"]) for _, node in emitted if node["type"] not in self.object_info})
        if unknown:
            raise WorkflowFormatError(
                f"node type(s) {', '.join(repr(t) for t in unknown)} are not known to this server's "
                "/object_info (a custom node that is not installed, a group node or a subgraph); "
                + _EXPORT_HINT
            )
        emitted.sort(key=lambda item: (_order(item[1]), _id_key(item[0])))
        return {node_id: self._api_node(node) for node_id, node in emitted}

    def _api_node(self, node: Mapping[str, Any]) -> dict[str, Any]:
        info = self.object_info[node["type"]]
        spec = info.get("input") or {}
        entries: dict[str, Any] = {**(spec.get("optional") or {}), **(spec.get("required") or {})}
        order = info.get("input_order") or {}
        names = [*(order.get("required") or spec.get("required") or {}),
                 *(order.get("optional") or spec.get("optional") or {})]
        inputs: dict[str, Any] = self._widget_inputs(node, [n for n in names if n in entries], entries)

        for socket in node.get("inputs") or []:
            if not isinstance(socket, Mapping) or socket.get("link") is None:
                continue
            widget = socket.get("widget")
            name = widget.get("name") if isinstance(widget, Mapping) else socket.get("name")
            if name not in entries:
                continue
            source = self._resolve(str(socket["link"]), set())
            if isinstance(source, _Link):
                inputs[name] = [source.origin, source.origin_slot]
            elif isinstance(source, _Value):
                inputs[name] = source.value  # the editor copies a primitive's value into its targets
        title = node.get("title") or info.get("display_name") or node["type"]
        return {"inputs": inputs, "class_type": node["type"], "_meta": {"title": title}}

    def _widget_inputs(
        self, node: Mapping[str, Any], names: list[str], entries: Mapping[str, Any]
    ) -> dict[str, Any]:
        raw = node.get("widgets_values")
        widgets = [n for n in names if _is_widget(entries[n])]
        if isinstance(raw, Mapping):
            return {n: raw[n] for n in widgets if n in raw}
        values = list(raw or [])
        inputs: dict[str, Any] = {}
        position = 0
        for name in widgets:
            if position >= len(values):
                break
            inputs[name] = values[position]
            position += 1
            if (
                _has_control_widget(name, entries[name])
                and position < len(values)
                and isinstance(values[position], str)
                and values[position] in _CONTROL_VALUES
            ):
                position += 1
        return inputs

    def _resolve(self, link_id: str, seen: set[str]) -> _Link | _Value | None:
        """Where a link really comes from, through reroutes, primitives and bypassed nodes."""
        link = self.links.get(link_id)
        if link is None or link_id in seen:
            return None
        seen.add(link_id)
        origin = self.nodes.get(link.origin)
        if origin is None:
            return None
        kind = origin["type"]
        if kind == "PrimitiveNode":
            values = origin.get("widgets_values") or []
            return _Value(values[0]) if values else None
        if kind == "Reroute":
            return self._follow_input(origin, 0, seen)
        if kind in VIRTUAL_NODE_TYPES or origin.get("mode", 0) == _MUTED:
            return None
        if origin.get("mode", 0) == _BYPASSED:
            return self._through_bypass(origin, link, seen)
        return link

    def _through_bypass(self, node: Mapping[str, Any], link: _Link, seen: set[str]) -> _Link | _Value | None:
        sockets = [s for s in node.get("inputs") or [] if isinstance(s, Mapping)]
        outputs = node.get("outputs") or []
        wanted = link.type
        if link.origin_slot < len(outputs) and isinstance(outputs[link.origin_slot], Mapping):
            wanted = outputs[link.origin_slot].get("type", wanted)
        same_slot = link.origin_slot if link.origin_slot < len(sockets) else None
        candidates = ([same_slot] if same_slot is not None else []) + list(range(len(sockets)))
        for index in candidates:
            if _types_fit(sockets[index].get("type"), wanted) and sockets[index].get("link") is not None:
                return self._follow_input(node, index, seen)
        return None

    def _follow_input(self, node: Mapping[str, Any], index: int, seen: set[str]) -> _Link | _Value | None:
        sockets = node.get("inputs") or []
        if index >= len(sockets) or not isinstance(sockets[index], Mapping):
            return None
        upstream = sockets[index].get("link")
        return None if upstream is None else self._resolve(str(upstream), seen)


def _parse_link(raw: Any) -> tuple[str, _Link]:
    try:
        if isinstance(raw, Mapping):
            return str(raw["id"]), _Link(str(raw["origin_id"]), int(raw["origin_slot"]), raw.get("type"))
        if isinstance(raw, list) and len(raw) >= 5:
            return str(raw[0]), _Link(str(raw[1]), int(raw[2]), raw[5] if len(raw) > 5 else None)
    except (KeyError, TypeError, ValueError):
        pass
    raise WorkflowFormatError(f"cannot read UI workflow link {raw!r:.200}")


def _is_widget(entry: Any) -> bool:
    kind = entry[0] if isinstance(entry, list | tuple) and entry else None
    extra = entry[1] if isinstance(entry, list | tuple) and len(entry) > 1 else {}
    if isinstance(extra, Mapping) and extra.get("forceInput"):
        return False
    return isinstance(kind, list) or kind in _WIDGET_TYPES


def _has_control_widget(name: str, entry: Any) -> bool:
    extra = entry[1] if len(entry) > 1 and isinstance(entry[1], Mapping) else {}
    flag = extra.get("control_after_generate")
    if flag is not None:
        return bool(flag)
    return entry[0] == "INT" and name in ("seed", "noise_seed")


def _types_fit(have: Any, want: Any) -> bool:
    if have == want or have == "*" or want == "*":
        return True
    if isinstance(have, str) and isinstance(want, str):
        return bool(set(have.split(",")) & set(want.split(",")))
    return False


def _order(node: Mapping[str, Any]) -> int:
    order = node.get("order")
    return order if isinstance(order, int) else 1 << 30


def _id_key(node_id: str) -> tuple[int, str]:
    return (int(node_id), "") if node_id.isdigit() else (1 << 30, node_id)
