"""The group pump every stage runs, and the gathering of a group's jobs.

A stage consumes :class:`~iopipe.runtime.channels.Group` s from an input queue and puts
groups on an output queue.  :func:`pump` runs the common loop: it keeps at most
``window`` groups in process (so the items alive in a stage are bounded), emits
results in input order unless ``ordered=False``, and records wait times.
:func:`gather_spans` runs the jobs one group is split into, naming the span of a
failed one.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, Protocol

from ..runtime.channels import END, Group
from .base import CURRENT_GROUP, CURRENT_SPAN, InQueue, ItemFailure, OutQueue

__all__ = [
    "SpanFailure",
    "WaitCounters",
    "drain",
    "flat_task_group",
    "gather_spans",
    "leaf_errors",
    "pump",
]


class WaitCounters(Protocol):
    """Where the pump records its waits (a stage's :class:`~iopipe.runtime.stats.StageCounters`)."""

    wait_input_s: float
    wait_output_s: float


async def drain(inq: InQueue, counters: WaitCounters) -> AsyncIterator[Group]:
    """Yield the groups of ``inq`` until END, counting the time spent waiting."""
    while True:
        t0 = time.perf_counter()
        group = await inq.get()
        counters.wait_input_s += time.perf_counter() - t0
        if group is END:
            return
        yield group


async def _put(outq: OutQueue, group: Group, counters: WaitCounters) -> None:
    t0 = time.perf_counter()
    await outq.put(group)
    counters.wait_output_s += time.perf_counter() - t0


async def pump(
    groups: AsyncIterator[Group],
    outq: OutQueue,
    process: Callable[[Group], Coroutine[Any, Any, Group]],
    *,
    window: int,
    ordered: bool,
    counters: WaitCounters,
) -> None:
    """Run ``process`` over ``groups`` with at most ``window`` groups in process.

    Invariant: a slot of ``window`` is taken before a group is pulled from the
    input and given back only once its result was put downstream, so the stage
    never holds more than ``window`` groups.  Ends by putting END.
    """
    slots = asyncio.Semaphore(window)
    pending: deque[asyncio.Task[Group]] = deque()
    ready = asyncio.Event()  # for the ordered emitter: something was appended / ended
    finished = False

    async def emit_ordered() -> None:
        while True:
            while not pending:
                if finished:
                    return
                ready.clear()
                await ready.wait()
            task = pending[0]
            out = await task
            pending.popleft()
            await _put(outq, out, counters)
            slots.release()

    async def one_unordered(group: Group) -> None:
        try:
            out = await process(group)
            await _put(outq, out, counters)
        finally:
            slots.release()

    async with flat_task_group() as tg:
        if ordered:
            tg.create_task(emit_ordered())
        it = aiter(groups)
        while True:
            await slots.acquire()
            try:
                group = await anext(it)
            except StopAsyncIteration:
                slots.release()
                break
            CURRENT_GROUP.set(group)  # the task's context copies it
            if ordered:
                pending.append(tg.create_task(process(group)))
                ready.set()
            else:
                tg.create_task(one_unordered(group))
        finished = True
        ready.set()
    await outq.put(END)


def leaf_errors(exc: BaseException) -> list[BaseException]:
    """The non-group exceptions inside (possibly nested) exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in leaf_errors(sub)]
    return [exc]


class flat_task_group:
    """An ``asyncio.TaskGroup`` that re-raises a lone failure as itself.

    Stages nest task groups; without this, one failed item would reach the
    consumer wrapped in several layers of ExceptionGroup.
    """

    def __init__(self) -> None:
        self._tg = asyncio.TaskGroup()

    async def __aenter__(self) -> asyncio.TaskGroup:
        return await self._tg.__aenter__()

    async def __aexit__(self, et: Any, exc: Any, tb: Any) -> bool | None:
        try:
            await self._tg.__aexit__(et, exc, tb)
            return None
        except BaseExceptionGroup as eg:
            leaves = [e for e in leaf_errors(eg) if not isinstance(e, asyncio.CancelledError)]
            # One failure can be raised twice: by a job's task and by the ordered
            # emitter that awaits it.  Count each exception object once.
            leaves = list({id(e): e for e in leaves}.values())
            if len(leaves) == 1:
                raise leaves[0] from leaves[0].__cause__
            raise


class SpanFailure(Exception):
    """An ItemFailure of one job, with the index of the job's first item in its group."""

    def __init__(self, exc: ItemFailure, offset: int) -> None:
        super().__init__(exc, offset)
        self.exc = exc
        self.offset = offset


async def gather_spans(coros: list[Any], offsets: list[int]) -> list[Any]:
    """Gather job coroutines; an ItemFailure is re-raised with its job's offset."""
    tasks = []
    for i, c in enumerate(coros):
        CURRENT_SPAN.set((offsets[i], offsets[i + 1] if i + 1 < len(offsets) else -1))
        tasks.append(asyncio.ensure_future(c))  # the task's context copies the span
    CURRENT_SPAN.set(None)
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException as exc:
        for t in tasks:
            t.cancel()
        if isinstance(exc, ItemFailure):
            for off, t in zip(offsets, tasks, strict=True):
                if t.done() and not t.cancelled() and t.exception() is exc:
                    raise SpanFailure(exc, off) from None
        raise
