"""``[server] processes``: one service on one port, run by several processes over one store.

The unit tests drive the pieces (how work is shared out, the datagram bus between processes, the
notifier's relay); the live ones run a real ``comfy-orch serve`` supervisor with two service
processes over FakeComfyUI doubles in the test process."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from comfy_orchestrator._child import free_port
from comfy_orchestrator.service import ServiceSettings, SettingsError
from comfy_orchestrator.service.notifier import Notifier
from comfy_orchestrator.service.peers import PeerBus
from comfy_orchestrator.service.processes import ProcessRole
from comfy_orchestrator.store import Claim
from comfy_orchestrator.testing import FakeComfyUI
from tests.service.conftest import auth
from tests.service.test_reliability import (
    Proc,
    _attempts,
    _cancel_and_see_the_prompt_stop,
    _kill,
    _session,
    _small_graph,
    _start,
    _submit_one,
    _terminate,
    _wait_all,
    _wait_running_on,
    _write_config,
)

# -- the pieces -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 2, 3, 4, 7])
def test_each_process_gets_an_even_share_never_none(count: int, tmp_path: Path) -> None:
    for total in range(1, 20):
        shares = [ProcessRole(i, count, tmp_path).share(total) for i in range(count)]
        assert max(shares) - min(shares) <= 1
        assert min(shares) >= 1
        assert sum(shares) == max(total, count)  # fewer slots than processes: each still gets one


def test_a_process_role_is_read_from_index_slash_count(tmp_path: Path) -> None:
    role = ProcessRole.parse("1/3", tmp_path, reconcile=False)
    assert (role.index, role.count, role.label, role.reconcile) == (1, 3, "1/3", False)
    for bad in ("3/3", "1", "a/b", "-1/2"):
        with pytest.raises(ValueError, match="process"):
            ProcessRole.parse(bad, tmp_path, reconcile=False)


async def test_the_bus_coalesces_wake_ups_and_delivers_cancels(tmp_path: Path) -> None:
    got: list[list[tuple[str, str]]] = [[], [], []]
    buses = [PeerBus(tmp_path, i, 3, lambda kind, arg, i=i: got[i].append((kind, arg))) for i in range(3)]  # type: ignore[misc]
    for bus in buses:
        await bus.start()
    try:
        for _ in range(50):
            buses[0].publish("e")
        buses[0].publish("q")
        buses[1].send_now("c", "job-1 graph")
        async with asyncio.timeout(5):
            while True:
                if len(got[1]) >= 2 and len(got[2]) >= 3 and got[0]:
                    break
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert sorted(got[1]) == [("e", ""), ("q", "")]  # fifty events: one datagram
        assert sorted(got[2]) == [("c", "job-1 graph"), ("e", ""), ("q", "")]
        assert got[0] == [("c", "job-1 graph")]  # never to itself
    finally:
        for bus in buses:
            bus.close()
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".sock")]


async def test_the_bus_ignores_a_sibling_that_is_not_up(tmp_path: Path) -> None:
    bus = PeerBus(tmp_path, 0, 3, lambda kind, arg: None)
    await bus.start()
    try:
        bus.send_now("c", "job-1 graph")  # siblings 1 and 2 are not bound: nothing raises
        bus.publish("e")
        await asyncio.sleep(0.01)
        assert bus.sent == 0
    finally:
        bus.close()


def _fill(sender: socket.socket, path: str) -> None:
    """Send wake-ups to ``path`` until its queue is full."""
    for _ in range(100_000):
        try:
            sender.sendto(b"e", path)
        except BlockingIOError:
            return
    raise AssertionError(f"{path} never filled up")


async def test_a_cancel_is_sent_again_until_a_full_queue_has_room(tmp_path: Path) -> None:
    sibling = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # process 1, too busy to read for a while
    sibling.bind(str(tmp_path / "1.sock"))
    sibling.setblocking(False)
    bus = PeerBus(tmp_path, 0, 2, lambda kind, arg: None)
    await bus.start()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as flood:
            flood.setblocking(False)
            _fill(flood, str(tmp_path / "1.sock"))
        bus.send_now("c", "job-9 graph")
        bus.publish("e")  # dropped: the queue holds wake-ups already
        await asyncio.sleep(0.1)
        got: list[bytes] = []
        async with asyncio.timeout(5):
            while True:
                try:
                    got.append(sibling.recv(512))
                except BlockingIOError:
                    if b"c job-9 graph" in got:
                        break
                    await asyncio.sleep(0.01)
        assert got.count(b"c job-9 graph") == 1
    finally:
        bus.close()
        sibling.close()


async def test_a_queued_job_goes_to_a_sibling_only_when_no_worker_here_is_idle() -> None:
    notifier = Notifier()
    relayed: list[str] = []
    notifier.relay = relayed.append
    waiter = notifier.next_job(notifier.generation, Claim("w-1", 60.0))
    notifier.job_queued()
    assert waiter.done()
    assert relayed == ["e"]  # a worker here took it: the siblings only hear of the event
    relayed.clear()
    notifier.job_queued()
    assert relayed == ["q", "e"]
    relayed.clear()
    notifier.job_queued(relay=False)  # what a sibling said is never sent back
    notifier.notify(relay=False)
    assert relayed == []


def test_managed_backends_need_a_single_process() -> None:
    with pytest.raises(SettingsError, match="processes = 1"):
        ServiceSettings.from_mapping({"server": {"processes": 2}, "managed": {"cpu": True}})
    assert ServiceSettings.from_mapping({"server": {"processes": 4}}).server.processes == 4


# -- a real supervisor with two service processes --------------------------------------------------------


def _config(tmp_path: Path, port: int, doubles: list[FakeComfyUI], *, processes: int = 2, workers: int = 4,
            lease_s: float = 10.0) -> Path:
    config = _write_config(tmp_path, port, doubles, workers=workers, lease_s=lease_s)
    text = config.read_text().replace("[server]\n", f"[server]\nprocesses = {processes}\n", 1)
    config.write_text(text)
    return config


async def _health(base: str) -> dict[str, Any]:
    """``/healthz`` on a new connection (the kernel picks the process that accepts it)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as fresh, \
            fresh.get(f"{base}/healthz") as resp:
        assert resp.status == 200
        body: dict[str, Any] = await resp.json()
        return body


async def _processes(base: str, count: int, *, timeout: float = 30.0) -> dict[str, int]:
    """Label → pid of every service process, once each has answered."""
    seen: dict[str, int] = {}
    async with asyncio.timeout(timeout):
        while len(seen) < count:
            with_health = await _health(base)
            seen[with_health["process"]] = with_health["pid"]
            await asyncio.sleep(0.01)
    return seen


@asynccontextmanager
async def _supervisor(config: Path, port: int, session: aiohttp.ClientSession, count: int
                      ) -> AsyncIterator[tuple[Proc, dict[str, int]]]:
    proc = await _start(config, port, session, name="supervisor")
    try:
        pids = await _processes(f"http://127.0.0.1:{port}", count)
        yield proc, pids
    finally:
        await _kill(proc)


async def _metric(session: aiohttp.ClientSession, base: str, pattern: str) -> float:
    async with session.get(f"{base}/metrics") as resp:
        text = await resp.text()
    return sum(float(m.group(1)) for m in re.finditer(pattern + r" ([0-9.e+]+)$", text, re.MULTILINE))


async def test_two_processes_serve_one_port_one_store_one_event_stream(tmp_path: Path) -> None:
    port = free_port("127.0.0.1")
    base = f"http://127.0.0.1:{port}"
    async with FakeComfyUI(name="fake-0") as a, FakeComfyUI(name="fake-1") as b, _session() as session:
        config = _config(tmp_path, port, [a, b])
        async with _supervisor(config, port, session, 2) as (proc, pids):
            assert set(pids) == {"0/2", "1/2"}
            assert len(set(pids.values()) | {proc.process.pid}) == 3  # the supervisor serves nothing itself
            events: list[dict[str, Any]] = []
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as fresh:
                ws = await fresh.ws_connect(f"{base}/v1/events", headers=auth())
                ids = []
                for n in range(24):  # a connection each: the two processes both take some
                    async with fresh.post(f"{base}/v1/jobs", json={"graph": _small_graph(0x100 + n)},
                                          headers=auth()) as resp:
                        assert resp.status == 202, await resp.text()
                        ids.append((await resp.json())["id"])
                async with asyncio.timeout(30):
                    while {e["job_id"] for e in events if e["type"] == "job.succeeded"} != set(ids):
                        msg = await ws.receive()
                        assert msg.type is aiohttp.WSMsgType.TEXT, msg
                        events.append(json.loads(msg.data))
                await ws.close()
                seqs = [e["seq"] for e in events]
                assert seqs == sorted(seqs)
                assert len(set(seqs)) == len(seqs)
                done = await _wait_all(session, base, ids, "succeeded", timeout=10)
                for job in done.values():
                    async with fresh.get(f"{base}/v1/jobs/{job['id']}/outputs/{job['outputs'][0]}",
                                         headers=auth()) as resp:
                        assert resp.status == 200
                        assert (await resp.read())[:4] == b"\x89PNG"
                # every process counts its own requests; /metrics sums them whichever process answers
                for _ in range(4):
                    assert await _metric(fresh, base, r'comfy_orchestrator_http_requests_total\{method="POST",'
                                                       r'route="/v1/jobs",status="202"\}') == 24
                assert len(a.history) + len(b.history) == 24
            assert await _terminate(proc, timeout=30) == 0, proc.output()


async def test_a_cancel_that_reaches_the_other_process_interrupts_the_prompt_within_5_s(tmp_path: Path) -> None:
    port = free_port("127.0.0.1")
    base = f"http://127.0.0.1:{port}"
    # ComfyUI (and so the double) acts on an interrupt at the next node boundary: nodes of 2 s
    async with FakeComfyUI(name="fake-0", node_delay=2.0) as fake, _session() as session:
        # a lease of 60 s: renewing it (every 20 s) would notice the cancel far too late
        config = _config(tmp_path, port, [fake], workers=2, lease_s=60.0)
        async with _supervisor(config, port, session, 2) as (proc, _pids):
            job_id = await _submit_one(session, base, 0x0A0B0C)
            prompt_id = await _wait_running_on(fake)
            other = await _connection_to_a_process_not_running_it(base)
            try:
                async with other.get(f"{base}/v1/backends", headers=auth()) as resp:
                    (backend,) = (await resp.json())["items"]
                # this process runs nothing; the service as a whole runs one prompt there
                assert (backend["in_flight"], backend["in_flight_here"]) == (1, 0)
                assert (backend["max_in_flight"], backend["max_in_flight_here"]) == (1, 1)
                await _cancel_and_see_the_prompt_stop(other, base, job_id, fake, prompt_id)
            finally:
                await other.close()
            assert await _terminate(proc, timeout=30) == 0, proc.output()
        assert fake.history[prompt_id]["status"]["status_str"] != "success"
        assert _attempts(tmp_path / "jobs.db", job_id) == [("gpu-0", prompt_id, "cancelled")]


async def test_jobs_posted_to_one_process_use_the_slots_of_the_others(tmp_path: Path) -> None:
    """Two slots on one backend, one per process: two jobs posted on one connection (one process)
    are both on the backend at once, the second claimed by the other process."""
    port = free_port("127.0.0.1")
    base = f"http://127.0.0.1:{port}"
    async with FakeComfyUI(name="fake-0", node_delay=1.0) as fake, _session() as session:
        config = _config(tmp_path, port, [fake], workers=4)
        config.write_text(config.read_text().replace('url = "', 'max_in_flight = 2\nurl = "', 1))
        async with _supervisor(config, port, session, 2) as (proc, _pids), \
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as one:
            ids = []
            for n in range(2):
                async with one.post(f"{base}/v1/jobs", json={"graph": _small_graph(0x300 + n)},
                                    headers=auth()) as resp:
                    assert resp.status == 202, await resp.text()
                    ids.append((await resp.json())["id"])
            async with asyncio.timeout(4):  # a job takes 5 s: the second is not waiting for the first
                while True:
                    if fake.queue_remaining == 2:
                        break
                    await asyncio.sleep(0.02)
            await _wait_all(session, base, ids, "succeeded", timeout=30)
            assert await _terminate(proc, timeout=30) == 0, proc.output()


async def _connection_to_a_process_not_running_it(base: str) -> aiohttp.ClientSession:
    """A session whose one kept-alive connection is to a process with nothing in flight."""
    async with asyncio.timeout(30):
        while True:
            session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))
            async with session.get(f"{base}/v1/backends", headers=auth()) as resp:
                items = (await resp.json())["items"]
            if all(item["in_flight_here"] == 0 for item in items):
                return session
            await session.close()


async def test_a_process_that_dies_is_started_again_and_sigterm_stops_them_all(tmp_path: Path) -> None:
    port = free_port("127.0.0.1")
    base = f"http://127.0.0.1:{port}"
    async with FakeComfyUI(name="fake-0") as fake, _session() as session:
        config = _config(tmp_path, port, [fake])
        async with _supervisor(config, port, session, 2) as (proc, pids):
            os.kill(pids["1/2"], signal.SIGKILL)
            async with asyncio.timeout(30):
                while True:
                    now = await _processes(base, 2)
                    if now["1/2"] != pids["1/2"]:
                        break
                    await asyncio.sleep(0.1)
            assert now["0/2"] == pids["0/2"]
            assert "process 1 (pid" in proc.output()
            assert "starting it again" in proc.output()
            ids = [await _submit_one(session, base, 0x200 + n) for n in range(6)]
            await _wait_all(session, base, ids, "succeeded", timeout=30)
            assert fake.queue_remaining == 0
            assert await _terminate(proc, timeout=30) == 0, proc.output()
            for pid in now.values():
                with pytest.raises(ProcessLookupError):
                    os.kill(pid, 0)


async def _process_running_it(base: str, pids: dict[str, int]) -> int:
    """The pid of the service process with a prompt in flight."""
    async with asyncio.timeout(30):
        while True:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as one:
                async with one.get(f"{base}/healthz") as resp:  # the same kept-alive connection below
                    label = (await resp.json())["process"]
                async with one.get(f"{base}/v1/backends", headers=auth()) as resp:
                    items = (await resp.json())["items"]
            if any(item["in_flight_here"] for item in items):
                return pids[label]


async def test_a_job_whose_process_was_killed_is_taken_over_and_its_prompt_followed(tmp_path: Path) -> None:
    """SIGKILL the process running a job: once its lease runs out another worker takes the job
    over, finds its prompt still running on the backend and follows it, instead of running it again."""
    port = free_port("127.0.0.1")
    base = f"http://127.0.0.1:{port}"
    async with FakeComfyUI(name="fake-0", node_delay=2.0) as fake, _session() as session:  # a prompt: ~10 s
        config = _config(tmp_path, port, [fake], workers=2, lease_s=3.0)
        async with _supervisor(config, port, session, 2) as (proc, pids):
            job_id = await _submit_one(session, base, 0x0D0E0F)
            prompt_id = await _wait_running_on(fake)
            os.kill(await _process_running_it(base, pids), signal.SIGKILL)
            done = await _wait_all(session, base, [job_id], "succeeded", timeout=40)
            assert await _terminate(proc, timeout=30) == 0, proc.output()
        assert done[job_id]["result"]["adopted"] is True
        assert done[job_id]["result"]["prompt_id"] == prompt_id
        assert list(fake.history) == [prompt_id]  # it ran once
        assert _attempts(tmp_path / "jobs.db", job_id) == [("gpu-0", prompt_id, "succeeded")]


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for a parent (or an init that may never reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_service_processes_drain_and_exit_when_their_supervisor_is_killed(tmp_path: Path) -> None:
    port = free_port("127.0.0.1")
    async with FakeComfyUI(name="fake-0") as fake, _session() as session:
        config = _config(tmp_path, port, [fake])
        async with _supervisor(config, port, session, 2) as (proc, pids):
            proc.process.send_signal(signal.SIGKILL)
            await proc.process.wait()
            async with asyncio.timeout(20):  # noticed within a second, then a drain of up to 5 s
                while True:
                    if not any(_alive(pid) for pid in pids.values()):
                        break
                    await asyncio.sleep(0.1)
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past connections' TIME_WAIT, not a listener
            sock.bind(("127.0.0.1", port))  # nobody listens on the port any more
