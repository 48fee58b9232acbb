"""The DataLoader's jobs: fetch a batch's samples and collate them, in a worker.

:class:`MapFetcher` (``dataset[i]`` in a thread), :class:`AsyncMapFetcher` (an
``async def __getitem__`` awaited on the loop, then :class:`Collate` in a thread)
and :class:`Collate` (an iterable dataset's samples) are the only jobs, under
both failure modes.  Every sample's load goes through one hook,
:meth:`_Jobs.failed`: it names the sample and the batch in a note, then raises
(``on_error="raise"``) or, when the failure is skippable (``on_error="skip"``),
records it so that the batch goes on without that sample.  Under ``"skip"`` a
job returns a :class:`Fetched` (the batch, samples attempted, failures), which
the consumer thread (:class:`~iopipe.loader.iterator.SkippingLoaderIter`)
counts and logs through the loader's :class:`~iopipe.runtime.policy.FailurePolicy`
in batch order; under ``"raise"`` it returns the batch.  Either way a failure
that ends the batch travels as a :class:`~iopipe.loader.workers.Failed` value.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from ..runtime.errors import Interrupted
from ..stages.base import skippable
from .workers import NOTHING, Failed, FirstGate, GovernedSlots, index_label

__all__ = ["AsyncMapFetcher", "Collate", "Fetched", "MapFetcher"]

#: ``(what failed, exception, samples lost)``: an index, or ``"batch N"`` for collate_fn.
Failure = tuple[Any, BaseException, int]


class Fetched:
    """One batch loaded under ``on_error="skip"``.

    Attributes:
        batch: The batch (collated, except from :class:`AsyncMapFetcher`, whose
            samples :class:`Collate` collates next), or ``NOTHING`` when no sample
            of it is left.
        n: Samples attempted.
        failures: What failed, per failure (see :data:`Failure`).
    """

    __slots__ = ("batch", "failures", "n")

    def __init__(self, batch: Any, n: int, failures: list[Failure]) -> None:
        self.batch = batch
        self.n = n
        self.failures = failures


def _sample_note(i: Any, n: int, index: Any) -> str:
    where = f"batch {n}" if index is None else f"batch {n}, indices {index_label(index)}"
    return f"iopipe.DataLoader: dataset[{i!r}] failed ({where})"


def _getitems_note(index: Any, n: int) -> str:
    return f"iopipe.DataLoader: dataset.__getitems__({index_label(index)}) failed (batch {n})"


class _Jobs:
    """What the jobs share: the failure hook and the collation under either mode."""

    def __init__(self, collate_fn: Callable[[Any], Any], skip: bool) -> None:
        self.collate_fn = collate_fn
        self.skip = skip  # on_error="skip": a skippable failure drops the sample

    def failed(self, exc: BaseException, note: str, what: Any, failures: list[Failure]) -> None:
        """The hook around every sample: note ``exc``, then record it (skip) or raise it.

        A KeyboardInterrupt or SystemExit leaves as :class:`~iopipe.runtime.errors.Interrupted`
        (never skipped): raised raw in a task, it would stop the loop thread.
        """
        exc.add_note(note)
        if not isinstance(exc, Exception):
            raise Interrupted(exc) from None
        if not (self.skip and skippable(exc)):
            raise exc
        failures.append((what, exc, 1))

    def finish(self, n: int, samples: Any, attempted: int, failures: list[Failure]) -> Any:
        """Collate batch ``n``: the batch (``"raise"``), or a :class:`Fetched` (``"skip"``).

        Under ``"skip"`` a ``collate_fn`` failure drops the batch (counted as the
        samples it held); with no sample left there is nothing to collate.
        """
        if not self.skip:
            return self._collate(n, samples)
        if samples is NOTHING:
            return Fetched(NOTHING, attempted, failures)
        try:
            return Fetched(self._collate(n, samples), attempted, failures)
        except Exception as exc:
            if not skippable(exc):
                raise
            lost = len(samples) if isinstance(samples, list) else 1
            return Fetched(NOTHING, attempted, [*failures, (f"batch {n}", exc, lost)])

    def _collate(self, n: int, samples: Any) -> Any:
        try:
            return self.collate_fn(samples)
        except Exception as exc:
            exc.add_note(f"iopipe.DataLoader: collate_fn failed on batch {n}")
            raise


class MapFetcher(_Jobs):
    """Fetch and collate one batch of a map-style dataset, as torch's ``_MapDatasetFetcher``.

    Called with ``(n, index)``: the batch number and what the index sampler
    yielded (a list of indices, or one index when ``batch_size=None``).  Runs in
    a worker thread, inside a slot of ``slots`` when set (fetches at once), and
    opens ``gate`` when it is the epoch's first batch.  A failing ``__getitems__``
    under ``"skip"`` is retried one index at a time to find which samples failed.
    """

    def __init__(
        self,
        dataset: Any,
        collate_fn: Callable[[Any], Any],
        auto_collation: bool,
        *,
        skip: bool = False,
    ) -> None:
        super().__init__(collate_fn, skip)
        self.dataset = dataset
        self.auto_collation = auto_collation
        getitems = getattr(dataset, "__getitems__", None)
        self.getitems = getitems if auto_collation and getitems else None
        self.gate: FirstGate | None = None
        self.slots: GovernedSlots | None = None

    def __call__(self, job: tuple[int, Any]) -> Any:
        n, index = job
        try:
            if self.slots is None:
                return self.finish(n, *self.fetch(n, index))
            self.slots.acquire(n)
            ok = False
            try:
                out = self.finish(n, *self.fetch(n, index))
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

    def fetch(self, n: int, index: Any) -> tuple[Any, int, list[Failure]]:
        """Return ``(samples or NOTHING, samples attempted, failures)`` of batch ``n``."""
        ds = self.dataset
        failures: list[Failure] = []
        if not self.auto_collation:  # batch_size=None: one sample per batch
            try:
                return ds[index], 1, failures
            except BaseException as exc:
                self.failed(exc, _sample_note(index, n, None), index, failures)
                return NOTHING, 1, failures
        if self.getitems is not None:
            try:
                samples = self.getitems(index)
                return samples, len(samples), failures
            except BaseException as exc:
                if not (self.skip and skippable(exc)):
                    exc.add_note(_getitems_note(index, n))
                    raise
                # Retried one index at a time below, to find which samples failed.
        out: list[Any] = []
        attempted = 0
        for i in index:
            attempted += 1
            try:
                out.append(ds[i])
            except BaseException as exc:
                self.failed(exc, _sample_note(i, n, index), i, failures)
        # Under "skip" a batch with no sample left (or none asked for) is not collated.
        return (NOTHING if self.skip and not out else out), attempted, failures


class AsyncMapFetcher(MapFetcher):
    """Await an ``async def __getitem__`` (or ``__getitems__``) on the loop.

    The samples of one batch are awaited concurrently; returns ``(n, samples)``
    (``(n, Fetched)`` under ``"skip"``) for a :class:`Collate` job, so collation
    runs in a thread, not on the loop.
    """

    async def __call__(self, job: tuple[int, Any]) -> tuple[int, Any]:
        n, index = job
        try:
            samples, attempted, failures = await self._fetch(n, index)
            return n, (Fetched(samples, attempted, failures) if self.skip else samples)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # named, then raised by the consumer
            return n, Failed(exc)
        finally:
            if self.gate is not None:
                self.gate.passed(n)

    async def _fetch(self, n: int, index: Any) -> tuple[Any, int, list[Failure]]:
        failures: list[Failure] = []
        if not self.auto_collation:
            sample = await self._one(n, index, None, failures)
            return (NOTHING if failures else sample), 1, failures
        if self.getitems is not None:
            try:
                samples = await self.getitems(index)
                return samples, len(samples), failures
            except BaseException as exc:
                if not (self.skip and skippable(exc)):
                    exc.add_note(_getitems_note(index, n))
                    raise
        indices = list(index)
        tasks = [asyncio.ensure_future(self._one(n, i, index, [])) for i in indices]
        try:
            outcomes = await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            raise
        for i, x in zip(indices, outcomes, strict=True):
            if isinstance(x, _Miss):
                failures.append((i, x.exc, 1))
        samples = [x for x in outcomes if not isinstance(x, _Miss)] if failures else list(outcomes)
        return (NOTHING if self.skip and not samples else samples), len(indices), failures

    async def _one(self, n: int, i: Any, index: Any, failures: list[Failure]) -> Any:
        try:
            return await self.dataset[i]
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self.failed(exc, _sample_note(i, n, index), i, failures)
            return _Miss(exc)


class _Miss:
    """The place of a sample that failed, among a batch's gathered outcomes."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class Collate(_Jobs):
    """Collate ``(n, samples)`` into batch ``n`` (runs in a worker thread).

    ``samples`` come from an iterable dataset or from :class:`AsyncMapFetcher`
    (a :class:`Fetched` under ``"skip"``); ``batched``: whether an iterable
    dataset's samples are a list (``batch_size`` set) rather than one sample.
    """

    def __init__(
        self, collate_fn: Callable[[Any], Any], *, skip: bool = False, batched: bool = True
    ) -> None:
        super().__init__(collate_fn, skip)
        self.batched = batched

    def __call__(self, job: tuple[int, Any]) -> Any:
        n, data = job
        if isinstance(data, Failed):
            return data
        if isinstance(data, Fetched):  # from AsyncMapFetcher under "skip"
            samples, attempted, failures = data.batch, data.n, data.failures
        else:
            samples, attempted, failures = data, (len(data) if self.batched else 1), []
        try:
            return self.finish(n, samples, attempted, failures)
        except Exception as exc:
            return Failed(exc)
