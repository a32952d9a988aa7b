"""The local side of the demo: a ComfyUI base directory with three tiny UNets.

The tiny UNet's text conditioning is ``LotusConditioning``, a fixed embedding: it has no text
encoder, so the prompt cannot steer the picture. The demo's template, ``graphs/cpu_tiny_prompt_txt2img``,
adds a ``Prompt`` node (a ``PrimitiveStringMultiline`` that feeds nothing) so that each graph carries
the prompt it is scored against: ComfyUI stores it in its history and in the PNG's metadata, and the
graph's content hash — the cache key — differs per prompt.
"""

from __future__ import annotations

from pathlib import Path

from comfy_orchestrator.demo.settings import LOCAL_MODELS
from comfy_orchestrator.notebook import prepare_tiny_models

__all__ = ["prepare_tiny_base"]


def prepare_tiny_base(base_dir: Path) -> list[str]:
    """Write the tiny models and two more UNets into ``base_dir`` (the notebooks' set,
    ``notebook.prepare_tiny_models``); returns the UNet file names, in the order they are compared.
    Blocking (about a second per model)."""
    prepare_tiny_models(base_dir, variants=len(LOCAL_MODELS) - 1)
    return list(LOCAL_MODELS)
