"""The capacity limiter's two faces (iopipe/runtime/limits.py): one model, loop and threads."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time

import pytest

from iopipe.runtime.limits import BlockingCapacityLimiter, CapacityLimiter, LimiterStatistics


def _wait(cond: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(0.005)
    return False


def test_async_face_bounds_holders_and_moves_its_bound() -> None:
    async def main() -> list[int]:
        lim = CapacityLimiter(2)
        peak: list[int] = []

        async def job() -> None:
            async with lim:
                peak.append(lim.borrowed_tokens)
                await asyncio.sleep(0.001)

        await asyncio.gather(*(job() for _ in range(6)))
        assert lim.statistics() == LimiterStatistics(0, 2, 0)
        await lim.acquire()
        await lim.acquire()
        lim.total_tokens = 1  # lowering takes nothing back
        assert lim.borrowed_tokens == 2
        assert lim.available_tokens == -1
        lim.release()
        lim.release()
        return peak

    assert max(asyncio.run(main())) == 2


def test_blocking_face_bounds_threads_and_wakes_them_when_the_bound_rises() -> None:
    lim = BlockingCapacityLimiter(1)
    lim.acquire()
    got = threading.Event()

    def waiter() -> None:
        with lim:
            got.set()

    t = threading.Thread(target=waiter)
    t.start()
    assert _wait(lambda: lim.statistics().tasks_waiting == 1)
    assert not got.is_set()
    lim.total_tokens = 2  # room now: the waiter goes while the first holder still holds
    assert got.wait(10)
    t.join(10)
    lim.release()
    assert lim.statistics() == LimiterStatistics(0, 2, 0)


def test_blocking_face_serves_the_lowest_priority_first() -> None:
    lim = BlockingCapacityLimiter(1)
    order: list[int] = []

    def take(p: int) -> None:
        lim.acquire(p)
        order.append(p)
        lim.release()

    lim.acquire(0)
    threads = []
    for k, p in enumerate([9, 3, 6]):
        threads.append(threading.Thread(target=take, args=(p,)))
        threads[-1].start()
        assert _wait(lambda k=k: lim.statistics().tasks_waiting == k + 1)
    lim.release()
    for t in threads:
        t.join(10)
    assert order == [3, 6, 9]


def test_statistics_are_a_frozen_snapshot() -> None:
    stats = BlockingCapacityLimiter(3).statistics()
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.total_tokens = 5  # type: ignore[misc]
    assert stats.total_tokens == 3
    assert BlockingCapacityLimiter(0).total_tokens == 1  # under 1 counts as 1


def test_a_waiter_interrupted_while_waiting_leaves_the_queue() -> None:
    lim = BlockingCapacityLimiter(1)
    lim.acquire()
    cond = lim.holding()

    def interrupted(timeout: float | None = None) -> bool:
        raise KeyboardInterrupt

    cond.wait = interrupted  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        lim.acquire(0)
    del cond.wait  # the real wait again
    assert lim.statistics().tasks_waiting == 0
    got = threading.Event()
    t = threading.Thread(target=lambda: (lim.acquire(5), got.set(), lim.release()))
    t.start()
    lim.release()
    assert got.wait(10)  # not stuck behind the interrupted waiter's priority
    t.join(10)
