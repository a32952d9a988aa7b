from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import pytest

from quality.batching import DynamicBatcher
from quality.errors import EvaluatorClosed


def test_gathers_up_to_max_batch() -> None:
    seen: list[int] = []
    gate = threading.Event()

    def run(items: Sequence[int]) -> list[int]:
        gate.wait(5)
        seen.append(len(items))
        return [i * 2 for i in items]

    batcher: DynamicBatcher[int, int] = DynamicBatcher(run, max_batch=4, max_wait_ms=50)
    futures = [batcher.submit(i) for i in range(10)]
    gate.set()
    assert [f.result(5) for f in futures] == [i * 2 for i in range(10)]
    batcher.close()
    assert max(seen) <= 4
    assert sum(seen) == 10
    assert batcher.stats.items == 10
    assert batcher.stats.largest_batch <= 4


def test_a_lone_request_does_not_wait() -> None:
    batcher: DynamicBatcher[int, int] = DynamicBatcher(lambda xs: list(xs), max_batch=64, max_wait_ms=2000)
    started = time.perf_counter()
    assert batcher.submit(7).result(5) == 7
    assert time.perf_counter() - started < 1.0  # nothing reserved: no reason to wait 2 s
    batcher.close()
    assert batcher.stats.batches == 1


def test_reserved_items_are_waited_for_at_most_max_wait() -> None:
    batcher: DynamicBatcher[int, int] = DynamicBatcher(lambda xs: list(xs), max_batch=64, max_wait_ms=100)
    with batcher.reserve(3) as reservation:
        started = time.perf_counter()
        first = reservation.submit(1)
        assert first.result(5) == 1  # the other two never come: the batch goes after max_wait
        waited = time.perf_counter() - started
    assert 0.08 < waited < 2.0
    batcher.close()


async def test_concurrent_callers_share_a_batch() -> None:
    batcher: DynamicBatcher[int, int] = DynamicBatcher(lambda xs: [x + 1 for x in xs], max_batch=32,
                                                       max_wait_ms=1000)

    async def caller(i: int) -> int:
        with batcher.reserve(1) as reservation:
            await asyncio.sleep(0.001 * i)  # "decoding"
            return await asyncio.wrap_future(reservation.submit(i))

    results = await asyncio.gather(*(caller(i) for i in range(16)))
    assert results == [i + 1 for i in range(16)]
    assert batcher.stats.largest_batch > 8
    assert await batcher.run_many([1, 2, 3]) == [2, 3, 4]
    batcher.close()


async def test_an_error_fails_its_batch_and_the_worker_goes_on() -> None:
    def run(items: Sequence[int]) -> list[int]:
        if 13 in items:
            raise ValueError("unlucky")
        return list(items)

    batcher: DynamicBatcher[int, int] = DynamicBatcher(run, max_batch=1, max_wait_ms=0)
    with pytest.raises(ValueError, match="unlucky"):
        await batcher.run(13)
    assert await batcher.run(1) == 1
    batcher.close()


def test_wrong_result_count_is_an_error() -> None:
    batcher: DynamicBatcher[int, int] = DynamicBatcher(lambda xs: [], max_batch=1)
    with pytest.raises(RuntimeError, match="0 results for 1"):
        batcher.submit(1).result(5)
    batcher.close()


def test_cancelled_requests_are_left_out() -> None:
    gate = threading.Event()
    ran: list[list[int]] = []

    def run(items: Sequence[int]) -> list[int]:
        gate.wait(5)
        ran.append(list(items))
        return list(items)

    batcher: DynamicBatcher[int, int] = DynamicBatcher(run, max_batch=1, max_wait_ms=0)
    first = batcher.submit(1)  # occupies the worker until the gate opens
    time.sleep(0.05)
    second = batcher.submit(2)
    assert second.cancel()
    gate.set()
    assert first.result(5) == 1
    batcher.close()
    assert ran == [[1]]


def test_close_finishes_queued_work_then_refuses() -> None:
    batcher: DynamicBatcher[int, int] = DynamicBatcher(lambda xs: list(xs), max_batch=2, max_wait_ms=10)
    futures = [batcher.submit(i) for i in range(5)]
    batcher.close()
    assert [f.result(1) for f in futures] == list(range(5))
    with pytest.raises(EvaluatorClosed):
        batcher.submit(9)
    batcher.close()  # idempotent


def test_bad_settings() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        DynamicBatcher(lambda xs: list(xs), max_batch=0)
    with pytest.raises(ValueError, match="max_wait_ms"):
        DynamicBatcher(lambda xs: list(xs), max_wait_ms=-1)


def test_items_of_several_units_are_packed_whole() -> None:
    """A caller's images travel as one item of len(images) units: merged with others, never split."""
    gate, busy = threading.Event(), threading.Event()
    seen: list[list[int]] = []

    def run(xs: Sequence[int]) -> list[int]:
        busy.set()
        gate.wait(5)
        seen.append(list(xs))
        return list(xs)

    batcher: DynamicBatcher[int, int] = DynamicBatcher(run, max_batch=8, max_wait_ms=0)
    first = batcher.submit(0, size=1)  # holds the worker while the rest queue up
    assert busy.wait(5)
    sizes = {1: 5, 2: 2, 3: 4, 4: 1, 5: 8, 6: 12}
    futures = [batcher.submit(item, size=size) for item, size in sizes.items()]
    gate.set()
    assert first.result(5) == 0
    assert [f.result(5) for f in futures] == list(sizes)
    assert seen == [[0], [1, 2], [3, 4], [5], [6]]  # 5+2, 4+1, 8, and 12 alone (larger than a batch)
    assert batcher.stats.items == 1 + sum(sizes.values())
    assert batcher.stats.largest_batch == 12
    batcher.close()
