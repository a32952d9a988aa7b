"""Test doubles shipped with comfy_orchestrator, for this project's tests and for yours.

``FakeComfyUI`` is a ComfyUI server on a real socket that speaks the recorded protocol, executes
its nodes with Pillow (no model, no GPU), draws deterministic "samples" (``sampler_succeeds`` says
when KSampler gets the prompt's shape right) and fails on demand through ``Faults``::

    from comfy_orchestrator.testing import FakeComfyUI, NodeFailure

    async with FakeComfyUI(models={"checkpoints": ["sd15.safetensors"]}, step_delay=0.01) as server:
        server.faults.execution_error = NodeFailure.cpu_oom(node_class="KSampler")
        ...  # point your client at server.url
"""

from comfy_orchestrator.testing.double import FakeComfyUI
from comfy_orchestrator.testing.faults import Faults, HangMode, NodeFailure
from comfy_orchestrator.testing.nodes import NODES, object_info, upscale_factor
from comfy_orchestrator.testing.sampler import SampleRequest, expected_spec, render_sample, sampler_succeeds, wrong_spec
from comfy_orchestrator.testing.shapes import COLOURS, SHAPES, ShapeSpec, caption, draw_shape, parse_shape_prompt

__all__ = [
    "COLOURS",
    "NODES",
    "SHAPES",
    "FakeComfyUI",
    "Faults",
    "HangMode",
    "NodeFailure",
    "SampleRequest",
    "ShapeSpec",
    "caption",
    "draw_shape",
    "expected_spec",
    "object_info",
    "parse_shape_prompt",
    "render_sample",
    "sampler_succeeds",
    "upscale_factor",
    "wrong_spec",
]
