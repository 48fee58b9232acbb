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
    pending: deque[asyncio.Task[Group | _Failed]] = deque()
    ready = asyncio.Event()  # for the ordered emitter: something was appended / ended
    finished = False

    async def emit_ordered() -> None:
        while True:
            while not pending:
                if finished:
                    return
                ready.clear()
                await ready.wait()
            out = _unwrap(await pending[0])  # in input order: the earliest failure first
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
                pending.append(tg.create_task(_settled(process, group)))
                ready.set()
            else:
                tg.create_task(one_unordered(group))
        finished = True
        ready.set()
    await outq.put(END)


class _Failed:
    """A group's failure, held until the ordered emitter reaches the group."""

    __slots__ = ("exc",)

    def __init__(self, exc: Exception) -> None:
        self.exc = exc


async def _settled(
    process: Callable[[Group], Coroutine[Any, Any, Group]], group: Group
) -> Group | _Failed:
    """``await process(group)``, returning its failure instead of raising it.

    Under ``ordered=True`` a later group can fail before an earlier one ends
    (they run concurrently); raising at once would report whichever job lost
    the race.  Holding the failure until the emitter reaches it makes the error
    the consumer sees the earliest failing item's, every run.
    """
    try:
        return await process(group)
    except Exception as exc:  # re-raised by the emitter, in order
        return _Failed(exc)


def _unwrap(out: Group | _Failed) -> Group:
    if isinstance(out, _Failed):
        raise out.exc
    return out


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
    """Gather job coroutines; an ItemFailure is re-raised with its job's offset.

    When jobs fail, the one reported is the earliest in the group, whichever
    finished first: the jobs before it are awaited (one of them may fail too),
    the ones after it are cancelled.
    """
    tasks = []
    for i, c in enumerate(coros):
        CURRENT_SPAN.set((offsets[i], offsets[i + 1] if i + 1 < len(offsets) else -1))
        tasks.append(asyncio.ensure_future(c))  # the task's context copies the span
    CURRENT_SPAN.set(None)
    pending = set(tasks)
    first = len(tasks)  # the earliest job known to have failed
    try:
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
            for t in sorted(done, key=tasks.index):  # the earliest job first
                if tasks.index(t) > first:
                    break  # a later job than one known to have failed: not reported
                if t.cancelled():
                    raise asyncio.CancelledError  # nothing of ours cancels a job before `first`
                exc = t.exception()
                if exc is None:
                    continue
                if not isinstance(exc, ItemFailure):
                    raise exc
                first = min(first, tasks.index(t))
            for t in tasks[first + 1 :]:
                t.cancel()
            pending.difference_update(tasks[first + 1 :])
    except BaseException:
        for t in tasks:
            t.cancel()
        raise
    if first < len(tasks):
        exc = tasks[first].exception()
        assert isinstance(exc, ItemFailure)
        raise SpanFailure(exc, offsets[first]) from None
    return [t.result() for t in tasks]
