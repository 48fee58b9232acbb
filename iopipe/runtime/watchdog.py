"""The stall watchdog: when the consumer waits too long, say where items are stuck.

No thread of its own.  The consumer's wait for the next group
(``_EpochIterator._get`` in iopipe/pipeline/builder.py) already wakes on a timeout; it
wakes at the ``stall_warning`` interval too, and only then (never while groups
flow) asks :func:`find_stall` where the work is.  Stages keep, per job (never
per item), the group and span it covers and when it started
(``Stage.submit``), so the report names the stage, the items in the oldest
stuck job and how long it has run:

    iopipe: no data for 60 s; items are stuck in stage 'map' on item 'a/7.jpg'
    for 60.2 s (queued after each stage, items/capacity: source 128/128, read 0/128)

With ``timeout`` set, the consumer's ``TimeoutError`` carries the same text,
and the jobs found stuck are abandoned: stopping the epoch and ``close()`` no
longer wait for them (iopipe/runtime/threads.py), so a job that never returns costs
neither the close bound nor the interpreter's exit.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import item_label

__all__ = [
    "DEFAULT_STALL_WARNING_S",
    "Stall",
    "StallTimeoutError",
    "StuckJob",
    "abandon_stuck",
    "check_stall_warning",
    "find_stall",
    "queue_summary",
]

logger = logging.getLogger("iopipe")

#: Seconds the consumer may wait for data before the watchdog logs a warning.
DEFAULT_STALL_WARNING_S = 60.0


def check_stall_warning(value: object) -> None:
    """Validate the ``stall_warning`` option (see :func:`check_seconds`)."""
    check_seconds("stall_warning", value)


def check_seconds(name: str, value: object) -> None:
    """Validate a duration option: a finite number of seconds > 0, or None.

    Raises:
        ValueError: anything else (``True``, NaN, which compares false with
            every bound and so would disable the wait, infinity, 0, a string).
    """
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a number of seconds > 0 or None, got {value!r}")


@dataclass(frozen=True, slots=True)
class StuckJob:
    """A job running in a worker: the source keys and items it holds, and for how long."""

    keys: tuple[Any, ...]
    items: tuple[Any, ...]
    running_s: float


@dataclass(frozen=True, slots=True)
class Stall:
    """Where a starving consumer's data is stuck.

    Attributes:
        stage: The stage holding the work (the one with the oldest running job,
            else the one nearest the consumer that holds items).
        jobs: That stage's running jobs, oldest first (empty when none is known).
    """

    stage: str
    jobs: tuple[StuckJob, ...] = ()

    def describe(self) -> str:
        """``items are stuck in stage 'map' on item 'a/7.jpg' for 0.5 s``."""
        text = f"items are stuck in stage {self.stage!r}"
        if not self.jobs:
            return text
        job = self.jobs[0]
        text += f"{_items_label(job.keys)} for {job.running_s:.1f} s"
        if len(self.jobs) > 1:
            text += f" ({len(self.jobs)} jobs running there)"
        return text


class StallTimeoutError(TimeoutError):
    """No data within ``timeout``: a ``TimeoutError`` that says where items are stuck.

    Attributes:
        stall: The :class:`Stall` found when the wait timed out.
    """

    def __init__(self, message: str, stall: Stall) -> None:
        super().__init__(message)
        self.stall = stall


def _quote(key: Any) -> str:
    label = item_label(key, 120)
    return repr(label) if isinstance(key, str) else label


def _items_label(keys: Sequence[Any]) -> str:
    if not keys:
        return ""
    if len(keys) == 1:
        return f" on item {_quote(keys[0])}"
    return f" on items {_quote(keys[0])} .. {_quote(keys[-1])} ({len(keys)} in one job)"


def _jobs(stage: Any) -> list[StuckJob]:
    running = getattr(stage, "running_jobs", None)
    if running is None:
        return []
    return [StuckJob(tuple(k), tuple(i), t) for k, i, t in running()]


def find_stall(source: Any, plan: Iterable[Any]) -> Stall | None:
    """Return the stage with the oldest job running in a worker, or None if no job runs.

    ``plan`` is what runs (stages, and fused runs with their ``members``); the
    source's pull of a plain iterable counts as a job of stage ``source``.
    Reads only counters and job tables: safe from the consumer thread.
    """
    best: tuple[float, str, list[StuckJob]] | None = None
    for unit in plan:
        members = unit.parts()
        for s in [unit, *members]:
            jobs = _jobs(s)
            if not jobs or (best is not None and jobs[0].running_s <= best[0]):
                continue
            name = s.name
            if members and s is unit:  # a fused job: name the member it is in
                busy = unit.busy_member()
                name = busy.name if busy is not None else members[0].name
            best = (jobs[0].running_s, name, jobs)
    job = getattr(source, "job", None)
    started = getattr(job, "started", 0.0)
    if job is not None and not job.done() and started:
        running = time.perf_counter() - started
        if best is None or running > best[0]:
            best = (running, source.name, [StuckJob((), (), running)])
    if best is None:
        return None
    return Stall(best[1], tuple(best[2]))


def abandon_stuck(source: Any, plan: Iterable[Any], older_than: float) -> None:
    """Stop waiting for jobs that have run ``older_than`` seconds or more (see module doc)."""
    for unit in plan:
        for s in [unit, *(getattr(unit, "members", None) or [])]:
            s.abandon(older_than)
    job = getattr(source, "job", None)
    if job is not None and job.started and time.perf_counter() - job.started >= older_than:
        job.abandoned = True


def queue_summary(names: Sequence[str], queues: Sequence[Any]) -> str:
    """``source 128/128, read 0/128``: items waiting after each stage / capacity."""
    parts = [
        f"{name} {q.counters.used}/{q.capacity}"
        for name, q in zip(names, queues, strict=False)
        if q is not None
    ]
    return ", ".join(parts)
