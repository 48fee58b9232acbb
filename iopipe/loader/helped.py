"""A DataLoader's loads in the training thread, with helpers that run ahead only where it pays.

torch runs a ``num_workers=0`` loader in the training thread: nothing loads
while the loop computes, but nothing crosses threads either.  Background
threads give the overlap and cost a wake-up per batch (hundreds of
microseconds of CPU on the benchmark machine) plus contention for the GIL
whenever two threads run Python: measured, a loop that only iterates took
batches of cheap items 2x slower from a background thread than inline, and
0.8x torch's two worker processes from two threads (docs/performance.md).
:func:`run_helped` takes the best of each:

* the consumer runs the next job itself whenever ``next()`` finds it neither
  done nor loading (a plain loop over cheap items: every batch, no thread
  crossing at all);
* up to ``helpers`` threads run the next jobs ahead, at most ``depth`` batches,
  as many as :class:`HelpJudge` measured to make batches come faster: all of
  them for reads that wait on storage or for a loop that computes, none for
  GIL-bound Python the loop waits for anyway.  With ``num_workers=0`` there is
  one helper, it runs only while the consumer is away from ``next()`` for
  longer than a wake-up costs (:data:`~iopipe.loader.judge.HELP_AWAY_S`), and never while the
  consumer loads (one degree of parallelism, as torch's);
* ``next()`` takes a batch a helper finished without waiting, and waits only
  for the one a helper is loading at that moment.

Invariants: jobs are taken from ``jobs`` in order under one lock; at most
``max(1, helpers)`` loads run at once; batches come out in job order; at most
``depth`` finished or loading batches are ahead of the consumer.  A job that
raises (``fn`` turns ordinary exceptions into
:class:`~iopipe.loader.workers.Failed` batches) is re-raised by ``next()`` when
its turn comes.  The helpers exit when the epoch's iterator is closed or
dropped (its ``finally`` stops them), and every wait polls, so no wait
outlives a helper.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from types import MappingProxyType
from typing import Any

from ..runtime.stats import PipelineStats, StageStats
from .judge import HelpJudge
from .workers import NOTHING, Failed

__all__ = ["HelpedRun", "run_helped"]

_POLL_S = 0.1  # every wait wakes this often to check the other side is alive
_JOIN_S = 10.0  # longest wait, at the end of an epoch, for a job the helper runs


class _Ahead:
    """The state the consumer and the helpers share (guarded by ``cond``)."""

    __slots__ = (
        "allowed",
        "away",
        "away_only",
        "busy",
        "busy_s",
        "by_consumer",
        "cond",
        "cpu_s",
        "delivered",
        "depth",
        "done",
        "error",
        "helpers",
        "idle",
        "jobs",
        "last_n",
        "loaded",
        "parallel",
        "ready",
        "running",
        "stopped",
        "taken",
        "wait_s",
        "waiting",
    )

    def __init__(self, jobs: Iterator[Any], depth: int, parallel: int, away_only: bool) -> None:
        # Re-entrant: a garbage collection in a thread holding it may finalize the
        # epoch's generator, whose stop() takes it again.
        lock = threading.RLock()
        self.cond = threading.Condition(lock)  # the consumer waits on it
        self.idle = threading.Condition(lock)  # idle helpers wait on it
        self.waiting: set[int] = set()  # the helpers waiting on `idle`
        self.jobs = jobs
        self.depth = depth  # batches done or loading ahead of the consumer, at most
        self.parallel = parallel  # loads at once, at most (the consumer's included)
        self.away_only = away_only  # helpers run only while the consumer is away
        self.ready: dict[int, Any] = {}  # job number -> batch a helper finished
        self.running: set[int] = set()  # the job numbers helpers run now
        self.busy = False  # the consumer runs a job itself
        self.allowed = 0  # helpers the judge lets run now
        self.away = False  # the consumer is away from next()
        self.done = False  # the jobs are exhausted or the epoch stopped
        self.stopped = False  # the epoch was stopped: nothing more is delivered or kept
        self.last_n = -1  # the number of the last job taken
        self.error: tuple[int, BaseException] | None = None  # a job that raised
        self.helpers: list[threading.Thread] = []
        # statistics (under ``cond``)
        self.taken = self.loaded = self.by_consumer = self.delivered = 0
        self.busy_s = self.wait_s = self.cpu_s = 0.0  # loads' wall and thread CPU; waits

    def take(self) -> Any:
        """The next job (under ``cond``); NOTHING once exhausted."""
        if self.done:
            return NOTHING
        try:
            job = next(self.jobs, NOTHING)
        except BaseException:
            self.done = True  # the sampler's error ends the epoch, raised in its turn
            raise
        if job is NOTHING:
            self.done = True
        else:
            self.taken += 1
            self.last_n = job[0]
        return job

    def wake(self) -> None:
        """Wake the idle helpers if one of them may start now (under ``cond``).

        Not on every change: a wake-up costs hundreds of microseconds of CPU here.
        """
        if any(self.may_start(i) for i in self.waiting):
            self.idle.notify_all()

    def end(self) -> None:
        """Wake everyone: the run ended (under ``cond``)."""
        self.done = True
        self.cond.notify_all()
        self.idle.notify_all()

    def may_start(self, index: int) -> bool:
        """Whether helper ``index`` may take a job now (under ``cond``)."""
        loading = len(self.running) + self.busy
        return (
            index < self.allowed
            and (self.away or not self.away_only)
            and len(self.ready) + loading < self.depth
            and loading < self.parallel
        )


def _help(st: _Ahead, index: int, fn: Callable[[Any], Any], pin: bool, device: int) -> None:
    """Helper thread ``index``: run the next jobs ahead while the judge allows it.

    ``device``: the CUDA device the consumer was on (-1: none), which the helper's
    pinned batches are for, as torch's pin-memory thread sets it.
    """
    if device >= 0:
        import torch

        torch.cuda.set_device(device)
    while True:
        with st.cond:
            while not st.done and not st.may_start(index):
                st.waiting.add(index)
                st.idle.wait(_POLL_S)
                st.waiting.discard(index)
            try:
                job = st.take()
            except BaseException as exc:  # the sampler's: raised after the jobs before it
                _failed(st, st.last_n + 1, exc)
                return
            if job is NOTHING:
                st.end()
                return
            st.running.add(job[0])
        t0 = time.perf_counter()
        try:
            batch, cpu = _one(fn, job, pin)
        except BaseException as exc:  # re-raised by next() at the job's turn
            with st.cond:
                st.running.discard(job[0])
                _failed(st, job[0], exc)
            return
        with st.cond:
            st.running.discard(job[0])
            if st.stopped:
                return  # nobody takes it: do not keep it
            st.ready[job[0]] = batch
            st.busy_s += time.perf_counter() - t0
            st.cpu_s += cpu
            st.loaded += 1
            st.cond.notify()  # the consumer, if it waits for this batch


def _failed(st: _Ahead, n: int, exc: BaseException) -> None:
    """Job ``n`` raised ``exc`` in a helper: the earliest such error is raised in its turn."""
    if not st.stopped and (st.error is None or n < st.error[0]):
        st.error = (n, exc)
    st.end()


def _cuda_device() -> int:
    """The calling thread's CUDA device, or -1 without CUDA."""
    import torch

    return torch.cuda.current_device() if torch.cuda.is_available() else -1


def _one(fn: Callable[[Any], Any], job: Any, pin: bool) -> tuple[Any, float]:
    """Run ``job``; return its batch and the thread CPU seconds it took."""
    cpu0 = time.thread_time()
    batch = fn(job)
    if pin and not isinstance(batch, Failed):
        from torch.utils.data._utils.pin_memory import pin_memory

        batch = pin_memory(batch)  # type: ignore[no-untyped-call]
    return batch, time.thread_time() - cpu0


class HelpedRun:
    """One epoch of :func:`run_helped`: iterate it in the consumer thread; :meth:`stop` from any."""

    def __init__(
        self,
        fn: Callable[[Any], Any],
        jobs: Iterator[tuple[int, Any]],
        pin: bool,
        *,
        depth: int,
        helpers: int,
        judge: HelpJudge,
    ) -> None:
        away_only = judge.gate_away
        parallel = 1 if away_only else max(1, helpers)
        self._st = _Ahead(jobs, max(1, depth), parallel, away_only)
        self._fn, self._pin, self._helpers, self._judge = fn, pin, helpers, judge
        self._device = _cuda_device() if pin else -1
        self._t0 = time.perf_counter()
        self._t_end: float | None = None  # when the epoch ended (stats stop counting)

    def __iter__(self) -> Iterator[Any]:
        st, fn, pin, judge = self._st, self._fn, self._pin, self._judge
        judge.new_run()
        left = time.perf_counter()
        try:
            while True:
                back = time.perf_counter()
                allowed = judge.step(back - left, back)
                batch = _next(st, fn, pin)
                if batch is NOTHING:
                    self._ended()
                    return
                self._allow(allowed)
                left = time.perf_counter()
                yield batch
        finally:
            self.stop()

    def _allow(self, allowed: int) -> None:
        """Let ``allowed`` helpers run until the consumer is back (starting threads as needed)."""
        st = self._st
        with st.cond:
            if st.done:
                return
            st.allowed, st.away = min(allowed, self._helpers), True
            while len(st.helpers) < st.allowed:
                t = threading.Thread(
                    target=_help,
                    args=(st, len(st.helpers), self._fn, self._pin, self._device),
                    name=f"iopipe-helper_{len(st.helpers)}",
                    daemon=True,
                )
                t.start()
                st.helpers.append(t)
            st.wake()

    def stats(self, epoch: int) -> PipelineStats:
        """The epoch's figures as a pipeline's: a ``source`` row (jobs taken) and a ``fetch`` row.

        ``fetch``: ``items`` batches loaded, ``busy_s`` their load time (the
        consumer's and the helpers'); ``extra`` says how many the consumer loaded
        itself and how many helpers the judge lets run now.
        """
        st = self._st
        with st.cond:
            elapsed = (self._t_end or time.perf_counter()) - self._t0
            src = StageStats("source", 1, st.taken, 0, 0.0, 0.0, 0.0, 0, 0.0, 0, elapsed)
            extra = {"by_consumer": float(st.by_consumer), "helpers": float(st.allowed)}
            fetch = StageStats(
                "fetch",
                max(1, self._helpers),
                st.loaded,
                0,
                st.busy_s,
                0.0,
                0.0,
                st.depth,
                0.0,
                len(st.ready),
                elapsed,
                extra=MappingProxyType(extra),
            )
            return PipelineStats((src, fetch), elapsed, st.delivered, st.wait_s, epoch)

    def loads(self) -> tuple[int, float, float]:
        """Batches loaded so far, their wall time and their threads' CPU time (seconds)."""
        st = self._st
        with st.cond:
            return st.loaded, st.busy_s, st.cpu_s

    def _ended(self) -> None:
        if self._t_end is None:
            self._t_end = time.perf_counter()

    def stop(self) -> None:
        """End the epoch: the helpers take no further job and are joined (bounded).

        What the run holds is let go (finished batches, the jobs, an error and its
        traceback); :meth:`stats` still describes the epoch.
        """
        st = self._st
        self._ended()
        with st.cond:
            st.stopped = True
            st.ready.clear()
            st.error = None
            st.jobs = iter(())
            st.end()
            helpers = list(st.helpers)
        deadline = time.monotonic() + _JOIN_S
        for t in helpers:
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))


def run_helped(
    fn: Callable[[Any], Any],
    jobs: Iterator[tuple[int, Any]],
    pin: bool,
    *,
    depth: int = 2,
    helpers: int = 1,
    judge: HelpJudge | None = None,
) -> HelpedRun:
    """Run ``fn(job)`` for each numbered ``job``, in order (see the module docstring).

    ``helpers``: threads that may run ahead (``num_workers``; 1 for ``num_workers=0``,
    which runs one load at a time and helps only while the loop is away); ``judge``
    decides how many do (kept by the caller across epochs; a fresh one by default).
    """
    if judge is None:
        judge = HelpJudge(helpers)
    return HelpedRun(fn, jobs, pin, depth=depth, helpers=helpers, judge=judge)


def _deliverable(head: int, loading: int | None, error: tuple[int, Any] | None) -> bool:
    """Whether the finished batch ``head`` is the next in order, before any failed job."""
    return (loading is None or head < loading) and (error is None or head < error[0])


def _next(st: _Ahead, fn: Callable[[Any], Any], pin: bool) -> Any:
    """The next batch in order: a helper's, or one this thread loads now."""
    with st.cond:
        st.away = False
        t0 = time.perf_counter()
        while True:
            if st.stopped:  # stopped from another thread (close()): the epoch is over
                return NOTHING
            head = min(st.ready) if st.ready else None
            loading = min(st.running) if st.running else None
            if head is not None and _deliverable(head, loading, st.error):
                batch = st.ready.pop(head)
                st.wait_s += time.perf_counter() - t0
                st.delivered += 1
                st.wake()  # room ahead for the helpers
                return batch
            if loading is None or (st.error is not None and st.error[0] < loading):
                break
            st.cond.wait(_POLL_S)  # a helper loads the next batch: it is nearly done
            if not any(t.is_alive() for t in st.helpers) and st.running:
                raise RuntimeError("iopipe.DataLoader: the helper threads died mid-batch")
        if st.error is not None:
            _, exc = st.error
            st.error = None
            raise exc
        st.wait_s += time.perf_counter() - t0
        job = st.take()
        if job is NOTHING:
            return NOTHING
        st.busy = True
    t0 = time.perf_counter()
    cpu = 0.0
    ok = False
    try:
        batch, cpu = _one(fn, job, pin)
        ok = True
        return batch
    finally:
        with st.cond:
            st.busy = False
            st.busy_s += time.perf_counter() - t0
            st.cpu_s += cpu
            if ok:
                st.loaded += 1
                st.by_consumer += 1
                st.delivered += 1
            st.wake()
