"""Per-stage counters and the frozen snapshots that :meth:`Pipeline.stats` returns.

Counters are mutated by the loop thread only; the consumer thread reads them to
build a snapshot.  Reads of single ints and floats are atomic under the GIL, so
a snapshot taken mid-epoch is consistent enough for monitoring (each figure is
exact; figures may be a few microseconds apart).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = ["PipelineStats", "StageCounters", "StageStats", "busy_share"]


@dataclass(slots=True)
class StageCounters:
    """Live counters of one stage (loop thread writes, anyone reads)."""

    name: str
    concurrency: int
    items: int = 0
    bytes: int = 0
    busy_s: float = 0.0  # summed over concurrent jobs
    wait_input_s: float = 0.0
    wait_output_s: float = 0.0
    jobs: int = 0
    extra: dict[str, float] = field(default_factory=dict)
    failures: int = 0  # items skipped under on_error="skip" (iopipe/runtime/policy.py)
    run_busy_s: float = 0.0  # a fused run's members: busy time of the whole run


def busy_share(s: StageStats, elapsed_s: float | None = None) -> float:
    """Return the share of the epoch's ``elapsed_s`` that ``s`` spent working.

    ``elapsed_s`` defaults to the stage's own; a stage that finished early (its
    ``elapsed_s`` shorter than the pipeline's) counts as idle after it finished.
    The larger of two figures: the utilization (``busy_s`` over the time at full
    concurrency) and the share of the time the stage neither waited for input
    nor for room downstream.  The members of a fused run wait as one, so the
    second is split between them in proportion to their busy time.
    """
    total = max(s.elapsed_s, elapsed_s or 0.0)
    if total <= 0:
        return 0.0
    util = s.busy_s / (total * max(1, s.concurrency))
    working = s.elapsed_s - max(s.wait_input_s, s.wait_output_s)
    if s.run_busy_s > 0:
        working *= min(1.0, s.busy_s / s.run_busy_s)
    return min(1.0, max(util, working / total, 0.0))


def _fmt_number(v: float) -> str:
    """An extra figure for the table: ints as they are, floats to three significant digits.

    ``0.0116726`` -> ``0.0117``, ``2.5`` -> ``2.5``, ``12345.6`` -> ``12,346`` (no
    exponent for large figures).
    """
    if isinstance(v, int):
        return str(v)
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.3g}"


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


@dataclass(frozen=True, slots=True)
class StageStats:
    """A snapshot of one stage.

    Attributes:
        name: Stage name (``"source"``, ``"read"``, ``"map"``, ...).
        concurrency: Jobs the stage may run at once.
        items: Items the stage has emitted (batches, for stages after the batcher).
        bytes: Bytes the stage produced (readers and caches; 0 where unknown).
        busy_s: Seconds spent working, summed over concurrent jobs.
        wait_input_s: Seconds the stage waited for input.
        wait_output_s: Seconds the stage waited for room downstream (backpressure).
        queue_capacity: Capacity of the stage's output queue, in items.
        queue_mean: Mean occupancy of that queue over the run, in items.
        queue_now: Items in that queue now.
        elapsed_s: Seconds the stage has been running this epoch (until it
            finished, for a stage that is done).
        extra: Stage-specific figures (the cache's ``hits``, ``misses``, ``bytes_held``).
        failures: Items the stage skipped because they failed (``on_error="skip"``).
        run_busy_s: For a member of a fused run (several stages run as one job),
            the busy time of the whole run, every member's together; else 0.
    """

    name: str
    concurrency: int
    items: int
    bytes: int
    busy_s: float
    wait_input_s: float
    wait_output_s: float
    queue_capacity: int
    queue_mean: float
    queue_now: int
    elapsed_s: float
    extra: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    failures: int = 0
    run_busy_s: float = 0.0

    @property
    def utilization(self) -> float:
        """Share of the stage's capacity in use: ``busy_s / (elapsed_s * concurrency)``."""
        denom = self.elapsed_s * max(1, self.concurrency)
        return min(1.0, self.busy_s / denom) if denom > 0 else 0.0

    @property
    def items_per_s(self) -> float:
        """Items emitted per second of the epoch."""
        return self.items / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclass(frozen=True, slots=True)
class AutoTuneState:
    """Where the autotuner of a pipeline with ``"auto"`` settings stands (docs/tuning.md).

    Attributes:
        phase: ``"grow"``, ``"trim"`` or ``"settled"``.
        knobs: The accepted setting, e.g. ``{"read": 8, "map": 4}``.
    """

    phase: str
    knobs: Mapping[str, int]

    @property
    def settled(self) -> bool:
        """Whether the search has settled (it searches again if the rate moves)."""
        return self.phase == "settled"


@dataclass(frozen=True, slots=True)
class PipelineStats:
    """A snapshot of a pipeline; ``print(pipe.stats())`` renders it as a table.

    Attributes:
        stages: One :class:`StageStats` per stage, source first.
        elapsed_s: Seconds since the current (or last) epoch started.
        delivered: Elements (items or batches) handed to the consumer.
        consumer_wait_s: Seconds the consumer spent blocked waiting for data.
        epoch: The current (or last) epoch number.
        inflight_bytes: With ``max_inflight_bytes``: bytes read and not yet taken
            by the consumer, now (0 without the option; iopipe/runtime/budget.py).
        peak_inflight_bytes: The most such bytes at any moment of the epoch.
        autotune: With ``"auto"`` settings: where the tuner stands (phase and the
            accepted knobs); None without them.
    """

    stages: tuple[StageStats, ...]
    elapsed_s: float
    delivered: int
    consumer_wait_s: float
    epoch: int
    inflight_bytes: int = 0
    peak_inflight_bytes: int = 0
    autotune: AutoTuneState | None = None

    @property
    def failures(self) -> int:
        """Items skipped because they failed, over all stages (``on_error="skip"``)."""
        return sum(s.failures for s in self.stages)

    @property
    def consumer_wait_share(self) -> float:
        """Share of the epoch's wall time the consumer spent waiting for data."""
        return min(1.0, self.consumer_wait_s / self.elapsed_s) if self.elapsed_s > 0 else 0.0

    def stage(self, name: str) -> StageStats:
        """Return the stats of the stage called ``name``.

        Raises:
            KeyError: no stage has that name.
        """
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"no stage named {name!r}; stages: {[s.name for s in self.stages]}")

    def __str__(self) -> str:
        head = (
            f"epoch {self.epoch}: {self.delivered} delivered in {self.elapsed_s:.2f} s; "
            f"consumer waited {self.consumer_wait_s:.2f} s ({self.consumer_wait_share:.1%})"
        )
        return f"{head}\n{self.table()}"

    def table(self) -> str:
        """The per-stage table of ``str(stats)``, without its first (epoch) line.

        ``busy`` is :func:`busy_share`, the figure the bottleneck
        verdict ranks stages by.
        """
        rows = [
            ("stage", "conc", "items", "items/s", "bytes", "busy", "wait in", "wait out", "queue")
        ]
        for s in self.stages:
            rows.append(
                (
                    s.name,
                    str(s.concurrency),
                    str(s.items),
                    f"{s.items_per_s:,.0f}",
                    _fmt_bytes(s.bytes) if s.bytes else "-",
                    f"{busy_share(s, self.elapsed_s):.0%}",
                    f"{s.wait_input_s:.2f}s",
                    f"{s.wait_output_s:.2f}s",
                    f"{s.queue_mean:.0f}/{s.queue_capacity}",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = []
        for r in rows:
            lines.append(
                "  ".join(
                    c.ljust(w) if i == 0 else c.rjust(w)
                    for i, (c, w) in enumerate(zip(r, widths, strict=True))
                )
            )
        for s in self.stages:
            if s.extra:
                extras = ", ".join(f"{k}={_fmt_number(v)}" for k, v in s.extra.items())
                lines.append(f"{s.name}: {extras}")
        if self.failures:
            per = ", ".join(f"{s.name} {s.failures}" for s in self.stages if s.failures)
            lines.append(f"skipped (on_error='skip'): {self.failures} items failed: {per}")
        if self.peak_inflight_bytes:
            lines.append(
                f"bytes in flight (max_inflight_bytes): {_fmt_bytes(self.inflight_bytes)} now, "
                f"peak {_fmt_bytes(self.peak_inflight_bytes)}"
            )
        return "\n".join(lines)


def snapshot(
    counters: StageCounters,
    queue_capacity: int,
    queue_mean: float,
    queue_now: int,
    started: float,
    ended: float | None,
) -> StageStats:
    """Freeze ``counters`` into a :class:`StageStats`."""
    elapsed = (ended if ended is not None else time.perf_counter()) - started
    extra: dict[str, Any] = dict(counters.extra)
    return StageStats(
        name=counters.name,
        concurrency=counters.concurrency,
        items=counters.items,
        bytes=counters.bytes,
        busy_s=counters.busy_s,
        wait_input_s=counters.wait_input_s,
        wait_output_s=counters.wait_output_s,
        queue_capacity=queue_capacity,
        queue_mean=queue_mean,
        queue_now=queue_now,
        elapsed_s=max(0.0, elapsed),
        extra=MappingProxyType(extra),
        failures=counters.failures,
        run_busy_s=counters.run_busy_s,
    )
