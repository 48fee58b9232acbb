"""The consumer's side of an epoch: ``next()`` on the thread that iterates.

The iterator reads one group at a time from the epoch's hand-off and hands out
its elements without crossing threads; while it waits it watches for stalls
(``timeout``, ``stall_warning``: iopipe/runtime/watchdog.py).
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from ..runtime.channels import END
from ..runtime.errors import PipelineClosedError, released
from ..runtime.watchdog import StallTimeoutError, abandon_stuck, logger, queue_summary
from .epoch import Epoch

__all__ = ["EpochIterator"]

T = TypeVar("T")


class EpochIterator(Generic[T]):
    """Iterator over one epoch; dropping it (``break``, ``del``) stops the epoch.

    Args:
        ep: The epoch it reads.
        timeout: Seconds a ``next()`` may wait for data (None: no limit).
        stall_warning: Seconds of waiting between stall warnings (None: off).
        closed: Whether the pipeline was closed.
        current: The iterator the pipeline serves now (None when none): an
            iterator that is not it was ended by a newer ``iter()`` or a loaded state.
            Both are the pipeline's bound methods, so they keep the pipeline (and
            its threads) alive while iterating.
    """

    def __init__(
        self,
        ep: Epoch,
        timeout: float | None,
        stall_warning: float | None,
        *,
        closed: Callable[[], bool],
        current: Callable[[], object],
    ) -> None:
        self._ep = ep
        self._timeout = timeout
        self._stall_warning = stall_warning
        self._pipe_closed = closed
        self._pipe_current = current
        loop = ep.rt.loop
        self._alive = lambda: loop.alive
        self._finalizer = weakref.finalize(self, ep.stop)

    def __iter__(self) -> EpochIterator[T]:
        return self

    def consumed(self) -> int:
        """Source items handed out so far this epoch."""
        return self._ep.position()

    def __next__(self) -> T:
        ep = self._ep
        i = ep.i
        if i < len(ep.buf):
            ep.i = i + 1
            return ep.buf[i]  # type: ignore[no-any-return]
        return self._refill()

    def _refill(self) -> T:
        ep = self._ep
        ep.consumed = ep.position()
        ep.buf, ep.i, ep.counts, ep.tail = [], 0, None, 0
        if ep.finished:
            raise StopIteration
        if self._pipe_closed():
            raise PipelineClosedError("this pipeline was closed")
        if ep.rt.pid != os.getpid():
            raise RuntimeError(
                "iopipe: this epoch was started in process "
                f"{ep.rt.pid}, before os.fork(); its threads are there. Start a new "
                "epoch here with iter(pipeline)"
            )
        try:
            group = self._get()
        except BaseException as exc:
            self.close()
            err = self._failure(exc)
            if err is not exc:
                raise err from None
            raise
        if group is END:
            ep.finished = True
            self.close()
            raise StopIteration
        if ep.budget is not None:  # the consumer holds this group now, not the pipeline
            ep.budget.release_upto(ep.consumed + group.weight + group.dropped)
        ep.delivered += len(group.items)
        ep.buf = group.items
        ep.counts = group.counts
        ep.tail = group.dropped
        ep.i = 1
        return ep.buf[0]  # type: ignore[no-any-return]

    def _failure(self, exc: BaseException) -> BaseException:
        """What ``next()`` raises for ``exc``, raised while it waited: often ``exc`` itself."""
        if self._pipe_closed() and isinstance(exc, RuntimeError):  # close() from elsewhere
            return PipelineClosedError("this pipeline was closed")
        if isinstance(exc, RuntimeError) and self._pipe_current() is not self:
            return RuntimeError(
                "iopipe: this iterator's epoch was ended by a newer iter(pipeline) "
                "(one epoch runs at a time); read from the new iterator"
            )
        # The user's KeyboardInterrupt or SystemExit, as itself; else exc unchanged.
        return released(exc)

    def _get(self) -> Any:
        """Wait for the next non-empty group; warn every ``stall_warning`` s of waiting.

        The watchdog costs nothing while groups flow: the hand-off's wait only
        expires (and the stall is looked for) once nothing arrived for a while.
        """
        ep = self._ep
        timeout, every = self._timeout, self._stall_warning
        wait = timeout if every is None else every if timeout is None else min(timeout, every)
        waited = 0.0  # seconds this call has waited, counted as waits expire
        while True:
            try:
                group = ep.handoff.get(wait, self._alive)
            except TimeoutError:
                assert wait is not None
                waited += wait
                if timeout is not None and waited >= timeout * (1 - 1e-9):
                    raise self._timed_out(timeout) from None
                assert every is not None
                self._warn(waited, every)
                wait = every if timeout is None else min(every, timeout - waited)
                continue
            if group is END or group.items:
                return group
            ep.consumed += group.dropped  # every item of the group failed (on_error="skip")

    def _timed_out(self, timeout: float) -> StallTimeoutError:
        ep = self._ep
        stall = ep.stall()
        # The consumer gave up on the jobs running now: stopping the epoch and close()
        # do not wait for them (iopipe/runtime/threads.py, iopipe/runtime/watchdog.py).
        abandon_stuck(ep.rt.source, ep.units(), 0.0)
        return StallTimeoutError(
            f"iopipe: no data within timeout={timeout} s; {stall.describe()}", stall
        )

    def _warn(self, waited: float, every: float) -> None:
        ep = self._ep
        stall = ep.stall()
        abandon_stuck(ep.rt.source, ep.units(), every)
        names = [ep.rt.source.name, *(s.name for s in ep.rt.stages)]
        logger.warning(
            "iopipe: no data for %.1f s; %s (queued after each stage, items/capacity: %s)",
            waited,
            stall.describe(),
            queue_summary(names, ep.queues),
        )

    def close(self) -> None:
        """Stop this iterator's epoch now (idempotent); ``next()`` then ends or raises."""
        self._finalizer()
