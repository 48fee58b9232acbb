"""WorkerPool: the thread pool that every stage runs its blocking jobs in.

Why not :class:`concurrent.futures.ThreadPoolExecutor`: its workers are joined
at interpreter exit (``threading._register_atexit``), so one job that never
returns (a read from a hung NFS mount, a user function blocked forever) hangs
the whole program on exit.  A :class:`WorkerPool` runs the same design (one
shared queue, threads started lazily up to ``max_workers``, an idle count so a
free worker is reused before a new one starts) on *daemon* threads named
``<name>_<n>`` (``iopipe-read_0``), and :meth:`WorkerPool.join` waits for them
with a bound.  A job marked :attr:`Job.abandoned` (the pipeline gave up on it
after a timeout or a stall warning) is not waited for at all: its thread ends
on its own when the job returns, and the interpreter exits without it.

Hot path: ``submit`` costs what ThreadPoolExecutor's does (bench numbers in the
report of issue 7, ``bench/bench_threads.py``); a worker records one start
time per job, which the stall watchdog reads (iopipe/_watchdog.py).
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import time
import weakref
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

    def run(self) -> None:
        job = self.job
        if not job.set_running_or_notify_cancel():
            return
        job.started = time.perf_counter()
        try:
            result = self.fn(*self.args)
        except BaseException as exc:
            job.set_exception(exc)
            self = None  # type: ignore[assignment]  # break the traceback's cycle
        else:
            job.set_result(result)


class _Worker:
    """What one thread knows: the shared queue and the item it runs (no pool reference)."""

    __slots__ = ("current", "idle", "thread", "work")

    def __init__(self, work: queue.SimpleQueue[_Item | None], idle: threading.Semaphore) -> None:
        self.work = work
        self.idle = idle
        self.current: _Item | None = None
        self.thread: threading.Thread | None = None

    def loop(self) -> None:
        work = self.work
        while True:
            item = work.get()
            if item is None:
                work.put(None)  # wake the next worker: all of them are shutting down
                return
            self.current = item
            item.run()
            self.current = None
            del item
            self.idle.release()


def _wake_all(work: queue.SimpleQueue[_Item | None]) -> None:
    work.put(None)


class WorkerPool(concurrent.futures.Executor):
    """A thread pool of daemon threads with a bounded, stuck-job-aware join.

    Thread-safety: :meth:`submit`, :meth:`shutdown` and :meth:`join` may be
    called from any thread.  Invariant: at most ``max_workers`` threads, started
    only when a job is queued and no started thread is idle.
    """

    def __init__(self, max_workers: int, name: str) -> None:
        if not isinstance(max_workers, int) or max_workers < 1:
            raise ValueError(f"max_workers must be an int >= 1, got {max_workers!r}")
        self.max_workers = max_workers
        self.name = name
        self._work: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._shutdown = False
        # A pool dropped without shutdown() still lets its threads go.
        self._finalizer = weakref.finalize(self, _wake_all, self._work)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Job:
        """Queue ``fn(*args, **kwargs)``; return its :class:`Job` future.

        Raises:
            RuntimeError: the pool was shut down.
        """
        if kwargs:
            args = (*args, kwargs)
            fn = _with_kwargs(fn)
        job = Job()
        with self._lock:
            if self._shutdown:
                raise RuntimeError(f"cannot submit to {self.name!r} after shutdown")
            self._work.put(_Item(job, fn, args))
            if not self._idle.acquire(timeout=0) and len(self._workers) < self.max_workers:
                self._start_worker()
        return job

    def _start_worker(self) -> None:
        w = _Worker(self._work, self._idle)
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
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                while True:
                    try:
                        item = self._work.get_nowait()
                    except queue.Empty:
                        break
                    if item is not None:
                        item.job.cancel()
            self._work.put(None)
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
