"""Every template in graphs/ loads, binds every slot and fits the recorded /object_info.

Model files and input images are not checked against the server's lists: the recording server had
no models, so ``check_template_against_object_info`` ignores ``value_not_in_list`` for loader
inputs (and the loaders' own file checks) by default.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from comfy_orchestrator.errors import TemplateError
from comfy_orchestrator.graph import (
    GRAPHS_ENV,
    Graph,
    SlotTarget,
    Template,
    check_template_against_object_info,
    content_hash,
    graphs_dir,
    load_templates,
    validate_prompt,
)
from tests.conftest import GRAPHS_DIR

TEMPLATE_FILES = sorted(GRAPHS_DIR.glob("*.json"))

# The templates this module owns, with the slots each must offer.
REQUIRED_SLOTS = {
    "sd15_txt2img": {"prompt", "negative", "seed", "steps", "cfg", "sampler", "scheduler", "checkpoint",
                     "width", "height", "batch_size", "filename_prefix"},
    "sdxl_txt2img": {"prompt", "negative", "seed", "steps", "cfg", "sampler", "scheduler", "checkpoint",
                     "width", "height", "batch_size", "filename_prefix"},
    "sd35_txt2img": {"prompt", "negative", "seed", "steps", "cfg", "sampler", "scheduler", "checkpoint",
                     "width", "height", "batch_size", "filename_prefix", "shift"},
    "flux_txt2img": {"prompt", "seed", "steps", "guidance", "sampler", "scheduler", "unet", "width",
                     "height", "batch_size", "filename_prefix"},
    "sd15_img2img": {"prompt", "negative", "seed", "steps", "cfg", "sampler", "scheduler", "checkpoint",
                     "denoise", "input_image", "filename_prefix"},
    "sd15_style_edit": {"prompt", "negative", "seed", "steps", "cfg", "sampler", "scheduler", "checkpoint",
                        "denoise", "input_image", "filename_prefix"},
    "sd15_hires_fix": {"prompt", "negative", "seed", "steps", "cfg", "sampler", "scheduler", "checkpoint",
                       "denoise", "width", "height", "filename_prefix"},
    "model_upscale": {"input_image", "upscale_model", "filename_prefix"},
    "cpu_model_free_ops": {"color", "width", "height", "scale_by", "blur_radius", "filename_prefix"},
}




def _changed(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2
    return f"{value}-changed"


@pytest.mark.parametrize("path", TEMPLATE_FILES, ids=lambda p: p.stem)
def test_template_loads_and_is_titled(path: Path) -> None:
    template = Template.load(path)
    assert template.name == path.stem
    assert template.description
    assert template.slots
    titles = template.graph.titles
    assert len(titles) == len(set(titles)) == len(template.graph)
    assert all(node.title for node in template.graph), "every node carries a _meta.title"
    assert Template.from_dict(template.to_dict()).graph == template.graph


@pytest.mark.parametrize("path", TEMPLATE_FILES, ids=lambda p: p.stem)
def test_template_binds_every_slot(path: Path) -> None:
    template = Template.load(path)
    before = template.graph.to_dict()
    for slot, targets in template.slots.items():
        value = _changed(template.defaults[slot])
        graph = template.bind({slot: value})
        assert isinstance(graph, Graph)
        assert graph is not template.graph
        for target in targets:
            assert graph.node(target.node).inputs[target.input] == value
        # nothing else moved
        touched = {(graph.node_id(t.node), t.input) for t in targets}
        for node in graph:
            for name, current in node.inputs.items():
                if (node.id, name) not in touched:
                    assert current == before[node.id]["inputs"][name]
    assert template.graph.to_dict() == before
    assert template.bind() == template.graph
    assert template.bind(**dict(template.defaults)) == template.graph


@pytest.mark.parametrize("path", TEMPLATE_FILES, ids=lambda p: p.stem)
def test_template_fits_object_info(path: Path, object_info: dict[str, Any]) -> None:
    template = Template.load(path)
    assert check_template_against_object_info(template, object_info) == []
    assert template.graph.output_node_ids(object_info)


def test_the_owned_templates_exist_with_their_slots() -> None:
    templates = load_templates(GRAPHS_DIR)
    for name, slots in REQUIRED_SLOTS.items():
        assert name in templates, name
        missing = slots - set(templates[name].slots)
        assert not missing, f"{name} lacks slots {missing}"


def test_model_free_template_is_valid_as_is(object_info: dict[str, Any]) -> None:
    template = load_templates(GRAPHS_DIR)["cpu_model_free_ops"]
    graph = template.bind(color=0x123456, width=32, height=48, scale_by=1.5, blur_radius=2,
                          filename_prefix="test_ops")
    assert validate_prompt(graph.to_dict(), object_info) is None
    assert graph.model_references() == {}
    body = validate_prompt(template.bind(blur_radius=99).to_dict(), object_info)
    assert body is not None
    assert body["node_errors"]["4"]["errors"][0]["type"] == "value_bigger_than_max"


def test_realistic_bindings_still_fit(object_info: dict[str, Any]) -> None:
    templates = load_templates(GRAPHS_DIR)
    sdxl = templates["sdxl_txt2img"]
    bound = Template("bound", sdxl.bind(prompt="a cat", seed=2**63, steps=40, cfg=5, sampler="dpmpp_2m_sde",
                                       scheduler="karras", width=832, height=1216), sdxl.slots)
    assert check_template_against_object_info(bound, object_info) == []
    assert bound.graph.node("KSampler").inputs["cfg"] == 5.0
    assert isinstance(bound.graph.node("KSampler").inputs["cfg"], float)
    flux = templates["flux_txt2img"].bind(unet="flux1-schnell.safetensors", steps=4)
    assert flux.model_references()["diffusion_models"] == {"flux1-schnell.safetensors"}
    assert flux.model_references()["vae"] == {"ae.safetensors"}
    assert templates["sd35_txt2img"].graph.model_references()["text_encoders"] == {
        "clip_l.safetensors", "clip_g.safetensors", "t5xxl_fp16.safetensors"}


def test_hires_fix_seed_drives_both_passes() -> None:
    hires = load_templates(GRAPHS_DIR)["sd15_hires_fix"]
    assert set(hires.slots["seed"]) == {SlotTarget("KSampler", "seed"), SlotTarget("Hires KSampler", "seed")}
    graph = hires.bind(seed=7)
    assert graph.node("KSampler").inputs["seed"] == graph.node("Hires KSampler").inputs["seed"] == 7


def test_bind_errors_name_the_slot() -> None:
    template = load_templates(GRAPHS_DIR)["sd15_txt2img"]
    with pytest.raises(TemplateError, match=r"no slot 'promt'; valid slots: prompt, negative"):
        template.bind(promt="x")
    with pytest.raises(TemplateError, match="slot 'seed' takes int, got str"):
        template.bind(seed="1")
    with pytest.raises(TemplateError, match="slot 'steps' takes int, got bool"):
        template.bind(steps=True)
    with pytest.raises(TemplateError, match="slot 'cfg' takes float"):
        template.bind({"cfg": "high"})
    with pytest.raises(TemplateError, match="slot 'prompt' takes str"):
        template.bind(prompt=None)
    assert template.slot_type("cfg") is float
    graph = template.bind({"prompt": "a"}, prompt="b")
    assert graph.node("Positive Prompt").inputs["text"] == "b"
    assert content_hash(template.bind(seed=1)) != content_hash(template.bind(seed=2))


def _template(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "t",
        "description": "d",
        "slots": {"width": {"node": "Empty Image", "input": "width"}},
        "graph": {
            "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0},
                  "_meta": {"title": "Empty Image"}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "t"},
                  "_meta": {"title": "Save Image"}},
        },
    }
    data.update(overrides)
    return data


@pytest.mark.parametrize(
    ("slots", "message"),
    [
        ({"w": {"node": "Nope", "input": "width"}}, "no node titled 'Nope'"),
        ({"w": {"node": "Empty Image", "input": "depth"}}, "has no input 'depth'"),
        ({"w": {"node": "Save Image", "input": "images"}}, "not a constant a slot can set"),
        ({"w": [{"node": "Empty Image", "input": "width"}, {"node": "Save Image", "input": "filename_prefix"}]},
         "different types"),
        ({"w": []}, "names no input"),
        ({"w": {"node": "Empty Image"}}, "target must be"),
    ],
)
def test_bad_template_files(slots: dict[str, Any], message: str) -> None:
    with pytest.raises(TemplateError, match=message):
        Template.from_dict(_template(slots=slots))


def test_template_needs_unique_titles_and_its_keys(tmp_path: Path) -> None:
    data = _template()
    data["graph"]["2"]["_meta"]["title"] = "Empty Image"
    with pytest.raises(TemplateError, match="unique"):
        Template.from_dict(data)
    with pytest.raises(TemplateError, match="needs graph"):
        Template.from_dict({"name": "x", "slots": {}})
    path = tmp_path / "bad.json"
    path.write_text("[")
    with pytest.raises(TemplateError, match=r"bad\.json"):
        Template.load(path)


def test_load_templates_and_graphs_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert graphs_dir() == GRAPHS_DIR.resolve()
    (tmp_path / "a.json").write_text(json.dumps(_template(name="same")))
    monkeypatch.setenv(GRAPHS_ENV, str(tmp_path))
    assert graphs_dir() == tmp_path
    assert list(load_templates()) == ["same"]
    assert graphs_dir(GRAPHS_DIR) == GRAPHS_DIR
    (tmp_path / "b.json").write_text(json.dumps(_template(name="same")))
    with pytest.raises(TemplateError, match="two templates are named 'same'"):
        load_templates(tmp_path)
    with pytest.raises(TemplateError, match=GRAPHS_ENV):
        graphs_dir(tmp_path / "missing")


def test_check_finds_what_a_server_would_reject(object_info: dict[str, Any]) -> None:
    def problems(data: dict[str, Any], **kwargs: Any) -> list[str]:
        return check_template_against_object_info(Template.from_dict(data), object_info, **kwargs)

    assert problems(_template()) == []
    data = _template()
    data["graph"]["1"]["inputs"]["width"] = 0
    assert problems(data) == ["node 'Empty Image' (#1, EmptyImage): Value 0 smaller than min of 1: width"]
    data = _template()
    data["graph"]["1"]["class_type"] = "NoSuchNode"
    assert problems(data) == ["Cannot execute because node NoSuchNode does not exist. (Node ID '#1')"]
    data = _template(slots={"prefix": {"node": "Save Image", "input": "filename_prefix"},
                            "mode": {"node": "Up", "input": "upscale_method"}})
    data["graph"]["3"] = {"class_type": "ImageScaleToTotalPixels", "_meta": {"title": "Up"},
                          "inputs": {"image": ["1", 0], "upscale_method": "sideways", "megapixels": 1.0}}
    data["graph"]["2"]["inputs"]["images"] = ["3", 0]
    found = problems(data)
    assert found == ["node 'Up' (#3, ImageScaleToTotalPixels): upscale_method: 'sideways' not in "
                     "['nearest-exact', 'bilinear', 'area', 'bicubic', 'lanczos']"]
    data = _template(slots={"cfg": {"node": "Empty Image", "input": "width"}})
    data["graph"]["1"]["inputs"]["width"] = 8.0
    assert problems(data) == ["slot 'cfg': takes float but EmptyImage.width is INT"]
    data = _template(slots={"ckpt": {"node": "Load Checkpoint", "input": "ckpt_name"}})
    data["graph"]["3"] = {"class_type": "CheckpointLoaderSimple", "_meta": {"title": "Load Checkpoint"},
                          "inputs": {"ckpt_name": "model.safetensors"}}
    data["graph"]["4"] = {"class_type": "PreviewAny", "_meta": {"title": "Show"}, "inputs": {"source": ["3", 0]}}
    assert problems(data) == []
    assert problems(data, ignore_missing_models=False) == [
        "node 'Load Checkpoint' (#3, CheckpointLoaderSimple): Value not in list: "
        "ckpt_name: 'model.safetensors' not in []"]
