"""One epoch of a running pipeline: its hand-off, its consumer cursor, its stall reports.

An :class:`Epoch` is one pass over the source, started by ``iter(pipeline)``;
its coroutine (:meth:`~iopipe.pipeline.engine.Runtime.run_epoch`) runs on the
loop thread, while the consumer reads it through an
:class:`~iopipe.pipeline.iterator.EpochIterator` on its own thread.  Everything
the two threads share crosses in the :class:`~iopipe.runtime.channels.Handoff`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import time
from typing import TYPE_CHECKING, Any

from ..runtime.budget import ByteBudget
from ..runtime.channels import Handoff
from ..runtime.stats import PipelineStats, snapshot
from ..runtime.watchdog import Stall, abandon_stuck, find_stall
from ..stages.base import Stage

if TYPE_CHECKING:
    from .engine import Runtime

__all__ = ["STOP_TIMEOUT_S", "Epoch", "budgeted_reader"]

#: Seconds stopping an epoch (and shutting a runtime down) waits for work in flight.
STOP_TIMEOUT_S = 10.0


def budgeted_reader(stages: list[Stage]) -> Stage | None:
    """The stage that ``max_inflight_bytes`` gates: the first that declares it can be."""
    return next((s for s in stages if s.gates_bytes), None)


class Epoch:
    """One pass over the source, started by ``iter(pipeline)``."""

    def __init__(self, rt: Runtime, epoch: int, skip: int, handoff_groups: int) -> None:
        self.rt = rt
        self.epoch = epoch
        self.skip = skip
        self.handoff = Handoff(handoff_groups, rt.loop.call_soon)
        self.queues: list[Any] = []
        self.started = time.perf_counter()
        self.ended: float | None = None
        # When each stage finished (task name -> perf_counter): a stage's stats cover
        # the time it ran, so one that finished early does not look busy meanwhile.
        self.stage_ended: dict[str, float] = {}
        self.delivered = 0
        self.consumed = skip  # source items handed out before the current group
        # The consumer's cursor in the group it is reading.  It lives here, not on
        # the iterator, so the position survives the iterator (state after a break).
        self.buf: list[Any] = []
        self.counts: list[int] | None = None
        self.i = 0
        self.tail = 0  # source items that failed after the group's last element (skip)
        self.finished = False
        self.task: asyncio.Task[Any] | None = None  # run_epoch's task, once it runs
        self.budget: ByteBudget | None = None
        if rt.max_inflight_bytes is not None:
            self.budget = ByteBudget(rt.max_inflight_bytes, skip, self.idle_after_reader)
        self.future: concurrent.futures.Future[None] = rt.loop.submit(rt.run_epoch(self))

    def position(self) -> int:
        """Source items handed to the consumer so far this epoch."""
        if self.counts is None:
            return self.consumed + self.i
        done = self.consumed + sum(self.counts[: self.i])
        return done + self.tail if self.i >= len(self.buf) else done

    def stage_done(self, task: asyncio.Task[Any]) -> None:
        """Record when a stage's task finished (its done callback, loop thread)."""
        now = time.perf_counter()
        for name in task.get_name().split("+"):  # a fused run is named "read+map+batch"
            self.stage_ended[name] = now

    def stop(self) -> None:
        """Cancel whatever still runs of this epoch and wait for it (bounded)."""
        if self.rt.pid != os.getpid():
            return  # inherited through os.fork(): the parent's to stop (see Runtime.shutdown)
        # Keep the consumer's position, drop what it had not taken yet.
        self.consumed = self.position()
        self.buf, self.i, self.counts, self.tail = [], 0, None, 0
        self.handoff.close()
        if self.budget is not None:
            self.budget.close()  # wakes (and fails) reads waiting for room
        fut = self.future
        if not fut.done():
            fut.cancel()  # cancels the task on the loop thread
        loop = self.rt.loop
        if loop.in_loop_thread or not loop.alive or self.rt.closed:
            return
        # The future reads "cancelled" at once, while the task is still unwinding on
        # the loop: wait there until it has (a task that never started is done).
        try:
            loop.submit(self._settled()).result(STOP_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            # A job that never returns: waited for once, not again by close().
            abandon_stuck(self.rt.source, self.units(), 0.0)
        except (concurrent.futures.CancelledError, RuntimeError):
            pass

    async def _settled(self) -> None:
        task = self.task
        if task is not None and not task.done():
            await asyncio.wait([task])
        # Jobs already running in workers outlive their cancelled tasks: wait for
        # them too, so nothing of this epoch (a read, an open file) runs on.
        await asyncio.gather(*(s.quiesce() for s in self.rt.plan))

    def idle_after_reader(self) -> bool:
        """Whether no read runs, nothing after the reader is queued or running, and the
        consumer waits in ``next()`` (the budget asks, on the loop thread).

        Then no byte held can reach the consumer without more reads: the budget
        lets the oldest waiting group's read through rather than deadlock
        (iopipe/runtime/budget.py).
        """
        reader = budgeted_reader(self.rt.stages)
        budget = self.budget
        if reader is None or budget is None or reader.jobs_in_flight():  # a read will deliver
            return False
        if not self.handoff.consumer_waiting:  # it computes: admitting can wait until it asks
            return False
        at = self.rt.stages.index(reader)
        if any(q is not None and q.counters.used for q in self.queues[at + 1 :]):
            return False
        for unit in self.units():
            for s in [unit, *unit.parts()]:
                if s is reader:
                    continue
                limit = s.limiter
                if s.jobs_in_flight() or (limit is not None and limit.borrowed_tokens):
                    return False
        return True

    def units(self) -> list[Stage]:
        """What runs: the stages, or the fused plan of them."""
        return list(getattr(self.rt, "plan", self.rt.stages))

    def stall(self) -> Stall:
        """Where the consumer's data is stuck: the oldest job in a worker, else the queues."""
        found = find_stall(self.rt.source, self.units())
        return found if found is not None else Stall(self.stuck_stage())

    def stuck_stage(self) -> str:
        """Name the stage nearest the consumer that still holds work (for timeouts)."""
        names = [self.rt.source.name] + [s.name for s in self.rt.stages]
        for unit in reversed(self.rt.plan):
            member = unit.busy_member()
            if member is not None:
                return member.name
        for i in range(len(self.rt.stages) - 1, -1, -1):
            s = self.rt.stages[i]
            limit = s.limiter
            if limit is not None and limit.borrowed_tokens:
                return s.name
            inq = self.queues[i] if i < len(self.queues) else None
            if inq is not None and inq.counters.used:
                return s.name
        return names[0]

    def stats(self) -> PipelineStats:
        """A snapshot of this epoch's counters, stage by stage (any thread)."""
        rt = self.rt
        snaps = []
        queues = self.queues
        parts: list[Any] = [rt.source, *rt.stages]
        for i, s in enumerate(parts):
            q = queues[i] if i < len(queues) else None
            qc = q.counters if q is not None else None
            snaps.append(
                snapshot(
                    s.counters,
                    qc.capacity if qc else 0,
                    qc.mean() if qc else 0.0,
                    qc.used if qc else 0,
                    self.started,
                    self.stage_ended.get(s.name, self.ended),
                )
            )
        elapsed = (self.ended or time.perf_counter()) - self.started
        delivered = self.delivered - len(self.buf) + self.i
        budget = self.budget
        return PipelineStats(
            tuple(snaps),
            elapsed,
            delivered,
            self.handoff.wait_s,
            self.epoch,
            inflight_bytes=budget.held if budget is not None else 0,
            peak_inflight_bytes=budget.peak if budget is not None else 0,
            autotune=rt.tuner.state() if rt.tuner is not None else None,
        )
