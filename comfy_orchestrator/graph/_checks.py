"""Checking a template against a server's ``/object_info``: would it run there, and do its slots fit?"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from comfy_orchestrator.graph._models import model_input_folder
from comfy_orchestrator.graph._template import SlotTarget, Template
from comfy_orchestrator.graph._validation import check_prompt

__all__ = ["check_template_against_object_info"]


def check_template_against_object_info(
    template: Template, object_info: Mapping[str, Any], *, ignore_missing_models: bool = True
) -> list[str]:
    """The problems a server with this ``/object_info`` would find in ``template`` (empty: none).

    Runs :func:`validate_prompt`'s checks on the template's graph with its defaults and, stricter
    than the server, checks every combo value (``COMBO`` inputs too) and that each slot's input
    exists for its class with a matching type. With ``ignore_missing_models`` (default) a model
    file or input image that is not in the server's lists is not a problem: a server without
    models lists none.
    """
    problems: list[str] = []
    prompt = template.graph.to_dict()
    verdict = check_prompt(
        prompt, object_info, file_exists=(lambda _name: True) if ignore_missing_models else None
    )
    if verdict.error is not None and not verdict.node_errors:
        problems.append(f"{verdict.error['message']} ({verdict.error['details']})")
    for node_id, entry in verdict.node_errors.items():
        node = prompt[node_id]
        for error in entry["errors"]:
            input_name = (error.get("extra_info") or {}).get("input_name")
            if (
                ignore_missing_models
                and error["type"] == "value_not_in_list"
                and _is_model_or_file_input(node["class_type"], input_name, object_info)
            ):
                continue
            problems.append(f"{_where(node, node_id)}: {error['message']}: {error['details']}")
    if any(node["class_type"] not in object_info for node in prompt.values()):
        return problems
    for node_id, node in prompt.items():
        problems.extend(_combo_problems(node_id, node, object_info, ignore_missing_models))
    for slot, targets in template.slots.items():
        for target in targets:
            problem = _slot_problem(template, slot, target, object_info)
            if problem:
                problems.append(problem)
    return list(dict.fromkeys(problems))


def _where(node: Mapping[str, Any], node_id: str) -> str:
    title = (node.get("_meta") or {}).get("title") or node["class_type"]
    return f"node {title!r} (#{node_id}, {node['class_type']})"


def _spec(class_type: str, input_name: str, object_info: Mapping[str, Any]) -> Any:
    inputs = (object_info.get(class_type) or {}).get("input") or {}
    return (inputs.get("required") or {}).get(input_name) or (inputs.get("optional") or {}).get(input_name)


def _is_model_or_file_input(class_type: str, input_name: Any, object_info: Mapping[str, Any]) -> bool:
    if not isinstance(input_name, str):
        return False
    if model_input_folder(class_type, input_name, object_info) is not None:
        return True
    spec = _spec(class_type, input_name, object_info)
    extra = spec[1] if spec and len(spec) > 1 and isinstance(spec[1], Mapping) else {}
    return any(extra.get(key) for key in ("image_upload", "video_upload", "audio_upload", "remote"))


def _combo_problems(
    node_id: str, node: Mapping[str, Any], object_info: Mapping[str, Any], ignore_missing_models: bool
) -> list[str]:
    problems = []
    for input_name, value in node["inputs"].items():
        spec = _spec(node["class_type"], input_name, object_info)
        if not spec or spec[0] != "COMBO" or isinstance(value, list):
            continue
        options = (spec[1] if len(spec) > 1 else {}).get("options")
        if not isinstance(options, list) or value in options:
            continue
        if ignore_missing_models and _is_model_or_file_input(node["class_type"], input_name, object_info):
            continue
        problems.append(f"{_where(node, node_id)}: {input_name}: {value!r} not in {options}")
    return problems


def _slot_problem(
    template: Template, slot: str, target: SlotTarget, object_info: Mapping[str, Any]
) -> str | None:
    node = template.graph.node(target.node)
    spec = _spec(node.class_type, target.input, object_info)
    if not spec:
        return f"slot {slot!r}: {node.class_type} has no input {target.input!r}"
    kind = spec[0]
    expected = {"INT": (int,), "FLOAT": (float,), "STRING": (str,), "BOOLEAN": (bool,)}.get(
        kind if isinstance(kind, str) else "", (str, int, float) if isinstance(kind, list) or kind == "COMBO" else ()
    )
    slot_type = template.slot_type(slot)
    if not expected:
        return f"slot {slot!r}: {node.class_type}.{target.input} is a {kind} socket, not a widget value"
    if slot_type not in expected:
        return f"slot {slot!r}: takes {slot_type.__name__} but {node.class_type}.{target.input} is {kind}"
    return None
