"""Autotuning: ``concurrency="auto"`` (read, map) and ``prefetch("auto")``.

Two parts, so that the search can be tested without threads or clocks:

* :class:`HillClimber` is a pure controller: given integer knobs and a
  feasibility test, it proposes a setting, is told the throughput measured under
  it (:meth:`HillClimber.observe`), and proposes the next.  It never reads a
  clock.
* :class:`AutoTuner` attaches it to a running pipeline (loop thread only): it
  times windows of delivered groups at the hand-off to the consumer, feeds the
  rate to the climber and applies each setting to the stages' limits.

The knobs: reads in flight of an auto reader (the ceiling of its I/O governor),
jobs in flight of an auto map stage, and the depth (in groups) of an auto
prefetch.  Pools are created at the largest size a knob may reach and the
:class:`~iopipe.stages.base.Limiter` moves within it, so no pool is ever resized.
The budgets: map jobs in flight (thread and process executors) sum to at most
``cpu_budget``; reads in flight and prefetched items, at the mean item size read
so far, stay within ``memory_budget_bytes``.
"""

from __future__ import annotations

import inspect
import os
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "MAX_AUTO_AWAITS",
    "MAX_AUTO_READS",
    "AutoTuner",
    "HillClimber",
    "Knob",
    "auto_value",
    "check_budgets",
    "make_tuner",
    "map_pool_size",
]

#: Reads in flight an auto reader may reach (its pool is created at this size).
MAX_AUTO_READS = 64
#: Awaits in flight an auto ``async`` map stage may reach (no threads involved).
MAX_AUTO_AWAITS = 256
#: CPUs a thread worker of an auto map stage counts for in ``cpu_budget``.  Threads
#: running Python decode code spend part of their time waiting for the GIL, so up
#: to two per CPU keep the CPUs busy (bench/bench_autotune.py: JPEG decode on 2 CPUs
#: ran fastest with 4 threads); a process worker counts for one.
THREAD_CPU = 0.5
#: Deepest auto prefetch, in groups.
MAX_AUTO_PREFETCH = 32
#: Memory budget when none is given: 1 GiB.
DEFAULT_MEMORY_BUDGET = 1 << 30
#: A measurement window spans at least this many groups and this many seconds
#: (shorter windows measure timer noise more than the pipeline); after each change
#: ``SETTLE_GROUPS`` groups are let through unmeasured while queues adjust.
WINDOW_GROUPS = 4
WINDOW_MIN_S = 0.2
SETTLE_GROUPS = 1


def auto_value(value: Any, maximum: int, *, param: str = "concurrency") -> tuple[int, bool]:
    """Return ``(value, False)`` for an int, ``(maximum, True)`` for ``"auto"``.

    Raises:
        ValueError: neither an int >= 1 nor ``"auto"``.
    """
    if value == "auto":
        return maximum, True
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value, False
    raise ValueError(f"{param} must be an int >= 1 or 'auto', got {value!r}")


def map_pool_size(fn: Any, executor: str | None, cpu_budget: int | None) -> int:
    """Jobs in flight an auto map stage may reach (its pool is created at this size)."""
    cpus = cpu_budget or os.cpu_count() or 1
    is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - async callable objects
    )
    kind = executor or ("async" if is_async else "thread")
    if kind == "async":
        return MAX_AUTO_AWAITS
    return int(cpus / THREAD_CPU) if kind == "thread" else cpus


def check_budgets(cpu_budget: Any, memory_budget_bytes: Any) -> None:
    """Validate the ``cpu_budget`` and ``memory_budget_bytes`` pipeline options.

    Raises:
        ValueError: one is not an int >= 1 or None.
    """
    for name, v in (("cpu_budget", cpu_budget), ("memory_budget_bytes", memory_budget_bytes)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"{name} must be an int >= 1 or None, got {v!r}")


@dataclass(frozen=True, slots=True)
class Knob:
    """One integer setting: its name, bounds and starting value."""

    name: str
    lo: int
    hi: int
    start: int

    def __post_init__(self) -> None:
        if not self.lo <= self.start <= self.hi:
            raise ValueError(f"knob {self.name}: need lo <= start <= hi, got {self}")


class HillClimber:
    """Coordinate-wise pattern search for integer settings that maximise a measured rate.

    One knob at a time, from the accepted value ``x`` with step ``s`` (initially
    ``x``, so the first moves double): try ``x + s`` and ``x - s``; a move that
    pays is kept and a move up doubles the step; when neither pays the step
    halves, and at zero the next knob's turn comes.  Two phases:

    * **grow**: a move pays when its rate beats the best rate seen so far by
      more than ``tolerance``.  Rounds over all knobs repeat while one changes
      something (at most ``max_rounds``).  Only improvements move, so one knob
      never gives up capacity another one needs (coordinate search that trims
      too early strands itself: read lowered while decode was the bottleneck).
      A round that changes nothing ends with a joint move, every knob raised
      at once (doubled where the budget allows, else by one): two stages in
      balance both bound throughput, and no single knob can show a gain.
    * **trim**: one round in which a move down (cheaper) also pays when its rate
      stays within ``tolerance`` of the best: the climber settles on the
      cheapest setting within ``tolerance`` of the best it measured.

    Every comparison is against the best rate of the whole search, so the
    trimming losses never add up beyond ``tolerance``, and the search ends
    (the best rate only grows, by more than ``tolerance`` per move up in rate).
    Then the climber is :attr:`settled` and keeps its setting, unless the
    median rate of the last ``drift_windows`` windows moves by more than
    ``drift`` from the settled rate: the workload changed (cold data got
    warm...) and a new search starts from the current setting.  The median
    keeps a few noisy windows from restarting it.

    Measurements are noisy (other processes, page-cache luck), so the rate of
    the current setting is the mean of two windows, a trial is accepted only
    when a second window confirms the first, and the best rate is that of
    accepted settings only, never one lucky window that would make every later
    comparison too strict.

    Deterministic and clock-free: the same rates give the same settings.
    """

    def __init__(
        self,
        knobs: list[Knob],
        *,
        feasible: Callable[[Mapping[str, int]], bool] | None = None,
        tolerance: float = 0.05,
        max_rounds: int = 4,
        drift: float = 0.4,
        drift_windows: int = 5,
    ) -> None:
        if not knobs:
            raise ValueError("HillClimber needs at least one knob")
        self.knobs = knobs
        self._feasible = feasible or (lambda s: True)
        self.tolerance = tolerance
        self.max_rounds = max_rounds
        self.drift = drift
        self.drift_windows = drift_windows
        self._x = {k.name: k.start for k in knobs}  # accepted setting
        self._trial: dict[str, int] | None = None  # setting under measurement, if not _x
        self._base: float | None = None  # rate measured at _x
        self._best = 0.0  # best rate of this search
        self._pending: float | None = None  # first window of a two-window measurement
        self._step = 1
        self._dirs: list[int] = []
        self.settled = False
        self.steps = 0  # measurements taken
        self._restart()

    # -- public -----------------------------------------------------------------------
    @property
    def setting(self) -> dict[str, int]:
        """The setting to run during the next measurement window."""
        return dict(self._trial if self._trial is not None else self._x)

    @property
    def best(self) -> dict[str, int]:
        """The accepted setting (what the pipeline settles on)."""
        return dict(self._x)

    @property
    def phase(self) -> str:
        """``"grow"``, ``"trim"`` or ``"settled"``."""
        return "settled" if self.settled else self._phase

    def observe(self, rate: float) -> dict[str, int]:
        """Record ``rate`` (items/s) measured under :attr:`setting`; return the next setting."""
        self.steps += 1
        if self.settled:
            self._watch(rate)
        elif self._pending is not None:  # the second window of the same setting
            first, self._pending = self._pending, None
            self._decide(rate, first)
        else:
            self._decide(rate, None)
        return self.setting

    def _decide(self, rate: float, first: float | None) -> None:
        """Act on a window's ``rate`` (``first``: the previous window of the same setting).

        The current setting's rate is the mean of two windows.  A trial that would
        be accepted is measured again and accepted only if the second window
        passes too: one lucky window must not move the setting.
        """
        if self._trial is None:
            if first is None:
                self._pending = rate
                return
            self._base = (first + rate) / 2
            self._best = max(self._best, self._base)
            self._propose()
            return
        ok = self._passes(rate)
        if ok and first is None:
            self._pending = rate
            return
        mean = rate if first is None else (first + rate) / 2
        if self._joint:
            self._judge_joint(ok, mean)
        else:
            self._judge(ok, mean)

    def _passes(self, rate: float) -> bool:
        """Whether ``rate`` under the trial justifies moving to it."""
        assert self._trial is not None
        if rate > self._best * (1 + self.tolerance):
            return True
        if self._joint or self._phase != "trim":
            return False
        knob = self.knobs[self._k]
        down = self._trial[knob.name] < self._x[knob.name]
        return down and rate >= self._best * (1 - self.tolerance)

    # -- search -----------------------------------------------------------------------
    def _restart(self) -> None:
        self.settled = False
        self._phase = "grow"
        self._round = 0
        self._changed = False
        self._joint = False  # the trial under measurement raises every knob
        self._k = 0
        self._recent: list[float] = []  # rates since settling, for drift
        self._pending = None
        self._trial = None
        self._base = None  # measure the current setting first
        self._best = 0.0
        self._begin_knob()

    def _begin_knob(self) -> None:
        # The first round doubles and halves from the start; later rounds and
        # the trim refine around a value already searched, in quarter steps.
        x = self._x[self.knobs[self._k].name]
        first = self._phase == "grow" and self._round == 0
        self._step = max(1, x if first else x // 4)
        self._dirs = [+1, -1] if self._phase == "grow" else [-1, +1]

    def _propose(self) -> None:
        """Set ``_trial`` to the next feasible candidate, moving on when a knob is done."""
        while True:
            knob = self.knobs[self._k]
            x = self._x[knob.name]
            while self._dirs:
                cand = x + self._dirs[0] * self._step
                if knob.lo <= cand <= knob.hi:
                    trial = {**self._x, knob.name: cand}
                    if self._feasible(trial):
                        self._trial = trial
                        return
                self._dirs.pop(0)
            self._step //= 2
            if self._step >= 1:
                self._dirs = [+1, -1] if self._phase == "grow" else [-1, +1]
                continue
            if not self._next_knob():
                return

    def _next_knob(self) -> bool:
        """Move to the next knob, round or phase.

        Returns False when it stops proposing single-knob moves: settled, or a
        joint move set as the trial.
        """
        self._k += 1
        if self._k < len(self.knobs):
            self._begin_knob()
            return True
        self._k = 0
        self._round += 1
        if self._phase == "trim":
            self.settled = True
            self._trial = None
            self._recent = []
            return False
        if not self._changed and self._round < self.max_rounds and len(self.knobs) > 1:
            joint = self._joint_move()
            if joint is not None:
                self._trial, self._joint = joint, True
                return False
        if not self._changed or self._round >= self.max_rounds:
            self._phase = "trim"
        self._changed = False
        self._begin_knob()
        return True

    def _joint_move(self) -> dict[str, int] | None:
        """Every knob raised at once as far as the budget allows, or None."""
        out = dict(self._x)
        for knob in self.knobs:
            x = out[knob.name]
            for cand in (min(knob.hi, 2 * x), min(knob.hi, x + 1)):
                if cand > x and self._feasible({**out, knob.name: cand}):
                    out[knob.name] = cand
                    break
        return out if out != self._x else None

    def _judge_joint(self, ok: bool, rate: float) -> None:
        self._joint = False
        if ok:
            self._x, self._base = self._trial or self._x, rate
            self._best = max(self._best, rate)
        else:
            self._phase = "trim"  # nothing grows: trim from here
        self._trial = None
        self._changed = False
        self._begin_knob()
        self._propose()

    def _judge(self, ok: bool, rate: float) -> None:
        assert self._trial is not None
        knob = self.knobs[self._k]
        up = self._trial[knob.name] > self._x[knob.name]
        if ok:
            self._best = max(self._best, rate)
            self._x = self._trial
            self._base = rate
            self._changed = True
            if up:
                self._step *= 2
            self._dirs = [+1, -1] if up else [-1, +1]  # keep going the same way first
        else:
            self._dirs.pop(0)
        self._trial = None
        self._propose()

    def _watch(self, rate: float) -> None:
        """Restart the search when the median of the last windows left the settled rate."""
        self._recent.append(rate)
        del self._recent[: -self.drift_windows]
        base = self._base or 0.0
        full = len(self._recent) == self.drift_windows and base > 0
        if full and abs(statistics.median(self._recent) - base) > self.drift * base:
            self._restart()


# -- attaching the climber to a running pipeline -------------------------------------


class AutoTuner:
    """Drives a :class:`HillClimber` from a running pipeline (loop thread only).

    Invariant: every limit it sets stays within the pool its stage created at
    open (the knob's ``hi``).

    Args:
        stages: The pipeline's opened stages; those with ``autotune`` get a knob.
        group_size: Source items per group before any batcher.
        cpu_budget: CPUs the auto map stages may use (see :data:`THREAD_CPU`).
        memory_budget_bytes: Bound on reads in flight plus prefetched items.
        window_groups, window_min_s: Least groups and seconds per measurement.
        settle_groups: Groups let through unmeasured after each change.
        clock: Seconds, monotonic (tests inject a fake one).
    """

    def __init__(
        self,
        stages: list[Any],
        *,
        group_size: int,
        cpu_budget: int,
        memory_budget_bytes: int,
        window_groups: int = WINDOW_GROUPS,
        window_min_s: float = WINDOW_MIN_S,
        settle_groups: int = SETTLE_GROUPS,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        from ..stages.decode import Decoder
        from ..stages.prefetch import Prefetcher
        from ..stages.reader import ChunkedReader

        self.cpu_budget = cpu_budget
        self.memory_budget_bytes = memory_budget_bytes
        self.window_groups = window_groups
        self.window_min_s = window_min_s
        self.settle_groups = settle_groups
        self._clock = clock
        self._stages: dict[str, Any] = {}
        # prefetch stage -> (elements, source items) per group at that stage
        self._prefetch_units: dict[str, tuple[int, int]] = {}
        self._readers: list[Any] = []
        # Map knobs first: decoding is the usual bottleneck, and the first knobs
        # searched are the ones settled soonest.
        knobs: dict[str, list[Knob]] = {"map": [], "read": [], "prefetch": []}
        self._cpu_cost: dict[str, float] = {}  # CPUs one job of a knob counts for
        weight = 1
        cpu_maps = [
            s
            for s in stages
            if isinstance(s, Decoder) and s.autotune and s.executor in ("thread", "process")
        ]
        share = cpu_budget / max(1, len(cpu_maps))  # CPUs each may start with
        for s in stages:
            if isinstance(s, ChunkedReader):
                self._readers.append(s)
            if s.autotune:
                self._stages[s.name] = s
                # Start low and grow only where it pays: extra workers often cost
                # throughput (GIL contention), and the search doubles quickly.
                if isinstance(s, Decoder):
                    start = min(s.concurrency, 2)
                    if s in cpu_maps:
                        cost = THREAD_CPU if s.executor == "thread" else 1.0
                        self._cpu_cost[s.name] = cost
                        start = max(1, min(start, int(share / cost)))
                    knobs["map"].append(Knob(s.name, 1, s.concurrency, start))
                elif isinstance(s, ChunkedReader):
                    knobs["read"].append(Knob(s.name, 1, s.concurrency, min(s.concurrency, 4)))
                elif isinstance(s, Prefetcher):
                    self._prefetch_units[s.name] = (
                        (group_size, group_size) if weight == 1 else (1, weight)
                    )
                    knobs["prefetch"].append(Knob(s.name, 1, MAX_AUTO_PREFETCH, 2))
            if getattr(s, "batch_size", None) and not s.one_to_one:
                weight *= s.batch_size
        self.climber = HillClimber([k for ks in knobs.values() for k in ks], feasible=self.feasible)
        self._queues: dict[str, Any] = {}
        self._skip = settle_groups
        self._count = 0
        self._items = 0
        self._t0 = 0.0
        self.history: list[tuple[dict[str, int], float]] = []  # (setting, rate) per window
        self.apply(self.climber.setting)

    # -- budgets -----------------------------------------------------------------------
    def item_bytes(self) -> float:
        """Mean bytes per item read so far (0 before anything was read)."""
        n = sum(r.counters.items for r in self._readers)
        b = sum(r.counters.bytes for r in self._readers)
        return b / n if n else 0.0

    def feasible(self, setting: Mapping[str, int]) -> bool:
        """Whether ``setting`` stays within the CPU and memory budgets."""
        if sum(setting[k] * c for k, c in self._cpu_cost.items()) > self.cpu_budget:
            return False
        per_item = self.item_bytes()
        if per_item <= 0:
            return True
        held = 0.0
        for name, s in self._stages.items():
            if name in self._prefetch_units:
                held += setting[name] * self._prefetch_units[name][1]
            elif s.kind == "read":
                held += setting[name]
        return held * per_item <= self.memory_budget_bytes

    # -- hooks called by the pipeline (loop thread) -------------------------------------
    def start_epoch(self, stages: list[Any], queues: list[Any]) -> None:
        """Take the new epoch's queues (``queues[i + 1]`` is the output of ``stages[i]``)."""
        self._queues = {s.name: queues[i + 1] for i, s in enumerate(stages)}
        self._skip = self.settle_groups
        self._count = 0
        self.apply(self.climber.setting)

    def on_group(self, weight: int) -> None:
        """Count one group of ``weight`` source items handed to the consumer."""
        now = self._clock()
        if self._skip:
            self._skip -= 1
            if not self._skip:
                self._t0, self._count, self._items = now, 0, 0
            return
        self._count += 1
        self._items += weight
        dt = now - self._t0
        if self._count < self.window_groups or dt < self.window_min_s:
            return
        rate = self._items / dt
        self.history.append((self.climber.setting, rate))
        before = self.climber.setting
        after = self.climber.observe(rate)
        if after != before:
            self.apply(after)
            self._skip = self.settle_groups
        else:
            self._t0, self._count, self._items = now, 0, 0

    def apply(self, setting: Mapping[str, int]) -> None:
        """Set every autotuned stage's limit to ``setting``."""
        for name, v in setting.items():
            s = self._stages[name]
            if name in self._prefetch_units:
                self._set_prefetch(s, v)
                continue
            s.counters.concurrency = v
            if s.kind == "read":
                s._gov.maximum = v
                if s._limit.limit > v:
                    s._limit.set_limit(v)
            else:
                s._limit.set_limit(v)

    def _set_prefetch(self, s: Any, groups: int) -> None:
        elements, unit = self._prefetch_units[s.name]
        s.n = groups * elements  # the Prefetcher counts elements (items, or batches)
        s.capacity = groups * unit  # queues count source items
        q = self._queues.get(s.name)
        if q is None:
            return
        if hasattr(q, "_putters"):  # a GroupQueue: capacity in source items
            q.capacity = q.counters.capacity = groups * unit
            q._wake(q._putters)  # a blocked producer may fit now
        else:  # the Handoff (a trailing prefetch): capacity in groups
            q.capacity = q.counters.capacity = max(groups, 1)
            q._notify_space()


def make_tuner(
    stages: list[Any], *, group_size: int, cpu_budget: int | None, memory_budget_bytes: int | None
) -> AutoTuner | None:
    """Return an :class:`AutoTuner` for ``stages``, or None when no stage is on auto."""
    if not any(s.autotune for s in stages):
        return None
    return AutoTuner(
        stages,
        group_size=group_size,
        cpu_budget=cpu_budget or os.cpu_count() or 1,
        memory_budget_bytes=memory_budget_bytes or DEFAULT_MEMORY_BUDGET,
    )
