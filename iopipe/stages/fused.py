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
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from ..control.governor import RateGovernor, TokenBound
from ..runtime.channels import BatchKey, Group
from ..runtime.errors import StageError
from ..runtime.limits import CapacityLimiter
from ..runtime.stats import StageCounters
from .base import ItemFailure, OutQueue, Stage
from .batch import Batcher
from .decode import Decoder, map_items
from .pump import drain, pump
from .read_jobs import Large, normalize_item, read_job
from .reader import ChunkedReader

__all__ = ["Fused", "fusable", "plan"]


def fusable(stage: Stage) -> bool:
    """Whether ``stage`` may join a fused run."""
    if stage.autotune or stage.policy is not None:  # on_error="skip" runs stages apart
        return False
    if isinstance(stage, ChunkedReader):
        return stage.byte_bound is None  # max_inflight_bytes reserves per item: staged reads
    if isinstance(stage, Decoder):
        return stage.executor == "thread"
    return isinstance(stage, Batcher)


def plan(stages: list[Stage]) -> list[Stage]:
    """Return the stages to run: maximal fusable runs of two or more become :class:`Fused`.

    A batcher ends a run (what follows it handles whole batches), and a run
    starts at a reader or a thread map.
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
        if fusable(s) and not (isinstance(s, Batcher) and not run):
            run.append(s)
            if isinstance(s, Batcher):
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
    done: int  # steps completed (fewer than all: large items wait for the reader)
    seconds: list[float]  # wall seconds per completed step
    read_cpu: float = 0.0
    cpu: float = 0.0  # thread CPU seconds of the whole job
    read_bytes: int = 0  # bytes read by this job (large items not included)
    misses: int = 0


def _fused_job(
    steps: list[tuple[Any, ...]], items: list[Any], flags: int, where: list[int]
) -> _JobResult:
    """Run ``steps`` over ``items`` in this worker thread.

    Steps: ``("read", chunk_bytes, with_source, sources)``, ``("map", fn)``,
    ``("collate", fn)``.  Stops after the read when an item is larger than one
    chunk: the reader reads it in concurrent pieces, then the rest follows.
    ``where[0]`` tells the loop which step runs (to name a stuck stage).
    """
    res = _JobResult(items, 0, [])
    cpu0 = time.thread_time()
    for k, step in enumerate(steps):
        where[0] = k
        t0 = time.perf_counter()
        kind = step[0]
        try:
            if kind == "read":
                c0 = time.thread_time()
                items, res.misses = read_job(_entries(items), step[1], flags)
                res.read_cpu = time.thread_time() - c0
                res.read_bytes = sum(len(x) for x in items if not isinstance(x, Large))
                if any(isinstance(x, Large) for x in items):
                    res.seconds.append(time.perf_counter() - t0)
                    res.items, res.done = items, k + 1
                    res.cpu = time.thread_time() - cpu0
                    return res
                if step[2]:
                    items = list(zip(step[3], items, strict=True))
            elif kind == "map":
                items = map_items(step[1], items)
            else:
                items = [step[1](items)]
        except Exception as exc:
            raise _StepFailure(k, exc) from None
        res.seconds.append(time.perf_counter() - t0)
    res.items, res.done = items, len(steps)
    res.cpu = time.thread_time() - cpu0
    return res


def _entries(items: list[Any]) -> list[tuple[str, int, int | None]]:
    """``normalize_item`` of each item (paths take a fast path); a bad one is an ItemFailure."""
    try:
        return [(x, 0, None) if type(x) is str else normalize_item(x) for x in items]
    except (TypeError, ValueError):
        for i, x in enumerate(items):
            try:
                normalize_item(x)
            except (TypeError, ValueError) as exc:
                raise ItemFailure(i, exc) from None
        raise


class Fused(Stage):
    """Drive a run of member stages, fused into one job per group while data is cached."""

    kind = "fused"

    def __init__(self, members: list[Stage]) -> None:
        maps = [m.concurrency for m in members if isinstance(m, Decoder)]
        reader = members[0] if isinstance(members[0], ChunkedReader) else None
        top = min(maps) if maps else (reader.concurrency if reader is not None else 1)
        super().__init__(name="+".join(m.name for m in members), concurrency=max(1, top))
        self.members = members
        self.reader = reader
        self.maps = [m for m in members if isinstance(m, Decoder)]
        last = members[-1]
        self.batcher = last if isinstance(last, Batcher) else None
        self._limit: CapacityLimiter | None = None
        self._gov: RateGovernor | None = None
        self._pool: Any = None
        self._count = 0
        self._where: list[tuple[list[int], int]] = []  # running jobs: (step cell, first step)

    def open(self, unit: int) -> None:
        """Take the first member's worker pool (open already); fused jobs run there."""
        super().open(unit)
        self._pool = getattr(self.members[0], "_pool", None)
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
        """Whether reads are served by the page cache (no reader: always)."""
        return self.reader is None or self.reader.cached()

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

    def _steps(self, group: Group) -> list[tuple[Any, ...]]:
        steps: list[tuple[Any, ...]] = []
        for m in self.members:
            if isinstance(m, ChunkedReader):
                steps.append(("read", m.chunk_bytes, m.with_source, group.items))
            elif isinstance(m, Decoder):
                steps.append(("map", m.fn))
            elif isinstance(m, Batcher):
                steps.append(("collate", m.collate_fn or _default_collate()))
        return steps

    async def _fused(self, group: Group, index: int) -> Group:
        assert self._limit is not None
        assert self._gov is not None
        steps = self._steps(group)
        items: list[Any] = group.items  # a reader's items are normalized in the job
        start = 0
        cpu = -1.0  # the job's thread CPU, when one job did the whole group
        while start < len(steps):
            flags = self.reader.probe_flags if self.reader else 0
            async with self._limit:
                self._gov.started()
                cell = ([0], start)
                self._where.append(cell)
                try:
                    res: _JobResult = await self.submit(
                        self._pool, _fused_job, steps[start:], items, flags, cell[0]
                    )
                except _StepFailure as sf:
                    raise self._failure(group, start + sf.step, sf.exc, index)
                finally:
                    # By identity: two cells can be equal ([0], 0) while their jobs differ.
                    self._where = [c for c in self._where if c is not cell]
            self._account(group, start, res)
            items = res.items
            cpu = res.cpu if start == 0 and res.done == len(steps) else -1.0
            start += res.done
            if start < len(steps):  # large items: the reader reads them in pieces
                assert self.reader is not None
                await self._read_larges(group, items)
                items = [x.buf if isinstance(x, Large) else x for x in items]
                if self.reader.with_source:
                    items = list(zip(group.items, items, strict=True))
        self._gov.observe(len(group.items), cpu)
        return self._output(group, items, index)

    async def _read_larges(self, group: Group, items: list[Any]) -> None:
        assert self.reader is not None
        larges = [(i, x) for i, x in enumerate(items) if isinstance(x, Large)]
        await self.reader.read_larges(group, larges)
        self.reader.counters.bytes += sum(len(x.buf) for _, x in larges)

    def _account(self, group: Group, start: int, res: _JobResult) -> None:
        """Credit each member with its share of a fused job (stats, governors)."""
        n = len(group.items)
        run = sum(res.seconds)
        for m in self.members:
            m.counters.run_busy_s += run
        for m, dt in zip(self.members[start : start + res.done], res.seconds, strict=True):
            c = m.counters
            c.busy_s += dt
            c.jobs += 1
            if isinstance(m, ChunkedReader):
                c.items += n
                c.bytes += res.read_bytes
                c.extra["cpu_s"] = c.extra.get("cpu_s", 0.0) + res.read_cpu
                m.observe_reads(dt, res.read_cpu, n, res.misses)
            elif isinstance(m, Decoder):
                c.items += n
                m.observe_job(dt, n)
            else:
                c.items += 1

    def _output(self, group: Group, items: list[Any], index: int) -> Group:
        if self.batcher is None:
            return group.replace_items(items)
        return Group(
            items,
            [BatchKey(index, group.keys[0], group.keys[-1])],
            batched=True,
            counts=[len(group.keys)],
        )

    def _failure(self, group: Group, step: int, exc: BaseException, index: int) -> StageError:
        member = self.members[step]
        if isinstance(member, Batcher):
            return StageError(member.name, BatchKey(index, group.keys[0], group.keys[-1]), exc)
        return member.fail(group, exc)

    async def _staged(self, group: Group, index: int) -> Group:
        """Run the members one after another on ``group`` (reads fan out)."""
        g = group
        for m in self.members:
            if isinstance(m, Batcher):
                return await m.collate_batch(g, index)
            assert isinstance(m, ChunkedReader | Decoder)
            g = await m.process(g)
        return g

    # -- the stream -----------------------------------------------------------
    async def run(self, inq: Any, outq: OutQueue) -> None:
        self._count = 0
        if self._gov is not None:
            self._gov.restart()
        every = [m.counters for m in self.members]
        groups = drain(inq, _SharedWaits(every[0], every))
        if self.batcher is not None:
            groups = self.batcher.cut(groups)
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


def _default_collate() -> Any:
    from torch.utils.data import default_collate

    return default_collate
