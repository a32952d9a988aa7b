"""Templates: an API-format graph plus named slots (``prompt``, ``seed``, …) that say which inputs to set.

A template file is JSON::

    {"name": "sd15_txt2img", "description": "…",
     "slots": {"prompt": {"node": "Positive Prompt", "input": "text"},
               "seed": [{"node": "KSampler", "input": "seed"}, {"node": "Hires KSampler", "input": "seed"}]},
     "graph": {API-format graph, every node with a unique _meta.title}}

Binding a slot sets every input it names; each slot's type is that of its current value
(``int``, ``float`` — which also takes ints —, ``str`` or ``bool``).
"""

from __future__ import annotations

import json
import numbers
import os
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

from comfy_orchestrator.errors import TemplateError, WorkflowFormatError
from comfy_orchestrator.graph._graph import Graph

__all__ = [
    "GRAPHS_ENV",
    "SlotTarget",
    "Template",
    "graphs_dir",
    "load_templates",
]

GRAPHS_ENV = "COMFY_ORCH_GRAPHS"
"""Environment variable naming the template directory when none is passed explicitly."""

_SLOT_TYPES: tuple[type, ...] = (bool, int, float, str)


class SlotTarget(NamedTuple):
    """One input a slot sets: the node's title and the input's name."""

    node: str
    input: str


class Template:
    """A graph with named slots. Immutable; :meth:`bind` returns a new :class:`Graph`."""

    __slots__ = ("_defaults", "_description", "_graph", "_name", "_slots", "_types")

    def __init__(
        self,
        name: str,
        graph: Graph,
        slots: Mapping[str, list[SlotTarget] | tuple[SlotTarget, ...]],
        *,
        description: str = "",
    ) -> None:
        if not name:
            raise TemplateError("a template needs a name")
        titles = graph.titles
        repeated = sorted({t for t in titles if titles.count(t) > 1})
        if repeated:
            raise TemplateError(f"template {name!r}: node titles must be unique, repeated: {repeated}")
        self._name = name
        self._description = description
        self._graph = graph
        self._slots: Mapping[str, tuple[SlotTarget, ...]] = MappingProxyType(
            {slot: tuple(SlotTarget(*t) for t in targets) for slot, targets in slots.items()}
        )
        self._types: dict[str, type] = {}
        defaults: dict[str, Any] = {}
        for slot, targets in self._slots.items():
            if not targets:
                raise TemplateError(f"template {name!r}: slot {slot!r} names no input")
            kinds = set()
            for target in targets:
                value = self._current(slot, target)
                kinds.add(_kind(value))
                defaults.setdefault(slot, value)
            if len(kinds) > 1 and kinds != {int, float}:
                raise TemplateError(
                    f"template {name!r}: slot {slot!r} sets inputs of different types "
                    f"({', '.join(sorted(k.__name__ for k in kinds))})"
                )
            self._types[slot] = float if float in kinds else kinds.pop()
        self._defaults = MappingProxyType(defaults)

    # -- files --------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "template") -> Template:
        """A template from its JSON form (see the module docstring)."""
        if not isinstance(data, Mapping):
            raise TemplateError(f"{source}: a template is a JSON object")
        missing = [key for key in ("name", "slots", "graph") if key not in data]
        if missing:
            raise TemplateError(f"{source}: a template needs {', '.join(missing)}")
        if not isinstance(data["slots"], Mapping) or not isinstance(data["graph"], Mapping):
            raise TemplateError(f"{source}: 'slots' and 'graph' must be JSON objects")
        try:
            graph = Graph(data["graph"])
        except WorkflowFormatError as exc:
            raise TemplateError(f"{source}: {exc}") from exc
        slots: dict[str, list[SlotTarget]] = {}
        for slot, raw in data["slots"].items():
            targets = raw if isinstance(raw, list) else [raw]
            parsed = []
            for target in targets:
                if not (
                    isinstance(target, Mapping)
                    and isinstance(target.get("node"), str)
                    and isinstance(target.get("input"), str)
                ):
                    raise TemplateError(f"{source}: slot {slot!r} target must be {{'node', 'input'}}: {target!r}")
                parsed.append(SlotTarget(target["node"], target["input"]))
            slots[str(slot)] = parsed
        try:
            return cls(str(data["name"]), graph, slots, description=str(data.get("description", "")))
        except TemplateError as exc:
            raise TemplateError(f"{source}: {exc}") from exc

    @classmethod
    def load(cls, path: str | Path) -> Template:
        """Read a template file."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise TemplateError(f"cannot read template {path}: {exc}") from exc
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """The template's JSON form."""
        slots: dict[str, Any] = {}
        for slot, targets in self._slots.items():
            items = [{"node": t.node, "input": t.input} for t in targets]
            slots[slot] = items[0] if len(items) == 1 else items
        return {"name": self._name, "description": self._description, "slots": slots,
                "graph": self._graph.to_dict()}

    # -- what it is ---------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def description(self) -> str:
        return self._description

    @property
    def graph(self) -> Graph:
        """The graph with every slot at its default."""
        return self._graph

    @property
    def slots(self) -> Mapping[str, tuple[SlotTarget, ...]]:
        """Slot name -> the (title, input) pairs it sets."""
        return self._slots

    @property
    def defaults(self) -> Mapping[str, Any]:
        """Slot name -> its value in the template's graph."""
        return self._defaults

    def slot_type(self, slot: str) -> type:
        """The Python type a slot takes (``float`` slots also take ``int``)."""
        self._check_slot(slot)
        return self._types[slot]

    def __repr__(self) -> str:
        return f"<Template {self._name!r} slots={list(self._slots)}>"

    # -- binding ------------------------------------------------------------------------------

    def bind(self, params: Mapping[str, Any] | None = None, /, **kwargs: Any) -> Graph:
        """A new graph with the given slots set: ``bind(prompt="a cat", seed=1)`` or ``bind({"seed": 1})``."""
        values = {**(params or {}), **kwargs}
        changes: dict[str, dict[str, Any]] = {}
        for slot, value in values.items():
            self._check_slot(slot)
            checked = self._checked_value(slot, value)
            for target in self._slots[slot]:
                changes.setdefault(target.node, {})[target.input] = checked
        return self._graph.with_inputs(changes)

    def _check_slot(self, slot: str) -> None:
        if slot not in self._slots:
            raise TemplateError(
                f"template {self._name!r} has no slot {slot!r}; valid slots: {', '.join(self._slots)}"
            )

    def _checked_value(self, slot: str, value: Any) -> Any:
        want = self._types[slot]
        if want is bool:
            ok = isinstance(value, bool)
        elif want is int:
            ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
            value = int(value) if ok else value
        elif want is float:
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
            value = float(value) if ok else value
        else:
            ok = isinstance(value, str)
        if not ok:
            raise TemplateError(
                f"template {self._name!r}: slot {slot!r} takes {want.__name__}, "
                f"got {type(value).__name__} {value!r:.80}"
            )
        return value

    def _current(self, slot: str, target: SlotTarget) -> Any:
        try:
            node = self._graph.node(target.node)
        except TemplateError as exc:
            raise TemplateError(f"slot {slot!r}: {exc}") from exc
        if target.input not in node.inputs:
            raise TemplateError(
                f"slot {slot!r}: node {target.node!r} has no input {target.input!r} "
                f"(it has {', '.join(node.inputs)})"
            )
        value = node.inputs[target.input]
        if not isinstance(value, _SLOT_TYPES):
            raise TemplateError(
                f"slot {slot!r}: {target.node!r}.{target.input} holds {value!r:.80}, "
                "not a constant a slot can set (a link?)"
            )
        return value


def _kind(value: Any) -> type:
    return bool if isinstance(value, bool) else type(value)


def graphs_dir(path: str | Path | None = None) -> Path:
    """The template directory: ``path``, else ``$COMFY_ORCH_GRAPHS``, else the repository's ``graphs/``."""
    if path is not None:
        chosen = Path(path)
    elif os.environ.get(GRAPHS_ENV):
        chosen = Path(os.environ[GRAPHS_ENV])
    else:
        chosen = Path(__file__).resolve().parents[2] / "graphs"
    if not chosen.is_dir():
        raise TemplateError(
            f"template directory {chosen} does not exist; pass one explicitly or set {GRAPHS_ENV}"
        )
    return chosen


def load_templates(directory: str | Path | None = None) -> dict[str, Template]:
    """Every ``*.json`` template in ``directory`` (default: :func:`graphs_dir`), by template name."""
    templates: dict[str, Template] = {}
    for path in sorted(graphs_dir(directory).glob("*.json")):
        template = Template.load(path)
        if template.name in templates:
            raise TemplateError(f"two templates are named {template.name!r} (second: {path})")
        templates[template.name] = template
    return templates
