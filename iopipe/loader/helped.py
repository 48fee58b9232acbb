"""``num_workers=0`` in the training thread, with a helper that runs ahead while the loop computes.

torch runs a ``num_workers=0`` loader in the training thread: nothing loads
while the loop computes, but nothing crosses threads either.  A background
thread gives the overlap and costs a wake-up per batch (hundreds of
microseconds of CPU on the benchmark machine) plus contention for the GIL
whenever both threads run Python: measured, a loop that only iterates took
batches of cheap items 2x slower from a background thread than inline
(docs/performance.md).  :func:`run_helped` takes the better of the two:

* the consumer runs the next job itself whenever ``next()`` finds it neither
  done nor running (a plain loop: every batch, no thread crossing at all);
* while the consumer is away from ``next()`` for longer than a wake-up costs
  (:data:`HELP_AWAY_S`, measured per batch), one helper thread runs the next
  jobs ahead, at most ``depth`` of them;
* ``next()`` takes a batch the helper finished without waiting, and waits only
  for the job the helper is running at that moment.

Invariants: jobs are taken from ``jobs`` in order under one lock, one job at
a time runs (the consumer's or the helper's: ``num_workers=0`` stays one degree
of parallelism), batches come out in job order, and at most ``depth`` finished
batches wait.  A job that raises (``fn`` turns ordinary exceptions into
:class:`~iopipe.loader.workers.Failed` batches) is re-raised by ``next()`` when
its turn comes.  The helper exits when the epoch's iterator is closed or
dropped (its ``finally`` stops the helper), and every wait polls, so no wait
outlives the helper.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from .workers import NOTHING, Failed

__all__ = ["HELP_AWAY_S", "HelpedRun", "run_helped"]

#: The consumer must stay away from ``next()`` this long (EWMA over batches)
#: before the helper is woken: below it, the wake-up costs more than it saves.
HELP_AWAY_S = 0.0005

_POLL_S = 0.1  # every wait wakes this often to check the other side is alive
_JOIN_S = 10.0  # longest wait, at the end of an epoch, for a job the helper runs


class _Ahead:
    """The state the consumer and the helper share (guarded by ``cond``)."""

    __slots__ = ("away", "cond", "depth", "done", "error", "helper", "jobs", "ready", "running")

    def __init__(self, jobs: Iterator[Any], depth: int) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.jobs = jobs
        self.depth = depth
        self.ready: dict[int, Any] = {}  # job number -> batch the helper finished
        self.running = -1  # the job number the helper runs now (-1: none)
        self.away = False  # the consumer is away from next() and asked for help
        self.done = False  # the jobs are exhausted or the epoch stopped
        self.error: tuple[int, BaseException] | None = None  # a job that raised
        self.helper: threading.Thread | None = None

    def take(self) -> Any:
        """The next job (under ``cond``); NOTHING once exhausted."""
        if self.done:
            return NOTHING
        job = next(self.jobs, NOTHING)
        if job is NOTHING:
            self.done = True
        return job


def _help(st: _Ahead, fn: Callable[[Any], Any], pin: bool) -> None:
    """The helper thread: while the consumer is away, run the next jobs ahead."""
    while True:
        with st.cond:
            while not st.done and not (st.away and len(st.ready) < st.depth):
                st.cond.wait(_POLL_S)
            job = st.take()
            if job is NOTHING:
                st.cond.notify_all()
                return
            st.running = job[0]
        try:
            batch = _one(fn, job, pin)
        except BaseException as exc:  # re-raised by next() at the job's turn
            with st.cond:
                st.error, st.running, st.done = (job[0], exc), -1, True
                st.cond.notify_all()
            return
        with st.cond:
            st.ready[job[0]] = batch
            st.running = -1
            st.cond.notify_all()


def _one(fn: Callable[[Any], Any], job: Any, pin: bool) -> Any:
    batch = fn(job)
    if pin and not isinstance(batch, Failed):
        from torch.utils.data._utils.pin_memory import pin_memory

        batch = pin_memory(batch)  # type: ignore[no-untyped-call]
    return batch


class HelpedRun:
    """One epoch of :func:`run_helped`: iterate it in the consumer thread; :meth:`stop` from any."""

    def __init__(
        self, fn: Callable[[Any], Any], jobs: Iterator[tuple[int, Any]], pin: bool, depth: int
    ) -> None:
        self._st = _Ahead(jobs, max(1, depth))
        self._fn, self._pin = fn, pin

    def __iter__(self) -> Iterator[Any]:
        st, fn, pin = self._st, self._fn, self._pin
        away_avg = 0.0
        left = time.perf_counter()
        try:
            while True:
                back = time.perf_counter()
                away_avg = 0.7 * away_avg + 0.3 * (back - left)
                batch = _next(st, fn, pin)
                if batch is NOTHING:
                    return
                if away_avg > HELP_AWAY_S:
                    _ask_for_help(st, fn, pin)
                left = time.perf_counter()
                yield batch
        finally:
            self.stop()

    def stop(self) -> None:
        """End the epoch: the helper takes no further job and is joined (bounded)."""
        st = self._st
        with st.cond:
            st.done = True
            st.ready.clear()
            st.cond.notify_all()
            helper = st.helper
        if helper is not None and helper is not threading.current_thread():
            helper.join(_JOIN_S)


def run_helped(
    fn: Callable[[Any], Any], jobs: Iterator[tuple[int, Any]], pin: bool, depth: int = 2
) -> HelpedRun:
    """Run ``fn(job)`` for each numbered ``job``, in order (see the module docstring)."""
    return HelpedRun(fn, jobs, pin, depth)


def _next(st: _Ahead, fn: Callable[[Any], Any], pin: bool) -> Any:
    """The next batch in order: the helper's, or one this thread loads now."""
    with st.cond:
        st.away = False
        while True:
            if st.ready:
                n = min(st.ready)
                if st.error is None or n < st.error[0]:
                    return st.ready.pop(n)
            if st.running < 0:
                break
            st.cond.wait(_POLL_S)  # the helper runs the next job: it is nearly done
            helper = st.helper
            if st.running >= 0 and helper is not None and not helper.is_alive():
                raise RuntimeError("iopipe.DataLoader: the helper thread died mid-batch")
        if st.error is not None:
            _, exc = st.error
            st.error = None
            raise exc
        job = st.take()
    if job is NOTHING:
        return NOTHING
    return _one(fn, job, pin)


def _ask_for_help(st: _Ahead, fn: Callable[[Any], Any], pin: bool) -> None:
    with st.cond:
        if st.done:
            return
        st.away = True
        if st.helper is None:
            st.helper = threading.Thread(
                target=_help, args=(st, fn, pin), name="iopipe-helper", daemon=True
            )
            st.helper.start()
        else:
            st.cond.notify_all()
