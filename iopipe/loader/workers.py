"""What feeds a DataLoader's jobs and bounds them (the jobs: ``fetch.py``; torch's processes: ``processes.py``).

Each epoch, the loader puts an iterator of jobs in a :class:`Feed` (the source of
its pipeline); a failure becomes a :class:`Failed` batch with a note naming the
batch and the failing index.  :class:`GovernedSlots` bounds the fetches that run
at once; :class:`FirstGate` lets the first batch of an epoch run alone.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any

from ..runtime.errors import item_label
from ..runtime.limits import UNORDERED, BlockingCapacityLimiter

__all__ = [
    "NOTHING",
    "AsyncFeed",
    "Failed",
    "Feed",
    "FirstGate",
    "GovernedSlots",
    "index_label",
    "iterable_batches",
    "numbered",
    "run_inline",
]


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


def index_label(index: Any) -> str:
    """A batch's indices as the loader's error notes name them (shortened)."""
    return item_label(index, 120)


class GovernedSlots:
    """Bounds the fetches that run at once; the bound moves with measured throughput.

    A :class:`~iopipe.runtime.limits.BlockingCapacityLimiter` starting at
    ``limit`` (``num_workers``), served in batch order, and a
    :class:`~iopipe.control.governor.RateGovernor` moving it.  A dataset whose
    ``__getitem__`` is GIL-bound Python fetches as fast or faster with fewer
    threads (two threads contending for the GIL on a page-cached read loop were
    15% slower than one on the benchmark machine); one that waits on storage or
    the network needs them all.  The governor starts high, tries fewer and keeps
    them only when batches come as fast (docs/dataloader.md).
    """

    def __init__(self, limit: int, *, govern: bool = True) -> None:
        from ..control.governor import RateGovernor, TokenBound

        self.limiter = BlockingCapacityLimiter(limit)
        # The governor is fed by every worker thread; under the limiter's own lock
        # it reads the tokens held and moves the bound with nobody taking one meanwhile.
        self._gov_lock = self.limiter.holding()
        self.governor = (
            RateGovernor(TokenBound(self.limiter), self.limiter.total_tokens, start_high=True)
            if govern and limit > 1
            else None
        )

    def restart(self) -> None:
        """A new epoch: measurement windows start afresh (idle time is not throughput)."""
        if self.governor is not None:
            with self._gov_lock:
                self.governor.restart()

    def acquire(self, n: int = -1) -> None:
        """Wait for a slot; among waiting fetches the lowest batch number ``n`` goes first.

        ``n = -1``: no order (after every numbered fetch).
        """
        self.limiter.acquire(n if n >= 0 else UNORDERED)
        if self.governor is not None:
            with self._gov_lock:
                self.governor.started()

    def release(self, ok: bool = True) -> None:
        """Give the slot back; ``ok``: the fetch succeeded (the governor counts it)."""
        self.limiter.release()
        if ok and self.governor is not None:
            with self._gov_lock:
                self.governor.observe(1)

    def __enter__(self) -> None:
        self.acquire()

    def __exit__(self, et: object, exc: object, tb: object) -> None:
        self.release(et is None)


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
