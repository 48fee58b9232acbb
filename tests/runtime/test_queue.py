"""Tests of the bounded queues and the units that travel through them (iopipe/runtime/channels.py)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import pytest

from iopipe.runtime.channels import END, BatchKey, Group, GroupQueue, Handoff
from tests._helpers import settle


def g(*items: Any) -> Group:
    return Group(list(items), list(items))


# -- Group ---------------------------------------------------------------------------


def test_group_weight_counts_items_hits_and_batched_counts() -> None:
    assert g(1, 2, 3).weight == 3
    assert Group([], []).weight == 0
    assert Group([1], [1], hits=[(0, "a", "x"), (2, "b", "y")]).weight == 3
    assert Group(["batch"], ["k"], batched=True, counts=[8]).weight == 8


def test_replace_items_keeps_keys_hits_and_counts() -> None:
    src = Group([1, 2], ["a", "b"], hits=[(2, "c", 3)], batched=True, counts=[3])
    out = src.replace_items([10, 20])
    assert out.items == [10, 20]
    assert (out.keys, out.hits, out.batched, out.counts) == (
        src.keys,
        src.hits,
        src.batched,
        src.counts,
    )
    assert src.items == [1, 2]


def test_end_and_batch_key_are_readable() -> None:
    assert repr(END) == "END"
    assert END is not None
    assert repr(BatchKey(3, "a/0.bin", "a/7.bin")) == "batch 3 (a/0.bin .. a/7.bin)"


# -- GroupQueue ----------------------------------------------------------------------


@pytest.mark.parametrize("capacity", [0, -1])
def test_group_queue_capacity_must_be_positive(capacity: int) -> None:
    with pytest.raises(ValueError, match=f"capacity must be >= 1, got {capacity}"):
        GroupQueue(capacity)


async def test_group_queue_is_fifo() -> None:
    q = GroupQueue(100)
    groups = [g(i, i + 1) for i in range(0, 20, 2)]
    for x in groups:
        await q.put(x)
    await q.put(END)
    assert len(q) == 11
    out = [await q.get() for _ in range(11)]
    assert out == [*groups, END]
    assert q.counters.used == 0


async def test_group_queue_bounds_items_not_groups() -> None:
    q = GroupQueue(4)
    await q.put(g(1, 2))
    await q.put(g(3, 4))
    assert q.counters.used == 4
    blocked = asyncio.create_task(q.put(g(5)))
    await settle()
    assert not blocked.done()  # 4 + 1 > capacity
    assert (await q.get()).items == [1, 2]
    await asyncio.wait_for(blocked, 10)
    assert q.counters.used == 3


async def test_group_queue_admits_an_oversized_group_into_an_empty_queue() -> None:
    q = GroupQueue(2)
    await asyncio.wait_for(q.put(g(*range(10))), 10)  # would deadlock otherwise
    assert q.counters.used == 10
    blocked = asyncio.create_task(q.put(g(99)))
    await settle()
    assert not blocked.done()
    await q.get()
    await asyncio.wait_for(blocked, 10)


async def test_end_marker_has_no_weight() -> None:
    q = GroupQueue(1)
    await q.put(g(1))
    # END is admitted even into a full queue: the end of stream never waits for room.
    await asyncio.wait_for(q.put(END), 10)
    assert q.counters.used == 1


async def test_get_waits_for_a_put() -> None:
    q = GroupQueue(4)
    getter = asyncio.create_task(q.get())
    await settle()
    assert not getter.done()
    await q.put(g(7))
    assert (await asyncio.wait_for(getter, 10)).items == [7]


async def test_cancelled_getter_does_not_swallow_a_wake_up() -> None:
    q = GroupQueue(4)
    first = asyncio.create_task(q.get())
    second = asyncio.create_task(q.get())
    await settle()
    first.cancel()
    await settle()
    await q.put(g(1))
    assert (await asyncio.wait_for(second, 10)).items == [1]
    assert first.cancelled()


async def test_cancelled_putter_does_not_swallow_a_wake_up() -> None:
    q = GroupQueue(1)
    await q.put(g(0))
    first = asyncio.create_task(q.put(g(1)))
    second = asyncio.create_task(q.put(g(2)))
    await settle()
    first.cancel()
    await settle()
    assert (await q.get()).items == [0]
    await asyncio.wait_for(second, 10)
    assert (await q.get()).items == [2]
    assert len(q) == 0


async def test_many_producers_and_consumers_keep_every_item_once() -> None:
    q = GroupQueue(3)
    n_prod, per = 4, 50
    got: list[int] = []

    async def produce(p: int) -> None:
        for i in range(per):
            await q.put(g(p * per + i))

    async def consume() -> None:
        while True:
            x = await q.get()
            if x is END:
                return
            got.extend(x.items)
            assert q.counters.used <= q.capacity

    consumers = [asyncio.create_task(consume()) for _ in range(3)]
    await asyncio.gather(*(produce(p) for p in range(n_prod)))
    for _ in consumers:
        await q.put(END)
    await asyncio.wait_for(asyncio.gather(*consumers), 10)
    assert sorted(got) == list(range(n_prod * per))


async def test_queue_counters_track_occupancy() -> None:
    q = GroupQueue(10)
    assert q.counters.mean() == 0.0
    await q.put(g(1, 2, 3))
    assert q.counters.used == 3
    assert q.counters.mean() >= 0.0
    await q.get()
    assert q.counters.used == 0


# -- Handoff (loop thread -> consumer thread) ----------------------------------------


def make_handoff(capacity: int) -> Handoff:
    loop = asyncio.get_running_loop()

    def wake(fn: Callable[[], None]) -> None:
        loop.call_soon_threadsafe(fn)

    return Handoff(capacity, wake)


def test_handoff_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="capacity must be >= 1, got 0"):
        Handoff(0, lambda fn: None)


async def test_handoff_crosses_threads_in_order_with_backpressure() -> None:
    h = make_handoff(2)
    n = 50
    got: list[Any] = []

    def consumer() -> None:
        while True:
            x = h.get(10.0, lambda: True)
            if x is END:
                return
            got.append(x.items[0])

    t = asyncio.create_task(asyncio.to_thread(consumer))
    for i in range(n):
        await asyncio.wait_for(h.put(g(i)), 10)
        assert h.counters.used <= 2
    h.put_end()
    await asyncio.wait_for(t, 10)
    assert got == list(range(n))


async def test_handoff_put_waits_while_full_and_the_consumer_wakes_it() -> None:
    h = make_handoff(1)
    await h.put(g(1))
    blocked = asyncio.create_task(h.put(g(2)))
    await settle()
    assert not blocked.done()
    first = await asyncio.to_thread(h.get, 10.0, lambda: True)
    assert first.items == [1]
    await asyncio.wait_for(blocked, 10)
    assert (await asyncio.to_thread(h.get, 10.0, lambda: True)).items == [2]


async def test_handoff_delivers_errors_after_what_came_before() -> None:
    h = make_handoff(4)
    await h.put(g(1))
    err = ValueError("stage broke")
    h.put_error(err)
    assert h.get(1.0, lambda: True).items == [1]
    with pytest.raises(ValueError, match="stage broke") as info:
        h.get(1.0, lambda: True)
    assert info.value is err


def test_handoff_get_times_out() -> None:
    h = Handoff(1, lambda fn: None)
    with pytest.raises(TimeoutError):
        h.get(0.01, lambda: True)
    assert h.wait_s > 0


def test_handoff_get_notices_a_dead_loop_thread() -> None:
    h = Handoff(1, lambda fn: None)
    with pytest.raises(RuntimeError, match="event-loop thread died"):
        h.get(None, lambda: False)


def test_handoff_close_wakes_a_blocked_consumer() -> None:
    h = Handoff(1, lambda fn: None)
    errors: list[BaseException] = []
    waiting = threading.Event()

    def consumer() -> None:
        waiting.set()
        try:
            h.get(None, lambda: True)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=consumer, name="test-consumer")
    t.start()
    assert waiting.wait(10)
    h.close()
    t.join(10)
    assert not t.is_alive()
    assert len(errors) == 1
    assert isinstance(errors[0], RuntimeError)
    assert "closed" in str(errors[0])


async def test_handoff_close_cancels_a_waiting_put_and_drops_pending_groups() -> None:
    h = make_handoff(1)
    await h.put(g(1))
    blocked = asyncio.create_task(h.put(g(2)))
    await settle()
    h.close()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(blocked, 10)
    with pytest.raises(asyncio.CancelledError):
        await h.put(g(3))  # refused once closed
    with pytest.raises(RuntimeError, match="closed"):
        h.get(0.01, lambda: True)
