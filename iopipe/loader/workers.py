"""The jobs a DataLoader runs off the training thread, and torch's worker processes.

Each epoch, the loader puts an iterator of jobs in a :class:`Feed` (the source of
its pipeline).  Thread workers run :class:`MapFetcher` (or :class:`AsyncMapFetcher`)
on one batch's indices at a time, and :class:`Collate` on the samples an iterable
dataset yielded; a failure becomes a :class:`Failed` batch with a note naming the
batch and the failing index.  Process workers are torch's own:
:class:`TorchWorkers` is torch's multi-process iterator with a stop flag,
:class:`TorchDriver` iterates it from the pipeline's source thread, and
:class:`WorkerProcesses` keeps them across epochs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import heapq
import itertools
import multiprocessing.connection
import os
import signal
import sys
import threading
import warnings
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any

from torch._utils import ExceptionWrapper
from torch.utils.data import IterableDataset
from torch.utils.data._utils import signal_handling
from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

from ..runtime.errors import Interrupted, item_label
from ..stages.source import _shard_iter
from .state import EpochPlan, draw_base_seed

__all__ = [
    "NOTHING",
    "AsyncFeed",
    "AsyncMapFetcher",
    "Collate",
    "Failed",
    "Feed",
    "FirstGate",
    "MapFetcher",
    "RankShard",
    "TorchDriver",
    "TorchWorkers",
    "WorkerProcesses",
    "inner_loader",
    "iterable_batches",
    "numbered",
    "run_inline",
]

#: How often a wait on worker processes wakes to check for a stop request and
#: for dead workers (torch's own interval, 5 s, is too slow to notice a crash).
POLL_S = 0.1
#: Longest the driver waits for a worker to be seen dead after torch's iterator failed.
CRASH_WAIT_S = 1.0
#: Longest ``TorchDriver.stop`` waits for the source thread to leave torch's iterator.
STOP_TIMEOUT_S = 10.0


class Failed:
    """A batch whose loading raised ``exc``; travels in order, raised by the consumer.

    Failures travel as items, not as stage errors, so that the batches before a
    failed one are still delivered first and iteration may go on after it, as
    with torch.
    """

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


#: "No first batch" (an empty epoch) for :func:`numbered`.
NOTHING: Any = object()


class Feed:
    """A pipeline source that, every epoch, iterates what the loader left in ``current``.

    Pulled a batch at a time by the source's worker thread: for iterable datasets
    and worker processes, whose ``next()`` may block.
    """

    def __init__(self) -> None:
        self.current: Iterator[Any] | None = None

    def take(self) -> Iterator[Any]:
        it, self.current = self.current, None
        return it if it is not None else iter(())

    def __iter__(self) -> Iterator[Any]:
        return self.take()


class AsyncFeed(Feed):
    """A :class:`Feed` iterated on the loop thread: for index samplers, which are cheap.

    Saves a thread hand-off per batch (the source pulls async iterables on the loop).
    When ``gate`` is set, the epoch's later jobs wait until it is done (see
    :class:`FirstGate`).
    """

    def __init__(self) -> None:
        super().__init__()
        self.gate: concurrent.futures.Future[None] | None = None

    def __aiter__(self) -> AsyncIterator[Any]:
        gate, self.gate = self.gate, None
        return _on_loop(self.take(), gate)


async def _on_loop(
    it: Iterator[Any], gate: concurrent.futures.Future[None] | None
) -> AsyncIterator[Any]:
    for x in it:
        yield x
        if gate is not None:
            await asyncio.wrap_future(gate)
            gate = None


class FirstGate:
    """Lets an epoch's first batch be fetched alone, for time to first batch.

    With ``N`` workers the first batch would share the GIL and the cores with the
    next ``N - 1`` and arrive about ``N`` times later (bench/bench_loader.py);
    holding the rest back costs one batch of ramp-up per epoch.  Armed by the
    consumer thread for each epoch, opened by the worker that finishes the batch.
    """

    def __init__(self) -> None:
        self._n = -1
        self._fut: concurrent.futures.Future[None] | None = None

    def arm(self, n: int) -> concurrent.futures.Future[None]:
        """Return the future that batch ``n`` (the epoch's first) will complete."""
        fut: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._fut, self._n = fut, n
        return fut

    def passed(self, n: int) -> None:
        """Batch ``n`` is done; open the gate if it was the first (any thread)."""
        fut = self._fut
        if n == self._n and fut is not None and not fut.done():
            try:
                fut.set_result(None)
            except concurrent.futures.InvalidStateError:  # cancelled meanwhile
                pass


def numbered(first: Any, rest: Iterator[Any], start: int) -> Iterator[tuple[int, Any]]:
    """Yield ``(start, first)``, then the rest of the index batches numbered on."""
    if first is NOTHING:
        return
    n = start
    yield n, first
    for index in rest:
        n += 1
        yield n, index


def run_inline(fn: Callable[[Any], Any], jobs: Iterable[Any], pin: bool) -> Iterator[Any]:
    """Run the jobs in the calling thread (``worker_type="main"``)."""
    from torch.utils.data._utils.pin_memory import pin_memory

    for job in jobs:
        batch = fn(job)
        yield pin_memory(batch) if pin and not isinstance(batch, Failed) else batch  # type: ignore[no-untyped-call]


def _label(index: Any) -> str:
    return item_label(index, 120)


def collate(collate_fn: Callable[[Any], Any], n: int, data: Any) -> Any:
    """Apply ``collate_fn`` to batch ``n``; a failure gets a note naming the batch."""
    try:
        return collate_fn(data)
    except Exception as exc:
        exc.add_note(f"iopipe.DataLoader: collate_fn failed on batch {n}")
        raise


def getitems_note(index: Any, n: int) -> str:
    """The note added to an exception of ``dataset.__getitems__`` (batch ``n``)."""
    return f"iopipe.DataLoader: dataset.__getitems__({_label(index)}) failed (batch {n})"


class GovernedSlots:
    """Bounds the fetches that run at once; the bound moves with measured throughput.

    Starts at ``limit`` (``num_workers``).  A dataset whose ``__getitem__`` is
    GIL-bound Python fetches as fast or faster with fewer threads (two threads
    contending for the GIL on a page-cached read loop were 15% slower than one on
    the benchmark machine); one that waits on storage or the network needs them
    all.  A :class:`~iopipe.stages.fused.RateGovernor` started high tries fewer
    and keeps them only when batches come as fast (docs/dataloader.md).
    """

    def __init__(self, limit: int, *, govern: bool = True) -> None:
        from ..stages.fused import RateGovernor

        self._cond = threading.Condition()
        self._limit = max(1, limit)
        self._held = 0
        self._waiting: list[int] = []  # a heap of the batch numbers waiting for a slot
        self.governor = (
            RateGovernor(self, self._limit, start_high=True) if govern and limit > 1 else None
        )

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def held(self) -> int:
        """Fetches running now."""
        return self._held

    def set_limit(self, limit: int) -> None:
        """Change the bound (called by the governor, under this object's lock)."""
        with self._cond:
            self._limit = max(1, limit)
            self._cond.notify_all()

    def restart(self) -> None:
        """A new epoch: measurement windows start afresh (idle time is not throughput)."""
        with self._cond:
            if self.governor is not None:
                self.governor.restart()

    def acquire(self, n: int = -1) -> None:
        """Wait for a slot; among waiting fetches the lowest batch number ``n`` goes first.

        Slots go in batch order: when the bound drops (the governor's trial) while
        a later batch is slow, an earlier batch must not queue behind it (the
        consumer needs the earlier one first).  ``n = -1``: no order.
        """
        key = n if n >= 0 else _UNORDERED
        with self._cond:
            heapq.heappush(self._waiting, key)
            while self._held >= self._limit or self._waiting[0] != key:
                self._cond.wait(1.0)
            heapq.heappop(self._waiting)
            self._held += 1
            if self.governor is not None:
                self.governor.started()
            if self._waiting and self._held < self._limit:
                self._cond.notify_all()  # room for the next lowest too

    def release(self, ok: bool = True) -> None:
        """Give the slot back; ``ok``: the fetch succeeded (the governor counts it)."""
        with self._cond:
            self._held -= 1
            if ok and self.governor is not None:
                self.governor.observe(1)
            self._cond.notify_all()

    def __enter__(self) -> None:
        self.acquire()

    def __exit__(self, et: object, exc: object, tb: object) -> None:
        self.release(et is None)


#: The waiting key of a fetch without a batch number: after every numbered one.
_UNORDERED = sys.maxsize


class MapFetcher:
    """Fetch and collate one batch of a map-style dataset, as torch's ``_MapDatasetFetcher``.

    Called with ``(n, index)``: the batch number and what the index sampler
    yielded (a list of indices, or one index when ``batch_size=None``).  Runs in
    a worker thread; with ``num_workers <= 1`` never two at a time.
    """

    def __init__(
        self, dataset: Any, collate_fn: Callable[[Any], Any], auto_collation: bool
    ) -> None:
        self.dataset = dataset
        self.collate_fn = collate_fn
        self.auto_collation = auto_collation
        getitems = getattr(dataset, "__getitems__", None)
        self.getitems = getitems if auto_collation and getitems else None
        self.gate: FirstGate | None = None
        self.slots: GovernedSlots | None = None

    def __call__(self, job: tuple[int, Any]) -> Any:
        n, index = job
        try:
            if self.slots is None:
                return collate(self.collate_fn, n, self.fetch(n, index))
            self.slots.acquire(n)
            ok = False
            try:
                out = collate(self.collate_fn, n, self.fetch(n, index))
                ok = True
            finally:
                self.slots.release(ok)
            return out
        except Exception as exc:
            return Failed(exc)
        except BaseException as exc:  # KeyboardInterrupt, SystemExit: see iopipe/runtime/errors.py
            return Failed(Interrupted(exc))
        finally:
            if self.gate is not None:
                self.gate.passed(n)

    def fetch(self, n: int, index: Any) -> Any:
        """Return the samples of batch ``n`` (``dataset[index]`` without auto-collation)."""
        ds = self.dataset
        if not self.auto_collation:
            try:
                return ds[index]
            except BaseException as exc:  # named, then raised
                exc.add_note(f"iopipe.DataLoader: dataset[{index!r}] failed (batch {n})")
                raise
        if self.getitems is not None:
            try:
                return self.getitems(index)
            except BaseException as exc:  # named, then raised
                exc.add_note(getitems_note(index, n))
                raise
        out = []
        for i in index:
            try:
                out.append(ds[i])
            except BaseException as exc:  # named, then raised
                exc.add_note(
                    f"iopipe.DataLoader: dataset[{i!r}] failed (batch {n}, indices {_label(index)})"
                )
                raise
        return out


class AsyncMapFetcher(MapFetcher):
    """Await an ``async def __getitem__`` (or ``__getitems__``) on the loop.

    The samples of one batch are awaited concurrently; returns ``(n, samples)``
    for a :class:`Collate` stage, so collation runs in a thread, not on the loop.
    """

    async def __call__(self, job: tuple[int, Any]) -> tuple[int, Any]:  # type: ignore[override]
        n, index = job
        try:
            return n, await self._fetch(n, index)
        except BaseException as exc:  # named, then raised
            return n, Failed(exc)
        finally:
            if self.gate is not None:
                self.gate.passed(n)

    async def _fetch(self, n: int, index: Any) -> Any:
        if not self.auto_collation:
            return await self._one(n, index, None)
        if self.getitems is not None:
            try:
                return await self.getitems(index)
            except BaseException as exc:  # named, then raised
                exc.add_note(getitems_note(index, n))
                raise
        tasks = [asyncio.ensure_future(self._one(n, i, index)) for i in index]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for t in tasks:
                t.cancel()
            raise

    async def _one(self, n: int, i: Any, index: Any) -> Any:
        try:
            return await self.dataset[i]
        except BaseException as exc:  # named, then raised
            where = f"batch {n}" if index is None else f"batch {n}, indices {_label(index)}"
            exc.add_note(f"iopipe.DataLoader: dataset[{i!r}] failed ({where})")
            raise


class Collate:
    """Collate ``(n, samples)`` into batch ``n`` (runs in a worker thread)."""

    def __init__(self, collate_fn: Callable[[Any], Any]) -> None:
        self.collate_fn = collate_fn

    def __call__(self, job: tuple[int, Any]) -> Any:
        n, data = job
        if isinstance(data, Failed):
            return data
        try:
            return collate(self.collate_fn, n, data)
        except Exception as exc:
            return Failed(exc)


def iterable_batches(
    it: Iterator[Any], batch_size: int | None, drop_last: bool, skip: int
) -> Iterator[tuple[int, Any]]:
    """Cut an iterable dataset's samples into batches as torch's ``_IterableDatasetFetcher``.

    Yields ``(n, samples)`` (``(n, sample)`` when ``batch_size`` is None); the
    first ``skip`` batches are drawn and dropped, not collated.  Runs in the
    pipeline's source thread: one thread iterates the dataset, so every sample
    is yielded once.  An error of the dataset's iterator is yielded as a
    :class:`Failed` batch and ends the epoch (the iterator is finished).
    """
    n = 0
    try:
        if batch_size is None:
            for x in it:
                if n >= skip:
                    yield n, x
                n += 1
            return
        while True:
            batch = list(itertools.islice(it, batch_size))
            if not batch or (drop_last and len(batch) < batch_size):
                return
            if n >= skip:
                yield n, batch
            n += 1
            if len(batch) < batch_size:
                return
    except Exception as exc:
        exc.add_note(f"iopipe.DataLoader: iterating the dataset failed (batch {n})")
        yield n, Failed(exc)


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
        return _shard_iter(iter(self.dataset), self.rank, self.world_size, self.mode)


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

    def shutdown(self) -> None:
        """Stop and join the worker processes (idempotent)."""
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
            where = "" if index is None else f" (indices {_label(index)})"
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
        return w is None or not self.persistent or any(p.exitcode is not None for p in w._workers)

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
            self.workers._reset(inner)  # type: ignore[no-untyped-call]
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
