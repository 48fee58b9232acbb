"""ByteBudget: the ``max_inflight_bytes`` bound, and the pipeline's byte accounting.

What it counts: the bytes the reader has read (or is about to read) and the
consumer has not yet taken.  The reader's worker reserves each item's size
right after ``fstat``, before allocating its buffer (:meth:`Ticket.take`); the
bytes stay counted while the item travels through queues, prefetch and the
stages after the reader, and are released when the consumer takes the group
that completes the item's reader group (counted in source items, so stages that
regroup items, such as ``batch()``, need no byte books of their own).

Invariant: ``held <= bound``, except that a reservation is let through over
the bound when nothing else can make progress: nothing is held at all (a
single item larger than the bound passes, alone), or the pipeline after the
reader is idle (nothing queued after it, no job running there, every job of
the reader waiting for room): a bound smaller than one batch's (or one group's)
bytes then admits what that batch needs instead of deadlocking.  So does a
read that waits for room while holding a read slot that the chunks of an item
larger than the bound need: up to ``concurrency`` items may then pass with it.
Cache hits are not counted (the cache's own ``max_bytes`` bounds
them); neither are objects a ``map`` makes from the buffers.

Thread-safety: :meth:`Ticket.take` runs in reader threads, :meth:`release_upto`
on the consumer thread, :meth:`ByteBudget.ticket` on the loop thread; one lock
guards the counts, taken once per item reserved and once per group released.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

__all__ = ["BudgetClosedError", "ByteBudget", "Ticket", "check_inflight_bytes"]

#: How often a blocked reservation re-checks whether the pipeline went idle.
_POLL_S = 0.005


def check_inflight_bytes(value: object) -> None:
    """Validate the ``max_inflight_bytes`` option.

    Raises:
        ValueError: not an int >= 1 nor None.
    """
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"max_inflight_bytes must be an int >= 1 or None, got {value!r}")


class BudgetClosedError(BaseException):
    """The epoch stopped while a read waited for room in the byte budget.

    A BaseException, like a cancellation: the reader's per-item ``except
    Exception`` must not turn it into a failed (or skipped) item.
    """


class Ticket:
    """The bytes reserved for one reader group; ``end`` is its end in source items."""

    __slots__ = ("budget", "bytes", "end")

    def __init__(self, budget: ByteBudget, end: int) -> None:
        self.budget = budget
        self.end = end
        self.bytes = 0

    def take(self, n: int) -> None:
        """Reserve ``n`` bytes, waiting while the bound is reached (reader worker thread).

        Raises:
            BudgetClosedError: the epoch stopped meanwhile.
        """
        self.budget._reserve(self, n)


class ByteBudget:
    """Bytes read and not yet taken by the consumer, bounded by ``bound``.

    Args:
        bound: ``max_inflight_bytes``.
        start: Source items of the epoch skipped before it (a resumed epoch).
        idle: Called (from a reader thread) while a reservation waits: True when
            nothing after the reader is queued or running and the consumer waits.
    """

    def __init__(self, bound: int, start: int = 0, idle: Callable[[], bool] | None = None) -> None:
        self.bound = bound
        self.held = 0
        self.peak = 0
        self._end = start  # source items covered by the tickets issued so far
        self._tickets: deque[Ticket] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._closed = False
        self._idle = idle
        self.waiting = 0  # reservations blocked now (read by the idle check)

    def ticket(self, weight: int) -> Ticket:
        """Open the ticket of the next reader group, of ``weight`` source items (loop thread)."""
        self._end += weight
        t = Ticket(self, self._end)
        with self._cond:
            self._tickets.append(t)
        return t

    def _reserve(self, t: Ticket, n: int) -> None:
        with self._cond:
            if self._closed:
                raise BudgetClosedError("iopipe: the epoch stopped")
            if self.held + n > self.bound and self.held > 0:
                self.waiting += 1
                try:
                    self._wait_for_room(n)
                finally:
                    self.waiting -= 1
            self.held += n
            t.bytes += n
            if self.held > self.peak:
                self.peak = self.held

    def _wait_for_room(self, n: int) -> None:
        idle_seen = False
        while True:
            self._cond.wait(_POLL_S)
            if self._closed:
                raise BudgetClosedError("iopipe: the epoch stopped")
            if self.held + n <= self.bound or self.held == 0:
                return
            # Idle twice in a row, not a passing moment between two stages.
            idle = self._idle is not None and self._idle()
            if idle and idle_seen:
                return
            idle_seen = idle

    def release_upto(self, position: int) -> None:
        """Release the tickets of groups whose items the consumer has all taken (any thread)."""
        tickets = self._tickets
        if not tickets or tickets[0].end > position:
            return
        with self._cond:
            freed = 0
            while tickets and tickets[0].end <= position:
                freed += tickets.popleft().bytes
            if freed:
                self.held -= freed
                self._cond.notify_all()

    def close(self) -> None:
        """Wake and fail every waiting reservation; later ones fail at once (idempotent)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
