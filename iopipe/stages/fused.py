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
  reader's :class:`~iopipe.stages.base.IoGovernor` sees the page cache serve
  the reads (its limit is 1).  How many such jobs run at once moves between 1
  and the members' concurrency by measured throughput (:class:`RateGovernor`):
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

from ..runtime.channels import BatchKey, Group
from ..runtime.errors import StageError, shielded
from .base import ItemFailure, Limiter, OutQueue, Stage, drain, pump
from .batch import Batcher
from .decode import Decoder, map_items
from .reader import ChunkedReader, _Large, _read_job, normalize_item

__all__ = ["Fused", "RateGovernor", "fusable", "plan"]


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


class RateGovernor:
    """Moves a :class:`Limiter` between 1 and ``maximum`` by measured throughput.

    Measures the items finished per second over windows of ``limit + 1`` jobs or
    more (``2 * limit + 1`` when started high: a step down that is wrongly kept
    costs more than a step up, undone by the checks below) and at least
    ``MIN_WINDOW_S``.  A step up (doubling) is kept only if the rate rose by 10%
    or more; a step down (halving) only if the rate did not fall.  The first
    job is a warm-up and not judged; after a change of limit, measuring waits
    until the jobs started under the old limit have finished (they would credit
    the new limit with their work).  After the second window it tries a step up
    from the limiter's start, or with ``start_high`` a step down from it.  A step
    up that runs clearly slower (under ``ABORT`` of the rate before it, after
    ``limit + 1`` jobs) is undone without waiting for ``MIN_WINDOW_S``: on
    GIL-bound work a second job costs a third of the rate while it runs.  Jobs
    that report their thread CPU time let it tell sooner: a step up whose first
    job spends more than ``CONTENDED`` times the CPU per item of the jobs before
    it is contending for the GIL (two jobs of pure Python on the benchmark
    machine: 2-4x the CPU each), and is undone at once.  After
    settling it tries again every ``REPROBE`` windows, alternately up and down,
    so one noisy measurement does not decide a whole run; each trial that does
    not pay doubles that interval (up to 32 times), so a workload that needs its
    setting pays little for the probes.  When downstream is the bottleneck more
    jobs cannot raise the rate, so the limit stays low (and the CPU free).

    The limiter may expose ``held`` (jobs running now); without it a change of
    limit is measured from the next finished job.

    Not thread-safe: call :meth:`observe` from one thread, or under a lock.
    """

    MIN_WINDOW_S = 0.05
    REPROBE = 16
    ABORT = 0.75
    CONTENDED = 1.6

    __slots__ = (
        "_cpu_item",
        "_down_next",
        "_interval",
        "_seen",
        "_settle",
        "_start_high",
        "_trial",
        "_win_items",
        "_win_jobs",
        "_win_start",
        "_windows",
        "limiter",
        "maximum",
    )

    def __init__(self, limiter: Any, maximum: int, *, start_high: bool = False) -> None:
        self.limiter = limiter  # anything with ``limit`` and ``set_limit(n)``
        self.maximum = max(1, maximum)
        self._start_high = start_high
        self._interval = self.REPROBE
        self._trial: tuple[int, float, bool] | None = None  # (limit before, its rate, up?)
        self._seen = 0  # windows measured outside trials (the first is a warm-up)
        self._settle = 0  # jobs of the old limit still to finish after a change
        self._windows = 0  # windows since the last decision
        self._down_next = True  # the next re-probe tries a lower limit (when above 1)
        self._win_items = 0
        self._win_jobs = 0
        self._win_start = -1.0
        self._cpu_item = 0.0  # EWMA thread CPU seconds per item, outside trials

    def started(self) -> None:
        """A job starts (opens the first measurement window)."""
        if self._win_start < 0:
            self._win_start = time.perf_counter()

    def restart(self) -> None:
        """Drop the window being measured (an epoch starts: idle time is not throughput)."""
        self._win_items, self._win_jobs, self._win_start = 0, 0, -1.0
        self._settle = 0  # the last epoch's jobs are over

    def _try(self, limit: int, rate: float, up: bool) -> None:
        self._trial = (limit, rate, up)
        self._set(min(self.maximum, 2 * limit) if up else max(1, limit // 2))

    def _set(self, limit: int) -> None:
        self._settle = int(getattr(self.limiter, "held", 0))
        self.limiter.set_limit(limit)

    def _judge(self, rate: float, limit: int) -> None:
        """End the trial running at ``limit`` with its measured ``rate``."""
        assert self._trial is not None
        before, before_rate, up = self._trial
        self._trial = None
        self._windows = 0
        if up and rate >= 1.1 * before_rate:
            self._interval = self.REPROBE
            if limit < self.maximum:
                self._try(limit, rate, up=True)  # it paid: try further
        elif not up and rate >= before_rate:
            self._interval = self.REPROBE  # as fast with fewer: keep the lower limit
        else:
            self._set(before)  # it did not pay: back, and wait longer
            self._interval = min(32 * self.REPROBE, 2 * self._interval)

    def observe(self, items: int, cpu: float = -1.0) -> None:
        """Account one finished job of ``items`` items (``cpu``: its thread CPU seconds)."""
        if self.maximum == 1:
            return
        self._win_items += items
        self._win_jobs += 1
        now = time.perf_counter()
        span = now - self._win_start
        limit = self.limiter.limit
        # The first window (a warm-up: threads start, caches fill) is the first job alone.
        jobs = (2 * limit if self._start_high else limit) + 1
        full = (self._win_jobs >= jobs and span >= self.MIN_WINDOW_S) or self._seen == 0
        trial = self._trial
        if cpu >= 0 and items > 0:
            per = cpu / items
            if trial is None:
                if self._settle == 0:
                    c = self._cpu_item
                    self._cpu_item = per if c == 0 else 0.8 * c + 0.2 * per
            elif trial[2] and self._cpu_item > 0 and per > self.CONTENDED * self._cpu_item:
                # Contending for the GIL (a job of the old limit shows it too: it
                # ran beside the new one): undo now.
                self._win_items, self._win_jobs, self._win_start = 0, 0, now
                self._judge(0.0, limit)
                return
        if self._settle > 0:
            self._settle -= 1
            if self._settle == 0 or full:  # (a failed old job is never observed)
                self._settle = 0
                self._win_items, self._win_jobs, self._win_start = 0, 0, now
            return
        if not full:
            if (
                trial is not None
                and trial[2]
                and self._win_jobs >= limit + 1
                and span > 0
                and self._win_items / span < self.ABORT * trial[1]
            ):
                self._win_items, self._win_jobs, self._win_start = 0, 0, now
                self._judge(0.0, limit)  # clearly slower: undo now
            return
        rate = self._win_items / span
        self._win_items, self._win_jobs, self._win_start = 0, 0, now
        if trial is not None:
            self._judge(rate, limit)
            return
        self._seen += 1
        if self._seen == 1:
            return  # start-up (threads, first batch fetched alone) is not the steady rate
        if self._seen == 2:
            if self._start_high and limit > 1:
                self._try(limit, rate, up=False)
            elif limit < self.maximum:
                self._try(limit, rate, up=True)
            return
        self._windows += 1
        if self._windows >= self._interval:
            down = limit >= self.maximum or (self._down_next and limit > 1)
            self._down_next = not down
            self._try(limit, rate, up=not down)


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
                items, res.misses = _read_job(_entries(items), step[1], flags)
                res.read_cpu = time.thread_time() - c0
                res.read_bytes = sum(len(x) for x in items if not isinstance(x, _Large))
                if any(isinstance(x, _Large) for x in items):
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
        self._limit: Limiter | None = None
        self._gov: RateGovernor | None = None
        self._pool: Any = None
        self._count = 0
        self._where: list[tuple[list[int], int]] = []  # running jobs: (step cell, first step)

    def open(self, unit: int) -> None:
        """Take the first member's worker pool (open already); fused jobs run there."""
        super().open(unit)
        self._pool = getattr(self.members[0], "_pool", None)
        self._limit = Limiter(1)
        self._gov = RateGovernor(self._limit, self.concurrency)

    def close(self, timeout: float) -> None:
        self._pool = None  # the member that owns it shuts it down

    def window(self) -> int:
        # Groups in process: enough for the widest member plus one moving through
        # the others (staged), never the sum: each group holds its decoded items.
        return max(m.window() for m in self.members) + 1

    async def quiesce(self) -> None:
        await asyncio.gather(super().quiesce(), *(m.quiesce() for m in self.members))

    def busy_member(self) -> Stage | None:
        """The member the oldest running fused job is in, or None (for stuck-stage reports)."""
        if not self._where:
            return None
        cell, start = self._where[0]
        return self.members[min(len(self.members) - 1, start + cell[0])]

    def _cached(self) -> bool:
        """Whether reads are served by the page cache (no reader: always)."""
        r = self.reader
        return r is None or r._limit is None or r._limit.limit == 1

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
            flags = self.reader._gov.probe_flags if self.reader and self.reader._gov else 0
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
                items = [x.buf if isinstance(x, _Large) else x for x in items]
                if self.reader.with_source:
                    items = list(zip(group.items, items, strict=True))
        self._gov.observe(len(group.items), cpu)
        return self._output(group, items, index)

    async def _read_larges(self, group: Group, items: list[Any]) -> None:
        assert self.reader is not None
        larges = [(i, x) for i, x in enumerate(items) if isinstance(x, _Large)]
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
                if m._gov is not None:
                    m._gov.observe(dt, res.read_cpu, n, res.misses)
            elif isinstance(m, Decoder):
                c.items += n
                m._sizer.observe(dt, n)
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
                return await _collate(m, g, index)
            g = await m._process(g)  # type: ignore[attr-defined]
        return g

    # -- the stream -----------------------------------------------------------
    async def run(self, inq: Any, outq: OutQueue) -> None:
        self._count = 0
        if self._gov is not None:
            self._gov.restart()
        every = [m.counters for m in self.members]
        groups = drain(inq, _SharedWaits(every[0], every))
        if self.batcher is not None:
            groups = self.batcher._cut(groups)
        last = _SharedWaits(every[-1], every)
        await pump(groups, outq, self._process, window=self.window(), ordered=True, counters=last)


class _SharedWaits:
    """A member's counters whose waits every member of the fused run shares.

    The run waits as one: while it waits for input or for room downstream, none
    of its members works, so each member's busy share (iopipe/runtime/stats.py
    ``busy_share``) must see the wait.  Other fields go to ``primary`` alone.
    """

    __slots__ = ("_all", "_primary")
    _SHARED = frozenset(("wait_input_s", "wait_output_s"))

    def __init__(self, primary: Any, every: list[Any]) -> None:
        object.__setattr__(self, "_primary", primary)
        object.__setattr__(self, "_all", every)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._primary, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in self._SHARED:
            setattr(self._primary, name, value)
            return
        delta = value - getattr(self._primary, name)
        for c in self._all:
            setattr(c, name, getattr(c, name) + delta)


def _default_collate() -> Any:
    from torch.utils.data import default_collate

    return default_collate


async def _collate(batcher: Batcher, group: Group, index: int) -> Group:
    """Collate one batch with the batcher's pool, as batch number ``index``."""
    from .base import timed

    collate = batcher.collate_fn or _default_collate()
    loop = asyncio.get_running_loop()
    key = BatchKey(index, group.keys[0], group.keys[-1])
    try:
        batch, dt = await loop.run_in_executor(batcher._pool, shielded, timed, collate, group.items)
    except Exception as exc:
        raise StageError(batcher.name, key, exc)
    batcher.counters.busy_s += dt
    batcher.counters.items += 1
    batcher.counters.jobs += 1
    return Group([batch], [key], batched=True, counts=[len(group.items)])
