"""DataLoader: a drop-in for ``torch.utils.data.DataLoader`` on iopipe's engine.

It is a subclass of torch's class: construction (validation, default samplers,
``collate_fn``, the attributes users read, ``len()``) is torch's own, so the
same arguments give the same errors and the same index batches.  Only iteration
differs: each epoch runs on a :class:`~iopipe.Pipeline` whose source yields the
sampler's index batches and whose ``fetch`` stage calls ``__getitem__`` in
worker threads (or awaits ``async def __getitem__`` on the loop); with
``worker_type="process"`` the source instead drives torch's own worker
processes.  See docs/dataloader.md.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from ..runtime.policy import FailurePolicy
from ..runtime.stats import PipelineStats, StageStats
from ..stages.source import resolve_rank
from .iterator import LoaderIter, SkippingLoaderIter, set_event
from .modes import NeedsProcesses, RngSnapshot, announce
from .options import WORKER_TYPES, LoaderOptions
from .placed import PlacedEpochs
from .placement import attr_ids
from .state import EpochPlan, RngState, advance, make_state, parse_state

__all__ = ["WORKER_TYPES", "DataLoader"]


logger = logging.getLogger("iopipe")

_T_co = TypeVar("_T_co", covariant=True)


class DataLoader(PlacedEpochs[_T_co]):
    """torch's DataLoader, with iopipe's background loop doing the loading.

    Takes every argument of ``torch.utils.data.DataLoader`` with the same meaning,
    validation and resulting batches (same samplers, same RNG draws, same
    collation), plus:

    Args:
        worker_type: ``"thread"`` (default): ``__getitem__`` runs in
            ``max(1, num_workers)`` threads of this process, prefetched in the
            background; ``num_workers=0`` still means one background thread, so
            ``__getitem__`` is never called concurrently.  ``"process"``: torch's
            own worker processes (for datasets that hold the GIL), iterated from a
            background thread.  ``"main"``: in the thread that iterates, nothing
            ahead (torch's ``num_workers=0``; for datasets that must stay on one
            thread).
        rank, world_size, shard: Iterable datasets only: deal the samples
            round-robin over ``world_size`` ranks and keep this rank's share, of
            equal length on every rank (``shard="pad"`` repeats samples from the
            first round, ``"drop"`` drops the last incomplete round).  Sharding
            is on when any of the three is given; missing ``rank``/``world_size``
            come from the initialised ``torch.distributed`` group.  Map-style
            datasets shard with ``DistributedSampler`` as with torch.
        on_error: ``"raise"`` (default): as torch, a failing ``__getitem__``
            raises.  ``"skip"``: a sample whose ``__getitem__`` fails is left out
            of its batch (which may come out short; a batch with no sample left,
            or whose ``collate_fn`` fails, is dropped), counted in
            :meth:`stats` and logged once on the ``"iopipe"`` logger with its
            index.  Thread and main workers only (``ValueError`` with
            ``worker_type="process"``).  See docs/dataloader.md.
        max_failures: With ``on_error="skip"``: samples that may fail per epoch
            (an int), a share of the samples attempted (a float in (0, 1),
            checked from 100 samples on and at the end of the epoch), or None
            (no limit, the default).  Past it the iterator raises
            :class:`~iopipe.TooManyFailures` and the epoch ends.

    Iterating: as torch's; a second iterator taken while the first is held
    (``zip(loader, loader)``) runs an independent epoch on its own workers.
    :meth:`state_dict` and :meth:`load_state_dict` resume the first exactly after
    the batches the consumer took.
    :meth:`close` (or ``with``) stops the background threads at once; dropping
    the loader does it too.
    """

    _current: weakref.ref[LoaderIter] | None  # the epoch's iterator
    # Copies running the other live iterators, oldest first (see _side_iter).
    _sides: list[tuple[weakref.ref[LoaderIter], DataLoader[Any]]]

    def __init__(
        self,
        dataset: Any,
        batch_size: int | None = 1,
        shuffle: bool | None = None,
        sampler: Any = None,
        batch_sampler: Any = None,
        num_workers: int = 0,
        collate_fn: Callable[[Any], Any] | None = None,
        pin_memory: bool = False,
        drop_last: bool = False,
        timeout: float = 0,
        worker_init_fn: Callable[[int], None] | None = None,
        multiprocessing_context: Any = None,
        generator: torch.Generator | None = None,
        *,
        prefetch_factor: int | None = None,
        persistent_workers: bool = False,
        pin_memory_device: str = "",
        in_order: bool = True,
        worker_type: str = "auto",
        rank: int | None = None,
        world_size: int | None = None,
        shard: str | None = None,
        on_error: str = "raise",
        max_failures: int | float | None = None,
    ) -> None:
        options = LoaderOptions(worker_type, rank, world_size, shard, on_error, max_failures)
        # Read by check_worker_number_rationality() during torch's __init__.
        self.worker_type = worker_type
        super().__init__(
            dataset,
            batch_size,
            shuffle,
            sampler,
            batch_sampler,
            num_workers,
            collate_fn,
            pin_memory,
            drop_last,
            timeout,
            worker_init_fn,
            multiprocessing_context,
            generator,
            prefetch_factor=prefetch_factor,
            persistent_workers=persistent_workers,
            pin_memory_device=pin_memory_device,
            in_order=in_order,
        )
        self.rank, self.world_size, self.shard = rank, world_size, shard
        self.on_error, self.max_failures = on_error, max_failures
        start = options.decide(
            self.dataset, num_workers=num_workers, timeout=timeout, worker_init_fn=worker_init_fn
        )
        self._init_epochs(options, start, generator)
        self._current = None
        self._sides = []
        self._announced = start.mode != "probe" and worker_type == "auto"  # logged once
        if self._announced:
            announce(self, start.mode, start.reason)

    # -- torch hooks -------------------------------------------------------------
    def __len__(self) -> int:
        """Batches per epoch, as torch computes it (per rank when sharding an iterable)."""
        if not (self._iterable and self._options.sharded):
            return super().__len__()
        n = len(self.dataset)  # type: ignore[arg-type]
        _, world = resolve_rank(self.rank, self.world_size)
        n = -(-n // world) if self._shard_mode == "pad" else n // world
        if self.batch_size is None:
            return n
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    # -- iteration -------------------------------------------------------------
    def __iter__(self) -> LoaderIter:  # type: ignore[override]
        """Start an epoch and return its iterator (ending a finished or dropped one's).

        The RNG draws of the epoch happen where torch makes them: the base seed
        here, in the calling thread; the sampler's here too with workers, at the
        first ``next()`` with ``num_workers=0`` on the calling thread.
        """
        mine = self._current() if self._current is not None else None
        reuse = mine if self.persistent_workers and self.num_workers > 0 else None
        if mine is not None and reuse is None and not self._done(mine):
            return self._side_iter()
        if self._mode == "probe" and self.num_workers > 0:
            return self._iter_probing()
        if self._place():
            return self._iter_trial(reuse)
        return self._iter_epoch(reuse)  # a persistent one: torch resets and returns it

    def _done(self, it: LoaderIter) -> bool:
        """Whether ``it`` has nothing left to hand out (ended, or every batch taken)."""
        plan = it.plan
        if plan.finished or plan.superseded or it.over:
            return True
        return self._taken_all(plan)

    def _side_iter(self) -> LoaderIter:
        """A second live iterator (``zip(loader, loader)``): a copy of this loader runs it.

        torch's iterators are independent: each draws its own base seed and
        sampler order from the shared sampler and generator, and has its own
        workers.  The copy shares the dataset, sampler and generator, has its own
        threads or processes, which stop when its iterator is dropped (or at
        this loader's ``close()``/``load_state_dict()``).  The epoch count goes
        on across copies: it counts ``iter()`` calls.
        """
        self._sides = [(r, s) for r, s in self._sides if r() is not None]
        side = copy.copy(self)
        side._reset_resources()
        side._announced = True  # the mode is this loader's to announce
        it = side.__iter__()
        weakref.finalize(it, side.close)  # as torch's iterator shuts its workers down
        self._sides.append((weakref.ref(it), side))
        self._epoch = side._epoch
        return it

    def _lead(self) -> DataLoader[Any]:
        """The loader whose iterator ``state_dict()`` and ``stats()`` describe.

        This loader's own while someone holds it; once it is dropped, the newest
        live copy's (``it = iter(loader)`` in the middle of an epoch: the new
        epoch runs on a copy).  Changes nothing: ``stats()`` may be called from
        any thread.
        """
        if self._current is not None and self._current() is not None:
            return self
        for ref, side in self._sides[::-1]:
            if ref() is not None:
                return side
        return self

    def _dropped(self, plan: EpochPlan, thread: int) -> None:
        """This loader's iterator of ``plan`` was dropped: end its epoch, as torch's ``__del__``.

        Its workers and prefetched batches go at once, not at the next ``iter()``.
        The position stays for ``state_dict()`` (a ``break``, then saving), unless
        a newer epoch runs on a copy (``it = iter(loader)`` mid-epoch).  Only in
        the thread that made the iterator: a garbage collection pass elsewhere
        leaves it to the next ``iter()`` or ``close()``.
        """
        if self._plan is not plan or plan.finished or threading.get_ident() != thread:
            return
        self._end_epoch()
        if any(ref() is not None for ref, _ in self._sides):
            self._plan = None

    def _close_sides(self) -> None:
        sides, self._sides = self._sides, []
        errors = []
        for _, side in sides:
            try:
                side.close()
            except Exception as exc:  # every copy is closed, whatever one raised
                errors.append(exc)
        if errors:
            raise errors[0]

    def _reset_resources(self) -> None:
        """Forget the threads, processes and epochs of the loader this one was copied from."""
        self._fresh_resources(record=self._stream.record)
        self._current = None
        self._sides = []
        if self._policy is not None:
            self._policy = FailurePolicy(self.max_failures)

    def _iter_probing(self) -> LoaderIter:
        """The first epoch of ``worker_type="auto"`` with workers: try threads, watching batch 0.

        If the watched batch needs torch's worker processes, every RNG is set back
        to where this call found it and the epoch starts again on processes, so
        the draws torch makes happen once, as torch makes them.
        """
        rngs = RngSnapshot.take()
        gens = RngState.capture(self._gens, False)
        self._mode, self._probing = "thread", True
        self._first_vars = attr_ids(self.dataset)  # what a later trial on processes checks
        try:
            return self._iter_epoch()
        except NeedsProcesses:
            rngs.restore()
            gens.apply(self._gens)
            self._stream.record = True
            return self._iter_epoch()
        finally:
            self._probing = False

    def _iter_epoch(self, reuse: LoaderIter | None = None) -> LoaderIter:
        self._end_epoch()
        new_workers = self._mode == "process" and self._procs.will_start
        before = self._epoch, self._pending
        plan, hand_draw, pre_global = self._plan_epoch(new_workers)
        try:
            batches = self._start(plan, hand_draw)
        except BaseException:
            self._epoch, self._pending = before  # a failed start consumes no state
            raise
        finally:
            if pre_global is not None:
                torch.set_rng_state(pre_global)
        self._pin_warnings()
        self._iterators += 1
        self._plan = plan
        if self._policy is not None:
            self._policy.reset()
        iter_cls = LoaderIter if self._policy is None else SkippingLoaderIter
        parts: dict[str, Any] = {
            "len_called": self._IterableDataset_len_called if self._iterable else None,
            "stop": self._stop_prefetch,
            "policy": self._policy,
            "stage": self._policy_stage,
        }
        if reuse is None:
            it = iter_cls(self, batches, plan, **parts)
            # A dropped iterator releases the source thread of its latest epoch.
            weakref.finalize(it, set_event, it.stop_box)
            if not (self.persistent_workers and self.num_workers > 0):
                weakref.finalize(it, _dropped, weakref.ref(self), plan, threading.get_ident())
        else:
            it = reuse
            it.__init__(self, batches, plan, **parts)  # type: ignore[misc]
        it.stop_box[0] = self._procs.stop_event
        self._current = weakref.ref(it)
        return it

    # -- worker processes ---------------------------------------------------------

    # -- lifecycle ---------------------------------------------------------------

    def close(self) -> None:
        """Stop the epoch in progress and release every thread and worker process.

        Idempotent; the loader can be iterated again afterwards (threads and
        workers start again).  Waits at most about 10 s for work in flight.
        """
        pipe, self._feed = self._pipe, None
        try:
            self._close_sides()
            self._end_epoch()
        finally:  # every step runs, whatever an earlier one raised
            self._pipe = None
            try:
                if pipe is not None:
                    pipe.close()
            finally:
                self._procs.close()

    def __enter__(self) -> DataLoader[_T_co]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> PipelineStats:
        """Per-stage statistics of the current (or last) epoch; see :class:`~iopipe.Pipeline`."""
        lead = self._lead()
        if lead is not self:
            return lead.stats()
        if self._pipe is None and self._helped_run is not None:
            stats = self._helped_run.stats(self._epoch)
        elif self._pipe is None:
            stats = PipelineStats((), 0.0, 0, 0.0, self._epoch)
        else:
            stats = self._pipe.stats()
        if self._policy is None or not self._policy.counts:
            return stats
        # Samples skipped under on_error="skip" are counted by the consumer thread
        # (worker_type="main" has no stages: the count gets a row of its own).
        counts = self._policy.counts
        stages = [
            dataclasses.replace(s, failures=counts[s.name]) if s.name in counts else s
            for s in stats.stages
        ]
        names = {s.name for s in stages}
        stages += [_failures_row(k, v) for k, v in counts.items() if k not in names]
        return dataclasses.replace(stats, stages=tuple(stages))

    @property
    def _policy_stage(self) -> str:
        """The stage a skipped sample is counted in: where ``__getitem__``/collation runs."""
        return "collate" if self._iterable else "fetch"

    # -- state -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Return where the consumer stands, small and JSON/pickle-serialisable.

        Counts the batches the consumer took (not those prefetched).  Holds the
        epoch number, the batches consumed in it, and the RNG states its sampler
        started from (base64), never sample data.  With several live
        iterators it describes the first one taken, or the newest still held
        once that one is dropped.
        """
        lead = self._lead()
        if lead is not self:
            return lead.state_dict()
        if self._pending is not None:
            epoch, batches, in_epoch, rng, base_seed = self._pending
            return make_state(epoch, batches, in_epoch, rng, base_seed)
        plan = self._plan
        if plan is not None and not plan.finished and not self._taken_all(plan):
            return make_state(plan.epoch, plan.consumed, True, plan.snapshot, True)
        # Between epochs: record the generators as the next epoch's sampler will find them.
        base_seed = not (self.persistent_workers and self._iterators > 0)
        rng = None
        if self._gens:
            states = list(RngState.capture(self._gens, False).generators)
            if self.generator is not None and base_seed:
                states[0] = advance(states[0])
            rng = RngState(tuple(states), None)
        return make_state(self._epoch, 0, False, rng, base_seed)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Make the next ``iter()`` resume from ``state`` (see :meth:`state_dict`).

        The resumed epoch yields exactly the batches the uninterrupted run yields
        after the ones counted in ``state`` (same sampler arguments required;
        ``DistributedSampler.set_epoch`` is the caller's, as with torch).

        Raises:
            ValueError: ``state`` is malformed or does not fit this loader.
        """
        epoch, batches, in_epoch, rng, base_seed = parse_state(state)
        parsed = None if rng is None else RngState.from_json(rng, len(self._gens))
        if parsed is not None and parsed.global_state is not None and not self._use_global:
            parsed = RngState(parsed.generators, None)
        self._close_sides()
        self._end_epoch()
        self._plan = None
        self._epoch = epoch
        self._pending = (epoch, batches, in_epoch, parsed, base_seed)

    def __repr__(self) -> str:
        return (
            f"<iopipe.DataLoader batch_size={self.batch_size} num_workers={self.num_workers} "
            f"worker_type={self.worker_type!r} mode={self._mode!r}>"
        )


def _dropped(ref: weakref.ref[DataLoader[Any]], plan: EpochPlan, thread: int) -> None:
    loader = ref()
    if loader is not None:
        loader._dropped(plan, thread)


def _failures_row(name: str, failures: int) -> StageStats:
    return StageStats(name, 1, 0, 0, 0.0, 0.0, 0.0, 0, 0.0, 0, 0.0, failures=failures)
