"""Graph: loading, lookup by title, immutability, model references and the content hash."""

from __future__ import annotations

import copy
import functools
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from comfy_orchestrator.errors import TemplateError, WorkflowFormatError
from comfy_orchestrator.graph import (
    Graph,
    Template,
    canonical_form,
    content_hash,
    graphs_dir,
    model_file_present,
)


def chain() -> dict[str, Any]:
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0},
              "_meta": {"title": "Empty Image"}},
        "2": {"class_type": "ImageScaleBy", "inputs": {"image": ["1", 0], "upscale_method": "bilinear",
                                                       "scale_by": 2.0}, "_meta": {"title": "Scale"}},
        "3": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "t"},
              "_meta": {"title": "Save Image"}},
    }


def renumbered(prompt: dict[str, Any], mapping: dict[str, str]) -> dict[str, Any]:
    """``prompt`` with node ids replaced through ``mapping`` (links too), in shuffled key order."""
    out: dict[str, Any] = {}
    items = list(prompt.items())
    random.Random(len(mapping)).shuffle(items)
    for node_id, node in items:
        node = copy.deepcopy(node)
        for name, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                node["inputs"][name] = [mapping[value[0]], value[1]]
        out[mapping[node_id]] = node
    return out


# -- construction and lookup ------------------------------------------------------------------


def test_to_dict_is_a_deep_copy() -> None:
    source = chain()
    graph = Graph.from_dict(source)
    source["1"]["inputs"]["width"] = 1
    out = graph.to_dict()
    out["2"]["inputs"]["scale_by"] = 9
    assert graph.to_dict()["1"]["inputs"]["width"] == 64
    assert graph.to_dict()["2"]["inputs"]["scale_by"] == 2.0
    assert graph == Graph(chain())
    assert graph != Graph({})
    assert len(graph) == 4


def test_node_lookup_by_title() -> None:
    graph = Graph(chain())
    node = graph.node("Scale")
    assert (node.id, node.class_type, node.title) == ("2", "ImageScaleBy", "Scale")
    assert node.inputs["image"] == ["1", 0]
    with pytest.raises(TypeError):
        node.inputs["scale_by"] = 3  # type: ignore[index]
    # An untitled node answers to its class_type.
    assert graph.node("ImageInvert").id == "3"
    assert "Scale" in graph
    assert "Nope" not in graph
    assert graph.titles == ["Empty Image", "Scale", "ImageInvert", "Save Image"]
    assert [n.id for n in graph] == ["1", "2", "3", "9"]


def test_unknown_and_ambiguous_titles_list_the_known_ones() -> None:
    graph = Graph(chain())
    with pytest.raises(TemplateError, match=r"no node titled 'Blur'.*'Empty Image', 'Scale'"):
        graph.node("Blur")
    data = chain()
    data["3"]["_meta"] = {"title": "Scale"}
    with pytest.raises(TemplateError, match=r"'Scale' is ambiguous: nodes #2, #3"):
        Graph(data).node("Scale")


def test_with_input_returns_a_new_graph() -> None:
    graph = Graph(chain())
    changed = graph.with_input("Empty Image", "width", 128)
    assert changed.node("Empty Image").inputs["width"] == 128
    assert graph.node("Empty Image").inputs["width"] == 64
    both = graph.with_inputs({"Empty Image": {"width": 8, "height": 16}, "Save Image": {"filename_prefix": "x"}})
    assert both.node("Empty Image").inputs["height"] == 16
    assert both.node("Save Image").inputs["filename_prefix"] == "x"
    with pytest.raises(TemplateError, match="not JSON-serialisable"):
        graph.with_input("Empty Image", "width", object())
    with pytest.raises(TemplateError, match="no node titled"):
        graph.with_input("Missing", "width", 1)


def test_class_types_and_outputs(object_info: dict[str, Any]) -> None:
    graph = Graph(chain())
    assert graph.class_types == {"EmptyImage", "ImageScaleBy", "ImageInvert", "SaveImage"}
    assert graph.output_node_ids(object_info) == ["9"]


@pytest.mark.parametrize(
    "bad",
    [[1, 2], {"1": {"inputs": {}}}, {"1": {"class_type": "X", "inputs": []}}, {"1": {"class_type": 3}},
     {"1": {"class_type": "X", "inputs": {}, "_meta": "t"}}],
)
def test_malformed_graphs_are_rejected(bad: Any) -> None:
    with pytest.raises(WorkflowFormatError):
        Graph.from_dict(bad)


def test_load_detects_the_format(tmp_path: Path, object_info: dict[str, Any]) -> None:
    api = tmp_path / "api.json"
    api.write_text(json.dumps(chain()))
    assert Graph.load(api) == Graph(chain())
    body = tmp_path / "body.json"
    body.write_text(json.dumps({"prompt": chain(), "client_id": "c"}))
    assert Graph.load(body) == Graph(chain())
    template = Template.load(graphs_dir() / "cpu_model_free_ops.json")
    assert Graph.load(graphs_dir() / "cpu_model_free_ops.json") == template.graph
    ui = tmp_path / "ui.json"
    ui.write_text(json.dumps({"nodes": [{"id": 1, "type": "EmptyImage", "widgets_values": [8, 8, 1, 0]}],
                              "links": []}))
    with pytest.raises(WorkflowFormatError, match="Export \\(API\\)"):
        Graph.load(ui)
    assert Graph.load(ui, object_info=object_info).node("EmptyImage").inputs["width"] == 8
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(WorkflowFormatError, match=r"broken\.json"):
        Graph.load(broken)
    with pytest.raises(WorkflowFormatError):
        Graph.load(tmp_path / "missing.json")


# -- model references -------------------------------------------------------------------------


def test_model_references_by_loader_input(object_info: dict[str, Any]) -> None:
    graph = Graph({
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15.safetensors"}},
        "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                     "lora_name": "style.safetensors",
                                                     "strength_model": 1.0, "strength_clip": 1.0}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": "taesd"}},
        "4": {"class_type": "VAELoader", "inputs": {"vae_name": "vae-ft-mse.safetensors"}},
        "5": {"class_type": "VAELoader", "inputs": {"vae_name": "pixel_space"}},
        "6": {"class_type": "TripleCLIPLoader", "inputs": {"clip_name1": "clip_l.safetensors",
                                                           "clip_name2": "clip_g.safetensors",
                                                           "clip_name3": ["7", 0]}},
        "8": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "4x.pth"}},
        "9": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "canny.safetensors"}},
        "10": {"class_type": "MyCustomLoader", "inputs": {"ckpt_name": "custom.ckpt", "seed": 1}},
    })
    expected = {
        "checkpoints": {"sd15.safetensors", "custom.ckpt"},
        "loras": {"style.safetensors"},
        "vae_approx": {"taesd"},
        "vae": {"vae-ft-mse.safetensors"},
        "text_encoders": {"clip_l.safetensors", "clip_g.safetensors"},
        "upscale_models": {"4x.pth"},
        "controlnet": {"canny.safetensors"},
    }
    assert graph.model_references() == expected
    # With /object_info a custom loader counts only where the server says the input is a combo.
    expected["checkpoints"] = {"sd15.safetensors"}
    assert graph.model_references(object_info) == expected


def test_model_file_present() -> None:
    assert model_file_present("vae_approx", "taesd", ["taesd_decoder.safetensors", "taesd_encoder.pth"])
    assert not model_file_present("vae_approx", "taesd", ["taesd_decoder.safetensors"])
    assert model_file_present("checkpoints", "sub/a.safetensors", ["sub\\a.safetensors"])
    assert not model_file_present("checkpoints", "a.safetensors", [])


# -- content hash -----------------------------------------------------------------------------


def test_hash_ignores_ids_titles_key_order_and_number_spelling() -> None:
    base = content_hash(Graph(chain()))
    moved = renumbered(chain(), {"1": "10", "2": "3", "3": "7", "9": "1"})
    assert content_hash(moved) == base
    untitled = {k: {kk: vv for kk, vv in v.items() if kk != "_meta"} for k, v in chain().items()}
    assert content_hash(untitled) == base
    spelled = chain()
    spelled["1"]["inputs"]["width"] = 64.0
    spelled["2"]["inputs"]["scale_by"] = 2
    spelled["1"]["inputs"] = dict(reversed(list(spelled["1"]["inputs"].items())))
    assert content_hash(spelled) == base
    assert Graph(chain()).content_hash() == base
    assert canonical_form(moved) == canonical_form(chain())
    assert list(canonical_form(chain())) == ["1", "2", "3", "4"]


def test_hash_changes_with_values_wiring_and_classes() -> None:
    base = content_hash(chain())
    changes: list[Callable[[dict[str, Any]], object]] = [
        lambda p: p["1"]["inputs"].__setitem__("width", 65),
        lambda p: p["1"]["inputs"].__setitem__("width", "64"),
        lambda p: p["2"]["inputs"].__setitem__("scale_by", 2.5),
        lambda p: p["9"]["inputs"].__setitem__("images", ["2", 0]),
        lambda p: p["3"].__setitem__("class_type", "ImageInvertOther"),
        lambda p: p["1"]["inputs"].pop("color"),
        lambda p: p.__setitem__("4", {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}}),
    ]
    for change in changes:
        changed = chain()
        change(changed)
        assert content_hash(changed) != base


def test_hash_of_graphs_with_twins_and_cycles_is_stable() -> None:
    twins = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "3": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}},
    }
    assert content_hash(twins) == content_hash(renumbered(twins, {"1": "2", "2": "1", "3": "3", "4": "4"}))
    cyclic = chain()
    cyclic["2"]["inputs"]["image"] = ["3", 0]
    assert content_hash(cyclic) == content_hash(copy.deepcopy(cyclic)) != content_hash(chain())
    dangling = chain()
    dangling["2"]["inputs"]["image"] = ["99", 0]
    assert content_hash(dangling) != content_hash(chain())


@functools.cache
def _template_prompts() -> list[dict[str, Any]]:
    return [Template.load(path).graph.to_dict() for path in sorted(graphs_dir().glob("*.json"))]


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_hash_is_invariant_under_any_renumbering(data: st.DataObject) -> None:
    prompt = data.draw(st.sampled_from(_template_prompts()))
    ids = list(prompt)
    new_ids = data.draw(st.permutations([str(i) for i in data.draw(
        st.lists(st.integers(1, 10_000), min_size=len(ids), max_size=len(ids), unique=True))]))
    moved = renumbered(prompt, dict(zip(ids, new_ids, strict=True)))
    assert content_hash(moved) == content_hash(prompt)
    assert canonical_form(moved) == canonical_form(prompt)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_hash_changes_when_any_constant_changes(data: st.DataObject) -> None:
    prompt = data.draw(st.sampled_from(_template_prompts()))
    constants = [(node_id, name, value) for node_id, node in prompt.items()
                 for name, value in node["inputs"].items() if not isinstance(value, list)]
    node_id, name, value = data.draw(st.sampled_from(constants))
    if isinstance(value, bool):
        new: Any = not value
    elif isinstance(value, int | float):
        new = value + data.draw(st.integers(1, 1000))
    else:
        new = value + data.draw(st.text(min_size=1, max_size=5))
    changed = copy.deepcopy(prompt)
    changed[node_id]["inputs"][name] = new
    assert content_hash(changed) != content_hash(prompt)


