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
  (:data:`HELP_AWAY_S`, measured per batch), and running ahead was measured to
  make batches come faster (:class:`HelpJudge`), one helper thread runs the
  next jobs ahead, at most ``depth`` of them;
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

__all__ = ["HELP_AWAY_S", "HelpJudge", "HelpedRun", "run_helped"]

#: The consumer must stay away from ``next()`` this long (EWMA over batches)
#: before the helper is woken: below it, the wake-up costs more than it saves.
HELP_AWAY_S = 0.0005

_POLL_S = 0.1  # every wait wakes this often to check the other side is alive
_JOIN_S = 10.0  # longest wait, at the end of an epoch, for a job the helper runs


class HelpJudge:
    """Decides, batch by batch, whether the helper runs ahead: only where it was measured to pay.

    Help pays when the loop's time away from ``next()`` leaves the GIL and a
    core free (a GPU step, a sleep); it costs when the loop computes in Python
    or on every core (the helper then only contends, and holds batches in
    memory).  Time away tells neither apart, so the judge measures: while the
    loop is away longer than :data:`HELP_AWAY_S`, it runs ``window`` batches
    without help and ``window`` with, compares the time per batch (from one
    ``next()`` to the next), keeps help only if it was 3% faster, holds that for
    ``hold`` windows, and measures again.  Pure: fed ``step(away, now)`` at each
    ``next()``.
    """

    __slots__ = ("_away", "_n", "_off_s", "_phase", "_start", "helping", "hold", "window")

    def __init__(self, window: int = 8, hold: int = 16) -> None:
        self.window, self.hold = window, hold
        self._away = 0.0  # EWMA of the time away from next()
        self._phase = 0  # 0: measuring without help, 1: with help, 2: holding `helping`
        self._n = 0  # batches into the phase
        self._start = 0.0  # when the phase's measured part began
        self._off_s = 0.0  # seconds per batch without help, measured in phase 0
        self.helping = False  # the verdict phase 2 holds

    def step(self, away: float, now: float) -> bool:
        """The loop came back after ``away`` s at ``now``: help with the batches after this one?"""
        self._away = 0.7 * self._away + 0.3 * away
        if self._away <= HELP_AWAY_S:  # nothing to overlap: the wake-up would cost more
            self._phase = self._n = 0
            return False
        self._n += 1
        if self._phase == 2:
            if self._n >= self.hold * self.window:
                self._phase = self._n = 0  # measure again: the loop may have changed
            return self.helping if self._phase == 2 else False
        if self._n == 1:
            self._start = now  # the phase's first batch was asked for under the old setting
        elif self._n > self.window:
            per = (now - self._start) / (self._n - 1)
            if self._phase == 0:
                self._off_s, self._phase, self._n = per, 1, 0
            else:
                self.helping, self._phase, self._n = per < 0.97 * self._off_s, 2, 0
                return self.helping
        return self._phase == 1


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
        judge = HelpJudge()
        left = time.perf_counter()
        try:
            while True:
                back = time.perf_counter()
                helping = judge.step(back - left, back)
                batch = _next(st, fn, pin)
                if batch is NOTHING:
                    return
                if helping:
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
