"""A DataLoader epoch's iterator: batches in sampler order, errors as torch raises them.

:class:`LoaderIter` counts what the consumer takes (``state_dict`` reads the
count); :class:`SkippingLoaderIter` applies ``on_error="skip"``'s accounting in
batch order.  Both read their loader's mode, pipeline and policy: they are the
loader's own parts, kept in their own file for size.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NoReturn

from ..runtime.errors import StageError, item_label, released
from ..runtime.policy import FailurePolicy
from ..runtime.watchdog import Stall
from .fetch import Fetched
from .placement import WARMUP
from .state import EpochPlan
from .workers import NOTHING, Failed

if TYPE_CHECKING:
    from .loader import DataLoader

__all__ = ["LoaderIter", "SkippingLoaderIter", "set_event"]


class LoaderIter:
    """One epoch of a :class:`DataLoader`: batches in sampler order.

    Counts what the consumer takes (for ``state_dict``).  An error in
    ``__getitem__`` is raised as itself, with a note naming the batch and index;
    a timeout raises torch's ``RuntimeError``, naming the stage where items wait.
    """

    plan: EpochPlan  # the epoch, shared with the loader (its position for state_dict)
    over: bool  # ended early (on_error="skip" past max_failures)
    stop_box: list[threading.Event | None]  # the worker source's stop

    def __init__(
        self,
        loader: DataLoader[Any],
        batches: Iterator[Any],
        plan: EpochPlan,
        *,
        len_called: int | None,
        stop: Callable[[], None],
        policy: FailurePolicy | None = None,
        stage: str = "",
    ) -> None:
        """Iterate ``batches`` of ``plan`` for ``loader``.

        ``len_called``: the ``len(loader)`` an iterable dataset reported (torch
        warns past it), else None; ``stop`` ends the epoch's prefetching;
        ``policy`` and ``stage``: ``on_error="skip"``'s count and where it counts.
        """
        self._loader = loader
        self._batches = batches
        self.plan = plan
        self.over = False
        if not hasattr(self, "stop_box"):  # kept when persistent workers reuse the iterator
            self.stop_box = [None]
        self._len_called = len_called
        self._stop_epoch = stop
        self._policy = policy  # read by SkippingLoaderIter only
        self._stage = stage

    def __iter__(self) -> LoaderIter:
        return self

    def __len__(self) -> int:
        return len(self._loader)

    def __next__(self) -> Any:
        plan = self.plan
        if plan.finished:
            raise StopIteration
        if plan.superseded:
            raise RuntimeError(
                "this DataLoader iterator was ended by the loader's close() or "
                "load_state_dict(); take a new one with iter(loader)"
            )
        batch = self._next_batch()
        plan.yielded += 1  # a failed batch counts: the consumer took its error
        if isinstance(batch, Failed):
            raise released(batch.exc)
        if self._len_called is not None and plan.yielded > self._len_called:
            self._warn_length(plan.yielded)
        return batch

    def _warn_length(self, yielded: int) -> None:
        loader = self._loader
        msg = (
            f"Length of IterableDataset {loader.dataset} was reported to be "
            f"{self._len_called}(when accessing len(dataloader)), but {yielded} samples have "
            "been fetched. "
        )
        if loader.num_workers > 0:
            msg += (
                "For multiprocessing data-loading, this could be caused by not properly "
                "configuring the IterableDataset replica at each worker. Please see "
                "https://pytorch.org/docs/stable/data.html#torch.utils.data.IterableDataset "
                "for examples."
            )
        warnings.warn(msg, UserWarning, stacklevel=3)

    def _next_batch(self) -> Any:
        began = time.perf_counter()
        try:
            batch = next(self._batches)
            self.plan.took(began, WARMUP)  # the placement judge's measure (placement.py)
            return batch
        except StopIteration:
            self.plan.finished = True
            raise
        except (StageError, TimeoutError) as exc:
            if self._loader.worker_mode == "main":  # the user's own exception, raised here
                raise
            err = exc
        _reraise(err, self._loader)


def set_event(holder: list[threading.Event | None]) -> None:
    event = holder[0]
    if event is not None:
        event.set()


class SkippingLoaderIter(LoaderIter):
    """:class:`LoaderIter` under ``on_error="skip"``: batches come as ``Fetched``.

    Counts and logs each batch's failures in batch order (consumer thread); a
    batch with nothing left counts as taken (for ``state_dict``) and is passed
    over.  Past ``max_failures`` it raises :class:`~iopipe.TooManyFailures` and
    the epoch ends (later ``next()`` calls raise StopIteration).
    """

    def __next__(self) -> Any:
        if self.over:
            raise StopIteration
        plan = self.plan
        if plan.superseded:
            return super().__next__()  # raises
        while True:
            try:
                batch = self._next_batch()
            except StopIteration:
                self._end_if_over(final=True)
                raise
            plan.yielded += 1
            if isinstance(batch, Failed):
                raise released(batch.exc)
            if not isinstance(batch, Fetched):  # pragma: no cover - every job returns one
                return batch
            self._account(batch)
            if batch.batch is not NOTHING:
                return batch.batch

    def _account(self, fetched: Fetched) -> None:
        policy = self._policy
        assert policy is not None
        policy.items_seen += fetched.n
        stage = self._stage
        try:
            for what, exc, lost in fetched.failures:
                index = not (isinstance(what, str) and what.startswith("batch "))
                policy.record(stage, None, what, exc, lost, what="index" if index else "")
        except BaseException:
            self._stop()
            raise
        self._end_if_over(final=False)

    def _end_if_over(self, *, final: bool) -> None:
        assert self._policy is not None
        try:
            self._policy.check(final=final)
        except BaseException:
            self._stop()
            raise

    def _stop(self) -> None:
        self.over = True  # the plan keeps its position: state_dict() resumes here
        self._stop_epoch()


def _timeout_detail(err: TimeoutError) -> str:
    """The pipeline's timeout message, its stuck jobs named by batch and indices.

    A fetch job's items are ``(batch number, indices)``; the pipeline's own
    message would name them by their position in the loader's feed.
    """
    text = str(err).removeprefix("iopipe: ")
    stall = getattr(err, "stall", None)
    if not isinstance(stall, Stall) or not stall.jobs:
        return text
    job = stall.jobs[0]
    batches = [x for x in job.items if isinstance(x, tuple) and len(x) == 2]
    if not batches:
        return text
    what = "; ".join(f"batch {n} (indices {item_label(index, 120)})" for n, index in batches[:4])
    more = f" and {len(batches) - 4} more" if len(batches) > 4 else ""
    head = text.split(";", 1)[0]
    return (
        f"{head}; items are stuck in stage {stall.stage!r} on {what}{more} "
        f"for {job.running_s:.1f} s"
    )


def _reraise(err: BaseException, loader: DataLoader[Any]) -> NoReturn:
    """Raise what the consumer should see for a pipeline error (outside any except block)."""
    if isinstance(err, TimeoutError):
        detail = _timeout_detail(err)
        if loader.worker_mode == "process":
            detail += " (the torch worker processes)"
        raise RuntimeError(
            f"DataLoader timed out after {loader.timeout} seconds: {detail}"
        ) from err
    cause = err.__cause__
    if isinstance(err, StageError) and cause is not None:
        # The user's own exception (so `except KeyError:` works as with torch);
        # its notes name the batch and index.
        raise cause
    raise err
