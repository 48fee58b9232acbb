"""Where a DataLoader's thread-worker loads run best: threads, or torch's worker processes.

``worker_type="auto"`` loads a plain map-style dataset on threads that help the
training thread (``helped.py``): nothing is pickled, no batch crosses a
process, and loads that release the GIL (reads, image decoding, numpy) run in
parallel.  Python that holds the GIL does not: two threads run it no faster
than one, while torch's worker processes run it on as many cores as there are
workers.  No measurement tells "holds the GIL" apart from "is CPU-bound and
releases it", so :class:`PlaceJudge` tries instead:

* after a thread epoch in which the loads could be GIL-bound (the training
  loop spent at least :data:`WAIT_SHARE` of the epoch in ``next()``, the loads'
  threads used the CPU for at least :data:`CPU_SHARE` of the epoch's wall time,
  a batch took at least :data:`MIN_LOAD_S` to load, and the process may run on
  two cores or more), the next epoch runs on torch's worker processes;
* after that trial epoch, processes stay if the loop waited in ``next()`` at
  least :data:`KEEP_GAIN` times less per batch than on threads; otherwise the
  loader goes back to threads.  The verdict is final for the loader.

Forking a dataset that has already loaded in this process is not what torch
does: torch's workers start from a dataset no ``__getitem__`` ran on, and
datasets open files, connections and pools lazily, inside each worker.  So the
trial is never made when the dataset's attributes were added or rebound since
the first epoch began (:func:`attr_ids`: the lazy-open idiom), and its first
batch must come within :data:`~iopipe.loader.modes.PROBE_TIMEOUT_S` without
error (:func:`first_batch`); otherwise the epoch starts again on threads, from
the same RNG states, before the loop saw anything of it.

Only epochs of at least :data:`MIN_BATCHES` batches are judged, and the first
:data:`WARMUP` batches of each (worker start-up, the helper judge's first
window) are not timed.  The trial
epoch runs on torch's own machinery at the loader's arguments, so it is never
slower than torch; the batches and every RNG draw are torch's in either mode
(``DataLoader._plan_epoch`` replays the base seed across the switch).  The judge
is pure: it is fed one :class:`EpochFigures` per epoch and answers with the
mode the next epoch should use.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["CPU_SHARE", "KEEP_GAIN", "MIN_BATCHES", "MIN_LOAD_S", "WAIT_SHARE", "WARMUP"]
__all__ += ["EpochFigures", "PlaceJudge", "TrialFailed", "attr_ids", "first_batch", "usable_cores"]

#: Epochs with fewer batches than this are not judged (too few to measure).
MIN_BATCHES = 16
#: The loop must spend at least this share of an epoch in ``next()`` (loads bound it).
WAIT_SHARE = 0.3
#: The loads' threads must use the CPU this share of the epoch's wall time, at least
#: (GIL-bound loads keep one core busy however many threads wait for the GIL).
CPU_SHARE = 0.5
#: Batches at the start of an epoch that are not timed.
WARMUP = 2
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
            and ep.load_cpu_s >= CPU_SHARE * ep.wall_s
            and ep.load_s / ep.loads >= MIN_LOAD_S
        )

    def after(self, ep: EpochFigures) -> str | None:
        """Feed the epoch just ended; return the mode the next one runs on, or None (same)."""
        if self.phase == "watch":
            if self.suspect(ep):
                self.threads, self.phase = ep, "trial"
                self.reason = (
                    f"loads took {ep.load_s / ep.loads * 1e3:.1f} ms a batch, "
                    f"using {ep.load_cpu_s / ep.wall_s:.0%} of a core, while the loop waited "
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


def attr_ids(obj: Any) -> dict[str, int]:
    """The identity of each attribute of ``obj`` (what a lazy open adds or rebinds)."""
    try:
        return {k: id(v) for k, v in vars(obj).items()}
    except TypeError:  # no __dict__ (slots): nothing can be added
        return {}


class TrialFailed(Exception):
    """The trial epoch on processes did not give its first batch; ``puller``: its thread."""

    def __init__(self, reason: str, puller: threading.Thread) -> None:
        super().__init__(reason)
        self.puller = puller


def first_batch(batches: Iterator[Any], wait: float) -> Iterator[Any]:
    """``batches`` with its first batch taken now, within ``wait`` seconds and without error.

    Raises:
        TrialFailed: the first batch did not come in time (the thread taking it
            ends once the epoch is stopped), or raised.
    """
    got: list[tuple[str, Any]] = []

    def pull() -> None:
        try:
            got.append(("batch", next(batches)))
        except StopIteration:
            got.append(("end", None))
        except BaseException as exc:
            got.append(("error", exc))

    puller = threading.Thread(target=pull, name="iopipe-trial", daemon=True)
    puller.start()
    puller.join(wait)
    if not got:
        raise TrialFailed(f"its first batch did not come within {wait:g} s", puller)
    kind, value = got[0]
    if kind == "error":
        raise TrialFailed(f"its first batch failed ({value!r:.200})", puller) from value
    return iter(()) if kind == "end" else itertools.chain([value], batches)
