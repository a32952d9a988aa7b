"""Graphs: API-format prompts addressed by node title, templates with named slots, and local
validation against a server's ``/object_info`` that answers what ComfyUI's ``POST /prompt`` answers.

    Graph            an immutable API-format prompt (load: API, template or UI format)
    Node             one node of a Graph, read-only
    Template         a Graph plus named slots; bind(**values) -> Graph
    content_hash     sha256 of what a graph computes (ids, titles, key order ignored)
    validate_prompt  the 400 body ComfyUI would answer, or None
    validate         the same, raised as GraphValidationError
"""

from comfy_orchestrator.graph._checks import check_template_against_object_info
from comfy_orchestrator.graph._graph import Graph, Node
from comfy_orchestrator.graph._hash import canonical_form, content_hash
from comfy_orchestrator.graph._models import LOADER_INPUTS, model_file_present, model_input_folder
from comfy_orchestrator.graph._template import (
    GRAPHS_ENV,
    SlotTarget,
    Template,
    graphs_dir,
    load_templates,
)
from comfy_orchestrator.graph._validation import PromptCheck, check_prompt, validate, validate_prompt

__all__ = [
    "GRAPHS_ENV",
    "LOADER_INPUTS",
    "Graph",
    "Node",
    "PromptCheck",
    "SlotTarget",
    "Template",
    "canonical_form",
    "check_prompt",
    "check_template_against_object_info",
    "content_hash",
    "graphs_dir",
    "load_templates",
    "model_file_present",
    "model_input_folder",
    "validate",
    "validate_prompt",
]
