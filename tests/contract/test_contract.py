"""One contract, two servers: what ComfyClient sees from the test double and from a real ComfyUI.

Every test here runs against both (``backend`` is parametrised); the live half carries the
``comfy_live`` marker. A behaviour of the double that drifts from the real server fails here.
"""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import pytest
from PIL import Image

from comfy_orchestrator import protocol as p
from comfy_orchestrator.client import ComfyClient
from comfy_orchestrator.errors import ExecutionFailed, GraphValidationError, JobCancelled
from tests.conftest import PROTOCOL_DIR
from tests.contract import graphs
from tests.contract.conftest import Backend

# The recorded 400 bodies (../shared/comfyui-protocol, or $COMFY_PROTOCOL_DIR): a checkout without
# them skips the 400-shape cases (an empty parameter set) and runs the rest, as the other recording
# readers do.
_INVALID = PROTOCOL_DIR / "invalid.json"
INVALID: dict[str, Any] = json.loads(_INVALID.read_text()) if _INVALID.is_file() else {}


async def test_success_path_outputs_history_and_download(backend: Backend) -> None:
    events: list[p.Event] = []
    async with ComfyClient(backend.url) as client:
        result = await client.run(graphs.model_free(), timeout=60, on_event=events.append)
        assert result.backend == backend.url
        (saved,) = result.output_images
        assert saved.filename.startswith("contract_")
        assert saved.type == "output"
        assert [f.type for f in result.outputs["7"].images] == ["temp"]
        assert result.outputs["6"].text == ("128",)  # PreviewAny of GetImageSize's width
        image = Image.open(io.BytesIO(await client.download(saved)))
        assert image.size == (128, 128)
        entry = await client.history(result.prompt_id)
        assert entry is not None
        assert entry.status == "success"
        assert result.timings.total_s >= result.timings.execution_s >= 0
    kinds = [type(e).__name__ for e in events]
    assert kinds[0] == "ExecutionStart"
    assert "ExecutionCached" in kinds
    assert kinds.index("ExecutionSuccess") > max(i for i, k in enumerate(kinds) if k == "Executed")
    # After success only `executing {node: null}` may follow; run() may return before it arrives, since
    # the /history entry, not that message, is what completes a run.
    after_success = events[kinds.index("ExecutionSuccess") + 1 :]
    assert all(isinstance(e, p.Executing) and e.node is None for e in after_success)
    assert set(result.node_order) == {"1", "2", "3", "5", "6", "7", "9"}


async def test_cached_resubmit_runs_nothing_and_reannounces_outputs(backend: Backend) -> None:
    graph = graphs.model_free()
    async with ComfyClient(backend.url) as client:
        first = await client.run(graph, timeout=60)
        again = await client.run(graph, timeout=60)
    assert set(again.cached_nodes) == set(graph)
    assert again.fully_cached
    assert not first.fully_cached
    assert again.output_images == first.output_images  # same file, no new one


def _invalid_graph(case: str) -> dict[str, Any]:
    base: dict[str, Any] = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
        "2": {"class_type": "ImageScaleBy", "inputs": {"image": ["1", 0], "upscale_method": "bilinear",
                                                       "scale_by": 1.0}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "bad"}},
    }
    if case == "unknown_class":
        base["5"] = {"class_type": "NoSuchNode", "inputs": {}}
    elif case == "unknown_class_on_output_path":
        base["1"]["class_type"] = "NoSuchNode"
    elif case == "missing_input":
        del base["1"]["inputs"]["width"]
    elif case == "bad_link_missing_node":
        base["9"]["inputs"]["images"] = ["42", 0]
    elif case == "bad_link_bad_slot":
        base["9"]["inputs"]["images"] = ["2", 5]
    elif case == "bad_link_type_mismatch":
        base["3"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
        base["9"]["inputs"]["images"] = ["3", 0]
    elif case == "value_below_min":
        base["1"]["inputs"]["width"] = 0
    elif case == "value_wrong_type":
        base["1"]["inputs"]["width"] = "abc"
    elif case == "bad_combo":
        base["2"]["inputs"]["upscale_method"] = "foo"
    elif case == "no_output_node":
        del base["9"]
    elif case == "missing_class_type":
        del base["1"]["class_type"]
    elif case == "empty_prompt":
        base = {}
    return base


CLIENT_CASES = [c for c in INVALID if c not in ("no_prompt_key", "malformed_json")]


@pytest.mark.parametrize("case", CLIENT_CASES)
async def test_every_400_shape(backend: Backend, case: str) -> None:
    expected = INVALID[case]["body"]
    async with ComfyClient(backend.url) as client:
        with pytest.raises(GraphValidationError) as info:
            await client.run(_invalid_graph(case), timeout=30)
    err = info.value
    assert err.error["type"] == expected["error"]["type"]
    assert err.error["message"] == expected["error"]["message"]
    assert set(err.node_errors) == set(expected["node_errors"])
    for node_id, want in expected["node_errors"].items():
        got = err.node_errors[node_id]
        assert got["class_type"] == want["class_type"]
        assert got["dependent_outputs"] == want["dependent_outputs"]
        assert [e["type"] for e in got["errors"]] == [e["type"] for e in want["errors"]]
        for g, w in zip(got["errors"], want["errors"], strict=True):
            assert set(g["extra_info"]) == set(w["extra_info"])
            if w["type"] != "exception_during_validation":
                assert g["details"] == w["details"]
    assert isinstance(err, ValueError)


async def test_execution_error_is_raised_with_node_and_exception(backend: Backend) -> None:
    async with ComfyClient(backend.url) as client:
        with pytest.raises(ExecutionFailed) as info:
            await client.run(graphs.oom(), timeout=60)
        failure = info.value
        assert (failure.node_id, failure.node_type, failure.exception_type) == ("1", "EmptyImage", "RuntimeError")
        assert failure.out_of_memory
        # The error event is sent before the history entry is written (the same race as success).
        async with asyncio.timeout(10):
            while (entry := await client.history(failure.prompt_id)) is None:  # noqa: ASYNC110 (remote state)
                await asyncio.sleep(0.02)
        assert entry.status == "error"
        assert entry.error is not None


async def test_interrupt_is_prompt_scoped(backend: Backend) -> None:
    """Interrupting one prompt stops it; a prompt queued behind it still runs."""
    slow = graphs.tiny_unet(backend.unet, backend.vae, steps=200, seed=11)
    async with ComfyClient(backend.url) as client:
        first_step = asyncio.Event()
        victim = asyncio.create_task(
            client.run(slow, timeout=120, on_progress=lambda e: first_step.set())
        )
        await asyncio.wait_for(first_step.wait(), 60)
        bystander = asyncio.create_task(client.run(graphs.model_free(), timeout=60))
        async with asyncio.timeout(10):
            while not (queue := await client.queue()).pending:  # noqa: ASYNC110 (remote state)
                await asyncio.sleep(0.01)
        assert len(queue.running) == 1
        assert len(queue.pending) == 1
        await client.interrupt("not-a-running-prompt")  # a silent no-op
        await client.interrupt(queue.running[0])
        with pytest.raises(JobCancelled):
            await victim
        assert (await bystander).output_images


async def test_delete_from_queue_leaves_the_running_prompt(backend: Backend) -> None:
    slow = graphs.tiny_unet(backend.unet, backend.vae, steps=60, seed=12)
    async with ComfyClient(backend.url) as client:
        first_step = asyncio.Event()
        running = asyncio.create_task(client.run(slow, timeout=120, on_progress=lambda e: first_step.set()))
        await asyncio.wait_for(first_step.wait(), 60)
        waiting = await client.submit(graphs.model_free())
        assert waiting in (await client.queue()).pending
        await client.delete_from_queue(waiting)
        queue = await client.queue()
        assert waiting not in queue
        assert len(queue.running) == 1
        await client.interrupt(queue.running[0])
        with pytest.raises(JobCancelled):
            await running


async def test_upload_then_load_image(backend: Backend) -> None:
    source = Image.new("RGB", (32, 24), (10, 200, 30))
    buf = io.BytesIO()
    source.save(buf, format="PNG")
    async with ComfyClient(backend.url) as client:
        ref = await client.upload_image(buf.getvalue(), filename="contract_up.png", subfolder="contract")
        assert (ref.filename, ref.subfolder, ref.type) == ("contract_up.png", "contract", "input")
        result = await client.run(graphs.invert_upload(ref.filename, ref.subfolder), timeout=60)
        out = Image.open(io.BytesIO(await client.download(result.output_images[0]))).convert("RGB")
    assert out.size == (32, 24)
    # 1 - 200/255 in float32 is 54.99999…/255: ComfyUI's SaveImage truncates, so 54, not 55.
    assert out.getpixel((5, 5)) == (245, 54, 225)


async def test_progress_and_previews_from_the_tiny_unet(backend: Backend) -> None:
    steps: list[tuple[int, int]] = []
    previews: list[p.Preview] = []
    async with ComfyClient(backend.url) as client:
        result = await client.run(
            graphs.tiny_unet(backend.unet, backend.vae, steps=4, seed=graphs.fresh_colour()),
            timeout=120,
            on_progress=lambda e: steps.append((e.value, e.max)),
            on_event=lambda e: previews.append(e) if isinstance(e, p.Preview) else None,
        )
        image = Image.open(io.BytesIO(await client.download(result.output_images[0])))
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert previews
    assert result.preview_count == len(previews)
    assert all(pv.prompt_id == result.prompt_id and pv.node_id == "4" for pv in previews)
    assert all(pv.mime == "image/jpeg" and pv.image[:2] == b"\xff\xd8" for pv in previews)
    assert image.size == (64, 64)


async def test_upscale_models(backend: Backend) -> None:
    async with ComfyClient(backend.url) as client:
        info = await client.object_info()
        listed = info["UpscaleModelLoader"]["input"]["required"]["model_name"]
        names = listed[1]["options"] if listed[0] == "COMBO" else listed[0]
        for name, factor in backend.upscalers:
            assert name in names
            result = await client.run(graphs.upscale(name), timeout=120)
            image = Image.open(io.BytesIO(await client.download(result.output_images[0])))
            assert image.size == (64 * factor, 64 * factor)


async def test_two_clients_see_only_their_own_prompts(backend: Backend) -> None:
    async with ComfyClient(backend.url) as a, ComfyClient(backend.url) as b:
        seen: dict[str, set[str]] = {"a": set(), "b": set()}

        def recorder(name: str) -> Any:
            return lambda e: seen[name].add(e.prompt_id) if e.prompt_id else None

        results = await asyncio.gather(
            *(a.run(graphs.model_free(), timeout=60, on_event=recorder("a")) for _ in range(3)),
            *(b.run(graphs.model_free(), timeout=60, on_event=recorder("b")) for _ in range(3)),
        )
    ids_a = {r.prompt_id for r in results[:3]}
    ids_b = {r.prompt_id for r in results[3:]}
    assert seen["a"] == ids_a
    assert seen["b"] == ids_b
    for client in (a, b):
        assert client.closed


async def test_system_stats_and_object_info(backend: Backend) -> None:
    async with ComfyClient(backend.url) as client:
        stats = await client.system_stats()
        info = await client.object_info()
        assert await client.object_info() is info  # cached
        assert (await client.object_info(refresh=True)).keys() == info.keys()
        await client.free()
    assert stats.comfyui_version
    assert stats.devices
    for node in ("EmptyImage", "SaveImage", "KSampler", "UNETLoader", "LoadImage"):
        assert node in info


CPU_TEMPLATES = ["cpu_model_free_ops", "cpu_tiny_unet_txt2img", "cpu_tiny_upscale", "cpu_tiny_upscale_generated"]


@pytest.mark.parametrize("name", CPU_TEMPLATES)
async def test_cpu_templates_run(backend: Backend, name: str) -> None:
    """The templates the tests and the demo use run as shipped (after binding fresh values)."""
    from comfy_orchestrator.graph import Template
    from tests.conftest import GRAPHS_DIR

    template = Template.load(GRAPHS_DIR / f"{name}.json")
    params: dict[str, Any] = {}
    if "seed" in template.slots:
        params["seed"] = graphs.fresh_colour()
    if "color" in template.slots:
        params["color"] = graphs.fresh_colour()
    async with ComfyClient(backend.url) as client:
        if "input_image" in template.slots:
            image = Image.new("RGB", (48, 48), (graphs.fresh_colour() % 256, 20, 90))
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            ref = await client.upload_image(buf.getvalue(), filename=f"{name}_in.png")
            params["input_image"] = ref.filename
        graph = template.bind(params)
        await client.validate(graph)
        result = await client.run(graph, timeout=120)
        assert result.output_images
        out = Image.open(io.BytesIO(await client.download(result.output_images[0])))
        assert out.width >= 48
