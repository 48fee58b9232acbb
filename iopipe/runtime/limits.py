"""The one capacity limiter: a semaphore whose bound may move while it is held.

On trio's model (``trio.CapacityLimiter``): ``total_tokens`` can be set at any
time (the autotuner and the governors of iopipe/control/ move it within the
pool a stage created at open), ``borrowed_tokens`` says how many are held, and
``statistics()`` is a frozen snapshot, so that nobody reads the limiter's
insides.  Two faces of the one model: :class:`CapacityLimiter` for tasks on the
loop thread (no lock: the stages' hot path), :class:`BlockingCapacityLimiter`
for worker threads (the DataLoader's fetches), whose waiters may also be served
by a priority (the batch number) rather than by arrival.
"""

from __future__ import annotations

import asyncio
import heapq
import sys
import threading
from collections import deque
from dataclasses import dataclass

__all__ = ["UNORDERED", "BlockingCapacityLimiter", "CapacityLimiter", "LimiterStatistics"]

#: The priority of a waiter that has none: served after every prioritised one.
UNORDERED = sys.maxsize


@dataclass(frozen=True, slots=True)
class LimiterStatistics:
    """A snapshot of a :class:`CapacityLimiter`."""

    borrowed_tokens: int
    total_tokens: int
    tasks_waiting: int


class _Tokens:
    """What both faces share: the bound, the tokens held and their reading."""

    __slots__ = ("_held", "_total")

    def __init__(self, total_tokens: int) -> None:
        self._total = max(1, total_tokens)
        self._held = 0

    @property
    def total_tokens(self) -> int:
        """The bound; setting it wakes waiters that fit now (values under 1 count as 1)."""
        return self._total

    @total_tokens.setter
    def total_tokens(self, value: int) -> None:
        self._set_total(max(1, value))

    def _set_total(self, value: int) -> None:
        raise NotImplementedError

    @property
    def borrowed_tokens(self) -> int:
        """Tokens held now."""
        return self._held

    @property
    def available_tokens(self) -> int:
        """Tokens free now (negative while the bound is below what is held)."""
        return self._total - self._held


class CapacityLimiter(_Tokens):
    """At most ``total_tokens`` holders at once; the bound may change while it is in use.

    Lowering the bound takes no token back: holders over the new bound keep
    theirs, and nobody new gets one until the held tokens are under it.
    Waiters are served first come, first served.
    """

    __slots__ = ("_waiters",)

    def __init__(self, total_tokens: int) -> None:
        super().__init__(total_tokens)
        self._waiters: deque[asyncio.Future[None]] = deque()

    def _set_total(self, value: int) -> None:
        self._total = value
        self._wake()

    def statistics(self) -> LimiterStatistics:
        """A frozen snapshot: tokens held, the bound, tasks waiting."""
        return LimiterStatistics(self._held, self._total, len(self._waiters))

    def _wake(self) -> None:
        while self._waiters and self._held < self._total:
            fut = self._waiters.popleft()
            if not fut.done():
                self._held += 1
                fut.set_result(None)

    async def acquire(self) -> None:
        """Take a token, waiting (in arrival order) while none is free."""
        if self._held < self._total and not self._waiters:
            self._held += 1
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()
            elif fut in self._waiters:
                self._waiters.remove(fut)
            raise

    def release(self) -> None:
        """Give a token back."""
        self._held -= 1
        self._wake()

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self.release()


class BlockingCapacityLimiter(_Tokens):
    """:class:`CapacityLimiter`'s model for threads: ``acquire()`` blocks (any thread).

    Waiters are served lowest ``priority`` first (arrival order among equals
    comes from the heap, not guaranteed): when the bound drops while a later
    batch is slow, an earlier batch must not queue behind it.  A waiter re-checks
    once a second, so a missed wake-up costs a second, never a hang.
    """

    __slots__ = ("_cond", "_waiting")

    def __init__(self, total_tokens: int) -> None:
        super().__init__(total_tokens)
        self._cond = threading.Condition()
        self._waiting: list[int] = []  # a heap of the waiters' priorities

    def _set_total(self, value: int) -> None:
        with self._cond:
            self._total = value
            self._cond.notify_all()

    def statistics(self) -> LimiterStatistics:
        """A frozen snapshot: tokens held, the bound, threads waiting."""
        with self._cond:
            return LimiterStatistics(self._held, self._total, len(self._waiting))

    def acquire(self, priority: int = UNORDERED) -> None:
        """Take a token, waiting while none is free or a lower ``priority`` waits."""
        with self._cond:
            heapq.heappush(self._waiting, priority)
            try:
                while self._held >= self._total or self._waiting[0] != priority:
                    self._cond.wait(1.0)
            except BaseException:  # interrupted while waiting: leave the queue, or it stalls
                self._waiting.remove(priority)
                heapq.heapify(self._waiting)
                self._cond.notify_all()
                raise
            heapq.heappop(self._waiting)
            self._held += 1
            if self._waiting and self._held < self._total:
                self._cond.notify_all()  # room for the next lowest too

    def release(self) -> None:
        """Give a token back."""
        with self._cond:
            self._held -= 1
            self._cond.notify_all()

    def holding(self) -> threading.Condition:
        """The limiter's (reentrant) lock: what runs under it sees the count hold still."""
        return self._cond

    def __enter__(self) -> None:
        self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
