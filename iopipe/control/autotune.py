"""Autotuning: ``concurrency="auto"`` (read, map) and ``prefetch("auto")``.

Two parts, so that the search can be tested without threads or clocks:

* :class:`~iopipe.control.climber.HillClimber` (iopipe/control/climber.py) is a
  pure controller: it proposes a setting, is told the throughput measured under
  it, and proposes the next.  It never reads a clock.
* :class:`AutoTuner` attaches it to a running pipeline (loop thread only): it
  times windows of delivered groups at the hand-off to the consumer, feeds the
  rate to the climber and applies each setting through the stages' public knobs
  (a stage declares its ``knob`` and implements ``set_knob``).

The knobs: reads in flight of an auto reader (the ceiling of its I/O governor),
jobs in flight of an auto map stage, and the depth (in groups) of an auto
prefetch.  Pools are created at the largest size a knob may reach and the
:class:`~iopipe.runtime.limits.CapacityLimiter` moves within it, so no pool is ever resized.
The budgets: map jobs in flight (thread and process executors) sum to at most
``cpu_budget``; reads in flight and prefetched items, at the mean item size read
so far, stay within ``memory_budget_bytes``.
"""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from ..runtime.channels import GroupQueue
from ..runtime.stats import AutoTuneState
from .climber import HillClimber, Knob

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "MAX_AUTO_AWAITS",
    "MAX_AUTO_READS",
    "AutoTuner",
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
        self.cpu_budget = cpu_budget
        self.memory_budget_bytes = memory_budget_bytes
        self.window_groups = window_groups
        self.window_min_s = window_min_s
        self.settle_groups = settle_groups
        self._clock = clock
        self._stages: dict[str, Any] = {}
        # prefetch stage -> (elements, source items) per group at that stage
        self._prefetch_units: dict[str, tuple[int, int]] = {}
        self._readers = [s for s in stages if s.knob == "read"]
        self._cpu_cost: dict[str, float] = {}  # CPUs one job of a knob counts for
        self.climber = HillClimber(self._knobs(stages, group_size), feasible=self.feasible)
        self._queues: dict[str, Any] = {}
        self._skip = settle_groups
        self._count = 0
        self._items = 0
        self._t0 = 0.0
        self.history: list[tuple[dict[str, int], float]] = []  # (setting, rate) per window
        self.apply(self.climber.setting)

    def state(self) -> AutoTuneState:
        """Where the search stands (any thread: a copy, read without the loop)."""
        return AutoTuneState(self.climber.phase, MappingProxyType(self.climber.best))

    def _knobs(self, stages: list[Any], group_size: int) -> list[Knob]:
        """One knob per autotuned stage, by the ``knob`` it declares."""
        # Map knobs first: decoding is the usual bottleneck, and the first knobs
        # searched are the ones settled soonest.
        knobs: dict[str, list[Knob]] = {"map": [], "read": [], "prefetch": []}
        weight = 1
        cpu_maps = [
            s for s in stages if s.knob == "map" and s.autotune and _job_cpus(s) is not None
        ]
        share = self.cpu_budget / max(1, len(cpu_maps))  # CPUs each may start with
        for s in stages:
            if s.autotune:
                self._stages[s.name] = s
                # Start low and grow only where it pays: extra workers often cost
                # throughput (GIL contention), and the search doubles quickly.
                if s.knob == "map":
                    start = min(s.concurrency, 2)
                    cost = _job_cpus(s)
                    if cost is not None:
                        self._cpu_cost[s.name] = cost
                        start = max(1, min(start, int(share / cost)))
                    knobs["map"].append(Knob(s.name, 1, s.concurrency, start))
                elif s.knob == "read":
                    knobs["read"].append(Knob(s.name, 1, s.concurrency, min(s.concurrency, 4)))
                elif s.knob == "prefetch":
                    self._prefetch_units[s.name] = (
                        (group_size, group_size) if weight == 1 else (1, weight)
                    )
                    knobs["prefetch"].append(Knob(s.name, 1, MAX_AUTO_PREFETCH, 2))
            if getattr(s, "batch_size", None) and not s.one_to_one:
                weight *= s.batch_size
        return [k for ks in knobs.values() for k in ks]

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
            elif s.knob == "read":
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
            s.set_knob(v)

    def _set_prefetch(self, s: Any, groups: int) -> None:
        elements, unit = self._prefetch_units[s.name]
        s.n = groups * elements  # the Prefetcher counts elements (items, or batches)
        s.capacity = groups * unit  # queues count source items
        q = self._queues.get(s.name)
        if q is None:
            return
        if isinstance(q, GroupQueue):  # capacity in source items
            q.resize(groups * unit)
        else:  # the Handoff (a trailing prefetch): capacity in groups
            q.resize(groups)


def _job_cpus(stage: Any) -> float | None:
    """CPUs one job of a map stage counts for in ``cpu_budget``; None: not a CPU pool."""
    executor = getattr(stage, "executor", None)
    if executor == "thread":
        return THREAD_CPU
    return 1.0 if executor == "process" else None


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
