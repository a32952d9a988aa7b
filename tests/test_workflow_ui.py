"""UI-format workflows (what ComfyUI's editor saves) convert to the API format the server runs."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from comfy_orchestrator.errors import WorkflowFormatError
from comfy_orchestrator.graph import Graph, check_prompt, model_input_folder, validate_prompt
from comfy_orchestrator.workflow import is_ui_workflow, ui_to_api


def _node(node_id: int, kind: str, *, order: int, inputs: list[dict[str, Any]] | None = None,
          outputs: list[dict[str, Any]] | None = None, widgets: Any = None, mode: int = 0,
          title: str | None = None) -> dict[str, Any]:
    node: dict[str, Any] = {
        "id": node_id, "type": kind, "pos": [100 * order, 100], "size": [300, 100], "flags": {},
        "order": order, "mode": mode, "inputs": inputs or [], "outputs": outputs or [],
        "properties": {"Node name for S&R": kind},
    }
    if widgets is not None:
        node["widgets_values"] = widgets
    if title is not None:
        node["title"] = title
    return node


def _in(name: str, kind: str, link: int | None, widget: bool = False) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name, "type": kind, "link": link}
    if widget:
        entry["widget"] = {"name": name}
    return entry


def _out(name: str, kind: str, links: list[int], slot: int) -> dict[str, Any]:
    return {"name": name, "type": kind, "links": links, "slot_index": slot}


def sd15_ui_workflow() -> dict[str, Any]:
    """SD 1.5 txt2img as the editor saves it, with a seed primitive, a reroute, a bypassed latent
    upscale, a muted preview and two notes."""
    nodes = [
        _node(4, "CheckpointLoaderSimple", order=0, widgets=["v1-5-pruned-emaonly.safetensors"],
              outputs=[_out("MODEL", "MODEL", [1], 0), _out("CLIP", "CLIP", [3, 5], 1),
                       _out("VAE", "VAE", [8], 2)]),
        _node(6, "CLIPTextEncode", order=2, title="Positive Prompt", widgets=["a red fox in the snow"],
              inputs=[_in("clip", "CLIP", 3)], outputs=[_out("CONDITIONING", "CONDITIONING", [4], 0)]),
        _node(7, "CLIPTextEncode", order=3, widgets=["blurry"],
              inputs=[_in("clip", "CLIP", 5)], outputs=[_out("CONDITIONING", "CONDITIONING", [6], 0)]),
        _node(5, "EmptyLatentImage", order=1, widgets=[512, 512, 1], outputs=[_out("LATENT", "LATENT", [2], 0)]),
        _node(10, "PrimitiveNode", order=4, widgets=[1234, "fixed"],
              outputs=[{"name": "INT", "type": "INT", "links": [12], "widget": {"name": "seed"}}]),
        _node(3, "KSampler", order=5,
              widgets=[156680208700286, "randomize", 20, 8, "euler", "normal", 1],
              inputs=[_in("model", "MODEL", 1), _in("positive", "CONDITIONING", 4),
                      _in("negative", "CONDITIONING", 6), _in("latent_image", "LATENT", 2),
                      _in("seed", "INT", 12, widget=True)],
              outputs=[_out("LATENT", "LATENT", [7], 0)]),
        _node(11, "LatentUpscaleBy", order=6, mode=4, widgets=["nearest-exact", 1.5],
              inputs=[_in("samples", "LATENT", 7)], outputs=[_out("LATENT", "LATENT", [9], 0)]),
        _node(12, "Reroute", order=7, inputs=[_in("", "*", 8)], outputs=[_out("", "VAE", [10], 0)]),
        _node(8, "VAEDecode", order=8, inputs=[_in("samples", "LATENT", 9), _in("vae", "VAE", 10)],
              outputs=[_out("IMAGE", "IMAGE", [11, 13], 0)]),
        _node(9, "SaveImage", order=9, widgets=["ComfyUI"], inputs=[_in("images", "IMAGE", 11)]),
        _node(13, "PreviewImage", order=10, mode=2, inputs=[_in("images", "IMAGE", 13)]),
        _node(14, "Note", order=11, widgets=["Bypass the upscale for a quick draft."]),
        _node(15, "MarkdownNote", order=12, widgets=["# SD 1.5"]),
    ]
    links = [
        [1, 4, 0, 3, 0, "MODEL"], [2, 5, 0, 3, 3, "LATENT"], [3, 4, 1, 6, 0, "CLIP"],
        [4, 6, 0, 3, 1, "CONDITIONING"], [5, 4, 1, 7, 0, "CLIP"], [6, 7, 0, 3, 2, "CONDITIONING"],
        [7, 3, 0, 11, 0, "LATENT"], [8, 4, 2, 12, 0, "*"], [9, 11, 0, 8, 0, "LATENT"], [10, 12, 0, 8, 1, "VAE"],
        [11, 8, 0, 9, 0, "IMAGE"], [12, 10, 0, 3, 4, "INT"], [13, 8, 0, 13, 0, "IMAGE"],
    ]
    return {"last_node_id": 15, "last_link_id": 13, "nodes": nodes, "links": links, "groups": [],
            "config": {}, "extra": {"ds": {"scale": 1, "offset": [0, 0]}}, "version": 0.4}


SD15_API = {
    "4": {"inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}, "class_type": "CheckpointLoaderSimple",
          "_meta": {"title": "Load Checkpoint"}},
    "5": {"inputs": {"width": 512, "height": 512, "batch_size": 1}, "class_type": "EmptyLatentImage",
          "_meta": {"title": "Empty Latent Image"}},
    "6": {"inputs": {"text": "a red fox in the snow", "clip": ["4", 1]}, "class_type": "CLIPTextEncode",
          "_meta": {"title": "Positive Prompt"}},
    "7": {"inputs": {"text": "blurry", "clip": ["4", 1]}, "class_type": "CLIPTextEncode",
          "_meta": {"title": "CLIP Text Encode (Prompt)"}},
    "3": {"inputs": {"seed": 1234, "steps": 20, "cfg": 8, "sampler_name": "euler", "scheduler": "normal",
                     "denoise": 1, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
                     "latent_image": ["5", 0]},
          "class_type": "KSampler", "_meta": {"title": "KSampler"}},
    "8": {"inputs": {"samples": ["3", 0], "vae": ["4", 2]}, "class_type": "VAEDecode",
          "_meta": {"title": "VAE Decode"}},
    "9": {"inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}, "class_type": "SaveImage",
          "_meta": {"title": "Save Image"}},
}


def test_sd15_workflow_converts_like_export_api(object_info: dict[str, Any]) -> None:
    workflow = sd15_ui_workflow()
    before = copy.deepcopy(workflow)
    api = ui_to_api(workflow, object_info)
    assert api == SD15_API
    assert list(api) == ["4", "5", "6", "7", "3", "8", "9"]  # execution order, as the editor exports
    assert workflow == before
    # The only thing the recorded server (no models) would object to is the checkpoint file.
    verdict = check_prompt(api, object_info)
    assert [(node, [e["type"] for e in entry["errors"]]) for node, entry in verdict.node_errors.items()] == [
        ("4", ["value_not_in_list"])]


def test_new_style_object_links_convert_the_same(object_info: dict[str, Any]) -> None:
    workflow = sd15_ui_workflow()
    keys = ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")
    workflow["links"] = [dict(zip(keys, link, strict=True)) for link in workflow["links"]]
    workflow["version"] = 1
    assert ui_to_api(workflow, object_info) == SD15_API


def model_free_ui_workflow(*, blur_mode: int = 4, save_mode: int = 0) -> dict[str, Any]:
    nodes = [
        _node(1, "EmptyImage", order=0, widgets=[64, 64, 1, 3368652], outputs=[_out("IMAGE", "IMAGE", [1], 0)]),
        _node(2, "ImageScaleBy", order=1, widgets=["bilinear", 2], title="Scale",
              inputs=[_in("image", "IMAGE", 1)], outputs=[_out("IMAGE", "IMAGE", [2], 0)]),
        _node(3, "ImageBlur", order=2, mode=blur_mode, widgets=[3, 1.0],
              inputs=[_in("image", "IMAGE", 2)], outputs=[_out("IMAGE", "IMAGE", [3], 0)]),
        _node(4, "SaveImage", order=3, mode=save_mode, widgets=["ui_ops"], inputs=[_in("images", "IMAGE", 3)]),
    ]
    links = [[1, 1, 0, 2, 0, "IMAGE"], [2, 2, 0, 3, 0, "IMAGE"], [3, 3, 0, 4, 0, "IMAGE"]]
    return {"nodes": nodes, "links": links, "version": 0.4}


def test_model_free_workflow_runs_as_converted(object_info: dict[str, Any], tmp_path: Path) -> None:
    api = ui_to_api(model_free_ui_workflow(blur_mode=0), object_info)
    assert api["3"]["inputs"] == {"image": ["2", 0], "blur_radius": 3, "sigma": 1.0}
    assert validate_prompt(api, object_info) is None
    bypassed = ui_to_api(model_free_ui_workflow(), object_info)
    assert "3" not in bypassed
    assert bypassed["4"]["inputs"]["images"] == ["2", 0]
    assert validate_prompt(bypassed, object_info) is None
    path = tmp_path / "ui.json"
    path.write_text(json.dumps(model_free_ui_workflow()))
    graph = Graph.load(path, object_info=object_info)
    assert graph.node("Scale").inputs == {"image": ["1", 0], "upscale_method": "bilinear", "scale_by": 2}


def test_muted_source_leaves_the_input_unset(object_info: dict[str, Any]) -> None:
    api = ui_to_api(model_free_ui_workflow(blur_mode=2), object_info)
    assert "images" not in api["4"]["inputs"]
    body = validate_prompt(api, object_info)
    assert body is not None
    assert body["node_errors"]["4"]["errors"][0]["type"] == "required_input_missing"
    assert ui_to_api(model_free_ui_workflow(blur_mode=0, save_mode=2), object_info).keys() == {"1", "2", "3"}


def test_bypass_without_a_matching_input_drops_the_link(object_info: dict[str, Any]) -> None:
    workflow = model_free_ui_workflow()
    workflow["nodes"][2] = _node(3, "GetImageSize", order=2, mode=4, inputs=[_in("image", "IMAGE", 2)],
                                 outputs=[_out("width", "INT", [3], 0)])
    workflow["nodes"][3] = _node(4, "PreviewAny", order=3, inputs=[_in("source", "*", 3)])
    workflow["links"][2] = [3, 3, 0, 4, 0, "INT"]
    api = ui_to_api(workflow, object_info)
    assert api["4"]["inputs"] == {}


def test_seed_without_control_value_and_dict_widgets(object_info: dict[str, Any]) -> None:
    workflow = {"nodes": [
        _node(1, "KSampler", order=0, widgets=[5, 30, 6.5, "dpmpp_2m", "karras", 0.6]),
        _node(2, "EmptyImage", order=1, widgets={"width": 16, "height": 32, "batch_size": 2, "color": 7}),
        _node(3, "CLIPTextEncode", order=2, widgets=["fixed"]),  # a prompt may read like a control value
        _node(4, "LoadImage", order=3, widgets=["example.png", "image"]),  # then the upload button's value
        _node(5, "PrimitiveInt", order=4, widgets=[9, "increment"]),
    ], "links": []}
    api = ui_to_api(workflow, object_info)
    assert api["1"]["inputs"] == {"seed": 5, "steps": 30, "cfg": 6.5, "sampler_name": "dpmpp_2m",
                                  "scheduler": "karras", "denoise": 0.6}
    assert api["2"]["inputs"] == {"width": 16, "height": 32, "batch_size": 2, "color": 7}
    assert api["3"]["inputs"] == {"text": "fixed"}
    assert api["4"]["inputs"] == {"image": "example.png"}
    assert api["5"]["inputs"] == {"value": 9}


def test_unknown_node_types_ask_for_an_api_export(object_info: dict[str, Any]) -> None:
    workflow = model_free_ui_workflow()
    workflow["nodes"].append(_node(7, "SomeCustomNode", order=4))
    workflow["nodes"].append(_node(8, "0b1c8e2a-7d55-4a7e-9a55-subgraph", order=5))
    with pytest.raises(WorkflowFormatError, match=r"'0b1c8e2a-7d55-4a7e-9a55-subgraph', 'SomeCustomNode'.*"
                                                  r"Workflow menu → Export \(API\)"):
        ui_to_api(workflow, object_info)
    # A muted unknown node is not sent, so it is no obstacle.
    workflow["nodes"] = [*workflow["nodes"][:-2], _node(7, "SomeCustomNode", order=4, mode=2)]
    assert "7" not in ui_to_api(workflow, object_info)


@pytest.mark.parametrize(
    "bad",
    [{"nodes": [{"id": 1}], "links": []}, {"nodes": [], "links": [[1, 2]]}, {"nodes": [], "links": [{"id": 1}]}],
)
def test_malformed_ui_workflows(bad: dict[str, Any], object_info: dict[str, Any]) -> None:
    with pytest.raises(WorkflowFormatError):
        ui_to_api(bad, object_info)


def test_format_detection() -> None:
    assert is_ui_workflow(sd15_ui_workflow())
    assert not is_ui_workflow(SD15_API)
    assert not is_ui_workflow({"nodes": {}, "links": []})
    with pytest.raises(WorkflowFormatError):
        ui_to_api(SD15_API, {})


# -- real workflows, as shipped with ComfyUI (comfyui-workflow-templates, installed by setup.sh) --


def _installed_workflow(name: str) -> dict[str, Any]:
    spec = importlib.util.find_spec("comfyui_workflow_templates")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("comfyui-workflow-templates is not installed")
    site = Path(next(iter(spec.submodule_search_locations))).parent
    found = sorted(site.glob(f"comfyui_workflow_templates*/templates/{name}.json"))
    if not found:
        pytest.skip(f"no {name}.json in the installed comfyui-workflow-templates")
    data: dict[str, Any] = json.loads(found[0].read_text())
    return data


@pytest.mark.parametrize(
    "name",
    ["default", "image2image", "lora", "sdxl_simple_example", "hiresfix_esrgan_workflow",
     "controlnet_example", "flux_dev_full_text_to_image", "area_composition"],
)
def test_comfyui_example_workflows_convert(name: str, object_info: dict[str, Any]) -> None:
    api = ui_to_api(_installed_workflow(name), object_info)
    verdict = check_prompt(api, object_info, file_exists=lambda _name: True)
    # A server without models rejects the model files only.
    problems = [(entry["class_type"], error["type"], error["extra_info"].get("input_name"))
                for entry in verdict.node_errors.values() for error in entry["errors"]
                if not (error["type"] == "value_not_in_list"
                        and model_input_folder(entry["class_type"], error["extra_info"]["input_name"]))]
    assert problems == []
    assert verdict.outputs or verdict.node_errors


def test_real_bypass_and_primitives(object_info: dict[str, Any]) -> None:
    lora = ui_to_api(_installed_workflow("lora"), object_info)  # the second LoraLoader is bypassed
    assert [n["class_type"] for n in lora.values()].count("LoraLoader") == 1
    assert lora["3"]["inputs"]["model"] == ["11", 0]
    assert lora["6"]["inputs"]["clip"] == ["11", 1]
    sdxl = ui_to_api(_installed_workflow("sdxl_simple_example"), object_info)
    base, refiner = sdxl["10"]["inputs"], sdxl["11"]["inputs"]
    assert (base["steps"], base["end_at_step"], refiner["steps"], refiner["start_at_step"]) == (25, 20, 25, 20)
    assert base["noise_seed"] == 721897303308196
