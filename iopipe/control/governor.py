"""Controllers that move a stage's bound while it runs: the I/O and rate governors, job sizing.

Each is a plain object fed with measurements (seconds, items, cache misses) by
the stage that owns it; those that read time take a ``clock``, so tests drive
them without time.  The bound they move is a
:class:`~iopipe.runtime.limits.CapacityLimiter` (:class:`RateGovernor`: any
:class:`Adjustable`, e.g. :class:`TokenBound` over a limiter of either face).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Protocol

from ..runtime.limits import BlockingCapacityLimiter, CapacityLimiter

__all__ = ["TARGET_JOB_S", "Adjustable", "IoGovernor", "RateGovernor", "TokenBound", "job_sizer"]

#: A job should take about this long, so that the ~30 us cost of handing it to a
#: thread stays a few percent of the work (bench/bench_pipeline.py shows the effect).
TARGET_JOB_S = 0.002


class Adjustable(Protocol):
    """A bound a :class:`RateGovernor` moves: its value, the jobs holding it now, a setter."""

    @property
    def limit(self) -> int: ...

    @property
    def held(self) -> int: ...

    def set_limit(self, limit: int) -> None: ...


class TokenBound:
    """A capacity limiter (either face, iopipe/runtime/limits.py) seen as an :class:`Adjustable`."""

    __slots__ = ("limiter",)

    def __init__(self, limiter: CapacityLimiter | BlockingCapacityLimiter) -> None:
        self.limiter = limiter

    @property
    def limit(self) -> int:
        """The limiter's ``total_tokens``."""
        return self.limiter.total_tokens

    @property
    def held(self) -> int:
        """The limiter's ``borrowed_tokens``."""
        return self.limiter.borrowed_tokens

    def set_limit(self, limit: int) -> None:
        """Set the limiter's ``total_tokens``."""
        self.limiter.total_tokens = limit


class job_sizer:
    """Chooses how many items go in one executor job from the measured time per item.

    Cheap items (page-cached reads, light decode) are packed many to a job so the
    thread hand-off is amortised; slow items (cold reads) get small jobs so that
    they fan out across ``concurrency`` workers.
    """

    __slots__ = ("_per_item",)

    def __init__(self) -> None:
        self._per_item = 0.0  # EWMA of seconds per item; 0 = unknown

    def observe(self, seconds: float, items: int) -> None:
        if items <= 0:
            return
        x = seconds / items
        self._per_item = x if self._per_item == 0.0 else 0.7 * self._per_item + 0.3 * x

    def split(self, n: int, concurrency: int) -> list[tuple[int, int]]:
        """Return ``[start, stop)`` ranges that cover ``range(n)``."""
        if n == 0:
            return []
        fan = math.ceil(n / max(1, concurrency))  # enough jobs to use every worker
        if self._per_item > 0:
            size = max(1, min(n, max(fan, int(TARGET_JOB_S / self._per_item))))
            if self._per_item * fan >= TARGET_JOB_S:
                size = fan
        else:
            size = fan
        return [(i, min(n, i + size)) for i in range(0, n, size)]


class IoGovernor:
    """Opens reads in flight while they wait on storage and it pays; closes them when not.

    Page-cached reads are CPU work under the GIL: extra threads only add
    contention (bench/bench_reader_backends.py; 16 threads read warm small files
    2-3x slower than one).  Storage-bound reads may gain from many in flight, or
    not (a local disk serving small files saturates at a few).  The governor
    tells cached from storage-bound reads by cache misses, probed exactly with
    ``preadv(RWF_NOWAIT)`` (a read the page cache cannot serve comes back
    short).  While more than 20% of reads miss it doubles the limit, but only
    as long as each doubling raised the reads completed per second by 10% or
    more; otherwise it goes back and keeps that ceiling.  Below 5% misses it
    steps down towards 1.  Where the probe is unsupported it falls back to the
    share of a job's wall time its thread was off the CPU (noisier: on a busy
    machine, waiting for a core looks like waiting for the disk).  ``clock``:
    seconds, monotonic (tests inject a fake one).
    """

    __slots__ = (
        "_ceiling",
        "_cpu",
        "_miss",
        "_prev",
        "_wait",
        "_win_items",
        "_win_jobs",
        "_win_start",
        "clock",
        "limiter",
        "maximum",
        "probe_flags",
    )

    def __init__(
        self,
        limiter: CapacityLimiter,
        maximum: int,
        probe_flags: int = 0,
        *,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.limiter = limiter
        self.clock = clock
        self.maximum = maximum
        self.probe_flags = probe_flags
        self._cpu = 0.0  # EWMA CPU seconds per item
        self._wait = 0.0  # EWMA share of wall time spent waiting
        self._miss = 0.0  # EWMA share of items that missed the page cache
        self._ceiling = maximum  # highest limit known to pay
        self._prev: tuple[int, float] | None = None  # (limit, items/s) before the last raise
        self._win_items = 0
        self._win_jobs = 0
        self._win_start = clock()

    def _window_rate(self, items: int) -> float | None:
        """Items/s over the window that this job completes, or None mid-window."""
        self._win_items += items
        self._win_jobs += 1
        now = self.clock()
        span = now - self._win_start
        if self._win_jobs < 2 * self.limiter.total_tokens or span < 0.02:
            return None
        rate = self._win_items / span
        self._win_items, self._win_jobs, self._win_start = 0, 0, now
        return rate

    def observe(self, wall: float, cpu: float, items: int, misses: int = -1) -> None:
        """Account one finished job of ``items`` reads (``misses`` < 0: not probed)."""
        if items <= 0 or wall <= 0:
            return
        per = cpu / items
        first = self._cpu == 0.0
        self._cpu = per if first else 0.8 * self._cpu + 0.2 * per
        limit = self.limiter.total_tokens
        if misses >= 0 and self.probe_flags:
            rate_now = misses / items
            self._miss = rate_now if first else 0.7 * self._miss + 0.3 * rate_now
            if self._miss < 0.05:
                self._ceiling, self._prev = self.maximum, None  # cached again: forget
                if limit > 1:
                    self.limiter.total_tokens = limit - 1
                return
            rate = self._window_rate(items)
            if rate is None or self._miss <= 0.2:
                return
            if self._prev is not None and limit > self._prev[0] and rate < 1.1 * self._prev[1]:
                self._ceiling = self._prev[0]  # the last raise did not pay: back, and stay
                self.limiter.total_tokens = self._prev[0]
                self._prev = None
            elif limit < min(self.maximum, self._ceiling):
                self._prev = (limit, rate)
                self.limiter.total_tokens = min(self.maximum, self._ceiling, 2 * limit)
            return
        if misses < 0:
            self.probe_flags = 0  # the file system refused the probe: fall back for good
        wait = max(0.0, 1.0 - cpu / wall)
        self._wait = wait if first else 0.8 * self._wait + 0.2 * wait
        if self._wait > 0.6 and limit < self.maximum:
            self.limiter.total_tokens = limit + 1
        elif self._wait < 0.3 and limit > 1:
            self.limiter.total_tokens = limit - 1

    def split(self, n: int) -> list[tuple[int, int]]:
        """Ranges of ``range(n)``: big jobs for cached reads, fan-out for waiting ones."""
        if n == 0:
            return []
        limit = self.limiter.total_tokens
        if self._cpu > 0 and limit == 1:
            size = max(1, min(n, int(4 * TARGET_JOB_S / self._cpu)))
        else:
            size = math.ceil(n / limit) if limit > 1 else min(n, 16)
        return [(i, min(n, i + size)) for i in range(0, n, size)]


class RateGovernor:
    """Moves an :class:`Adjustable` bound between 1 and ``maximum`` by measured throughput.

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

    The bound's ``held`` (jobs running now) tells how many jobs of the old limit
    are still to finish after a change.  ``clock``: seconds, monotonic (tests
    inject a fake one, or replace :attr:`clock` of a governor made elsewhere).

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
        "clock",
        "limiter",
        "maximum",
    )

    def __init__(
        self,
        limiter: Adjustable,
        maximum: int,
        *,
        start_high: bool = False,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.limiter = limiter
        self.clock = clock
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
            self._win_start = self.clock()

    def restart(self) -> None:
        """Drop the window being measured (an epoch starts: idle time is not throughput)."""
        self._win_items, self._win_jobs, self._win_start = 0, 0, -1.0
        self._settle = 0  # the last epoch's jobs are over

    def _try(self, limit: int, rate: float, up: bool) -> None:
        self._trial = (limit, rate, up)
        self._set(min(self.maximum, 2 * limit) if up else max(1, limit // 2))

    def _set(self, limit: int) -> None:
        self._settle = self.limiter.held
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

    def _contended(self, per: float, trial: tuple[int, float, bool] | None) -> bool:
        """Track the CPU per item outside trials; say whether a step up contends for the GIL."""
        if trial is None:
            if self._settle == 0:
                c = self._cpu_item
                self._cpu_item = per if c == 0 else 0.8 * c + 0.2 * per
            return False
        return trial[2] and self._cpu_item > 0 and per > self.CONTENDED * self._cpu_item

    def observe(self, items: int, cpu: float = -1.0) -> None:
        """Account one finished job of ``items`` items (``cpu``: its thread CPU seconds)."""
        if self.maximum == 1:
            return
        self._win_items += items
        self._win_jobs += 1
        now = self.clock()
        span = now - self._win_start
        limit = self.limiter.limit
        # The first window (a warm-up: threads start, caches fill) is the first job alone.
        jobs = (2 * limit if self._start_high else limit) + 1
        full = (self._win_jobs >= jobs and span >= self.MIN_WINDOW_S) or self._seen == 0
        trial = self._trial
        if cpu >= 0 and items > 0 and self._contended(cpu / items, trial):
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
