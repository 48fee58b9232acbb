"""The one capacity limiter: a semaphore whose bound may move while it is held.

On trio's model (``trio.CapacityLimiter``): ``total_tokens`` can be set at any
time (the autotuner and the governors of iopipe/control/ move it within the
pool a stage created at open), ``borrowed_tokens`` says how many are held, and
:meth:`CapacityLimiter.statistics` is a frozen snapshot, so that nobody reads
the limiter's insides.  Loop thread only.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass

__all__ = ["CapacityLimiter", "LimiterStatistics"]


@dataclass(frozen=True, slots=True)
class LimiterStatistics:
    """A snapshot of a :class:`CapacityLimiter`."""

    borrowed_tokens: int
    total_tokens: int
    tasks_waiting: int


class CapacityLimiter:
    """At most ``total_tokens`` holders at once; the bound may change while it is in use.

    Lowering the bound takes no token back: holders over the new bound keep
    theirs, and nobody new gets one until the held tokens are under it.
    Waiters are served first come, first served.
    """

    __slots__ = ("_held", "_total", "_waiters")

    def __init__(self, total_tokens: int) -> None:
        self._total = total_tokens
        self._held = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def total_tokens(self) -> int:
        """The bound; setting it wakes waiters that fit now (values under 1 count as 1)."""
        return self._total

    @total_tokens.setter
    def total_tokens(self, value: int) -> None:
        self._total = max(1, value)
        self._wake()

    @property
    def borrowed_tokens(self) -> int:
        """Tokens held now."""
        return self._held

    @property
    def available_tokens(self) -> int:
        """Tokens free now (negative while the bound is below what is held)."""
        return self._total - self._held

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
