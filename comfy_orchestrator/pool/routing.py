"""Which backend can run which graph: capabilities read from ``/object_info``, requirements read from
the graph, and the difference between them in words.

A backend can run a graph when it has every node class the graph uses and every model file its
loaders name (checkpoints, diffusion models, VAEs, LoRAs, upscale models, text encoders…).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from comfy_orchestrator.errors import ComfyOrchestratorError
from comfy_orchestrator.graph import Graph, model_input_folder

__all__ = ["Capabilities", "NoCapableBackend", "Requirements", "model_of"]

_TAESD_NAMES = frozenset({"taesd", "taesdxl", "taesd3", "taef1"})
_NOT_A_FILE = frozenset({"None", "pixel_space", ""})
# The model a job is "about", for affinity: the first folder of these the graph loads from.
_AFFINITY_FOLDERS = ("checkpoints", "diffusion_models")


class NoCapableBackend(ComfyOrchestratorError):
    """No backend of the pool (among those allowed for the job) has what the graph needs.

    ``missing`` maps each backend considered to what it lacks, e.g.
    ``{"gpu-a": ["model checkpoints/sdxl.safetensors"], "gpu-b": ["node class FluxGuidance"]}``.
    """

    def __init__(self, missing: Mapping[str, list[str]], *, job_id: str | None = None) -> None:
        self.missing: dict[str, list[str]] = {name: list(items) for name, items in missing.items()}
        self.job_id = job_id
        if self.missing:
            where = "; ".join(f"{name} lacks {', '.join(items)}" for name, items in self.missing.items())
        else:
            where = "the pool has no backend to run it on"
        super().__init__(f"no backend can run this graph: {where}")


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What one server offers: its node classes and, per model folder, the files its loaders list."""

    node_classes: frozenset[str]
    models: Mapping[str, frozenset[str]]
    fetched_at: float = field(default_factory=time.monotonic)

    @classmethod
    def from_object_info(cls, object_info: Mapping[str, Any]) -> Capabilities:
        """Read node classes and the option lists of every loader input in ``/object_info``."""
        models: dict[str, set[str]] = {}
        for class_type, info in object_info.items():
            spec = info.get("input") if isinstance(info, Mapping) else None
            if not isinstance(spec, Mapping):
                continue
            for section in ("required", "optional"):
                inputs = spec.get(section)
                if not isinstance(inputs, Mapping):
                    continue
                for input_name, entry in inputs.items():
                    folder = model_input_folder(class_type, input_name, object_info)
                    if folder is None:
                        continue
                    for option in _options(entry):
                        if option in _NOT_A_FILE:
                            continue
                        if folder == "vae" and option in _TAESD_NAMES:
                            models.setdefault("vae_approx", set()).add(option)  # VAELoader offers the pair
                        else:
                            models.setdefault(folder, set()).add(_normal(option))
        return cls(
            node_classes=frozenset(object_info),
            models=MappingProxyType({folder: frozenset(files) for folder, files in models.items()}),
        )

    def missing(self, needs: Requirements) -> list[str]:
        """What of ``needs`` this server lacks, in words; empty when it can run the graph."""
        lacking = [f"node class {name}" for name in sorted(needs.node_classes - self.node_classes)]
        for folder, files in sorted(needs.models.items()):
            have = self.models.get(folder, frozenset())
            lacking += [f"model {folder}/{name}" for name in sorted(files) if _normal(name) not in have]
        return lacking

    def summary(self) -> dict[str, tuple[str, ...]]:
        """Model folder → sorted file names (for status pages)."""
        return {folder: tuple(sorted(files)) for folder, files in sorted(self.models.items())}


@dataclass(frozen=True, slots=True)
class Requirements:
    """What a graph needs from a server: node classes and model files by folder."""

    node_classes: frozenset[str]
    models: Mapping[str, frozenset[str]]

    @classmethod
    def of(cls, graph: Graph) -> Requirements:
        """What ``graph`` needs (its built-in loaders are known by class, see ``Graph.model_references``)."""
        return cls(
            node_classes=graph.class_types,
            models=MappingProxyType(
                {folder: frozenset(files) for folder, files in graph.model_references().items()}
            ),
        )

    @property
    def model(self) -> str | None:
        """See :func:`model_of`."""
        return model_of(self.models)


def model_of(models: Mapping[str, frozenset[str]]) -> str | None:
    """The main model of a graph (its checkpoint, else its diffusion model), for model affinity."""
    for folder in _AFFINITY_FOLDERS:
        files = models.get(folder)
        if files:
            return f"{folder}/{min(files)}"
    return None


def _options(entry: Any) -> list[str]:
    """The choices of a combo input spec: ``[[...options], {...}]`` or ``["COMBO", {"options": [...]}]``."""
    if not isinstance(entry, list | tuple) or not entry:
        return []
    kind = entry[0]
    if isinstance(kind, list | tuple):
        return [str(o) for o in kind if isinstance(o, str)]
    if kind == "COMBO" and len(entry) > 1 and isinstance(entry[1], Mapping):
        options = entry[1].get("options")
        if isinstance(options, list | tuple):
            return [str(o) for o in options if isinstance(o, str)]
    return []


def _normal(name: str) -> str:
    return name.replace("\\", "/")
