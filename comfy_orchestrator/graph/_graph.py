"""``Graph``: an immutable API-format prompt whose nodes are addressed by title."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from comfy_orchestrator.errors import TemplateError, WorkflowFormatError
from comfy_orchestrator.graph._hash import content_hash
from comfy_orchestrator.graph._models import model_references_of
from comfy_orchestrator.workflow import is_ui_workflow, ui_to_api

__all__ = ["Graph", "Node"]


@dataclass(frozen=True)
class Node:
    """One node of a :class:`Graph`, read-only. ``inputs`` holds constants and ``[node_id, slot]`` links."""

    id: str
    class_type: str
    title: str | None
    inputs: Mapping[str, Any]


class Graph:
    """An API-format prompt ``{node_id: {"class_type", "inputs", "_meta": {"title"}}}``, never changed in place.

    Nodes are addressed by their ``_meta.title`` (a node without a title answers to its
    ``class_type``). Every ``with_*`` method returns a new graph; :meth:`to_dict` is what gets
    POSTed. Build one with :meth:`from_dict` or :meth:`load`, which accept the API format, the
    project's template format and, given the server's ``/object_info``, a UI-format workflow.
    """

    __slots__ = ("_nodes",)

    def __init__(self, nodes: Mapping[str, Any]) -> None:
        self._nodes: dict[str, dict[str, Any]] = _checked_nodes(nodes)

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, object_info: Mapping[str, Any] | None = None) -> Graph:
        """A graph from API format, template format (its ``graph``) or UI format (needs ``object_info``)."""
        if not isinstance(data, Mapping):
            raise WorkflowFormatError(f"a graph must be a JSON object, got {type(data).__name__}")
        if is_ui_workflow(data):
            if object_info is None:
                raise WorkflowFormatError(
                    "this is a UI-format workflow; converting it needs the server's /object_info "
                    "(pass object_info=...), or export it from ComfyUI with Workflow menu → Export (API)"
                )
            return cls(ui_to_api(data, object_info))
        if isinstance(data.get("graph"), Mapping) and "slots" in data:
            return cls(data["graph"])
        if isinstance(data.get("prompt"), Mapping) and "class_type" not in data["prompt"]:
            return cls(data["prompt"])  # a POST /prompt body
        return cls(data)

    @classmethod
    def load(cls, path: str | Path, *, object_info: Mapping[str, Any] | None = None) -> Graph:
        """Read a graph file (API, template or UI format; see :meth:`from_dict`)."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise WorkflowFormatError(f"cannot read graph file {path}: {exc}") from exc
        try:
            return cls.from_dict(data, object_info=object_info)
        except WorkflowFormatError as exc:
            raise WorkflowFormatError(f"{path}: {exc}") from exc

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """A deep copy in API format: the ``prompt`` of ``POST /prompt``."""
        copied: dict[str, dict[str, Any]] = json.loads(json.dumps(self._nodes))
        return copied

    # -- looking at it ------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._nodes)

    def __iter__(self) -> Iterator[Node]:
        return (self._node(node_id) for node_id in self._nodes)

    def __contains__(self, title: object) -> bool:
        return isinstance(title, str) and len(self._ids_for(title)) == 1

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Graph) and self._nodes == other._nodes

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<Graph {len(self._nodes)} nodes: {', '.join(self.titles[:6])}{' …' if len(self) > 6 else ''}>"

    @property
    def titles(self) -> list[str]:
        """Every node's title (its class_type when untitled), in graph order."""
        return [_title_or_class(node) for node in self._nodes.values()]

    @property
    def class_types(self) -> frozenset[str]:
        """The node classes the graph uses."""
        return frozenset(node["class_type"] for node in self._nodes.values())

    def node(self, title: str) -> Node:
        """The node titled ``title``; :class:`TemplateError` listing the known titles if none or several."""
        return self._node(self.node_id(title))

    def node_id(self, title: str) -> str:
        """The id of the node titled ``title`` (see :meth:`node`)."""
        ids = self._ids_for(title)
        if len(ids) == 1:
            return ids[0]
        known = ", ".join(repr(t) for t in dict.fromkeys(self.titles))
        if not ids:
            raise TemplateError(f"no node titled {title!r}; known titles: {known}")
        raise TemplateError(
            f"title {title!r} is ambiguous: nodes {', '.join('#' + i for i in ids)} carry it; "
            f"give each node a unique title (known titles: {known})"
        )

    def output_node_ids(self, object_info: Mapping[str, Any]) -> list[str]:
        """Ids of the nodes whose class is an output node according to ``/object_info``."""
        return [
            node_id
            for node_id, node in self._nodes.items()
            if (object_info.get(node["class_type"]) or {}).get("output_node") is True
        ]

    def model_references(self, object_info: Mapping[str, Any] | None = None) -> dict[str, set[str]]:
        """Model folder (``checkpoints``, ``loras``, ``vae_approx``, …) -> the file names the graph loads.

        Built-in loaders are known by class; with ``object_info`` a custom loader also counts when
        a combo input has a telling name (``ckpt_name``, ``lora_name``, …). The TAESD names of
        VAELoader (``taesd``, ``taesdxl``, ``taesd3``, ``taef1``) are listed under ``vae_approx``
        as those names: each stands for the ``<name>_encoder``/``<name>_decoder`` pair.
        """
        return model_references_of(self._nodes, object_info)

    def content_hash(self) -> str:
        """See :func:`comfy_orchestrator.graph.content_hash`: equal for graphs that differ only in ids/titles."""
        return content_hash(self)

    # -- changing it (into a new graph) -------------------------------------------------------

    def with_input(self, title: str, input_name: str, value: Any) -> Graph:
        """A new graph where input ``input_name`` of the node titled ``title`` is ``value``."""
        return self.with_inputs({title: {input_name: value}})

    def with_inputs(self, changes: Mapping[str, Mapping[str, Any]]) -> Graph:
        """A new graph with many inputs set: ``{title: {input_name: value}}``."""
        nodes = self.to_dict()
        for title, values in changes.items():
            node_id = self.node_id(title)
            for input_name, value in values.items():
                try:
                    nodes[node_id]["inputs"][input_name] = json.loads(json.dumps(value))
                except (TypeError, ValueError) as exc:
                    raise TemplateError(
                        f"value for {title!r}.{input_name} is not JSON-serialisable: {value!r}"
                    ) from exc
        return Graph._trusted(nodes)

    # -- internals ----------------------------------------------------------------------------

    @classmethod
    def _trusted(cls, nodes: dict[str, dict[str, Any]]) -> Graph:
        graph = cls.__new__(cls)
        graph._nodes = nodes
        return graph

    def _ids_for(self, title: str) -> list[str]:
        titled = [i for i, node in self._nodes.items() if _title(node) == title]
        if titled:
            return titled
        return [i for i, node in self._nodes.items() if _title(node) is None and node["class_type"] == title]

    def _node(self, node_id: str) -> Node:
        node = self._nodes[node_id]
        inputs = json.loads(json.dumps(node["inputs"]))
        return Node(node_id, node["class_type"], _title(node), MappingProxyType(inputs))


def _title(node: Mapping[str, Any]) -> str | None:
    meta = node.get("_meta")
    title = meta.get("title") if isinstance(meta, Mapping) else None
    return title if isinstance(title, str) else None


def _title_or_class(node: Mapping[str, Any]) -> str:
    title = _title(node)
    return title if title is not None else str(node["class_type"])


def _checked_nodes(nodes: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    if not isinstance(nodes, Mapping):
        raise WorkflowFormatError(f"an API-format graph is a JSON object of nodes, got {type(nodes).__name__}")
    try:
        copied: dict[str, Any] = json.loads(json.dumps({str(k): v for k, v in nodes.items()}))
    except (TypeError, ValueError) as exc:
        raise WorkflowFormatError(f"graph is not JSON-serialisable: {exc}") from exc
    for node_id, node in copied.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
            raise WorkflowFormatError(
                f"node {node_id!r} is not an API-format node (an object with a string 'class_type'); "
                "is this a UI-format workflow? Export it with Workflow menu → Export (API)"
            )
        inputs = node.setdefault("inputs", {})
        if not isinstance(inputs, dict):
            raise WorkflowFormatError(f"node {node_id!r}: 'inputs' must be an object")
        meta = node.get("_meta")
        if meta is not None and not isinstance(meta, dict):
            raise WorkflowFormatError(f"node {node_id!r}: '_meta' must be an object")
    return copied
