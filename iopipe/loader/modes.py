"""Which workers ``worker_type="auto"`` (the DataLoader's default) runs a dataset on.

torch's worker processes give a dataset four things that threads of one process
cannot: each worker seeds the global RNGs (torch, numpy, ``random``) with
``base_seed + worker_id``; ``get_worker_info()`` answers inside it;
``worker_init_fn`` runs in it; an iterable dataset gets one replica per worker.
And with ``num_workers=0`` torch calls ``__getitem__`` in the training thread, so
the dataset's draws from a global RNG interleave with the training loop's own.
A dataset that relies on none of this gets the same batches from threads, which
cost less.  So ``"auto"`` decides once per loader:

* ``num_workers > 0`` with an iterable dataset or a ``worker_init_fn``: torch's
  processes (both are defined per worker), except for iopipe's own ``shard=`` of
  an iterable dataset (one stream per rank, which torch has no counterpart of):
  threads;
* otherwise the first batch of the first epoch is fetched while the training
  thread waits, and watched: a draw from a global RNG (its state changed), a call
  of ``get_worker_info()``, ``torch.initial_seed()`` or ``torch.seed()`` (with
  ``num_workers > 0``), or a first batch that does not come within
  :data:`PROBE_TIMEOUT_S` (a dataset waiting for its sibling workers) means torch's
  semantics need processes (``num_workers > 0``) or the training thread itself
  (``num_workers=0``); else threads.  The watched batch is kept when threads win,
  so the decision costs nothing then.

The watch covers the first batch only: a dataset that first draws random numbers
in a later batch is not seen (docs/dataloader.md says so; pass ``worker_type``).
"""

from __future__ import annotations

import logging
import os
import random
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.utils.data

from .workers import NOTHING

__all__ = [
    "PROBE_TIMEOUT_S",
    "NeedsProcesses",
    "Primed",
    "Probe",
    "RngSnapshot",
    "announce",
    "first_job",
    "probe_here",
    "probe_in_thread",
    "static_mode",
]

logger = logging.getLogger("iopipe")

#: Longest wait for the watched first batch with ``num_workers > 0``; past it the
#: dataset is run on torch's processes (a batch that waits for other workers, as
#: with a barrier across them, would otherwise never come).
PROBE_TIMEOUT_S = 10.0


def static_mode(
    worker_type: str,
    *,
    num_workers: int,
    iterable: bool,
    init_fn: bool,
    is_async: bool,
    sharded: bool = False,
) -> tuple[str, str]:
    """Return ``(mode, reason)`` known before any batch: ``"probe"`` when undecided.

    ``mode`` is ``"thread"``, ``"process"``, ``"main"`` or ``"probe"``.
    """
    if worker_type != "auto":
        if worker_type == "process" and num_workers == 0:
            return (
                "main",
                "worker_type='process' with num_workers=0 (torch's single-process loading)",
            )
        return worker_type, f"worker_type={worker_type!r}"
    if is_async:
        return "thread", "an async def __getitem__ is awaited on the loop"
    if num_workers > 0 and iterable and sharded:
        return "thread", "shard= deals one stream per rank, read by one thread (an iopipe extra)"
    if num_workers > 0 and iterable:
        return "process", "an IterableDataset gets one replica per worker process, as with torch"
    if num_workers > 0 and init_fn:
        return "process", "worker_init_fn runs in each worker process, as with torch"
    return "probe", ""


@dataclass(frozen=True, slots=True)
class RngSnapshot:
    """The states of the process-wide RNGs a dataset may draw from.

    numpy imports ``numpy.random`` lazily; while nobody has, its global RNG
    cannot have been drawn from and is not imported here (importing it adds
    thousands of long-lived objects, which brings the first full garbage
    collection into the first epoch).  Imported after the snapshot, it counts
    as changed unless its state is still the one its import made.
    """

    torch_state: torch.Tensor
    numpy_state: Any  # None: numpy.random was not imported
    python_state: Any

    @classmethod
    def take(cls) -> RngSnapshot:
        nprandom = sys.modules.get("numpy.random")
        np_state = None if nprandom is None else nprandom.get_state()
        return cls(torch.get_rng_state(), np_state, random.getstate())

    def restore(self) -> None:
        torch.set_rng_state(self.torch_state)
        if self.numpy_state is not None:
            np.random.set_state(self.numpy_state)
        random.setstate(self.python_state)

    def changed(self) -> str | None:
        """Name the first RNG whose state differs from now, or None."""
        if not torch.equal(self.torch_state, torch.get_rng_state()):
            return "torch's global RNG"
        if self.numpy_state is None:
            if "numpy.random" in sys.modules and not _numpy_untouched():
                return "numpy's global RNG (numpy.random was first imported meanwhile)"
        else:
            now = _numpy_state()
            if not (
                self.numpy_state[2:] == now[2:] and np.array_equal(self.numpy_state[1], now[1])
            ):
                return "numpy's global RNG"
        if self.python_state != random.getstate():
            return "Python's random module"
        return None


def _numpy_untouched() -> bool:
    """Whether numpy's global RNG is as its import left it (no draw, no seed).

    Its import seeds it from the OS, so the state itself says nothing; but
    that seeding leaves the Mersenne Twister at position 623 with no cached
    Gaussian, where any draw or ``np.random.seed()`` moves it (back to 623
    only after a multiple of 624 words).  Anything else counts as touched:
    the safe side (the dataset then runs as torch runs it).
    """
    _, _, pos, has_gauss, _ = _numpy_state()
    return bool(pos == _FRESH_MT_POS and has_gauss == 0)


def _numpy_state() -> Any:
    """``np.random.get_state()``: the legacy tuple, which numpy's stubs type as a dict."""
    return np.random.get_state()


_FRESH_MT_POS = 623  # numpy >= 1.17 seeds MT19937 through SeedSequence


@dataclass(slots=True)
class Probe:
    """What fetching the watched batch gave: its outcome, and why it needs processes."""

    outcome: Any = None
    done: bool = False
    needs: str | None = None  # why torch's semantics need processes / the main thread
    error: BaseException | None = None  # a BaseException the job raised (re-raised)
    timed_out: bool = False  # the job did not return within the wait


def probe_here(fn: Callable[[], Any]) -> Probe:
    """Run ``fn()`` in the calling thread and watch the global RNGs (``num_workers=0``).

    Nothing is undone: the calling thread is where torch runs it, so the batch and
    the RNG states after it are torch's whichever way the loader goes on.
    """
    before = RngSnapshot.take()
    probe = Probe()
    try:
        probe.outcome = fn()
        probe.done = True
    finally:
        changed = before.changed()
        if changed is not None:
            probe.needs = f"__getitem__ drew from {changed}"
    return probe


_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


def _watched_codes() -> dict[Any, str]:
    return {
        torch.utils.data.get_worker_info.__code__: "get_worker_info()",
        torch.initial_seed.__code__: "torch.initial_seed()",
        torch.seed.__code__: "torch.seed()",
    }


def probe_in_thread(fn: Callable[[Any], Any], job: Any, timeout: float = PROBE_TIMEOUT_S) -> Probe:
    """Run ``fn(job)`` in a helper thread while this one waits; watch what it touches.

    A draw from a global RNG is undone afterwards (the process-wide states are set
    back), so the training thread's stream is untouched; the calls named in the
    module docstring are seen through a profile hook in the helper thread only.
    """
    before = RngSnapshot.take()
    watched = _watched_codes()
    probe = Probe()

    def hook(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and probe.needs is None:
            what = watched.get(frame.f_code)
            # torch's own callers (default_collate asks get_worker_info() whether
            # to collate into shared memory) behave alike on threads and processes.
            if what is not None and not frame.f_back.f_code.co_filename.startswith(_TORCH_DIR):
                probe.needs = f"__getitem__ calls {what}"

    def run() -> None:
        sys.setprofile(hook)
        try:
            probe.outcome = fn(job)
            probe.done = True
        except BaseException as exc:  # re-raised in the waiting thread
            probe.error = exc
        finally:
            sys.setprofile(None)

    t = threading.Thread(target=run, name="iopipe-probe", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        probe.timed_out = True
        probe.needs = f"the first batch did not come within {timeout:g} s alone"
        return probe  # the thread is abandoned (daemon); its batch is not used
    changed = before.changed()
    if changed is not None:
        before.restore()
        probe.needs = probe.needs or f"__getitem__ drew from {changed}"
    return probe


def announce(loader: Any, mode: str, reason: str) -> None:
    """Log, once per loader, which workers it runs on and why."""
    where = {
        "thread": f"{max(1, loader.num_workers)} background thread(s)",
        "process": f"torch's {loader.num_workers} worker processes",
        "main": "the iterating thread (torch's num_workers=0)",
    }[mode]
    logger.info("iopipe.DataLoader: loading on %s: %s", where, reason)


class NeedsProcesses(Exception):
    """The watched first batch needs torch's worker processes (``worker_type="auto"``)."""


def first_job(fn: Callable[[Any], Any], job: Any, jobs: Iterator[Any]) -> tuple[Any, Any]:
    """Run the epoch's first job (taking it from ``jobs`` when ``job`` is NOTHING)."""
    if job is NOTHING:
        job = next(jobs, NOTHING)
    return job, (NOTHING if job is NOTHING else fn(job))


class Primed:
    """A job function that returns a result already computed for one job.

    The batch watched by ``worker_type="auto"`` is not fetched twice: the
    pipeline's job function hands out its outcome when that job comes.
    """

    __slots__ = ("fn", "primed")

    def __init__(self, fn: Callable[[Any], Any], primed: tuple[int, Any] | None = None) -> None:
        self.fn = fn
        self.primed = primed

    def __call__(self, job: tuple[int, Any]) -> Any:
        primed = self.primed
        if primed is not None and primed[0] == job[0]:
            self.primed = None
            return primed[1]
        return self.fn(job)
