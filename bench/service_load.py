"""The service under load: jobs/s through the HTTP API end to end, the latency it adds over a direct
``ComfyClient`` call, and how its memory grows.

The service runs as it does in production, ``python -m comfy_orchestrator serve --config FILE``, in a
process of its own (so its RSS is its own, read from ``/proc/PID/status``), over test doubles
(``comfy_orchestrator.testing.FakeComfyUI``) with no latency, each in a process of its own, so that
none shares an event loop with this one, which drives the load with plain aiohttp (or, with
``--drivers N``, N driver processes share the load, started together once each has warmed up). Every job is the same
trivial graph (EmptyImage 8×8 → SaveImage, a new colour each time so no cache answers).

* ``throughput``: ``--submitters`` concurrent loops, each: ``POST /v1/jobs`` → its ``job.succeeded``
  event on one shared ``WS /v1/events`` → ``GET /v1/jobs/{id}/outputs/{name}``; jobs/s over
  ``--jobs`` jobs (2000), after a warm-up. Target ≥ 300 jobs/s.
* ``latency``: the same graph one at a time, alternating between ``ComfyClient.run`` + ``download``
  straight against a double (the baseline) and the service path above; p50/p99 of each and of the
  difference, and the service's CPU time per job meanwhile (all of it on the job's path). Target
  < 5 ms added at p50.
* ``rss``: the service's VmRSS after the warm-up and after the measured jobs. Target < 50 MB growth.

Each measurement runs once per ``--processes`` value (``[server] processes``: service processes on one
port over one store), the first being the baseline the others are compared with (``vs_baseline``);
a service of several processes has its CPU time and RSS summed over the supervisor and its children.

``throughput`` also gives the service's CPU time per job and how busy it kept one core (from
``/proc/PID/stat``), which tells a CPU-bound service from one waiting on its disk, and the CPU time
per job of the harness (the drivers and the doubles), which shares the machine's cores with the
service, with how busy the drivers were (one near 1.0 is itself the limit: add ``--drivers``);
``--store-dir /dev/shm`` puts the job store on tmpfs, taking fsync out of the figures.

Prints JSON.

    python bench/service_load.py                  # the full run: 2000 jobs, 300 latency pairs; 1 and 4 processes
    python bench/service_load.py --processes 1,8 --drivers 4  # one process against eight (with the cores)
    python bench/service_load.py --quick          # a smoke run: 200 jobs, 50 pairs
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp

from comfy_orchestrator.client import ComfyClient
from comfy_orchestrator.testing import FakeComfyUI

TOKEN = "bench-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FINAL = {"job.succeeded", "job.failed", "job.cancelled"}
_colours = itertools.count(1)


def job_graph() -> dict[str, Any]:
    """Two nodes that execute (never cached: a new colour each time)."""
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1,
                                                     "color": next(_colours) % 0xFFFFFF}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "load"}},
    }


# -- processes ----------------------------------------------------------------------------------------


async def serve_doubles(count: int) -> None:
    """The ``--serve-doubles N`` mode: N zero-latency doubles in this process until stdin closes;
    prints their URLs first, one a line."""
    async with AsyncExitStack() as stack:
        for n in range(count):
            double = await stack.enter_async_context(FakeComfyUI(name=f"double-{n}", models={}))
            print(double.url, flush=True)
        await asyncio.to_thread(sys.stdin.read)


async def stop(proc: asyncio.subprocess.Process, *, signal_first: bool = False) -> None:
    if proc.returncode is not None:
        return
    if proc.stdin is not None:
        proc.stdin.close()
    if signal_first:
        proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), 20)
    except TimeoutError:
        proc.kill()
        await proc.wait()


async def start_doubles(stack: AsyncExitStack, count: int) -> tuple[list[asyncio.subprocess.Process], list[str]]:
    """``count`` doubles, each in a process of its own (as each ComfyUI is): none waits on another's loop."""
    procs, urls = [], []
    for _ in range(count):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--serve-doubles", "1",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )
        stack.push_async_callback(stop, proc)
        assert proc.stdout is not None
        procs.append(proc)
        urls.append((await asyncio.wait_for(proc.stdout.readline(), 30)).decode().strip())
    return procs, urls


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def write_config(folder: Path, port: int, urls: Sequence[str], *, workers: int, max_in_flight: int,
                 processes: int) -> Path:
    backends = "".join(f'[[backends]]\nname = "gpu-{n}"\nurl = "{url}"\nmax_in_flight = {max_in_flight}\n'
                       for n, url in enumerate(urls))
    config = folder / "service.toml"
    config.write_text(
        f'[server]\nhost = "127.0.0.1"\nport = {port}\nworkers = {workers}\ndrain_timeout = 5.0\n'
        f'processes = {processes}\n'
        f'[store]\npath = "{folder / "jobs.db"}"\noutputs_dir = "{folder / "outputs"}"\n'
        f'{backends}'
        f'[[tokens]]\ntoken = "{TOKEN}"\ntenant = "bench"\n'
        f'[limits]\nmax_queued_per_tenant = 100000\n'
    )
    return config


async def start_service(stack: AsyncExitStack, config: Path, port: int) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "comfy_orchestrator", "serve", "--config", str(config),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    stack.push_async_callback(stop, proc, signal_first=True)
    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session, asyncio.timeout(60):
        while True:
            if proc.returncode is not None:
                raise RuntimeError(f"the service exited with {proc.returncode} before it was ready")
            try:
                async with session.get(f"{url}/readyz") as resp:
                    if resp.status == 200:
                        break
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.1)
    return proc, url


async def all_answering(url: str, processes: int) -> None:
    """Until every service process has answered ``/healthz`` (on new connections, which the kernel
    spreads over them): process 0 is ready first, the others start after it."""
    seen: set[str] = set()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session, \
            asyncio.timeout(60):
        while len(seen) < processes:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{url}/readyz") as resp:
                    if resp.status == 200:
                        async with session.get(f"{url}/healthz") as health:
                            seen.add((await health.json())["process"])
            await asyncio.sleep(0.02)


def tree(pid: int) -> list[int]:
    """``pid`` and its children (a multi-process service: the supervisor and its service processes)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    return [pid, *(int(c) for c in children)]


def cpu_s(pid: int, *, children: bool = True) -> float:
    """User + system CPU seconds so far of the process (and its live children), ``/proc/PID/stat``."""
    total = 0.0
    for p in tree(pid) if children else [pid]:
        fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def rss_mb(pid: int) -> float:
    """VmRSS of the process and its live children, summed."""
    total = 0.0
    for p in tree(pid):
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) / 1024
    return total


# -- the service path ---------------------------------------------------------------------------------


class ServicePath:
    """POST /v1/jobs → its final event on one shared event socket → GET each output."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session, self.url = session, url
        self.waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.early: dict[str, dict[str, Any]] = {}  # final events that came before their POST answered
        self.reader: asyncio.Task[None] | None = None

    async def open(self) -> None:
        async with self.session.get(f"{self.url}/v1/jobs?limit=1", headers=AUTH) as resp:
            assert resp.status == 200, await resp.text()
        ws = await self.session.ws_connect(f"{self.url}/v1/events", headers=AUTH, heartbeat=30)
        self.reader = asyncio.create_task(self._read(ws))

    async def close(self) -> None:
        if self.reader is not None:
            self.reader.cancel()

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async with ws:
            async for msg in ws:
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    raise RuntimeError(f"event socket: {msg.type}")
                event = json.loads(msg.data)
                if event["type"] not in FINAL:
                    continue
                future = self.waiting.pop(event["job_id"], None)
                if future is None:
                    self.early[event["job_id"]] = event
                elif not future.done():
                    future.set_result(event)

    async def run(self, graph: dict[str, Any]) -> int:
        """One job end to end; the number of output bytes fetched."""
        async with self.session.post(f"{self.url}/v1/jobs", json={"graph": graph}, headers=AUTH) as resp:
            if resp.status != 202:
                raise RuntimeError(f"POST /v1/jobs: {resp.status} {await resp.text()}")
            job_id = (await resp.json())["id"]
        event = self.early.pop(job_id, None)
        if event is None:
            future = asyncio.get_running_loop().create_future()
            self.waiting[job_id] = future
            event = await future
        if event["type"] != "job.succeeded":
            raise RuntimeError(f"job {job_id}: {event['type']} {event['data']}")
        fetched = 0
        for output in event["data"]["outputs"]:
            async with self.session.get(f"{self.url}/v1/jobs/{job_id}/outputs/{output['name']}",
                                        headers=AUTH) as resp:
                assert resp.status == 200, resp.status
                fetched += len(await resp.read())
        assert fetched, f"job {job_id}: no output"
        return fetched


async def run_jobs(path: ServicePath, jobs: int, submitters: int) -> list[float]:
    """``jobs`` jobs end to end from ``submitters`` concurrent loops; each one's latency."""
    counter = itertools.count()
    latencies: list[float] = []

    async def submitter() -> None:
        while next(counter) < jobs:
            start = time.perf_counter()
            await path.run(job_graph())
            latencies.append(time.perf_counter() - start)

    await asyncio.gather(*(submitter() for _ in range(submitters)))
    return latencies


async def throughput(path: ServicePath, jobs: int, submitters: int) -> dict[str, Any]:
    started = time.perf_counter()
    latencies = await run_jobs(path, jobs, submitters)
    return load_figures(jobs, submitters, time.perf_counter() - started, latencies)


def load_figures(jobs: int, submitters: int, measured: float, latencies: Sequence[float]) -> dict[str, Any]:
    return {"jobs": jobs, "submitters": submitters, "measured_s": round(measured, 3),
            "jobs_per_s": round(jobs / measured, 1), "job_latency": summary(latencies)}


async def drive(url: str, jobs: int, submitters: int, warmup: int) -> None:
    """The ``--drive URL`` mode, one of ``--drivers N`` load processes: warm up, say ``ready``, wait
    for a line on stdin, run ``jobs`` jobs, print their latencies as JSON, exit when stdin closes."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        path = ServicePath(session, url)
        await path.open()
        try:
            await throughput(path, warmup, submitters)
            print("ready", flush=True)
            await asyncio.to_thread(sys.stdin.readline)
            print(json.dumps(await run_jobs(path, jobs, submitters)), flush=True)
            await asyncio.to_thread(sys.stdin.read)  # until told to stop: its CPU time is read first
        finally:
            await path.close()


async def start_drivers(stack: AsyncExitStack, url: str, jobs: int, submitters: int, drivers: int,
                        warmup: int) -> list[asyncio.subprocess.Process]:
    """``drivers`` load processes (``--drive``) sharing ``jobs`` and ``submitters``, each warmed up
    and waiting for ``run_drivers`` to start them together: one driver's event loop is not the limit."""
    procs = []
    for n in range(drivers):
        share = jobs // drivers + (n < jobs % drivers)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--drive", url, "--jobs", str(share),
            "--submitters", str(max(1, submitters // drivers)), "--warmup", str(max(1, warmup // drivers)),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )
        stack.push_async_callback(stop, proc)
        procs.append(proc)
    for proc in procs:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 120)
        if line.strip() != b"ready":
            raise RuntimeError(f"a driver process failed to start: {line!r}")
    return procs


async def run_drivers(procs: Sequence[asyncio.subprocess.Process], jobs: int, submitters: int) -> dict[str, Any]:
    started = time.perf_counter()
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        await proc.stdin.drain()
    results = []
    for proc in procs:
        assert proc.stdout is not None
        results.append(json.loads(await proc.stdout.readline()))
    measured = time.perf_counter() - started
    return load_figures(jobs, submitters, measured, [t for r in results for t in r])


# -- latency ------------------------------------------------------------------------------------------


def percentile(ordered: Sequence[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(samples: Sequence[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"p50_ms": round(percentile(ordered, 0.50) * 1000, 3), "p99_ms": round(percentile(ordered, 0.99) * 1000, 3),
            "mean_ms": round(statistics.fmean(ordered) * 1000, 3)}


async def latency(path: ServicePath, double_url: str, pairs: int, warmup: int) -> dict[str, Any]:
    direct_s: list[float] = []
    service_s: list[float] = []
    async with ComfyClient(double_url) as client:

        async def direct(graph: dict[str, Any]) -> None:
            result = await client.run(graph, timeout=60)
            assert await client.download(result.output_images[0])

        for i in range(warmup + pairs):
            for name in (("direct", "service") if i % 2 == 0 else ("service", "direct")):
                graph = job_graph()
                start = time.perf_counter()
                await (direct(graph) if name == "direct" else path.run(graph))
                elapsed = time.perf_counter() - start
                if i >= warmup:
                    (direct_s if name == "direct" else service_s).append(elapsed)
    d, s = summary(direct_s), summary(service_s)
    return {
        "pairs": pairs,
        "baseline": "ComfyClient.run + download straight against the same double",
        "direct": d,
        "service": s,
        "added_p50_ms": round(s["p50_ms"] - d["p50_ms"], 3),
        "added_p99_ms": round(s["p99_ms"] - d["p99_ms"], 3),
        "added_per_pair": summary([b - a for a, b in zip(direct_s, service_s, strict=True)]),
    }


# -- main ---------------------------------------------------------------------------------------------


async def measure_one(args: argparse.Namespace, processes: int, *, jobs: int, pairs: int,
                      warmup: int) -> dict[str, Any]:
    """Throughput, latency and RSS of one service configuration (``processes`` service processes)."""
    async with AsyncExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="service-load-", dir=args.store_dir)))
        doubles, urls = await start_doubles(stack, args.backends)
        port = free_port()
        config = write_config(folder, port, urls, workers=args.workers, max_in_flight=args.max_in_flight,
                              processes=processes)
        proc, url = await start_service(stack, config, port)
        if processes > 1:
            await all_answering(url, processes)
        connector = aiohttp.TCPConnector(limit=0)
        session = await stack.enter_async_context(aiohttp.ClientSession(connector=connector))
        path = ServicePath(session, url)
        await path.open()
        stack.push_async_callback(path.close)

        rss_start = rss_mb(proc.pid)
        await throughput(path, warmup, args.submitters)  # warm-up: sockets, caches, first SQLite pages
        drivers = (await start_drivers(stack, url, jobs, args.submitters, args.drivers, warmup)
                   if args.drivers > 1 else [])

        def driver_cpu() -> float:
            if drivers:
                return sum(cpu_s(d.pid) for d in drivers)
            return cpu_s(os.getpid(), children=False)

        def doubles_cpu() -> float:
            return sum(cpu_s(d.pid) for d in doubles)

        rss_before, cpu_before = rss_mb(proc.pid), cpu_s(proc.pid)
        driver_before, doubles_before = driver_cpu(), doubles_cpu()
        if drivers:
            load = await run_drivers(drivers, jobs, args.submitters)
        else:
            load = await throughput(path, jobs, args.submitters)
        rss_after, cpu = rss_mb(proc.pid), cpu_s(proc.pid) - cpu_before
        driver, doubled = driver_cpu() - driver_before, doubles_cpu() - doubles_before
        load["service_cpu_ms_per_job"] = round(cpu / jobs * 1000, 3)
        load["service_cpu_busy"] = round(cpu / load["measured_s"], 3)  # 1.0: one core all the time
        # what this driver and the doubles spent: on a machine with few cores they compete with the
        # service, and (cores × 1000) / (service + harness ms per job) bounds the jobs/s it can show;
        # a driver busy near 1.0 is the limit itself (one event loop)
        load["harness_cpu_ms_per_job"] = round((driver + doubled) / jobs * 1000, 3)
        load["drivers"] = max(1, args.drivers)
        load["driver_cpu_busy"] = round(driver / load["measured_s"], 3)  # summed over the drivers
        load["doubles_cpu_busy"] = round(doubled / load["measured_s"], 3)
        cpu_before_latency = cpu_s(proc.pid)
        lat = await latency(path, urls[0], pairs, warmup=10)
        # one job at a time: all of the service's work is on the job's path, so this tracks the
        # latency it adds more steadily than wall-clock time on a busy machine (it includes the
        # service's idle ticks while each direct call runs)
        lat["service_cpu_ms_per_job"] = round((cpu_s(proc.pid) - cpu_before_latency) / (pairs + 10) * 1000, 3)
        rss_end = rss_mb(proc.pid)
    rss = {"at_ready_mb": round(rss_start, 1), "before_mb": round(rss_before, 1), "after_mb": round(rss_after, 1),
           "growth_mb": round(rss_after - rss_before, 1), "after_latency_run_mb": round(rss_end, 1),
           "jobs_between": jobs}
    meets = {
        "jobs_per_s": load["jobs_per_s"] >= TARGETS["jobs_per_s_min"],
        "added_p50_ms": lat["added_p50_ms"] < TARGETS["added_p50_ms_max"],
        "rss_growth_mb": rss["growth_mb"] < TARGETS["rss_growth_mb_max"],
    }
    return {"processes": processes, "throughput": load, "latency": lat, "rss": rss, "meets": meets}


TARGETS = {"jobs_per_s_min": 300, "added_p50_ms_max": 5.0, "rss_growth_mb_max": 50}


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    jobs, pairs, warmup = (200, 50, 50) if args.quick else (args.jobs, args.pairs, args.warmup)
    load_at_start = os.getloadavg()[0]
    runs = [await measure_one(args, n, jobs=jobs, pairs=pairs, warmup=warmup) for n in args.processes]
    base = runs[0]
    for run in runs[1:]:
        run["vs_baseline"] = {
            "jobs_per_s_ratio": round(run["throughput"]["jobs_per_s"] / base["throughput"]["jobs_per_s"], 2),
            "added_p50_ms_change": round(run["latency"]["added_p50_ms"] - base["latency"]["added_p50_ms"], 3),
        }
    return {
        "benchmark": "service_load",
        "quick": args.quick,
        "setup": {"backends": args.backends, "max_in_flight": args.max_in_flight, "workers": args.workers,
                  "drivers": args.drivers,
                  "store_dir": args.store_dir or tempfile.gettempdir(), "submitters": args.submitters,
                  "jobs": jobs, "warmup_jobs": warmup, "latency_pairs": pairs,
                  "double": "FakeComfyUI, no latency, a process each",
                  "service": "python -m comfy_orchestrator serve, own process(es)"},
        "baseline": f"[server] processes = {base['processes']} (the first run); the latency baseline of every "
                    "run is ComfyClient.run + download straight against the same double",
        "runs": runs,
        "targets": TARGETS,
        "meets_targets": any(all(run["meets"].values()) for run in runs),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
                    # other work on the machine shows here: a load above the core count slows every figure
                    "loadavg_1m": [round(load_at_start, 2), round(os.getloadavg()[0], 2)]},
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2000, help="measured jobs (2000)")
    parser.add_argument("--warmup", type=int, default=200, help="warm-up jobs before the measurement (200)")
    parser.add_argument("--pairs", type=int, default=300, help="latency pairs, direct and through the service (300)")
    parser.add_argument("--submitters", type=int, default=32, help="concurrent submitting loops (32)")
    parser.add_argument("--backends", type=int, default=2, help="zero-latency doubles (2)")
    parser.add_argument("--max-in-flight", type=int, default=4, help="pool slots per backend (4)")
    parser.add_argument("--workers", type=int, default=8,
                        help="the service's [server] workers, over all its processes (8: one per pool slot)")
    parser.add_argument("--processes", type=lambda v: [int(n) for n in v.split(",")], default=[1, 4],
                        help="the service's [server] processes, one run each, the first the baseline (1,4)")
    parser.add_argument("--store-dir", default=None,
                        help="where the job store and outputs go (default: the system's temp folder); "
                             "/dev/shm takes fsync out of the figures")
    parser.add_argument("--quick", action="store_true", help="smoke run: 200 jobs, 50 latency pairs")
    parser.add_argument("--drivers", type=int, default=1,
                        help="processes the throughput load comes from, --submitters shared among them (1: "
                             "this one; on a machine with cores to spare, more keep one driver's loop from "
                             "being the limit)")
    parser.add_argument("--serve-doubles", type=int, metavar="N", help=argparse.SUPPRESS)
    parser.add_argument("--drive", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_doubles:
        await serve_doubles(args.serve_doubles)
        return
    if args.drive:
        await drive(args.drive, args.jobs, args.submitters, args.warmup)
        return
    print(json.dumps(await measure(args), indent=2))


if __name__ == "__main__":
    asyncio.run(main())
