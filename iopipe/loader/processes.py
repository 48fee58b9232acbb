"""torch's worker processes, run for a DataLoader with ``worker_type="process"``.

:class:`TorchWorkers` is torch's multi-process iterator with a stop flag,
:class:`TorchDriver` iterates it from the pipeline's source thread, and
:class:`WorkerProcesses` keeps them across epochs; :func:`inner_loader` is the
torch DataLoader they run.  A batch whose dataset call failed in a worker
arrives as a :class:`~iopipe.loader.workers.Failed` batch.
"""

from __future__ import annotations

import multiprocessing.connection
import os
import signal
import threading
import warnings
from collections.abc import Iterator
from typing import Any

# A module import, not `from ... import signal_handling`: the one torch function
# used here (dropping the workers from its SIGCHLD handler) has no public name.
import torch.utils.data._utils.signal_handling as signal_handling
from torch._utils import ExceptionWrapper
from torch.utils.data import IterableDataset
from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

from ..stages.source import shard_iter
from .state import EpochPlan, draw_base_seed
from .workers import Failed, index_label

__all__ = [
    "RankShard",
    "TorchDriver",
    "TorchWorkers",
    "WorkerProcesses",
    "inner_loader",
]

#: How often a wait on worker processes wakes to check for a stop request and
#: for dead workers (torch's own interval, 5 s, is too slow to notice a crash).
POLL_S = 0.1
#: Longest the driver waits for a worker to be seen dead after torch's iterator failed.
CRASH_WAIT_S = 1.0
#: Longest ``TorchDriver.stop`` waits for the source thread to leave torch's iterator.
STOP_TIMEOUT_S = 10.0


class RankShard(IterableDataset[Any]):
    """An iterable dataset dealt round-robin to ``world_size`` ranks (worker processes).

    Each worker process shards its own replica's stream, so a dataset that
    splits itself across workers with ``get_worker_info()`` stays disjoint.
    """

    def __init__(self, dataset: Any, rank: int, world_size: int, mode: str) -> None:
        self.dataset = dataset
        self.rank = rank
        self.world_size = world_size
        self.mode = mode

    def __iter__(self) -> Iterator[Any]:
        return shard_iter(iter(self.dataset), self.rank, self.world_size, self.mode)


class _Stopped(Exception):
    """Raised inside torch's iterator when the driver was asked to stop."""


class TorchWorkers(_MultiProcessingDataLoaderIter):
    """torch's multi-process DataLoader iterator, stoppable from another thread.

    Only the waiting differs from torch: it wakes every ``POLL_S`` to honour
    ``stop`` and to check that the workers are alive (torch checks every 5 s,
    relying on a SIGCHLD handler it can install only from the main thread).
    Timeouts are the pipeline's (the inner loader is built with ``timeout=0``).
    """

    stop: threading.Event

    def __init__(self, loader: Any, stop: threading.Event) -> None:
        self.stop = stop
        super().__init__(loader)
        # torch registers the workers with its SIGCHLD handler, which then raises
        # RuntimeError asynchronously in the main thread, wherever it is (inside a
        # close(), inside a test runner: both were hit).  The poll in _get_data
        # finds a dead worker within POLL_S and the error reaches next() in order.
        if self._worker_pids_set:
            signal_handling._remove_worker_pids(id(self))  # type: ignore[attr-defined]
            self._worker_pids_set = False

    def _get_data(self) -> Any:
        while True:
            if self.stop.is_set():
                raise _Stopped
            if self._pin_memory and not self._pin_memory_thread.is_alive():
                raise RuntimeError("Pin memory thread exited unexpectedly")
            ok, data = self._try_get_data(POLL_S)  # type: ignore[no-untyped-call]
            if ok:
                return data

    def _process_data(self, data: Any, worker_idx: int) -> Any:
        try:
            return super()._process_data(data, worker_idx)  # type: ignore[no-untyped-call]
        except Exception as exc:
            if isinstance(data, ExceptionWrapper):  # the dataset failed, not the workers
                return Failed(exc)
            raise

    def crashed(self, wait_s: float) -> dict[int, int]:
        """Return ``{pid: exit code}`` of workers that died; wait up to ``wait_s`` for one."""
        procs = list(self._workers)
        if not any(p.exitcode for p in procs):
            live = [p for p in procs if p.exitcode is None]
            ready = multiprocessing.connection.wait([p.sentinel for p in live], timeout=wait_s)
            for p in live:
                if p.sentinel in ready:
                    # The sentinel is readable as soon as the process closes its
                    # files, a moment before waitpid(WNOHANG) reports it: reap it.
                    p.join(wait_s)
        return {p.pid: p.exitcode for p in procs if p.exitcode and p.pid is not None}

    def exited(self) -> bool:
        """Whether any worker process has exited (a persistent set must then start anew)."""
        return any(p.exitcode is not None for p in self._workers)

    def reset(self, loader: Any) -> None:
        """Reset persistent workers for the next epoch of ``loader``, as torch does."""
        self._reset(loader)

    def shutdown(self) -> None:
        """Stop and join the worker processes (idempotent)."""
        self._shutdown_workers()

    def kill(self) -> None:
        """Terminate the worker processes first (they may hang), then shut down."""
        for w in self._workers:
            if w.is_alive():
                w.terminate()
        self._shutdown_workers()


class TorchDriver:
    """One epoch of :class:`TorchWorkers`, iterated by the pipeline's source thread.

    Invariant: the source thread is inside torch's iterator only while holding
    ``_lock``, so :meth:`stop` returning means nobody touches the iterator.
    """

    def __init__(self, workers: TorchWorkers, plan: EpochPlan, drop: int = 0) -> None:
        self.workers = workers
        self.plan = plan
        self.stop_event = workers.stop
        self._drop = drop  # iterable datasets: batches consumed before a resume
        self._n = plan.skip - drop
        self._lock = threading.Lock()

    def __iter__(self) -> TorchDriver:
        return self

    def __next__(self) -> Any:
        with self._lock:
            while True:
                if self.stop_event.is_set():
                    raise StopIteration
                batch = self._next()
                if self._drop:
                    self._drop -= 1
                    continue
                return batch

    def _next(self) -> Any:
        sent = self.plan.sent
        try:
            batch = next(self.workers)
        except _Stopped:
            raise StopIteration from None
        except StopIteration:
            raise
        except Exception as exc:
            # torch's iterator itself failed.  A worker that dies just after
            # sending a batch surfaces as ConnectionResetError or EOFError (its
            # shared-memory handles are gone) before it looks dead: wait for it.
            dead = self.workers.crashed(wait_s=CRASH_WAIT_S)
            if not dead:
                raise
            err = RuntimeError(_death_message(dead))
            err.add_note(f"iopipe.DataLoader: worker exit codes (pid: code): {dead}")
            raise err from exc
        index = sent.popleft() if sent else None
        if isinstance(batch, Failed):
            where = "" if index is None else f" (indices {index_label(index)})"
            batch.exc.add_note(
                f"iopipe.DataLoader: batch {self._n}{where} failed in a worker process"
            )
        self._n += 1
        return batch

    def stop(self) -> None:
        """Make the source thread leave torch's iterator; wait (bounded) until it has."""
        self.stop_event.set()
        if self._lock.acquire(timeout=STOP_TIMEOUT_S):
            self._lock.release()


def _death_message(dead: dict[int, int]) -> str:
    """torch's words for a dead worker: the first killed by a signal, else all that exited."""
    signalled = [(pid, code) for pid, code in dead.items() if code < 0]
    if signalled:
        pid, code = signalled[0]
        try:
            name = signal.Signals(-code).name
            what = signal.strsignal(-code) or name
        except ValueError:
            what = f"signal {-code}"
        return f"DataLoader worker (pid {pid}) is killed by signal: {what}. "
    pids = ", ".join(str(p) for p in dead)
    return f"DataLoader worker (pid(s) {pids}) exited unexpectedly"


class WorkerProcesses:
    """torch's worker processes of one DataLoader, across its epochs.

    Without persistent workers every epoch starts new processes (torch then draws
    a base seed) and the previous ones are shut down; with them, the processes
    are reset between epochs, as torch's persistent iterator is.
    """

    def __init__(self, persistent: bool) -> None:
        self.persistent = persistent
        self.workers: TorchWorkers | None = None
        self.driver: TorchDriver | None = None
        self._pid = os.getpid()  # a forked child inherits these objects, not the processes

    @property
    def will_start(self) -> bool:
        """Whether the next epoch starts new processes (none yet, not persistent, or one died)."""
        self._forget_inherited()
        w = self.workers
        return w is None or not self.persistent or w.exited()

    def _forget_inherited(self) -> None:
        """In a child made by ``os.fork()``, drop the parent's workers without touching them.

        Shutting them down from here would set the parent's done event and join
        processes that are not this process's children; the driver's lock may be
        held by a thread that exists only in the parent.
        """
        if self._pid != os.getpid():
            self.workers, self.driver, self._pid = None, None, os.getpid()

    def start_epoch(
        self, inner: Any, plan: EpochPlan, *, drop: int, hand_draw: bool
    ) -> TorchDriver:
        """Start (or reset) the workers for ``plan``; return the epoch's driver.

        Args:
            inner: The torch DataLoader from :func:`inner_loader`.
            plan: The epoch (its index stream is ``inner``'s sampler).
            drop: Batches to fetch and drop first (iterable datasets resuming).
            hand_draw: Draw a base seed from ``inner.generator`` before resetting
                persistent workers (see ``DataLoader._plan_epoch``).
        """
        stop = threading.Event()
        if self.will_start:
            if self.workers is not None:
                self.workers.shutdown()
            self.workers = TorchWorkers(inner, stop)  # draws the base seed, primes workers
        else:
            assert self.workers is not None
            if hand_draw:
                draw_base_seed(inner.generator)
            self.workers.stop = stop
            self.workers.reset(inner)
        self.driver = TorchDriver(self.workers, plan, drop)
        return self.driver

    @property
    def stop_event(self) -> threading.Event | None:
        return None if self.driver is None else self.driver.stop_event

    def end_epoch(self) -> None:
        """Stop the epoch's driver; shut the workers down unless persistent."""
        self._forget_inherited()
        driver, self.driver = self.driver, None
        if driver is not None:
            driver.stop()
            if not self.persistent:
                self.close()

    def close(self) -> None:
        """Shut the workers down (idempotent; call :meth:`end_epoch` first)."""
        self._forget_inherited()
        workers, self.workers = self.workers, None
        if workers is not None:
            workers.shutdown()

    def abort(self) -> None:
        """End the epoch and terminate the workers, which may hang (a failed trial)."""
        self._forget_inherited()
        driver, self.driver = self.driver, None
        if driver is not None:
            driver.stop()  # the source thread leaves torch's iterator first
        workers, self.workers = self.workers, None
        if workers is not None:
            workers.kill()


def inner_loader(loader: Any, dataset: Any, stream: Any) -> Any:
    """Build torch's DataLoader that the worker processes run, from ``loader``'s settings.

    Map-style datasets are sampled by ``stream`` (the resumable index stream),
    as ``batch_sampler`` (or ``sampler`` when ``batch_size=None``); iterable ones
    are batched by torch as usual.  Its timeout is 0: the pipeline's applies.
    """
    from torch.utils.data import DataLoader

    kw: dict[str, Any] = {
        "num_workers": loader.num_workers,
        "collate_fn": loader.collate_fn,
        "pin_memory": loader.pin_memory,
        "timeout": 0,
        "worker_init_fn": loader.worker_init_fn,
        "multiprocessing_context": loader.multiprocessing_context,
        "generator": loader.generator,
        "prefetch_factor": loader.prefetch_factor,
        "persistent_workers": loader.persistent_workers,
        "pin_memory_device": loader.pin_memory_device,
        "in_order": loader.in_order,
    }
    with warnings.catch_warnings():
        # The loader itself warned (as torch does) if the workers are too many.
        warnings.filterwarnings("ignore", message="This DataLoader will create")
        if isinstance(dataset, IterableDataset):
            return DataLoader(
                dataset, batch_size=loader.batch_size, drop_last=loader.drop_last, **kw
            )
        if loader.batch_sampler is not None:
            return DataLoader(dataset, batch_sampler=stream, **kw)
        return DataLoader(dataset, batch_size=None, sampler=stream, **kw)
