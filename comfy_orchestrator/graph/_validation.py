"""Local validation of an API-format prompt, answering exactly what ComfyUI's ``POST /prompt`` answers.

This is a re-implementation (not a copy) of the checks ComfyUI runs before it queues a prompt
(``execution.validate_prompt`` / ``validate_inputs``), driven by the server's ``/object_info``
instead of its node classes. The rules it follows, in the server's own order:

1. every node needs ``class_type`` and a class the server knows (the first offender, in prompt
   order, is ``invalid_prompt``);
2. at least one output node (``prompt_no_outputs``);
3. from every output node, walk the links upstream and check each node once: required inputs
   present, links ``[node_id, slot]`` of length 2 that point at a node and slot that exist and
   whose type fits, constants that convert to the input's INT/FLOAT/STRING/BOOLEAN type, within
   min/max, and inside the list of a list-typed combo;
4. a problem raised while following a link (a missing node, a bad slot) is reported as ComfyUI
   reports the Python exception it hits there (``exception_during_validation`` on the node that
   was being checked from an output, ``exception_during_inner_validation`` one level down).

Known, documented differences from the server:

* ``traceback`` fields hold this module's own frames (from ``traceback.format_tb``), not ComfyUI's.
* The server walks outputs and inputs in ``set`` order, which changes from process to process;
  here outputs go in prompt order and inputs in ``/object_info`` order. So the order of entries
  inside ``errors`` / ``dependent_outputs`` and of lines in ``details`` can differ, and so can one
  server quirk that depends on it: after an output fails, *every* node already found faulty gets
  that output appended to its ``dependent_outputs``, whether it feeds it or not.
* Custom validators: the file loaders (LoadImage, LoadImageMask, LoadImageOutput, LoadLatent,
  LoadAudio, LoadVideo) are reproduced, with file existence answered by ``file_exists`` or, by
  default, by the file list the server put in ``/object_info`` (names in a subfolder or marked
  ``[output]``/``[temp]`` are assumed to exist: that list cannot tell); the validators of paid API
  nodes (Kling, BFL, Tripo) are not.
* A prompt that is not a JSON object, or a node that is neither an object nor a list, makes the
  server answer 500; here the same Python error (``TypeError``, ...) is raised.

Compared with a running ComfyUI 0.3.75 on 60 prompts (every case above and the templates in
``graphs/``): identical bodies and status, but for tracebacks and the caveats listed.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from comfy_orchestrator.errors import GraphValidationError
from comfy_orchestrator.graph._graph import Graph
from comfy_orchestrator.graph._walker import Outcome, Walker, exception_error

__all__ = ["PromptCheck", "check_prompt", "validate", "validate_prompt"]


@dataclass(frozen=True)
class PromptCheck:
    """Everything ComfyUI decides when it validates a prompt.

    ``ok`` is the server's verdict: False answers 400 with ``{"error": error, "node_errors":
    node_errors}``; True answers 200 with ``{"prompt_id", "number", "node_errors": node_errors}``
    (``node_errors`` is then non-empty only when some outputs failed and others did not: the
    server runs the good ``outputs`` and ignores the rest). ``prompt`` is the prompt as the server
    keeps it afterwards: a JSON copy with constants converted to their input's type.
    """

    ok: bool
    error: dict[str, Any] | None
    outputs: list[str]
    node_errors: dict[str, Any]
    prompt: Any = field(repr=False)

    def body(self) -> dict[str, Any] | None:
        """The 400 body ``{"error", "node_errors"}``, or None when the server accepts the prompt."""
        if self.ok:
            return None
        return {"error": self.error, "node_errors": self.node_errors}


def validate_prompt(prompt: Mapping[str, Any], object_info: Mapping[str, Any]) -> dict[str, Any] | None:
    """The body ComfyUI's ``POST /prompt`` answers with its 400 for ``prompt``, or None when it is accepted.

    ``object_info`` is the server's ``GET /object_info``. Pure: neither argument is changed.
    See :func:`check_prompt` for the full verdict (accepted outputs, converted prompt).
    """
    return check_prompt(prompt, object_info).body()


def validate(graph: Graph | Mapping[str, Any], object_info: Mapping[str, Any]) -> None:
    """Raise :class:`GraphValidationError` (carrying the server-shaped body) when ``graph`` would be rejected."""
    data = graph.to_dict() if isinstance(graph, Graph) else graph
    body = validate_prompt(data, object_info)
    if body is not None:
        raise GraphValidationError(body["error"], body["node_errors"])


def check_prompt(
    prompt: Any,
    object_info: Mapping[str, Any],
    *,
    partial_execution_targets: Sequence[str] | None = None,
    file_exists: Callable[[str], bool] | None = None,
) -> PromptCheck:
    """Validate ``prompt`` as ComfyUI does and return the whole verdict.

    ``partial_execution_targets`` is the optional field of the same name of ``POST /prompt``: only
    those output nodes count. ``file_exists(name)`` answers whether a loader's file (``"a.png"``,
    ``"sub/a.png"``, ``"a.png [output]"``) exists; by default a plain name must be in the file
    list of the node's ``/object_info`` entry and other forms are assumed to exist.

    A prompt that is not JSON-serialisable raises ``TypeError``/``ValueError``; so does one the
    server would answer with a 500 (see the module docstring).
    """
    work = json.loads(json.dumps(prompt))
    outputs: list[str] = []
    for node_id in work:
        node = work[node_id]
        if "class_type" not in node:
            return _fail(_top_error(
                "invalid_prompt",
                "Cannot execute because a node is missing the class_type property.",
                f"Node ID '#{node_id}'",
            ), work)
        class_type = node["class_type"]
        info = object_info.get(class_type)
        if info is None:
            return _fail(_top_error(
                "invalid_prompt",
                f"Cannot execute because node {class_type} does not exist.",
                f"Node ID '#{node_id}'",
            ), work)
        if info.get("output_node") is True and (
            partial_execution_targets is None or node_id in partial_execution_targets
        ):
            outputs.append(node_id)
    if not outputs:
        return _fail(_top_error("prompt_no_outputs", "Prompt has no outputs", ""), work)

    walker = Walker(work, object_info, file_exists)
    good: list[str] = []
    failed: list[tuple[str, list[dict[str, Any]]]] = []
    node_errors: dict[str, Any] = {}
    for output_id in outputs:
        try:
            outcome = walker.check(output_id)
        except Exception as exc:
            outcome = Outcome(False, [exception_error(
                "exception_during_validation", "Exception when validating node", exc, {}
            )])
            walker.validated[output_id] = outcome
        if outcome.valid:
            good.append(output_id)
            continue
        failed.append((output_id, outcome.errors))
        # As the server does: after each failed output, every node checked so far that carries
        # errors of its own is listed (once), and this output is added to its dependent_outputs.
        for node_id, result in walker.validated.items():
            if result.valid or not result.errors:
                continue
            if node_id not in node_errors:
                node_errors[node_id] = {
                    "errors": result.errors,
                    "dependent_outputs": [],
                    "class_type": work[node_id]["class_type"],
                }
            node_errors[node_id]["dependent_outputs"].append(output_id)

    # Errors quote /object_info (input_config); copy them so callers cannot change object_info through them.
    node_errors = copy.deepcopy(node_errors)
    if good:
        return PromptCheck(True, None, good, node_errors, work)
    details = "\n".join(f"{e['message']}: {e['details']}" for _, errors in failed for e in errors)
    error = _top_error("prompt_outputs_failed_validation", "Prompt outputs failed validation", details)
    return PromptCheck(False, error, [], node_errors, work)


def _top_error(kind: str, message: str, details: str) -> dict[str, Any]:
    return {"type": kind, "message": message, "details": details, "extra_info": {}}


def _fail(error: dict[str, Any], prompt: Any) -> PromptCheck:
    return PromptCheck(False, error, [], {}, prompt)
