"""ByteBudget: the ``max_inflight_bytes`` bound, and the pipeline's byte accounting.

What it counts: the bytes the reader has read (or is about to read) and the
consumer has not yet taken.  The reader's worker reserves each item's size
right after ``fstat``, before allocating its buffer (:meth:`Ticket.try_take`);
the bytes stay counted while the item travels through queues, prefetch and
the stages after the reader, and are released when the consumer takes the
group that completes the item's reader group (counted in source items, so
stages that regroup items, such as ``batch()``, need no byte books of their own).

A reservation never waits in a worker: when an item does not fit, the job
ends there and the reader waits on the event loop (:meth:`ByteBudget.wait_room`),
holding no read slot and no thread, so the pieces of large items already
admitted keep their slots and finish, and release bytes in turn.

Invariant: ``held <= bound``, except that a reservation is let through over
the bound when nothing else can make progress: nothing is held at all (a
single item larger than the bound passes, alone), or the pipeline after the
reader is idle (nothing queued after it, no job running there or in the
reader): a bound smaller than one batch's (or one group's) bytes then admits
what that batch needs instead of deadlocking.  Cache hits are not counted (the
cache's own ``max_bytes`` bounds them); neither are objects a ``map`` makes
from the buffers.

Thread-safety: :meth:`Ticket.try_take` runs in reader threads,
:meth:`release_upto` on the consumer thread, :meth:`ByteBudget.ticket` and
:meth:`ByteBudget.wait_room` on the loop thread; one lock guards the counts,
taken once per item reserved and once per group released.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable

__all__ = ["BudgetClosedError", "ByteBudget", "Ticket", "check_inflight_bytes"]

log = logging.getLogger("iopipe")

#: How often a waiting reservation re-checks for room and whether the pipeline went idle.
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

    __slots__ = ("budget", "bytes", "credit", "end", "items", "left")

    def __init__(self, budget: ByteBudget, end: int) -> None:
        self.budget = budget
        self.end = end
        self.bytes = 0
        self.credit = 0  # granted by wait_room, not yet used by a read
        self.left = 0  # items of the group still to reserve (see ByteBudget._fits)
        self.items = 0  # items of the group

    def expect(self, items: int) -> None:
        """Say how many items the group will reserve (loop thread, before its reads)."""
        with self.budget._cond:
            self.left = self.items = items

    def done(self) -> None:
        """The group reserves nothing more: its reads ended, or failed (loop thread)."""
        with self.budget._cond:
            self.left = 0

    def try_take(self, n: int) -> bool:
        """Reserve ``n`` bytes if there is room now; never waits (reader worker thread).

        Bytes granted by :meth:`ByteBudget.wait_room` for this ticket are used first.

        Raises:
            BudgetClosedError: the epoch stopped.
        """
        return self.budget._try_reserve(self, n)


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
        # Bumped by each group let through by idleness: a waiter's earlier sighting
        # of idleness is stale then (the passed group's read has not started yet).
        self._idle_passes = 0
        self.waiting = 0  # reservations waiting on the loop now
        self._waiters: set[Ticket] = set()
        self._largest = 0  # the largest item reserved (or asked for) so far
        self.warned = False  # the warning that a group outgrew the bound was logged

    def ticket(self, weight: int) -> Ticket:
        """Open the ticket of the next reader group, of ``weight`` source items (loop thread)."""
        self._end += weight
        t = Ticket(self, self._end)
        with self._cond:
            self._tickets.append(t)
        return t

    def _try_reserve(self, t: Ticket, n: int) -> bool:
        with self._cond:
            if self._closed:
                raise BudgetClosedError("iopipe: the epoch stopped")
            self._largest = max(self._largest, n)
            used = min(n, t.credit)
            if n > used and not self._fits(t, n - used):
                return False
            t.credit -= used
            t.left = max(0, t.left - 1)
            self._add(t, n - used)
            return True

    def _fits(self, t: Ticket, n: int) -> bool:
        """Whether ``n`` more bytes for ``t`` keep room for the older groups (lock held).

        The groups in the reader's window reserve concurrently; were the later
        ones to fill the room first, the oldest (the one the consumer needs
        next) could pass only over the bound.  So a later group leaves room for
        what the older ones have still to reserve, guessed as their items left
        times the largest item seen.
        """
        margin = 0
        for older in self._tickets:
            if older is t:
                break
            margin += older.left
        if self.held == 0 and margin == 0:
            return True  # the oldest item, larger than the bound, passes alone
        return self.held + n + margin * self._largest <= self.bound

    def _add(self, t: Ticket, n: int) -> None:
        self.held += n
        t.bytes += n
        if self.held > self.peak:
            self.peak = self.held

    async def wait_room(self, t: Ticket, n: int) -> None:
        """Wait on the event loop until ``n`` bytes fit, then grant them to ``t`` (loop thread).

        The reader waits here, holding no read slot and no worker thread, so the
        pieces of items already admitted go on meanwhile.  It lets the bytes
        through when they fit (:meth:`_fits`), or when the pipeline after the
        reader is idle (seen twice in a row) and no older group waits.

        Raises:
            BudgetClosedError: the epoch stopped meanwhile.
        """
        idle_seen = False
        passes = self._idle_passes
        self.waiting += 1
        self._waiters.add(t)
        try:
            while True:
                with self._cond:
                    if self._closed:
                        raise BudgetClosedError("iopipe: the epoch stopped")
                    if self._fits(t, n):
                        break
                await asyncio.sleep(_POLL_S)
                # Idle twice in a row, not a passing moment between two stages; and
                # only the group the consumer needs next passes (the oldest ticket),
                # not every group in the reader's window.
                idle = self._idle is not None and self._idle()
                if idle and idle_seen and passes == self._idle_passes and self._first_waiting(t):
                    self._idle_passes += 1
                    break
                idle_seen, passes = idle, self._idle_passes
        finally:
            self.waiting -= 1
            self._waiters.discard(t)
        with self._cond:
            if self._closed:
                raise BudgetClosedError("iopipe: the epoch stopped")
            self._add(t, n)
            t.credit += n
            over = t.bytes > self.bound  # the group alone outgrew the bound
        if over and not self.warned:
            self.warned = True
            log.warning(
                "iopipe: max_inflight_bytes=%d is smaller than one reader group needs "
                "(%d bytes for %d of its %d items so far); the group passes over the bound "
                "rather than deadlock. Give the pipeline a group_size (or a batch size) of "
                "items that fit the bound.",
                self.bound,
                t.bytes,
                t.items - t.left + 1,
                t.items,
            )

    def _first_waiting(self, t: Ticket) -> bool:
        """Whether no ticket older than ``t`` waits for room (loop thread)."""
        with self._cond:
            for older in self._tickets:
                if older is t:
                    return True
                if older in self._waiters:
                    return False
        return True

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
