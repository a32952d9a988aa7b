"""The walk behind :func:`check_prompt`: ComfyUI's per-node input checks, node by node from the outputs."""

from __future__ import annotations

import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Outcome", "Walker", "exception_error"]

# /object_info entries of nodes written against ComfyUI's V3 node API always carry all four keys;
# V1 nodes carry at most some of them. V3 nodes keep RETURN_TYPES in a list, V1 nodes in a tuple,
# which shows in the text of an IndexError.
_V3_KEYS = frozenset({"api_node", "deprecated", "experimental", "output_tooltips"})

# Nodes with their own input validator: the generic min/max/list checks are skipped for the named
# input and replaced by "does this file exist" (message as the node words it).
_FILE_INPUTS: dict[str, tuple[str, str]] = {
    "LoadImage": ("image", "Invalid image file: {}"),
    "LoadImageMask": ("image", "Invalid image file: {}"),
    "LoadImageOutput": ("image", "Invalid image file: {}"),
    "LoadLatent": ("latent", "Invalid latent file: {}"),
    "LoadAudio": ("audio", "Invalid audio file: {}"),
    "LoadVideo": ("file", "Invalid video file: {}"),
}
_ANNOTATIONS = ("[output]", "[input]", "[temp]")


@dataclass
class Outcome:
    valid: bool
    errors: list[dict[str, Any]]


class Walker:
    """Checks nodes from the outputs upstream, each node once (``validated`` is the memo)."""

    def __init__(
        self, prompt: Any, object_info: Mapping[str, Any], file_exists: Callable[[str], bool] | None
    ) -> None:
        self.prompt = prompt
        self.object_info = object_info
        self.file_exists = file_exists
        self.validated: dict[Any, Outcome] = {}
        self._in_progress: set[Any] = set()

    def check(self, node_id: Any) -> Outcome:
        if node_id in self.validated:
            return self.validated[node_id]
        if node_id in self._in_progress:
            # The server recurses around a cycle until Python gives up; the outcome is the same.
            raise RecursionError("maximum recursion depth exceeded")
        self._in_progress.add(node_id)
        try:
            outcome = self._check_inputs(node_id)
        finally:
            self._in_progress.discard(node_id)
        self.validated[node_id] = outcome
        return outcome

    def _check_inputs(self, node_id: Any) -> Outcome:
        node = self.prompt[node_id]
        inputs = node["inputs"]
        class_type = node["class_type"]
        spec = self.object_info[class_type].get("input") or {}
        required: Mapping[str, Any] = spec.get("required") or {}
        optional: Mapping[str, Any] = spec.get("optional") or {}
        file_input = _FILE_INPUTS.get(class_type)
        own_validator_args = (file_input[0],) if file_input else ()

        errors: list[dict[str, Any]] = []
        valid = True
        for name in dict.fromkeys([*required, *optional]):
            category = "required" if name in required else "optional"
            entry = required[name] if category == "required" else optional[name]
            input_type = entry[0]
            extra: Any = entry[1] if len(entry) > 1 else {}
            if name not in inputs:
                if category == "required":
                    errors.append(_error(
                        "required_input_missing", "Required input is missing", name, {"input_name": name}
                    ))
                continue
            value = inputs[name]
            config = [input_type, extra]
            if isinstance(value, list):
                if len(value) != 2:
                    errors.append(_error(
                        "bad_linked_input",
                        "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                        name,
                        {"input_name": name, "input_config": config, "received_value": value},
                    ))
                    continue
                source_id = value[0]
                source_class = self.prompt[source_id]["class_type"]
                received_type = self._return_types(source_class)[value[1]]
                if not _types_match(received_type, input_type):
                    errors.append(_error(
                        "return_type_mismatch",
                        "Return type mismatch between linked nodes",
                        f"{name}, received_type({received_type}) mismatch input_type({input_type})",
                        {
                            "input_name": name,
                            "input_config": config,
                            "received_type": received_type,
                            "linked_node": value,
                        },
                    ))
                    continue
                try:
                    if not self.check(source_id).valid:
                        valid = False
                except Exception as exc:
                    valid = False
                    self.validated[source_id] = Outcome(False, [exception_error(
                        "exception_during_inner_validation",
                        "Exception when validating inner node",
                        exc,
                        {"input_name": name, "input_config": config},
                        linked_node=value,
                    )])
                continue

            if isinstance(value, dict) and "__value__" in value:
                value = value["__value__"]
                inputs[name] = value
            try:
                value = _convert(value, input_type)
            except Exception as exc:
                errors.append(_error(
                    "invalid_input_type",
                    f"Failed to convert an input value to a {input_type} value",
                    f"{name}, {value}, {exc}",
                    {
                        "input_name": name,
                        "input_config": config,
                        "received_value": value,
                        "exception_message": str(exc),
                    },
                ))
                continue
            inputs[name] = value
            if name in own_validator_args:
                continue
            problem = _range_or_list_problem(name, value, input_type, extra, config)
            if problem is not None:
                errors.append(problem)

        if file_input is not None:
            errors.extend(self._file_problems(class_type, inputs, optional, required, file_input))
        return Outcome(valid and not errors, errors)

    def _return_types(self, class_type: str) -> Sequence[Any]:
        info = self.object_info[class_type]
        outputs = list(info.get("output") or [])
        return outputs if info.keys() >= _V3_KEYS else tuple(outputs)

    def _file_problems(
        self,
        class_type: str,
        inputs: Mapping[str, Any],
        optional: Mapping[str, Any],
        required: Mapping[str, Any],
        file_input: tuple[str, str],
    ) -> list[dict[str, Any]]:
        name, message = file_input
        if name not in inputs or (name not in required and name not in optional):
            return []
        value = inputs[name]
        # A linked input reaches the node's validator as None, which it cannot handle.
        if isinstance(value, list) and len(value) == 2:
            value = None
        entry = required.get(name) or optional.get(name)
        if self._exists(value, entry):
            return []
        return [_error(
            "custom_validation_failed",
            "Custom validation failed for node",
            f"{name} - {message.format(value)}",
            {"input_name": name},
        )]

    def _exists(self, value: Any, entry: Any) -> bool:
        plain = value
        annotation = None
        for marker in _ANNOTATIONS:
            if value.endswith(marker):  # AttributeError for non-strings, as on the server
                plain, annotation = value[: -len(marker)].strip(), marker
                break
        if self.file_exists is not None:
            return self.file_exists(value)
        if annotation in ("[output]", "[temp]") or "/" in plain or "\\" in plain:
            return True
        options = _combo_options(entry[0], entry[1] if len(entry) > 1 else {})
        return True if options is None else plain in options


def _convert(value: Any, input_type: Any) -> Any:
    if input_type == "INT":
        return int(value)
    if input_type == "FLOAT":
        return float(value)
    if input_type == "STRING":
        return str(value)
    if input_type == "BOOLEAN":
        return bool(value)
    return value


def _range_or_list_problem(
    name: str, value: Any, input_type: Any, extra: Any, config: list[Any]
) -> dict[str, Any] | None:
    if "min" in extra and value < extra["min"]:
        return _error(
            "value_smaller_than_min",
            "Value {} smaller than min of {}".format(value, extra["min"]),
            name,
            {"input_name": name, "input_config": config, "received_value": value},
        )
    if "max" in extra and value > extra["max"]:
        return _error(
            "value_bigger_than_max",
            "Value {} bigger than max of {}".format(value, extra["max"]),
            name,
            {"input_name": name, "input_config": config, "received_value": value},
        )
    # Only list-typed combos (V1 nodes) are checked by the server; "COMBO" inputs are not.
    if isinstance(input_type, list) and value not in input_type:
        shown: list[Any] | None = config
        if len(input_type) > 20:
            listing = f"(list of length {len(input_type)})"
            shown = None
        else:
            listing = str(input_type)
        return _error(
            "value_not_in_list",
            "Value not in list",
            f"{name}: '{value}' not in {listing}",
            {"input_name": name, "input_config": shown, "received_value": value},
        )
    return None


def _types_match(received: Any, expected: Any) -> bool:
    """ComfyUI's link type check: equal, ``*`` on either side, or comma-separated unions that overlap."""
    if received == expected or received == "*" or expected == "*":
        return True
    if not isinstance(received, str) or not isinstance(expected, str):
        return False
    got = {part.strip() for part in received.split(",")}
    want = {part.strip() for part in expected.split(",")}
    return bool(got & want)


def _combo_options(input_type: Any, extra: Any) -> list[Any] | None:
    if isinstance(input_type, list):
        return input_type
    if input_type == "COMBO" and isinstance(extra, Mapping) and isinstance(extra.get("options"), list):
        return list(extra["options"])
    return None


def _error(kind: str, message: str, details: str, extra_info: dict[str, Any]) -> dict[str, Any]:
    return {"type": kind, "message": message, "details": details, "extra_info": extra_info}


def exception_error(
    kind: str,
    message: str,
    exc: BaseException,
    extra_info: dict[str, Any],
    *,
    linked_node: Any = None,
) -> dict[str, Any]:
    exc_type = type(exc)
    module = exc_type.__module__
    type_name = exc_type.__qualname__ if module == "builtins" else f"{module}.{exc_type.__qualname__}"
    info = dict(extra_info)
    if kind == "exception_during_inner_validation":
        info["exception_message"] = str(exc)
    info["exception_type"] = type_name
    info["traceback"] = traceback.format_tb(exc.__traceback__)
    if kind == "exception_during_inner_validation":
        info["linked_node"] = linked_node
    return _error(kind, message, str(exc), info)
