"""Fused: run consecutive thread stages as one job per group while the data is cached.

Why.  On page-cached data, reading, mapping and collating a group are short CPU
jobs that hold the GIL.  Run as three stages they keep three threads busy at
once, which then contend for the GIL and wake each other for every group: on the
2-core machine of docs/benchmarks.md that cost 44 us of CPU per small file,
against 22 us when one thread reads, maps and collates the whole group in one
job (``bench/bench_fused_ceiling.py``), which is what a plain loop pays.

What.  A run of two or more consecutive stages among ``read()``, ``map()`` with
the thread executor, and a final ``batch()`` (none of them ``"auto"``) is driven
by one :class:`Fused` stage.  The member stages keep their names, counters,
errors and configuration: statistics and error messages read as if each ran on
its own.  Per group the stage chooses:

* **fused**: one worker job reads, maps and collates the group, while the
  reader's :class:`~iopipe.control.governor.IoGovernor` sees the page cache serve
  the reads (its limit is 1).  How many such jobs run at once moves between 1
  and the members' concurrency by measured throughput
  (:class:`~iopipe.control.governor.RateGovernor`):
  a GIL-bound job gains nothing from a second thread; a decoder that releases
  the GIL (PIL, numpy) does.
* **staged**: the members process the group one after another, each its own
  way, when reads wait on storage; the reader then fans the reads out as usual.

Batches are cut before reading (the members are one-to-one), so each fused job
produces exactly one batch, the same batch the :class:`Batcher` would have made.

How.  Fusion is a rewrite of the opened stages (:func:`plan`), and the driver
knows no concrete stage: each member declares it can join (``fusable()``), gives
a :class:`~iopipe.stages.steps.FusedStep` per group, accounts its own step, and
says how to finish a step that stopped the job, how to process a group staged,
and what the run puts out or fails with (the ``Stage`` methods of that section).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from ..control.governor import RateGovernor, TokenBound
from ..runtime.channels import Group
from ..runtime.limits import CapacityLimiter
from ..runtime.stats import StageCounters
from .base import OutQueue, Stage
from .pump import drain, pump
from .steps import FusedStep, StepRun

__all__ = ["Fused", "fusable", "plan"]


def fusable(stage: Stage) -> bool:
    """Whether ``stage`` may join a fused run: it says so, and nothing tunes or skips it."""
    if stage.autotune or stage.policy is not None:  # on_error="skip" runs stages apart
        return False
    return stage.fusable()


def plan(stages: list[Stage]) -> list[Stage]:
    """Rewrite ``stages``: maximal fusable runs of two or more become one :class:`Fused`.

    A batcher ends a run (what follows it handles whole batches) and cannot start
    one; the members stay the pipeline's stages (stats, errors and state name them).
    """
    out: list[Stage] = []
    run: list[Stage] = []

    def flush() -> None:
        if len(run) >= 2:
            out.append(Fused(list(run)))
        else:
            out.extend(run)
        run.clear()

    for s in stages:
        batches = s.batch_size is not None
        if fusable(s) and not (batches and not run):
            run.append(s)
            if batches:
                flush()
        else:
            flush()
            out.append(s)
    flush()
    return out


class _StepFailure(Exception):
    """Step ``step`` of a fused job failed with ``exc`` (an ItemFailure or a collate error)."""

    def __init__(self, step: int, exc: BaseException) -> None:
        super().__init__(step, exc)
        self.step = step
        self.exc = exc


@dataclass(slots=True)
class _JobResult:
    items: list[Any]
    runs: list[StepRun]  # per completed step (fewer than all: a step stopped the job)
    inputs: list[Any] | None = None  # what the last step run was given
    cpu: float = 0.0  # thread CPU seconds of the whole job


def _fused_job(steps: list[FusedStep], items: list[Any], where: list[int]) -> _JobResult:
    """Run ``steps`` over ``items`` in this worker thread, until one stops the job.

    ``where[0]`` tells the loop which step runs (to name a stuck stage).
    """
    res = _JobResult(items, [])
    cpu0 = time.thread_time()
    for k, step in enumerate(steps):
        where[0] = k
        run = StepRun()
        t0 = time.perf_counter()
        res.inputs = items
        try:
            items, stop = step.run(items, run)
        except Exception as exc:
            raise _StepFailure(k, exc) from None
        run.seconds = time.perf_counter() - t0
        res.runs.append(run)
        if stop:
            break
    res.items = items
    res.cpu = time.thread_time() - cpu0
    return res


class Fused(Stage):
    """Drive a run of member stages, fused into one job per group while data is cached."""

    kind = "fused"

    def __init__(self, members: list[Stage]) -> None:
        widths = [w for m in members if (w := m.fused_width()) is not None]
        top = min(widths) if widths else members[0].concurrency
        super().__init__(name="+".join(m.name for m in members), concurrency=max(1, top))
        self.members = members
        last = members[-1]
        self.batcher = last if last.batch_size is not None else None
        self._limit: CapacityLimiter | None = None
        self._gov: RateGovernor | None = None
        self._pool: Any = None
        self._count = 0
        self._where: list[tuple[list[int], int]] = []  # running jobs: (step cell, first step)

    def open(self, unit: int) -> None:
        """Borrow the first member's worker pool (open already); fused jobs run there."""
        super().open(unit)
        self._pool = self.members[0].worker_pool
        self._limit = CapacityLimiter(1)
        self._gov = RateGovernor(TokenBound(self._limit), self.concurrency)

    def close(self, timeout: float) -> None:
        self._pool = None  # the member that owns it shuts it down

    @property
    def limiter(self) -> CapacityLimiter | None:
        return self._limit

    def window(self) -> int:
        # Groups in process: enough for the widest member plus one moving through
        # the others (staged), never the sum: each group holds its decoded items.
        return max(m.window() for m in self.members) + 1

    async def quiesce(self) -> None:
        await asyncio.gather(super().quiesce(), *(m.quiesce() for m in self.members))

    def parts(self) -> list[Stage]:
        return list(self.members)

    def busy_member(self) -> Stage | None:
        """The member the oldest running fused job is in, or None (for stuck-stage reports)."""
        if not self._where:
            return None
        cell, start = self._where[0]
        return self.members[min(len(self.members) - 1, start + cell[0])]

    def _cached(self) -> bool:
        """Whether the members' reads are served by the page cache (no reads: yes)."""
        return all(m.reads_cached() for m in self.members)

    # -- one group ------------------------------------------------------------
    async def _process(self, group: Group) -> Group:
        index = self._count  # taken in input order, before any await
        if self.batcher is not None:
            self._count += 1
        if not group.items:
            return group
        if self._cached():
            return await self._fused(group, index)
        return await self._staged(group, index)

    async def _fused(self, group: Group, index: int) -> Group:
        assert self._limit is not None
        assert self._gov is not None
        steps = [m.fused_step(group) for m in self.members]
        items: list[Any] = group.items  # a reader's items are normalized in the job
        start = 0
        cpu = -1.0  # the job's thread CPU, when one job did the whole group
        while start < len(steps):
            async with self._limit:
                self._gov.started()
                cell = ([0], start)
                self._where.append(cell)
                try:
                    res: _JobResult = await self.submit(
                        self._pool, _fused_job, steps[start:], items, cell[0]
                    )
                except _StepFailure as sf:
                    step = start + sf.step
                    raise self.members[step].fused_failure(group, sf.exc, index)
                finally:
                    # By identity: two cells can be equal ([0], 0) while their jobs differ.
                    self._where = [c for c in self._where if c is not cell]
            self._account(group, start, res)
            done = len(res.runs)
            cpu = res.cpu if start == 0 and done == len(steps) else -1.0
            items = res.items
            start += done
            if start < len(steps):  # the step that stopped finishes on the loop
                assert res.inputs is not None
                items = await self.members[start - 1].resume_fused(group, res.inputs, items)
        self._gov.observe(len(group.items), cpu)
        return self.members[-1].fused_output(group, items, index)

    def _account(self, group: Group, start: int, res: _JobResult) -> None:
        """Credit each member with its share of a fused job (stats, governors)."""
        n = len(group.items)
        run = sum(r.seconds for r in res.runs)
        for m in self.members:
            m.counters.run_busy_s += run
        for m, r in zip(self.members[start : start + len(res.runs)], res.runs, strict=True):
            m.counters.busy_s += r.seconds
            m.counters.jobs += 1
            m.account_fused(r, n)

    async def _staged(self, group: Group, index: int) -> Group:
        """Run the members one after another on ``group`` (reads fan out)."""
        for m in self.members:
            group = await m.staged(group, index)
        return group

    # -- the stream -----------------------------------------------------------
    async def run(self, inq: Any, outq: OutQueue) -> None:
        self._count = 0
        if self._gov is not None:
            self._gov.restart()
        every = [m.counters for m in self.members]
        groups = self.members[-1].cut(drain(inq, _SharedWaits(every[0], every)))
        last = _SharedWaits(every[-1], every)
        await pump(groups, outq, self._process, window=self.window(), ordered=True, counters=last)


class _SharedWaits:
    """A member's counters whose waits every member of the fused run shares.

    The run waits as one: while it waits for input or for room downstream, none
    of its members works, so each member's busy share (iopipe/runtime/stats.py
    ``busy_share``) must see the wait.  Other fields are ``primary``'s alone.
    """

    __slots__ = ("_all", "_primary")

    def __init__(self, primary: StageCounters, every: list[StageCounters]) -> None:
        self._primary = primary
        self._all = every

    def __getattr__(self, name: str) -> Any:
        return getattr(self._primary, name)

    @property
    def wait_input_s(self) -> float:
        return self._primary.wait_input_s

    @wait_input_s.setter
    def wait_input_s(self, value: float) -> None:
        delta = value - self._primary.wait_input_s
        for c in self._all:
            c.wait_input_s += delta

    @property
    def wait_output_s(self) -> float:
        return self._primary.wait_output_s

    @wait_output_s.setter
    def wait_output_s(self, value: float) -> None:
        delta = value - self._primary.wait_output_s
        for c in self._all:
            c.wait_output_s += delta
