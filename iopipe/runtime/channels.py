"""Bounded hand-off queues and the units of work that travel through them.

Items travel between stages in :class:`Group` s (a few dozen items at a time), so
that per-item costs on the event loop are amortised: the loop does a handful of
operations per group, never per item.  Two queue kinds exist:

* :class:`GroupQueue` joins two stages on the loop.  Its capacity counts items,
  not groups; a group larger than the whole capacity is still admitted into an
  empty queue so that nothing can deadlock.
* :class:`Handoff` joins the last stage (loop thread) to the consumer (any
  thread).  It is the only place where data crosses threads, one group (usually
  one whole batch) at a time.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["END", "GAP", "BatchKey", "Group", "GroupQueue", "Handoff", "QueueCounters"]


class _End:
    """End-of-stream marker (a sentinel object, never ``None``)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "END"


END: Any = _End()


@dataclass(slots=True, frozen=True)
class BatchKey:
    """Identifies a batch in error messages: its number and the items at its ends."""

    index: int
    first: Any
    last: Any

    def __repr__(self) -> str:
        from .errors import item_label

        return f"batch {self.index} ({item_label(self.first, 80)} .. {item_label(self.last, 80)})"


@dataclass(slots=True, eq=False)
class Group:
    """A run of consecutive items of one epoch.

    Attributes:
        items: The payloads still to be processed by the stages before the cache
            (cache misses), or all payloads when there is no cache.
        keys: One source key per entry of ``items``, for error messages and the cache.
        hits: Cached outputs as ``(position in group, key, value)``, or ``None``.
        batched: Whether each entry of ``items`` is a whole batch.
        counts: The number of source items each entry of ``items`` stands for:
            for batched groups, and for groups that lost items to
            ``on_error="skip"`` (see :meth:`drop`); ``None`` means one each.
        dropped: Source items of this group that failed after its last entry
            (``on_error="skip"``): the consumer counts them once past the group.
    """

    items: list[Any]
    keys: list[Any]
    hits: list[tuple[int, Any, Any]] | None = None
    batched: bool = False
    counts: list[int] | None = None
    dropped: int = 0

    @property
    def weight(self) -> int:
        """Source items this group holds, cache hits included."""
        if self.counts is not None:
            return sum(self.counts) + (len(self.hits) if self.hits else 0)
        return len(self.items) + (len(self.hits) if self.hits else 0)

    def replace_items(self, items: list[Any]) -> Group:
        """Return a group like this one with ``items`` substituted (same length)."""
        return Group(items, self.keys, self.hits, self.batched, self.counts, self.dropped)

    def drop(self, items: list[Any], failed: set[int]) -> Group:
        """Return this group with ``items`` (one per entry) less the entries at ``failed``.

        For ``on_error="skip"``.  The source items a dropped entry stood for are
        added to the count of the next entry kept, or to ``dropped`` when none
        follows: the consumer's position (``state_dict``) passes them exactly
        when it passes the next entry.  In a group with cache hits the next
        entry may be a hit, which only the cache stage can place: a dropped
        entry then stays among the hits as a :data:`GAP` at its position, and
        the cache stage attributes it when it merges (``stages/cache.py``).
        """
        if self.hits:
            return self._drop_among_hits(items, failed)
        counts = self.counts
        kept: list[Any] = []
        keys: list[Any] = []
        new_counts: list[int] = []
        carry = 0
        for j, (x, key) in enumerate(zip(items, self.keys, strict=True)):
            c = 1 if counts is None else counts[j]
            if j in failed:
                carry += c
                continue
            kept.append(x)
            keys.append(key)
            new_counts.append(c + carry)
            carry = 0
        return Group(kept, keys, None, self.batched, new_counts, self.dropped + carry)

    def _drop_among_hits(self, items: list[Any], failed: set[int]) -> Group:
        hits = self.hits or []
        taken = {pos for pos, _, _ in hits}
        misses = [p for p in range(len(items) + len(hits)) if p not in taken]
        gaps = [(misses[j], self.keys[j], GAP) for j in sorted(failed)]
        kept = [x for j, x in enumerate(items) if j not in failed]
        keys = [k for j, k in enumerate(self.keys) if j not in failed]
        # counts (all ones) tells the cache stage that gaps are among the hits.
        merged = sorted([*hits, *gaps], key=lambda h: h[0])
        return Group(kept, keys, merged, self.batched, [1] * len(kept), self.dropped)


class _Gap:
    """Marks, among a group's cache hits, a source item dropped by ``on_error="skip"``."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "GAP"


GAP: Any = _Gap()


@dataclass(slots=True)
class QueueCounters:
    """Occupancy statistics of a queue (mutated by the loop thread only)."""

    capacity: int
    used: int = 0
    area: float = 0.0  # integral of `used` over time, for the mean occupancy
    last: float = field(default_factory=time.perf_counter)
    started: float = field(default_factory=time.perf_counter)

    def change(self, delta: int) -> None:
        now = time.perf_counter()
        self.area += self.used * (now - self.last)
        self.last = now
        self.used += delta

    def mean(self) -> float:
        now = time.perf_counter()
        total = now - self.started
        area = self.area + self.used * (now - self.last)
        return area / total if total > 0 else 0.0


def _weight(group: Any) -> int:
    return group.weight if isinstance(group, Group) else 0


class GroupQueue:
    """A bounded FIFO of groups between two stages; used by the loop thread only.

    Invariant: the items it holds never exceed ``capacity``, except for one group
    admitted into an empty queue.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.counters = QueueCounters(capacity)
        self._items: deque[Any] = deque()
        self._getters: deque[asyncio.Future[None]] = deque()
        self._putters: deque[asyncio.Future[None]] = deque()

    def __len__(self) -> int:
        return len(self._items)

    def resize(self, capacity: int) -> None:
        """Set the capacity in items (loop thread); a blocked producer that fits now wakes."""
        self.capacity = self.counters.capacity = max(capacity, 1)
        self._wake(self._putters)

    @staticmethod
    def _wake(waiters: deque[asyncio.Future[None]]) -> None:
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    async def _wait(self, waiters: deque[asyncio.Future[None]]) -> None:
        fut = asyncio.get_running_loop().create_future()
        waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut in waiters:
                waiters.remove(fut)
            raise

    async def put(self, group: Any) -> None:
        """Append ``group``, waiting while the queue is too full to take it."""
        w = _weight(group)
        while self.counters.used > 0 and self.counters.used + w > self.capacity:
            await self._wait(self._putters)
        self._items.append(group)
        self.counters.change(w)
        self._wake(self._getters)
        if self.counters.used < self.capacity:
            self._wake(self._putters)

    async def get(self) -> Any:
        """Remove and return the oldest group, waiting while the queue is empty."""
        while not self._items:
            await self._wait(self._getters)
        group = self._items.popleft()
        self.counters.change(-_weight(group))
        self._wake(self._putters)
        if self._items:
            self._wake(self._getters)
        return group


class _Failure:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class Handoff:
    """The thread-safe queue from the loop thread to the consumer thread.

    The loop side (:meth:`put`, :meth:`put_end`, :meth:`put_error`) runs on the
    loop; the consumer side (:meth:`get`) on any one thread.  Invariant: at most
    ``capacity`` groups wait here; the loop side is woken through
    ``call_soon_threadsafe`` only when it is actually blocked on a full queue.
    """

    def __init__(self, capacity: int, wake_loop: Callable[[Callable[[], None]], None]) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.counters = QueueCounters(capacity)
        self._wake_loop = wake_loop
        self._cond = threading.Condition(threading.Lock())
        self._items: deque[Any] = deque()
        # One future per put() waiting for space: an unordered stage has several
        # putters waiting at once, and each must be woken (a single slot lost them).
        self._space: deque[asyncio.Future[None]] = deque()
        self._closed = False
        self.wait_s = 0.0  # time the consumer spent blocked in get()
        self.consumer_waiting = False  # the consumer is blocked in get() now (any thread reads)

    # -- loop side -------------------------------------------------------------
    async def put(self, group: Group) -> None:
        """Hand ``group`` to the consumer, waiting while ``capacity`` groups are pending."""
        while True:
            with self._cond:
                if self._closed:
                    raise asyncio.CancelledError()
                if len(self._items) < self.capacity:
                    self._items.append(group)
                    self.counters.change(1)
                    self._cond.notify()
                    return
                fut = asyncio.get_running_loop().create_future()
                self._space.append(fut)
            try:
                await fut
            finally:
                if fut in self._space:
                    self._space.remove(fut)

    def _push(self, marker: Any) -> None:
        with self._cond:
            self._items.append(marker)
            self._cond.notify()

    def put_end(self) -> None:
        """Mark the end of the epoch (never blocks)."""
        self._push(END)

    def put_error(self, exc: BaseException) -> None:
        """Deliver ``exc`` to the consumer ahead of nothing else (never blocks)."""
        self._push(_Failure(exc))

    def resize(self, capacity: int) -> None:
        """Set the capacity in groups (loop thread); a blocked producer that fits now wakes."""
        self.capacity = self.counters.capacity = max(capacity, 1)
        self._notify_space()

    def _notify_space(self) -> None:  # runs on the loop thread
        while self._space:
            fut = self._space.popleft()
            if not fut.done():
                fut.set_result(None)

    # -- consumer side ---------------------------------------------------------
    def get(self, timeout: float | None, alive: Callable[[], bool]) -> Any:
        """Return the next group or :data:`END`; raise the error a stage delivered.

        Blocks the calling thread.  Wakes every 100 ms to check ``alive()`` so a
        dead loop thread can never hang the consumer.

        Raises:
            TimeoutError: nothing arrived within ``timeout`` seconds.
            RuntimeError: the loop thread died without delivering anything.
        """
        start = time.perf_counter()
        deadline = None if timeout is None else start + timeout
        with self._cond:
            try:
                while not self._items:
                    if self._closed:
                        raise RuntimeError("iopipe: the hand-off queue was closed")
                    wait = 0.1
                    if deadline is not None:
                        left = deadline - time.perf_counter()
                        if left <= 0:
                            self.wait_s += time.perf_counter() - start
                            raise TimeoutError
                        wait = min(wait, left)
                    self.consumer_waiting = True
                    if not self._cond.wait(wait) and not alive() and not self._items:
                        raise RuntimeError("iopipe: the event-loop thread died")
            finally:
                self.consumer_waiting = False
            item = self._items.popleft()
            if isinstance(item, Group):
                self.counters.change(-1)
            wake = bool(self._space)
        self.wait_s += time.perf_counter() - start
        if wake:
            self._wake_loop(self._notify_space)
        if isinstance(item, _Failure):
            raise item.exc
        return item

    def close(self) -> None:
        """Refuse further puts and drop what waits (consumer side, idempotent)."""
        with self._cond:
            self._closed = True
            self._items.clear()
            self._cond.notify_all()
            wake = bool(self._space)
        if wake:
            self._wake_loop(self._notify_space)
