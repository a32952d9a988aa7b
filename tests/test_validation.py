"""validate_prompt answers what ComfyUI's POST /prompt answers (recorded in invalid.json and histories)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from comfy_orchestrator.errors import GraphValidationError
from comfy_orchestrator.graph import Graph, check_prompt, model_input_folder, validate, validate_prompt
from tests.conftest import PROTOCOL_DIR, require_recordings

require_recordings()

INVALID = json.loads((PROTOCOL_DIR / "invalid.json").read_text())


@pytest.fixture(scope="module")
def object_info() -> dict[str, Any]:
    info: dict[str, Any] = json.loads((PROTOCOL_DIR / "object_info.json").read_text())
    return info


def chain() -> dict[str, Any]:
    """The graph the invalid.json cases were recorded against: the basic graph's SaveImage branch."""
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1,
                                                     "color": 3368652}},
        "2": {"class_type": "ImageScaleBy", "inputs": {"image": ["1", 0], "upscale_method": "bilinear",
                                                       "scale_by": 2.0}},
        "3": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}},
        "4": {"class_type": "ImageBlur", "inputs": {"image": ["3", 0], "blur_radius": 3, "sigma": 1.0}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "orch_basic"}},
    }


def _case(name: str) -> dict[str, Any]:
    p = chain()
    if name == "unknown_class":
        p["5"] = {"class_type": "NoSuchNode", "inputs": {}}
    elif name == "unknown_class_on_output_path":
        p["1"]["class_type"] = "NoSuchNode"
    elif name == "missing_input":
        del p["1"]["inputs"]["width"]
    elif name == "bad_link_missing_node":
        p["9"]["inputs"]["images"] = ["42", 0]
    elif name == "bad_link_bad_slot":
        p["9"]["inputs"]["images"] = ["3", 5]  # ImageInvert: a V1 node, RETURN_TYPES is a tuple
    elif name == "bad_link_type_mismatch":
        p["2"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
        p["9"]["inputs"]["images"] = ["2", 0]
    elif name == "value_below_min":
        p["1"]["inputs"]["width"] = 0
    elif name == "value_wrong_type":
        p["1"]["inputs"]["width"] = "abc"
    elif name == "bad_combo":
        p["2"]["inputs"]["upscale_method"] = "foo"
    elif name == "no_output_node":
        del p["9"]
    elif name == "missing_class_type":
        del p["1"]["class_type"]
    elif name == "empty_prompt":
        p = {}
    else:  # pragma: no cover
        raise AssertionError(name)
    return p


def _without_tracebacks(body: dict[str, Any]) -> dict[str, Any]:
    body = copy.deepcopy(body)
    for entry in body["node_errors"].values():
        for error in entry["errors"]:
            error["extra_info"].pop("traceback", None)
    return body


RECORDED_400 = [name for name, case in INVALID.items() if case["status"] == 400 and name != "no_prompt_key"]


def test_every_recorded_400_is_covered() -> None:
    # no_prompt_key (a body without "prompt") and malformed_json (a 500) are the HTTP layer's.
    assert set(INVALID) - set(RECORDED_400) == {"no_prompt_key", "malformed_json"}


@pytest.mark.parametrize("name", RECORDED_400)
def test_recorded_400_bodies_are_reproduced(name: str, object_info: dict[str, Any]) -> None:
    expected = INVALID[name]["body"]
    got = validate_prompt(_case(name), object_info)
    assert got is not None
    assert _without_tracebacks(got) == _without_tracebacks(expected)
    # Tracebacks cannot be ComfyUI's own frames; they are a list of strings where the server has one.
    for node_id, entry in expected["node_errors"].items():
        for mine, theirs in zip(got["node_errors"][node_id]["errors"], entry["errors"], strict=True):
            if "traceback" in theirs["extra_info"]:
                tb = mine["extra_info"]["traceback"]
                assert tb
                assert all(isinstance(line, str) for line in tb)
    json.dumps(got)  # the body is JSON as it is


def _history_prompts() -> list[tuple[str, dict[str, Any]]]:
    prompts = []
    for path in sorted(PROTOCOL_DIR.glob("*_history.json")):
        for entry in json.loads(path.read_text()).values():
            prompts.append((path.stem, entry["prompt"][2]))
    return prompts


@pytest.mark.parametrize(("name", "prompt"), _history_prompts())
def test_prompts_the_server_accepted_are_valid(name: str, prompt: dict[str, Any], object_info: dict[str, Any]) -> None:
    assert validate_prompt(prompt, object_info) is None


def test_basic_graph_with_every_output_is_valid(object_info: dict[str, Any]) -> None:
    entry = next(iter(json.loads((PROTOCOL_DIR / "basic_history.json").read_text()).values()))
    prompt, outputs = entry["prompt"][2], entry["prompt"][4]
    verdict = check_prompt(prompt, object_info)
    assert verdict.ok
    assert verdict.node_errors == {}
    assert sorted(verdict.outputs) == sorted(outputs)  # PreviewAny takes "*" from GetImageSize's INT


def test_recorded_float_min_quirk(object_info: dict[str, Any]) -> None:
    # model_free_nodes.json: PrimitiveFloat at float(min) is below the integer min (exact comparison).
    recorded = json.loads((PROTOCOL_DIR / "model_free_nodes.json").read_text())["failed_validation"]
    value = float(object_info["PrimitiveFloat"]["input"]["required"]["value"][1]["min"])
    prompt = {"1": {"class_type": "PrimitiveFloat", "inputs": {"value": value}},
              "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}
    body = validate_prompt(prompt, object_info)
    assert body is not None
    error = body["node_errors"]["1"]["errors"][0]
    assert f"{error['message']}: {error['details']}" == recorded["PrimitiveFloat"]


def _first_error(body: dict[str, Any] | None, node_id: str) -> dict[str, Any]:
    assert body is not None
    error: dict[str, Any] = body["node_errors"][node_id]["errors"][0]
    return error


def test_value_above_max(object_info: dict[str, Any]) -> None:
    p = chain()
    p["4"]["inputs"]["blur_radius"] = 32
    error = _first_error(validate_prompt(p, object_info), "4")
    assert error["type"] == "value_bigger_than_max"
    assert error["message"] == "Value 32 bigger than max of 31"
    assert error["extra_info"]["received_value"] == 32


def test_float_conversion_failure(object_info: dict[str, Any]) -> None:
    p = chain()
    p["4"]["inputs"]["sigma"] = "abc"
    error = _first_error(validate_prompt(p, object_info), "4")
    assert error["type"] == "invalid_input_type"
    assert error["message"] == "Failed to convert an input value to a FLOAT value"
    assert error["details"] == "sigma, abc, could not convert string to float: 'abc'"


def test_strings_are_converted_like_the_server_does(object_info: dict[str, Any]) -> None:
    p = chain()
    p["1"]["inputs"]["width"] = "64"
    p["2"]["inputs"]["scale_by"] = {"__value__": "2"}
    before = copy.deepcopy(p)
    verdict = check_prompt(p, object_info)
    assert verdict.ok
    assert verdict.prompt["1"]["inputs"]["width"] == 64
    assert verdict.prompt["2"]["inputs"]["scale_by"] == 2.0
    assert p == before  # pure


def test_long_combo_lists_are_not_echoed(object_info: dict[str, Any]) -> None:
    p: dict[str, Any] = {
        "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "2": {"class_type": "KSampler", "inputs": {
            "model": ["9", 0], "seed": 0, "steps": 1, "cfg": 1.0, "sampler_name": "nope",
            "scheduler": "normal", "positive": ["9", 0], "negative": ["9", 0], "latent_image": ["1", 0],
            "denoise": 1.0}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}},
    }
    body = validate_prompt(p, object_info)
    assert body is not None
    # KSampler's model link points at a missing node: the KeyError is reported one level down.
    error = body["node_errors"]["2"]["errors"][0]
    assert error["type"] == "exception_during_inner_validation"
    assert error["details"] == "'9'"
    assert error["extra_info"]["linked_node"] == ["2", 0]
    assert error["extra_info"]["input_name"] == "source"
    assert body["error"]["details"] == ""  # the output itself has no error of its own
    p["9"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "x.safetensors"}}
    p["2"]["inputs"].update(positive=["1", 0], negative=["1", 0])
    body = validate_prompt(p, object_info)
    assert body is not None
    errors = {e["extra_info"]["input_name"]: e for e in body["node_errors"]["2"]["errors"]}
    assert errors["sampler_name"]["details"].startswith("sampler_name: 'nope' not in (list of length ")
    assert errors["sampler_name"]["extra_info"]["input_config"] is None
    assert errors["positive"]["type"] == "return_type_mismatch"
    assert body["node_errors"]["9"]["errors"][0]["details"] == "ckpt_name: 'x.safetensors' not in []"


def test_bad_linked_input_and_v3_slot(object_info: dict[str, Any]) -> None:
    p = chain()
    p["3"]["inputs"]["image"] = ["2", 0, 1]
    error = _first_error(validate_prompt(p, object_info), "3")
    assert error["type"] == "bad_linked_input"
    assert error["extra_info"]["received_value"] == ["2", 0, 1]
    p = chain()
    p["9"]["inputs"]["images"] = ["4", 1]  # ImageBlur is a V3 node: its RETURN_TYPES is a list
    assert _first_error(validate_prompt(p, object_info), "9")["details"] == "list index out of range"
    p["9"]["inputs"]["images"] = ["3", 0.5]
    error = _first_error(validate_prompt(p, object_info), "9")
    assert error["details"] == "tuple indices must be integers or slices, not float"
    assert error["extra_info"]["exception_type"] == "TypeError"


def test_node_without_inputs_key(object_info: dict[str, Any]) -> None:
    p = chain()
    del p["9"]["inputs"]
    error = _first_error(validate_prompt(p, object_info), "9")
    assert (error["type"], error["details"]) == ("exception_during_validation", "'inputs'")


def test_one_good_output_is_enough_and_errors_still_listed(object_info: dict[str, Any]) -> None:
    p = chain()
    p["7"] = {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}}
    p["8"] = {"class_type": "ImageInvert", "inputs": {}}
    verdict = check_prompt(p, object_info)
    assert verdict.ok
    assert verdict.body() is None
    assert verdict.outputs == ["9"]
    assert verdict.node_errors["8"]["dependent_outputs"] == ["7"]
    assert validate_prompt(p, object_info) is None


def test_dependent_outputs_follow_the_servers_bookkeeping(object_info: dict[str, Any]) -> None:
    p = chain()
    p["1"]["inputs"]["width"] = 0
    p["7"] = {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}}
    body = validate_prompt(p, object_info)
    assert body is not None
    assert list(body["node_errors"]) == ["1"]
    assert body["node_errors"]["1"]["dependent_outputs"] == ["9", "7"]
    # The server appends every later failing output to every node already listed, even a node that
    # output does not depend on.
    p = chain()
    p["4"]["inputs"]["sigma"] = 0
    p["7"] = {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}
    p["1"]["inputs"]["color"] = -1
    body = validate_prompt(p, object_info)
    assert body is not None
    assert body["node_errors"]["4"]["dependent_outputs"] == ["9", "7"]
    assert body["node_errors"]["1"]["dependent_outputs"] == ["9", "7"]


def test_errors_in_one_node_come_in_object_info_order(object_info: dict[str, Any]) -> None:
    p = chain()
    p["1"]["inputs"] = {"height": 0, "color": "x"}
    body = validate_prompt(p, object_info)
    assert body is not None
    kinds = [(e["type"], e["extra_info"]["input_name"]) for e in body["node_errors"]["1"]["errors"]]
    assert kinds == [("required_input_missing", "width"), ("value_smaller_than_min", "height"),
                     ("required_input_missing", "batch_size"), ("invalid_input_type", "color")]


def test_partial_execution_targets(object_info: dict[str, Any]) -> None:
    p = chain()
    p["7"] = {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}}
    p["8"] = {"class_type": "ImageInvert", "inputs": {}}
    assert check_prompt(p, object_info, partial_execution_targets=["9"]).node_errors == {}
    verdict = check_prompt(p, object_info, partial_execution_targets=["7"])
    assert not verdict.ok
    assert list(verdict.node_errors) == ["8"]
    assert check_prompt(p, object_info, partial_execution_targets=[]).error == INVALID["no_output_node"][
        "body"]["error"]


def test_v3_combo_values_are_not_checked_by_the_server(object_info: dict[str, Any]) -> None:
    p: dict[str, Any] = {
        "1": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "missing.pth"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "3": {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["1", 0], "image": ["2", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "x"}},
    }
    # LoadImage has its own validator: its file must exist (the recorded server had no input files).
    body = validate_prompt(p, object_info)
    assert body is not None
    assert list(body["node_errors"]) == ["2"]
    assert _first_error(body, "2") == {
        "type": "custom_validation_failed", "message": "Custom validation failed for node",
        "details": "image - Invalid image file: example.png", "extra_info": {"input_name": "image"}}
    assert check_prompt(p, object_info, file_exists=lambda name: name == "example.png").ok
    info = copy.deepcopy(object_info)
    info["LoadImage"]["input"]["required"]["image"][0] = ["example.png"]
    assert validate_prompt(p, info) is None
    p["2"]["inputs"]["image"] = "made.png [output]"
    assert validate_prompt(p, object_info) is None


def test_cycles_fail_without_node_errors(object_info: dict[str, Any]) -> None:
    p = chain()
    p["2"]["inputs"]["image"] = ["3", 0]
    body = validate_prompt(p, object_info)
    assert body == {"error": {"type": "prompt_outputs_failed_validation",
                              "message": "Prompt outputs failed validation", "details": "", "extra_info": {}},
                    "node_errors": {}}


def test_non_object_prompt_raises_where_the_server_answers_500(object_info: dict[str, Any]) -> None:
    with pytest.raises(TypeError):
        validate_prompt({"1": 5}, object_info)
    assert validate_prompt({"1": ["not", "a", "node"]}, object_info) == {
        "error": {"type": "invalid_prompt",
                  "message": "Cannot execute because a node is missing the class_type property.",
                  "details": "Node ID '#1'", "extra_info": {}},
        "node_errors": {}}


def test_validate_raises_graph_validation_error(object_info: dict[str, Any]) -> None:
    validate(Graph(chain()), object_info)
    p = chain()
    p["1"]["inputs"]["width"] = 0
    with pytest.raises(GraphValidationError) as caught:
        validate(Graph(p), object_info)
    assert caught.value.error == INVALID["value_below_min"]["body"]["error"]
    assert caught.value.node_errors == INVALID["value_below_min"]["body"]["node_errors"]
    assert "width" in str(caught.value)
    with pytest.raises(GraphValidationError):
        validate(_case("unknown_class"), object_info)


def test_model_inputs_are_known_by_folder(object_info: dict[str, Any]) -> None:
    assert model_input_folder("CheckpointLoaderSimple", "ckpt_name") == "checkpoints"
    assert model_input_folder("KSampler", "seed", object_info) is None


def _write(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "graph.json"
    path.write_text(json.dumps(data))
    return path


def test_graph_loaded_from_file_validates(tmp_path: Path, object_info: dict[str, Any]) -> None:
    graph = Graph.load(_write(tmp_path, chain()))
    assert validate_prompt(graph.to_dict(), object_info) is None
