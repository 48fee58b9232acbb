"""The DataLoader's jobs under ``on_error="skip"``: batches without their failed samples.

Each job returns a :class:`Fetched`: the batch collated from the samples that
loaded (or ``NOTHING`` when none did, or when ``collate_fn`` failed), how many
samples were attempted and what failed.  The consumer thread (``LoaderIter``)
counts and logs the failures through the loader's
:class:`~iopipe.runtime.policy.FailurePolicy`, in batch order, and hands out the batch.
Under ``on_error="raise"`` none of this runs: the loader uses the plain jobs of
``_workers``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ..stages.base import skippable
from .workers import (
    NOTHING,
    AsyncMapFetcher,
    Collate,
    Failed,
    MapFetcher,
    getitems_note,
    index_label,
)

__all__ = ["Fetched", "SkippingAsyncMapFetcher", "SkippingCollate", "SkippingMapFetcher"]


class Fetched:
    """One batch loaded under ``on_error="skip"``.

    Attributes:
        batch: The batch (collated, except from :class:`SkippingAsyncMapFetcher`,
            whose samples a :class:`SkippingCollate` collates next), or
            ``NOTHING`` when no sample of it is left.
        n: Samples attempted.
        failures: ``(what failed, exception, samples lost)`` per failure: an
            index (one sample), or ``"batch N"`` when ``collate_fn`` failed.
    """

    __slots__ = ("batch", "failures", "n")

    def __init__(self, batch: Any, n: int, failures: list[tuple[Any, BaseException, int]]) -> None:
        self.batch = batch
        self.n = n
        self.failures = failures


def _noted(exc: BaseException, note: str) -> BaseException:
    exc.add_note(note)
    return exc


def collate_skipping(
    collate_fn: Any, n: int, samples: Any, attempted: int, failures: list[Any]
) -> Fetched:
    """Collate what is left of batch ``n``; a ``collate_fn`` failure drops the batch."""
    if samples is NOTHING:
        return Fetched(NOTHING, attempted, failures)
    try:
        batch = collate_fn(samples)
    except Exception as exc:
        exc.add_note(f"iopipe.DataLoader: collate_fn failed on batch {n}")
        if not skippable(exc):
            raise
        lost = len(samples) if isinstance(samples, list) else 1
        return Fetched(NOTHING, attempted, [*failures, (f"batch {n}", exc, lost)])
    return Fetched(batch, attempted, failures)


class SkippingMapFetcher(MapFetcher):
    """:class:`MapFetcher` that drops the samples whose ``__getitem__`` fails.

    A failing ``__getitems__`` is retried one index at a time (``dataset[i]``)
    to find which samples failed.  MemoryError (and what is not an Exception)
    still fails the batch, as under ``on_error="raise"``.
    """

    def __call__(self, job: tuple[int, Any]) -> Any:
        n, index = job
        try:
            if self.slots is None:
                return self.load(n, index)
            with self.slots:
                return self.load(n, index)
        except Exception as exc:
            return Failed(exc)
        finally:
            if self.gate is not None:
                self.gate.passed(n)

    def load(self, n: int, index: Any) -> Fetched:
        """Fetch and collate batch ``n`` without its failed samples (worker thread)."""
        samples, attempted, failures = self.fetch_skipping(n, index)
        return collate_skipping(self.collate_fn, n, samples, attempted, failures)

    def fetch_skipping(self, n: int, index: Any) -> tuple[Any, int, list[Any]]:
        """Return ``(samples or NOTHING, samples attempted, failures)`` of batch ``n``."""
        ds = self.dataset
        if not self.auto_collation:  # batch_size=None: one sample per batch
            try:
                return ds[index], 1, []
            except Exception as exc:
                note = f"iopipe.DataLoader: dataset[{index!r}] failed (batch {n})"
                if not skippable(exc):
                    raise _noted(exc, note) from None
                return NOTHING, 1, [(index, _noted(exc, note), 1)]
        if self.getitems is not None:
            try:
                samples = self.getitems(index)
                return samples, len(samples), []
            except Exception as exc:
                if not skippable(exc):
                    raise _noted(exc, getitems_note(index, n)) from None
                # Retried one index at a time below, to find which samples failed.
        out: list[Any] = []
        failures: list[Any] = []
        attempted = 0
        for i in index:
            attempted += 1
            try:
                out.append(ds[i])
            except Exception as exc:
                note = f"iopipe.DataLoader: dataset[{i!r}] failed (batch {n}, indices {index_label(index)})"
                if not skippable(exc):
                    raise _noted(exc, note) from None
                failures.append((i, _noted(exc, note), 1))
        return (out if out else NOTHING), attempted, failures


class SkippingAsyncMapFetcher(AsyncMapFetcher):
    """:class:`AsyncMapFetcher` that drops the samples whose ``__getitem__`` fails.

    Returns ``(n, Fetched)`` with the samples uncollated, for :class:`SkippingCollate`.
    """

    async def __call__(self, job: tuple[int, Any]) -> tuple[int, Any]:
        n, index = job
        try:
            return n, await self._fetch_skipping(n, index)
        except Exception as exc:
            return n, Failed(exc)
        finally:
            if self.gate is not None:
                self.gate.passed(n)

    async def _fetch_skipping(self, n: int, index: Any) -> Fetched:
        if not self.auto_collation:
            outcome = await self._attempt(n, index, None)
            if isinstance(outcome, _Miss):
                return Fetched(NOTHING, 1, [(index, outcome.exc, 1)])
            return Fetched(outcome, 1, [])
        if self.getitems is not None:
            try:
                samples = await self.getitems(index)
                return Fetched(samples, len(samples), [])
            except Exception as exc:
                if not skippable(exc):
                    raise _noted(exc, getitems_note(index, n)) from None
        indices = list(index)
        tasks = [asyncio.ensure_future(self._attempt(n, i, index)) for i in indices]
        try:
            outcomes = await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            raise
        samples = [x for x in outcomes if not isinstance(x, _Miss)]
        failures = [
            (i, x.exc, 1) for i, x in zip(indices, outcomes, strict=True) if isinstance(x, _Miss)
        ]
        return Fetched(samples if samples else NOTHING, len(indices), failures)

    async def _attempt(self, n: int, i: Any, index: Any) -> Any:
        try:
            return await self._one(n, i, index)  # notes the exception with the batch
        except Exception as exc:
            if not skippable(exc):
                raise
            return _Miss(exc)


class _Miss:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class SkippingCollate(Collate):
    """:class:`Collate` whose failure drops the batch; returns a :class:`Fetched`.

    Args:
        collate_fn: As for :class:`Collate`.
        batched: Whether each job's data is a list of samples (``batch_size``
            set) rather than one sample.
    """

    def __init__(self, collate_fn: Any, batched: bool) -> None:
        super().__init__(collate_fn)
        self.batched = batched

    def __call__(self, job: tuple[int, Any]) -> Any:
        n, data = job
        if isinstance(data, Failed):
            return data
        if isinstance(data, Fetched):  # from SkippingAsyncMapFetcher
            samples, attempted, failures = data.batch, data.n, data.failures
        else:  # an iterable dataset's samples
            samples, attempted, failures = data, (len(data) if self.batched else 1), []
        try:
            return collate_skipping(self.collate_fn, n, samples, attempted, failures)
        except Exception as exc:
            return Failed(exc)
