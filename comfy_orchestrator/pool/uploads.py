"""Input files of a job: stored on a backend under a content-addressed name, and the graph's image
loaders pointed at that name."""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from typing import Any

from comfy_orchestrator.pool.jobs import Upload

__all__ = ["IMAGE_LOADERS", "rewrite_inputs", "stored_filename"]

# Loader class -> the input that names a file of ComfyUI's input/ folder.
IMAGE_LOADERS: Mapping[str, str] = {"LoadImage": "image", "LoadImageMask": "image"}


def stored_filename(upload: Upload) -> str:
    """``cat.png`` with sha256 ``ab12…`` is stored as ``cat-ab12….png``: one file per content, so two
    jobs uploading different bytes under the same name never overwrite each other."""
    stem, ext = posixpath.splitext(posixpath.basename(upload.name.replace("\\", "/")))
    return f"{stem or 'upload'}-{upload.sha256[:16]}{ext or '.png'}"


def rewrite_inputs(nodes: Mapping[str, Mapping[str, Any]], stored: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """A copy of ``nodes`` whose image-loader inputs naming a key of ``stored`` name its value instead."""
    out: dict[str, dict[str, Any]] = {}
    for node_id, node in nodes.items():
        copy = dict(node)
        input_name = IMAGE_LOADERS.get(str(node.get("class_type")))
        inputs = node.get("inputs")
        if input_name is not None and isinstance(inputs, Mapping):
            value = inputs.get(input_name)
            if isinstance(value, str) and value in stored:
                copy["inputs"] = {**inputs, input_name: stored[value]}
        out[node_id] = copy
    return out
