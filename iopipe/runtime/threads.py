"""WorkerPool: the thread pool that every stage runs its blocking jobs in.

Why not :class:`concurrent.futures.ThreadPoolExecutor`: its workers are joined
at interpreter exit (``threading._register_atexit``), so one job that never
returns (a read from a hung NFS mount, a user function blocked forever) hangs
the whole program on exit.  A :class:`WorkerPool` runs a similar design (threads
started lazily up to ``max_workers``, an idle worker reused before a new one
starts, a queue beyond that) on *daemon* threads named
``<name>_<n>`` (``iopipe-read_0``), and :meth:`WorkerPool.join` waits for them
with a bound.  A job marked :attr:`Job.abandoned` (the pipeline gave up on it
after a timeout or a stall warning) is not waited for at all: its thread ends
on its own when the job returns, and the interpreter exits without it.

Unlike ThreadPoolExecutor, an idle worker is woken last-in first-out and goes
idle before its job's result wakes the submitter: a pipeline that runs one job
at a time keeps it on one thread, with warm caches and one malloc arena (taking
turns, as ThreadPoolExecutor's workers do, cost a fused small-file pipeline 12%
more CPU per sample and 12% of its rate: ``bench/bench_threads.py``).  A worker records one start time per
job, which the stall watchdog reads (iopipe/runtime/watchdog.py).
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["Job", "WorkerPool", "interpreter_exiting"]

#: Set as the interpreter starts to exit, before any ``atexit`` handler (so before the
#: pipelines' finalizers): from then on nobody waits for a job still running.
_EXITING = threading.Event()
try:
    threading._register_atexit(_EXITING.set)  # type: ignore[attr-defined]
except AttributeError:  # pragma: no cover - a Python without the hook
    import atexit

    atexit.register(_EXITING.set)


def interpreter_exiting() -> bool:
    """Whether the interpreter has begun to exit (then stuck jobs are not waited for)."""
    return _EXITING.is_set()


class Job(concurrent.futures.Future[Any]):
    """The future of one job; knows when a worker started it.

    Attributes:
        started: ``time.perf_counter()`` when a worker began running it (0.0: queued).
        abandoned: Set by the pipeline when it stopped waiting for this job;
            :meth:`WorkerPool.join` then does not wait for its thread.
    """

    def __init__(self) -> None:
        super().__init__()
        self.started = 0.0
        self.abandoned = False


class _Item:
    __slots__ = ("args", "fn", "job")

    def __init__(self, job: Job, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.job = job
        self.fn = fn
        self.args = args


class _Shared:
    """What the pool and its threads share (the threads hold no pool reference)."""

    __slots__ = ("idle", "lock", "pending", "shutdown")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pending: deque[_Item] = deque()  # jobs no worker has taken yet
        self.idle: list[_Worker] = []  # a stack: the last worker to go idle is woken first
        self.shutdown = False


#: What :meth:`_Worker.next_job` returns when the worker is to exit.
_STOP: Any = object()


class _Worker:
    """One thread: takes the oldest queued job, runs it, and waits idle when none is left."""

    __slots__ = ("current", "shared", "thread", "wake")

    def __init__(self, shared: _Shared) -> None:
        self.shared = shared
        self.wake = threading.Lock()  # released (by submit or shutdown) to wake this worker
        self.wake.acquire()
        self.current: _Item | None = None
        self.thread: threading.Thread | None = None

    def loop(self) -> None:
        item = self.next_job()
        while item is not _STOP:
            if item is None:
                self.wake.acquire()  # until a job is queued, or shutdown
                item = self.next_job()
                continue
            job = item.job
            result: Any = None
            error: BaseException | None = None
            ran = job.set_running_or_notify_cancel()
            if ran:
                self.current = item
                job.started = time.perf_counter()
                try:
                    result = item.fn(*item.args)
                except BaseException as exc:
                    error = exc
                self.current = None
            # Take the next job or go idle *before* the result wakes the submitter:
            # its next submit then finds this thread instead of starting another.
            item = self.next_job()
            if ran:
                if error is None:
                    job.set_result(result)
                else:
                    job.set_exception(error)
            del job, result, error  # neither the worker nor a traceback keeps them alive

    def next_job(self) -> Any:
        """The oldest queued job; else None, this worker now idle; ``_STOP`` at shutdown."""
        sh = self.shared
        with sh.lock:
            if sh.pending:
                return sh.pending.popleft()
            if sh.shutdown:
                return _STOP
            sh.idle.append(self)
            return None


def _wake_all(shared: _Shared) -> None:
    """Shut down: every idle worker wakes with nothing to do and exits."""
    with shared.lock:
        shared.shutdown = True
        idle, shared.idle = shared.idle, []
    for w in idle:
        w.wake.release()


class WorkerPool(concurrent.futures.Executor):
    """A thread pool of daemon threads with a bounded, stuck-job-aware join.

    Jobs wait in one queue and start in the order submitted.  A submit wakes the
    worker that went idle last (its CPU caches and malloc arena are warm: a
    pipeline running one job at a time keeps to one thread instead of taking
    turns), else starts a thread while there are fewer than ``max_workers``; a
    worker that finishes a job takes the oldest queued one before going idle.

    Thread-safety: :meth:`submit`, :meth:`shutdown` and :meth:`join` may be
    called from any thread.  Invariant: at most ``max_workers`` threads, started
    only when a job is submitted and no started thread is idle.
    """

    def __init__(self, max_workers: int, name: str) -> None:
        if not isinstance(max_workers, int) or max_workers < 1:
            raise ValueError(f"max_workers must be an int >= 1, got {max_workers!r}")
        self.max_workers = max_workers
        self.name = name
        self._shared = _Shared()
        self._workers: list[_Worker] = []
        # A pool dropped without shutdown() still lets its threads go.
        self._finalizer = weakref.finalize(self, _wake_all, self._shared)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Job:
        """Queue ``fn(*args, **kwargs)``; return its :class:`Job` future.

        Raises:
            RuntimeError: the pool was shut down.
        """
        if kwargs:
            args = (*args, kwargs)
            fn = _with_kwargs(fn)
        job = Job()
        item = _Item(job, fn, args)
        sh = self._shared
        with sh.lock:
            if sh.shutdown:
                raise RuntimeError(f"cannot submit to {self.name!r} after shutdown")
            sh.pending.append(item)
            if sh.idle:
                sh.idle.pop().wake.release()  # the last to go idle: its caches are warm
            elif len(self._workers) < self.max_workers:
                self._start_worker()
        return job

    def _start_worker(self) -> None:
        w = _Worker(self._shared)
        t = threading.Thread(target=w.loop, name=f"{self.name}_{len(self._workers)}", daemon=True)
        w.thread = t
        t.start()
        self._workers.append(w)

    @property
    def threads(self) -> list[threading.Thread]:
        """The threads started so far."""
        return [w.thread for w in self._workers if w.thread is not None]

    def running(self) -> list[Job]:
        """The jobs workers are running now (any thread; a snapshot)."""
        out = []
        for w in list(self._workers):
            item = w.current
            if item is not None:
                out.append(item.job)
        return out

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Refuse new jobs; cancel queued ones if asked; let every worker exit.

        With ``wait`` it joins the workers without a bound, like the standard
        executors; the stages call :meth:`join` with one instead.
        """
        sh = self._shared
        if cancel_futures:
            with sh.lock:
                queued, sh.pending = list(sh.pending), deque()
            for item in queued:
                item.job.cancel()
        _wake_all(sh)
        if wait:
            for t in self.threads:
                t.join()

    def join(self, timeout: float) -> list[threading.Thread]:
        """Wait at most ``timeout`` s for the workers to exit; return those still alive.

        Workers running an abandoned job, or any job once the interpreter exits,
        are not waited for (they exit once the job returns; as daemon threads they
        never hold up the exit).  Call :meth:`shutdown` first.
        """
        deadline = time.monotonic() + timeout
        me = threading.current_thread()
        for w in list(self._workers):
            t = w.thread
            if t is None or t is me:
                continue
            while t.is_alive():
                item = w.current
                job = item.job if item is not None else None
                if job is not None and not job.done() and (job.abandoned or _EXITING.is_set()):
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                # Short slices: a job may be abandoned while we wait for it.
                t.join(min(left, 0.05))
        return [t for t in self.threads if t.is_alive()]


def _with_kwargs(fn: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any) -> Any:
        *pos, kw = args
        return fn(*pos, **kw)

    return call
