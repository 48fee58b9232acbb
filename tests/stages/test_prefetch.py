"""Tests of the prefetcher alone (iopipe/stages/prefetch.py), on both loop implementations."""

from __future__ import annotations

import asyncio

import pytest

from iopipe import Pipeline
from iopipe.runtime.channels import END, GroupQueue
from iopipe.stages.prefetch import Prefetcher
from tests._helpers import (
    check_close_midway,
    check_order_and_count,
    check_state_midway,
    groups_of,
    items_of,
    run_stage,
    settle,
    wait_until,
)


async def test_groups_pass_through_unchanged_in_order() -> None:
    groups = groups_of(list(range(20)), 3)
    out = await run_stage(Prefetcher(5), groups)
    assert out == groups  # the very same group objects
    assert items_of(out) == list(range(20))


@pytest.mark.parametrize(("n", "group"), [(1, 1), (4, 1), (8, 2), (6, 3)])
async def test_keeps_up_to_n_items_ready(n: int, group: int) -> None:
    stage = Prefetcher(n).fresh()
    stage.open(group)
    assert stage.capacity == n
    inq, outq = GroupQueue(2 * group), GroupQueue(stage.capacity)
    groups = groups_of(list(range(100)), group)

    async def feed() -> None:
        for g in groups:
            await inq.put(g)
        await inq.put(END)

    async with asyncio.TaskGroup() as tg:
        tg.create_task(feed())
        runner = tg.create_task(stage.run(inq, outq))
        # Nobody consumes: the prefetcher fills its queue to n items and stops there.
        await settle()
        assert outq.counters.used == n
        taken = await outq.get()
        assert taken is groups[0]
        await settle()
        assert outq.counters.used == n  # refilled to n, not beyond
        got = [*taken.items]
        while (g := await outq.get()) is not END:
            assert outq.counters.used <= n
            got.extend(g.items)
        await runner
    assert got == list(range(100))
    assert stage.counters.items == 100


@pytest.mark.parametrize("n", [0, -1, True, 1.5])
def test_prefetch_size_is_validated(n: object) -> None:
    with pytest.raises(ValueError, match=f"prefetch size must be an int >= 1, got {n!r}"):
        Prefetcher(n)  # type: ignore[arg-type]


def test_prefetch_in_the_middle_holds_n_elements() -> None:
    # prefetch(3) after batch(4) holds 3 batches, i.e. 12 source items.
    with Pipeline.from_iterable(range(100)).batch(4).prefetch(3).map(lambda b: b) as pipe:
        it = iter(pipe)
        next(it)
        assert pipe.stats().stage("prefetch").queue_capacity == 12
        assert wait_until(lambda: pipe.stats().stage("prefetch").queue_now == 12)
        assert len(list(it)) == 24


@pytest.mark.parametrize(("batch_size", "n"), [(None, 16), (None, 3), (4, 5)])
def test_a_final_prefetch_holds_n_elements_ahead_of_the_consumer(
    batch_size: int | None, n: int
) -> None:
    # The last stage puts straight into the consumer's hand-off: a prefetch(n) there
    # must still hold n elements (items, or batches) ready, not the hand-off's default.
    pipe = Pipeline.from_iterable(range(1000), group_size=4)
    if batch_size is not None:
        pipe = pipe.batch(batch_size)
    with pipe.prefetch(n) as pipe:
        it = iter(pipe)
        next(it)
        # The last stage's queue (the hand-off) counts groups: 4 items, or one batch.
        per_group = 4 if batch_size is None else 1
        cap = pipe.stats().stage("prefetch").queue_capacity
        assert cap * per_group >= n
        assert wait_until(lambda: pipe.stats().stage("prefetch").queue_now == cap)
        rest = list(it)
    assert len(rest) == (999 if batch_size is None else 249)


def test_prefetch_pipeline_keeps_order_and_count() -> None:
    check_order_and_count(
        lambda: Pipeline.from_iterable(range(77), group_size=5).prefetch(10), list(range(77))
    )


def test_prefetch_pipeline_closes_midway() -> None:
    check_close_midway(lambda: Pipeline.from_iterable(range(500)).prefetch(64), take=10)


def test_prefetch_pipeline_resumes_midway() -> None:
    check_state_midway(
        lambda: Pipeline.from_iterable(range(90), group_size=8).prefetch(20),
        list(range(90)),
        take=21,
    )
