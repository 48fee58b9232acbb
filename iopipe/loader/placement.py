"""Where a DataLoader's thread-worker loads run best: threads, or torch's worker processes.

``worker_type="auto"`` loads a plain map-style dataset on threads that help the
training thread (``helped.py``): nothing is pickled, no batch crosses a
process, and loads that release the GIL (reads, image decoding, numpy) run in
parallel.  Python that holds the GIL does not: two threads run it no faster
than one, while torch's worker processes run it on as many cores as there are
workers.  No measurement tells "holds the GIL" apart from "is CPU-bound and
releases it", so :class:`PlaceJudge` tries instead:

* after a thread epoch in which the loads could be GIL-bound (the training
  loop spent at least :data:`WAIT_SHARE` of the epoch in ``next()``, the loads
  kept their thread on the CPU for at least :data:`CPU_SHARE` of their wall
  time, a batch took at least :data:`MIN_LOAD_S` to load, and the process may
  run on two cores or more), the next epoch runs on torch's worker processes;
* after that trial epoch, processes stay if the loop waited in ``next()`` at
  least :data:`KEEP_GAIN` times less per batch than on threads; otherwise the
  loader goes back to threads.  The verdict is final for the loader.

Only epochs of at least :data:`MIN_BATCHES` batches are judged.  The trial
epoch runs on torch's own machinery at the loader's arguments, so it is never
slower than torch; the batches and every RNG draw are torch's in either mode
(``DataLoader._plan_epoch`` replays the base seed across the switch).  The judge
is pure: it is fed one :class:`EpochFigures` per epoch and answers with the
mode the next epoch should use.
"""

from __future__ import annotations

import dataclasses
import os

__all__ = ["CPU_SHARE", "KEEP_GAIN", "MIN_BATCHES", "MIN_LOAD_S", "WAIT_SHARE"]
__all__ += ["EpochFigures", "PlaceJudge", "usable_cores"]

#: Epochs with fewer batches than this are not judged (too few to measure).
MIN_BATCHES = 16
#: The loop must spend at least this share of an epoch in ``next()`` (loads bound it).
WAIT_SHARE = 0.3
#: Loads must keep their thread on the CPU this share of their wall time, at least.
CPU_SHARE = 0.5
#: A batch must take this long to load, at least: a process hand-off costs
#: hundreds of microseconds (pickling, a pipe, a wake-up), which cheaper batches
#: would not win back.
MIN_LOAD_S = 1e-3
#: Processes stay when the loop waits this many times less per batch on them.
KEEP_GAIN = 1.1


@dataclasses.dataclass(frozen=True, slots=True)
class EpochFigures:
    """What one epoch measured, from the consumer's side and (threads) the loads' side.

    ``next_s``: time the training loop spent in ``next()`` (waiting, or loading a
    batch itself); ``wall_s``: from the first ``next()`` to the last batch;
    ``loads``, ``load_s``, ``load_cpu_s``: batches loaded on threads, their wall
    time and their threads' CPU time (zero on processes).
    """

    mode: str
    batches: int
    next_s: float
    wall_s: float
    loads: int = 0
    load_s: float = 0.0
    load_cpu_s: float = 0.0

    @property
    def wait_per_batch(self) -> float:
        return self.next_s / max(1, self.batches)


def usable_cores() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class PlaceJudge:
    """Decides, from one thread epoch and one trial epoch, whether loads run on processes.

    ``phase``: ``"watch"`` (thread epochs, looking for GIL-bound loads),
    ``"trial"`` (an epoch on processes is being measured) or ``"settled"``.
    """

    def __init__(self, cores: int) -> None:
        self.cores = cores
        self.phase = "watch"
        self.threads: EpochFigures | None = None  # the thread epoch the trial is against
        self.verdict: str | None = None  # the settled mode, and why
        self.reason = ""

    def suspect(self, ep: EpochFigures) -> bool:
        """Whether ``ep`` (a thread epoch) looks bound by loads that hold the GIL."""
        if ep.mode != "thread" or ep.batches < MIN_BATCHES or ep.loads < MIN_BATCHES:
            return False
        if self.cores < 2 or ep.wall_s <= 0 or ep.load_s <= 0:
            return False
        return (
            ep.next_s >= WAIT_SHARE * ep.wall_s
            and ep.load_cpu_s >= CPU_SHARE * ep.load_s
            and ep.load_s / ep.loads >= MIN_LOAD_S
        )

    def after(self, ep: EpochFigures) -> str | None:
        """Feed the epoch just ended; return the mode the next one runs on, or None (same)."""
        if self.phase == "watch":
            if self.suspect(ep):
                self.threads, self.phase = ep, "trial"
                self.reason = (
                    f"loads took {ep.load_s / ep.loads * 1e3:.1f} ms a batch, "
                    f"{ep.load_cpu_s / ep.load_s:.0%} on the CPU, while the loop waited "
                    f"{ep.next_s / ep.wall_s:.0%} of the epoch: trying torch's worker "
                    "processes for one epoch (Python that holds the GIL runs on one core "
                    "in threads)"
                )
                return "process"
            return None
        if self.phase == "trial":
            if ep.mode != "process" or ep.batches < MIN_BATCHES:
                return None  # not measurable yet: the trial goes on
            assert self.threads is not None
            before, now = self.threads.wait_per_batch, ep.wait_per_batch
            self.phase = "settled"
            if now * KEEP_GAIN <= before:
                self.verdict = "process"
                self.reason = (
                    f"the loop waited {now * 1e3:.2f} ms a batch on processes against "
                    f"{before * 1e3:.2f} ms on threads: staying on processes"
                )
                return None
            self.verdict = "thread"
            self.reason = (
                f"the loop waited {now * 1e3:.2f} ms a batch on processes against "
                f"{before * 1e3:.2f} ms on threads: back to threads"
            )
            return "thread"
        return None
