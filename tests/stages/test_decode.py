"""Tests of the decoder (``map``) alone (iopipe/stages/decode.py), on both loop implementations."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import threading
import time
from typing import Any

import pytest

from iopipe import Pipeline, StageError
from iopipe.stages.decode import Decoder
from tests._helpers import (
    check_close_midway,
    check_error_propagation,
    check_order_and_count,
    check_state_midway,
    fail_on_seven,
    groups_of,
    items_of,
    run_stage,
    square,
    square_and_pid,
)

N = 100


def jittery_square(x: int) -> int:
    # A fake slow function: uneven durations make completion order differ from input order.
    time.sleep(random.random() * 0.001)
    return x * x


async def async_square(x: int) -> int:
    for _ in range(random.randrange(4)):
        await asyncio.sleep(0)
    return x * x


async def async_fail_on_seven(x: int) -> int:
    await asyncio.sleep(0)
    if x == 7:
        raise ValueError("bad item 7")
    return x


FNS = {
    "thread": (jittery_square, fail_on_seven),
    "process": (square, fail_on_seven),
    "inline": (square, fail_on_seven),
    "async": (async_square, async_fail_on_seven),
}
FAST = ["thread", "inline", "async"]


async def decode(items: list[Any], fn: Any, *, group: int = 8, **kw: Any) -> list[Any]:
    return items_of(await run_stage(Decoder(fn, **kw), groups_of(items, group)))


# -- order and completeness -------------------------------------------------------------


@pytest.mark.parametrize("executor", FAST)
async def test_output_keeps_input_order(executor: str) -> None:
    fn, _ = FNS[executor]
    got = await decode(list(range(N)), fn, executor=executor, concurrency=4)
    assert got == [x * x for x in range(N)]


@pytest.mark.parametrize("executor", FAST)
async def test_unordered_output_has_every_item_once(executor: str) -> None:
    fn, _ = FNS[executor]
    got = await decode(list(range(N)), fn, executor=executor, concurrency=4, ordered=False)
    assert sorted(got) == [x * x for x in range(N)]


@pytest.mark.slow
def test_process_executor_keeps_order_and_runs_elsewhere() -> None:
    # Each worker process imports iopipe (and so torch) to run its jobs: seconds per pool.
    with Pipeline.from_iterable(range(40), group_size=4).map(
        square_and_pid, executor="process", concurrency=2
    ) as pipe:
        for _ in range(2):  # the pool persists across epochs
            out = list(pipe)
            assert [y for y, _ in out] == [x * x for x in range(40)]
            assert os.getpid() not in {pid for _, pid in out}
    # close() joined the workers (no waiting here): none is left running.
    assert [p for p in multiprocessing.active_children() if p.is_alive()] == []


async def test_unordered_output_really_is_completion_order() -> None:
    # Item 0 is held until the consumer has received item 1: only a stage that emits
    # in completion order can deliver 1 first (an ordered one would wait for 0).
    from iopipe.runtime.channels import END, GroupQueue

    release = threading.Event()

    def fn(x: int) -> int:
        if x == 0:
            assert release.wait(10), "item 1 was never emitted ahead of item 0"
        return x

    stage = Decoder(fn, concurrency=2, ordered=False).fresh()
    stage.open(1)
    inq, outq = GroupQueue(2), GroupQueue(2)
    got: list[int] = []

    async def feed() -> None:
        for g in groups_of([0, 1], 1):
            await inq.put(g)
        await inq.put(END)

    async def collect() -> None:
        while (g := await outq.get()) is not END:
            got.extend(g.items)
            release.set()

    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(feed())
            tg.create_task(stage.run(inq, outq))
            tg.create_task(collect())
    finally:
        stage.close(10)
    assert got == [1, 0]


async def test_empty_groups_pass_through() -> None:
    from iopipe.runtime.channels import Group

    out = await run_stage(Decoder(square), [Group([], []), Group([3], [3])], unit=1)
    assert items_of(out) == [9]


# -- where the work runs ---------------------------------------------------------------


async def test_thread_executor_runs_in_named_workers() -> None:
    names = await decode(list(range(16)), lambda _: threading.current_thread().name, group=4)
    assert all(n.startswith("iopipe-map") for n in names), set(names)


async def test_inline_executor_runs_on_the_loop_thread() -> None:
    here = threading.current_thread()
    got = await decode(list(range(5)), lambda _: threading.current_thread(), executor="inline")
    assert all(t is here for t in got)


@pytest.mark.parametrize("executor", ["thread", "async"])
async def test_jobs_in_flight_never_exceed_concurrency(executor: str) -> None:
    lock = threading.Lock()
    active = 0
    peak = 0

    def enter() -> None:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)

    def leave() -> None:
        nonlocal active
        with lock:
            active -= 1

    def sync_fn(x: int) -> int:
        enter()
        time.sleep(0.0005)
        leave()
        return x

    async def async_fn(x: int) -> int:
        enter()
        await asyncio.sleep(0)
        leave()
        return x

    fn = sync_fn if executor == "thread" else async_fn
    # One item per group: every item is its own job, the most parallel case.
    got = await decode(list(range(60)), fn, executor=executor, concurrency=3, group=1)
    assert got == list(range(60))
    assert 1 <= peak <= 3


async def test_an_async_callable_object_is_awaited() -> None:
    class Doubler:
        async def __call__(self, x: int) -> int:
            await asyncio.sleep(0)
            return 2 * x

    assert Decoder(Doubler()).executor == "async"
    assert await decode(list(range(10)), Doubler()) == [2 * x for x in range(10)]


# -- errors --------------------------------------------------------------------------


@pytest.mark.parametrize("executor", FAST)
async def test_an_error_names_the_stage_and_the_item(executor: str) -> None:
    _, bad = FNS[executor]
    keys = [f"item-{i}" for i in range(20)]
    stage = Decoder(bad, executor=executor, name="decode")
    with pytest.raises(StageError) as info:
        await run_stage(stage, groups_of(list(range(20)), 6, keys=keys))
    err = info.value
    assert (err.stage, err.item) == ("decode", "item-7")
    assert isinstance(err.__cause__, ValueError)
    assert str(err.__cause__) == "bad item 7"
    assert "iopipe stage: decode, item: item-7" in err.__notes__


@pytest.mark.slow
def test_an_error_in_a_worker_process_keeps_its_cause() -> None:
    check_error_propagation(
        lambda: Pipeline.from_iterable(list(range(20))).map(
            fail_on_seven, executor="process", concurrency=1
        ),
        stage="map",
        item=7,
        cause=ValueError,
        match="bad item 7",
        prefix_of=list(range(20)),
    )


@pytest.mark.parametrize(
    ("fn", "kw", "exc", "match"),
    [
        (square, {"executor": "async"}, TypeError, "executor='async' needs an async def"),
        (async_square, {"executor": "thread"}, TypeError, "is an async function"),
        (square, {"executor": "fiber"}, ValueError, "executor must be one of"),
        (42, {}, TypeError, "map\\(\\) needs a callable, got int"),
        (square, {"concurrency": 0}, ValueError, "concurrency must be an int >= 1, got 0"),
        (square, {"concurrency": True}, ValueError, "concurrency must be an int >= 1"),
    ],
)
def test_decoder_arguments_are_validated(
    fn: Any, kw: dict[str, Any], exc: type[Exception], match: str
) -> None:
    with pytest.raises(exc, match=match):
        Decoder(fn, **kw)


# -- stats and the shared properties ---------------------------------------------------


async def test_stats_count_items_and_jobs() -> None:
    stage = Decoder(square, concurrency=2).fresh()
    stage.open(10)
    from iopipe.runtime.channels import END, GroupQueue

    inq, outq = GroupQueue(100), GroupQueue(100)
    for g in groups_of(list(range(30)), 10):
        await inq.put(g)
    await inq.put(END)
    try:
        await stage.run(inq, outq)
    finally:
        stage.close(10)
    assert stage.counters.items == 30
    assert stage.counters.jobs >= 3


@pytest.mark.parametrize("executor", FAST)
def test_map_pipeline_keeps_order_and_count(executor: str) -> None:
    fn, _ = FNS[executor]
    want = [x * x for x in range(N)]
    check_order_and_count(
        lambda: Pipeline.from_iterable(range(N), group_size=7).map(fn, executor=executor), want
    )
    check_order_and_count(
        lambda: Pipeline.from_iterable(range(N)).map(fn, executor=executor, ordered=False),
        want,
        ordered=False,
    )


@pytest.mark.parametrize("executor", FAST)
def test_map_pipeline_propagates_errors(executor: str) -> None:
    _, bad = FNS[executor]
    check_error_propagation(
        lambda: (
            Pipeline.from_iterable([f"k{i}" for i in range(20)], group_size=4)
            .map(lambda k: int(k[1:]))
            .map(bad, executor=executor)
        ),
        stage="map_1",
        item="k7",  # the source item, not the value the failing stage saw
        cause=ValueError,
        prefix_of=list(range(20)),
    )


def test_map_pipeline_closes_midway() -> None:
    check_close_midway(lambda: Pipeline.from_iterable(range(N), group_size=4).map(square), take=9)


@pytest.mark.parametrize("group_size", [1, 8])
def test_map_pipeline_resumes_midway(group_size: int) -> None:
    check_state_midway(
        lambda: Pipeline.from_iterable(range(N), group_size=group_size).map(jittery_square),
        [x * x for x in range(N)],
        take=37,
    )
