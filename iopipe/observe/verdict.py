"""The bottleneck verdict, and the periodic reporting of stats while a pipeline runs.

:func:`bottleneck` reads a :class:`~iopipe.PipelineStats` and says in one line which
part bounds throughput.  The CLI (``iopipe run``), the periodic log line of
``stats_interval=`` and users calling it on ``pipe.stats()`` all share it.

How it decides (thresholds are module constants):

1. The training loop (the consumer) waited less than :data:`CONSUMER_WAIT` of the
   time: data was ready whenever it asked, so the consumer bounds throughput.
2. Otherwise the busiest stage bounds it when its busy share reaches
   :data:`SATURATED`.  A stage's busy share is the larger of its utilization
   (``busy_s / (elapsed_s * concurrency)``) and the share of the time it was
   neither waiting for input nor for room downstream: the second catches a
   stage whose effective concurrency is below its maximum (the reader's governor,
   an autotuned limit).  A stage that finished early counts as idle since.  The source or the reader bounding throughput is
   reported as the input side (kind ``"source"``), with the reads' I/O-wait share
   when the reader measured it.
3. Otherwise there is no clear bottleneck: the consumer waits although no stage
   is saturated, which points at latency (too little prefetch or concurrency).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

from ..runtime.stats import PipelineStats, StageStats, busy_share

if TYPE_CHECKING:
    from ..pipeline.builder import Pipeline
    from ..pipeline.epoch import Epoch

__all__ = [
    "CONSUMER_WAIT",
    "SATURATED",
    "StatsReporter",
    "Verdict",
    "bottleneck",
    "busy_share",
    "check_monitoring",
]

#: Below this share of waiting, the consumer is the bottleneck.
CONSUMER_WAIT = 0.05
#: From this busy share on, a stage counts as saturated.
SATURATED = 0.7
#: Seconds between reports when only ``on_stats`` is given.
DEFAULT_INTERVAL_S = 10.0

VerdictKind = Literal["stage", "source", "consumer", "none"]

logger = logging.getLogger("iopipe")


@dataclass(frozen=True, slots=True)
class Verdict:
    """What bounds a pipeline's throughput; ``str(verdict)`` is a one-line explanation.

    Attributes:
        kind: ``"stage"`` (a processing stage such as ``map`` is saturated),
            ``"source"`` (the source or the reads: data arrives too slowly),
            ``"consumer"`` (the training loop: the pipeline keeps up) or
            ``"none"`` (no clear bottleneck, or nothing measured yet).
        stage: Name of the bounding stage for ``"stage"`` and ``"source"``, else ``None``.
        busy: Busy share of every stage, by name (see the module docstring).
        consumer_wait_share: Share of the time the consumer waited for data.
        message: The one-line explanation.
    """

    kind: VerdictKind
    stage: str | None
    busy: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    consumer_wait_share: float = 0.0
    message: str = ""

    def __str__(self) -> str:
        return self.message


def _fill(s: StageStats) -> float:
    return min(1.0, s.queue_mean / s.queue_capacity) if s.queue_capacity > 0 else 0.0


def _is_input_side(name: str) -> bool:
    return name == "source" or name == "read" or name.startswith("read_")


def _others(ranked: list[tuple[str, float]], skip: str | None) -> str:
    rest = [f"{n} busy {b:.0%}" for n, b in ranked if n != skip][:2]
    return "; ".join(rest)


def _io_note(s: StageStats) -> str:
    """``" (storage: reads waited on I/O 85% of their time)"`` when the reader measured CPU."""
    cpu = s.extra.get("cpu_s")
    if cpu is None or s.busy_s <= 0:
        return ""
    wait = max(0.0, 1.0 - cpu / s.busy_s)
    if wait >= 0.5:
        return f" (storage: reads waited on I/O {wait:.0%} of their time)"
    return f" (CPU: reads spent {1 - wait:.0%} of their time on the CPU)"


def bottleneck(stats: PipelineStats) -> Verdict:
    """Say which part of the pipeline bounds its throughput.

    Works on any snapshot, also one taken mid-epoch (``pipe.stats()`` during
    iteration).  Pure: reads ``stats`` only.

    Args:
        stats: A snapshot from :meth:`iopipe.Pipeline.stats` (or built by hand).

    Returns:
        A :class:`Verdict`; ``str()`` of it is one line such as ``"map bounds
        throughput: busy 97%; read busy 31%; the training loop waited 41% of the time"``.
    """
    if not stats.stages or stats.elapsed_s <= 0 or stats.delivered == 0:
        return Verdict("none", None, message="no clear bottleneck: nothing delivered yet")
    busy = {s.name: busy_share(s, stats.elapsed_s) for s in stats.stages}
    ranked = sorted(busy.items(), key=lambda kv: kv[1], reverse=True)
    wait = stats.consumer_wait_share
    waited = f"the training loop waited {wait:.1%} of the time"
    frozen = MappingProxyType(busy)
    if wait < CONSUMER_WAIT:
        fill = _fill(stats.stages[-1])
        parts = [
            f"the training loop bounds throughput: it waited {wait:.1%} of the time",
            f"the output queue was {fill:.0%} full",
        ]
        if ranked:
            parts.append(f"busiest stage {ranked[0][0]} busy {ranked[0][1]:.0%}")
        return Verdict("consumer", None, frozen, wait, "; ".join(parts))
    top, top_busy = ranked[0]
    if top_busy >= SATURATED:
        s = stats.stage(top)
        kind: VerdictKind = "source" if _is_input_side(top) else "stage"
        note = _io_note(s) if kind == "source" else ""
        others = _others(ranked, top)
        parts = [f"{top} bounds throughput{note}: busy {top_busy:.0%}"]
        if others:
            parts.append(others)
        parts.append(waited)
        return Verdict(kind, top, frozen, wait, "; ".join(parts))
    message = (
        f"no clear bottleneck: {waited} but no stage is saturated "
        f"(busiest {top} busy {top_busy:.0%}); raise prefetch or concurrency to hide latency"
    )
    return Verdict("none", None, frozen, wait, message)


def check_monitoring(stats_interval: float | None, on_stats: Any) -> None:
    """Validate the ``stats_interval`` and ``on_stats`` pipeline options.

    Raises:
        ValueError: ``stats_interval`` is not a number > 0 or None.
        TypeError: ``on_stats`` is not callable or None.
    """
    if stats_interval is not None and (
        isinstance(stats_interval, bool)
        or not isinstance(stats_interval, int | float)
        or stats_interval <= 0
    ):
        raise ValueError(f"stats_interval must be a number > 0 or None, got {stats_interval!r}")
    if on_stats is not None and not callable(on_stats):
        raise TypeError(f"on_stats must be callable or None, got {on_stats!r:.80}")


class StatsReporter:
    """Reports one epoch's stats every ``interval`` seconds, on the loop thread.

    Each report logs ``str(verdict)`` and the stats table at INFO on the
    ``"iopipe"`` logger and calls ``on_stats(stats)`` when given; the first tick
    after the end of the epoch makes a last report.  ``interval`` defaults to
    :data:`DEFAULT_INTERVAL_S`.  The callback runs on the loop thread, so it must be
    quick (hand slow sinks to a thread of their own).  If it raises, the error
    is logged and the callback is not called again: monitoring never stops
    training.  Holds the pipeline only weakly, so it never keeps it alive.
    """

    def __init__(
        self,
        pipe: Pipeline[Any],
        ep: Epoch,
        interval: float | None,
        on_stats: Callable[[PipelineStats], Any] | None,
    ) -> None:
        self._pipe = weakref.ref(pipe)
        self._ep = weakref.ref(ep)
        self._interval = interval if interval is not None else DEFAULT_INTERVAL_S
        self._on_stats = on_stats

    def start(self) -> None:
        """Schedule the first report (any thread)."""
        ep = self._ep()
        if ep is not None:
            ep.rt.loop.call_soon(self._schedule, ep.rt.loop.loop)

    def _schedule(self, loop: Any) -> None:
        loop.call_later(self._interval, self._tick, loop)

    def _tick(self, loop: Any) -> None:
        pipe, ep = self._pipe(), self._ep()
        if pipe is None or ep is None or ep.rt.latest is not ep:
            return  # the pipeline is gone or a newer epoch reports for itself
        ended = ep.ended is not None
        self.report(pipe.stats())
        if not ended:
            self._schedule(loop)

    def report(self, stats: PipelineStats) -> None:
        """Log ``stats`` with their verdict and pass them to the callback."""
        logger.info("%s\n%s", bottleneck(stats), stats)
        if self._on_stats is not None:
            try:
                self._on_stats(stats)
            except Exception:
                logger.exception("iopipe: on_stats raised; it will not be called again")
                self._on_stats = None
