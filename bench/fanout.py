"""How close the pool's pull dispatch comes to the ideal throughput of its backends.

Test doubles (``comfy_orchestrator.testing.FakeComfyUI``) whose every prompt takes a fixed time
(``node_delay`` per node of a two-node graph: EmptyImage → SaveImage, a new colour per job so no cache
answers), all on real sockets in this process:

* ``uniform``: N = 1, 2, 4, 8 doubles of 200 ms per prompt, ``--jobs`` jobs (400) through ``Pool.run``:
  efficiency = measured throughput / ideal throughput (N / 0.2 s). Target ≥ 0.95.
* ``mixed``: four doubles, 1×, 1×, 2× and 4× slower (200, 200, 400, 800 ms): efficiency against the
  ideal sum of their throughputs (Σ 1/tᵢ). Target ≥ 0.90. Side by side, the same jobs split statically
  round-robin (job i → double i mod 4, each double's share run with its own ``ComfyClient``, as many
  prompts at a time as the pool keeps per backend), the baseline pull dispatch replaces.

The doubles run in their own processes; their own time per prompt (request handling, validation,
the PNG) is measured first, with a queue that never runs dry, and taken off their node delays, so
that one prompt really takes 200 ms (``calibration`` in the output shows the check).

Prints JSON.

    python bench/fanout.py            # the full run (about 4½ minutes: the round-robin baseline alone is 80 s)
    python bench/fanout.py --quick    # a smoke run: 32 jobs of 100 ms
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import sys
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

from comfy_orchestrator.client import ComfyClient
from comfy_orchestrator.pool import BackendConfig, Pool, PoolSettings
from comfy_orchestrator.testing import FakeComfyUI

NODES_PER_PROMPT = 2
_colours = itertools.count(1)


def job_graph() -> dict[str, Any]:
    """Two nodes that execute (never cached: a new colour each time)."""
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1,
                                                     "color": next(_colours) % 0xFFFFFF}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "fanout"}},
    }


@dataclass(frozen=True)
class Double:
    name: str
    url: str


async def serve(specs: Sequence[str]) -> None:
    """The ``--serve NAME=NODE_DELAY ...`` mode: these doubles in this process until stdin closes;
    prints their URLs first, one a line."""
    async with AsyncExitStack() as stack:
        for spec in specs:
            name, _, delay = spec.partition("=")
            double = await stack.enter_async_context(FakeComfyUI(name=name, models={}, node_delay=float(delay)))
            print(double.url, flush=True)
        await asyncio.to_thread(sys.stdin.read)


async def start_doubles(stack: AsyncExitStack, prompt_seconds: Sequence[float], overhead: float) -> list[Double]:
    """Each double in a process of its own, so that their work does not share the event loop of the
    pool under test. ``overhead`` (the double's own time per prompt) is taken off the node delays, so
    that one prompt takes ``prompt_seconds`` in all."""
    specs = [
        (f"double-{i}-{round(seconds * 1000)}ms", max(0.0, seconds - overhead) / NODES_PER_PROMPT)
        for i, seconds in enumerate(prompt_seconds)
    ]
    doubles = []
    for group in ([spec] for spec in specs):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--serve", *(f"{name}={delay}" for name, delay in group),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )
        stack.push_async_callback(stop, proc)
        assert proc.stdout is not None
        for name, _ in group:
            url = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().strip()
            doubles.append(Double(name, url))
    return doubles


async def stop(proc: asyncio.subprocess.Process) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    try:
        await asyncio.wait_for(proc.wait(), 10)
    except TimeoutError:
        proc.kill()
        await proc.wait()


def summary(measured: float, ideal: float, jobs: int, per_backend: Counter[str]) -> dict[str, Any]:
    return {
        "measured_s": round(measured, 3),
        "ideal_s": round(ideal, 3),
        "throughput_jobs_per_s": round(jobs / measured, 3),
        "ideal_jobs_per_s": round(jobs / ideal, 3),
        "efficiency": round(ideal / measured, 4),
        "jobs_per_backend": dict(sorted(per_backend.items())),
    }


async def saturated_seconds(url: str, prompts: int) -> float:
    """Seconds per prompt of a double whose queue never runs dry: what it can do at best."""
    async with ComfyClient(url) as client:
        await asyncio.gather(*(client.run(job_graph()) for _ in range(3)))
        started = time.perf_counter()
        await asyncio.gather(*(client.run(job_graph()) for _ in range(prompts)))
        return (time.perf_counter() - started) / prompts


async def calibrate(prompt: float, quick: bool) -> dict[str, float]:
    """The double's own time per prompt on top of its node delays (measured with its queue never
    empty, so nothing of a client's or the pool's counts), and the cycle of the calibrated double."""
    prompts = 8 if quick else 50
    async with AsyncExitStack() as stack:
        (plain,) = await start_doubles(stack, [prompt], 0.0)
        overhead = max(0.0, await saturated_seconds(plain.url, prompts) - prompt)
        (calibrated,) = await start_doubles(stack, [prompt], overhead)
        cycle = await saturated_seconds(calibrated.url, prompts)
    return {"double_overhead_ms": round(overhead * 1000, 2), "calibrated_cycle_ms": round(cycle * 1000, 2),
            "overhead": overhead}


async def run_pool(prompt_seconds: Sequence[float], jobs: int, max_in_flight: int, overhead: float) -> dict[str, Any]:
    ideal = jobs / sum(1.0 / s for s in prompt_seconds)
    async with AsyncExitStack() as stack:
        doubles = await start_doubles(stack, prompt_seconds, overhead)
        configs = [BackendConfig(d.name, d.url, max_in_flight=max_in_flight) for d in doubles]
        pool = await stack.enter_async_context(Pool(configs, PoolSettings(health_interval=5.0)))
        # Warm-up: every backend's socket open once, outside the measurement.
        await asyncio.gather(*(pool.run(job_graph(), backends=[d.name]) for d in doubles))
        started = time.perf_counter()
        results = await asyncio.gather(*(pool.run(job_graph()) for _ in range(jobs)))
        measured = time.perf_counter() - started
        retries = pool.stats().retries
    out = summary(measured, ideal, jobs, Counter(r.backend for r in results))
    out["retries"] = retries
    return out


async def run_round_robin(
    prompt_seconds: Sequence[float], jobs: int, max_in_flight: int, overhead: float
) -> dict[str, Any]:
    ideal = jobs / sum(1.0 / s for s in prompt_seconds)
    async with AsyncExitStack() as stack:
        doubles = await start_doubles(stack, prompt_seconds, overhead)
        clients = [await stack.enter_async_context(ComfyClient(d.url)) for d in doubles]
        await asyncio.gather(*(c.run(job_graph()) for c in clients))
        shares = [[job_graph() for _ in range(i, jobs, len(clients))] for i in range(len(clients))]

        async def run_share(client: ComfyClient, graphs: list[dict[str, Any]]) -> None:
            slots = asyncio.Semaphore(max_in_flight)  # as many prompts on the server as the pool keeps

            async def one(graph: dict[str, Any]) -> None:
                async with slots:
                    await client.run(graph)

            await asyncio.gather(*(one(g) for g in graphs))

        started = time.perf_counter()
        await asyncio.gather(*(run_share(c, s) for c, s in zip(clients, shares, strict=True)))
        measured = time.perf_counter() - started
    return summary(measured, ideal, jobs, Counter({d.name: len(s) for d, s in zip(doubles, shares, strict=True)}))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=400, help="jobs per measurement (400)")
    parser.add_argument("--prompt-ms", type=float, default=200.0, help="time of one prompt on a 1× double (200)")
    parser.add_argument("--max-in-flight", type=int, default=2, help="pool slots per backend (2)")
    parser.add_argument("--sizes", default="1,2,4,8", help="pool sizes of the uniform runs (1,2,4,8)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 32 jobs of 100 ms")
    parser.add_argument("--serve", nargs="+", metavar="NAME=NODE_DELAY", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        await serve(args.serve)
        return
    jobs, prompt = (32, 0.1) if args.quick else (args.jobs, args.prompt_ms / 1000)
    slowdowns = (1, 1, 2, 4)

    calibration = await calibrate(prompt, args.quick)
    overhead = calibration.pop("overhead")
    uniform = []
    for n in (int(x) for x in args.sizes.split(",")):
        row = await run_pool([prompt] * n, jobs, args.max_in_flight, overhead)
        uniform.append({"backends": n, **row})
    mixed_seconds = [prompt * k for k in slowdowns]
    mixed_pool = await run_pool(mixed_seconds, jobs, args.max_in_flight, overhead)
    mixed_rr = await run_round_robin(mixed_seconds, jobs, args.max_in_flight, overhead)

    report = {
        "benchmark": "fanout",
        "jobs": jobs,
        "prompt_ms": round(prompt * 1000, 1),
        "max_in_flight": args.max_in_flight,
        "quick": args.quick,
        "calibration": calibration,
        "uniform": uniform,
        "mixed": {
            "slowdowns": list(slowdowns),
            "prompt_ms": [round(s * 1000, 1) for s in mixed_seconds],
            "pool": mixed_pool,
            "round_robin": mixed_rr,
            "pool_vs_round_robin_speedup": round(mixed_rr["measured_s"] / mixed_pool["measured_s"], 3),
        },
        "targets": {"uniform_efficiency": 0.95, "mixed_efficiency": 0.90},
        "meets_targets": all(r["efficiency"] >= 0.95 for r in uniform) and mixed_pool["efficiency"] >= 0.90,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
