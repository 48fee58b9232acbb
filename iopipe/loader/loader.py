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
import inspect
import itertools
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, TypeVar

import torch
from torch.utils.data import DataLoader as _TorchDataLoader
from torch.utils.data import IterableDataset

from ..pipeline.builder import Pipeline
from ..runtime.errors import StageError, item_label, released
from ..runtime.policy import FailurePolicy, check_policy
from ..runtime.stats import PipelineStats, StageStats
from ..runtime.watchdog import Stall
from ..stages.source import SHARD_MODES, _shard_iter, resolve_rank
from .modes import (
    PROBE_TIMEOUT_S,
    RngSnapshot,
    announce,
    probe_here,
    probe_in_thread,
    static_mode,
)
from .skip import (
    Fetched,
    SkippingAsyncMapFetcher,
    SkippingCollate,
    SkippingMapFetcher,
)
from .state import (
    STATE_VERSION,
    EpochPlan,
    IndexStream,
    RngState,
    advance,
    draw_base_seed,
    parse_state,
    rng_sources,
)
from .workers import (
    NOTHING,
    AsyncFeed,
    AsyncMapFetcher,
    Collate,
    Failed,
    Feed,
    FirstGate,
    GovernedSlots,
    MapFetcher,
    RankShard,
    WorkerProcesses,
    inner_loader,
    iterable_batches,
    numbered,
    run_inline,
)

__all__ = ["WORKER_TYPES", "DataLoader"]

WORKER_TYPES = ("auto", "thread", "process", "main")

_T_co = TypeVar("_T_co", covariant=True)


def _is_async(dataset: Any) -> bool:
    cls = type(dataset)
    return inspect.iscoroutinefunction(
        getattr(cls, "__getitem__", None)
    ) or inspect.iscoroutinefunction(getattr(cls, "__getitems__", None))


class DataLoader(_TorchDataLoader[_T_co]):
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
        check_policy(on_error, max_failures)
        if worker_type not in WORKER_TYPES:
            raise ValueError(f"worker_type must be one of {WORKER_TYPES}, got {worker_type!r}")
        if shard is not None and shard not in SHARD_MODES:
            raise ValueError(f"shard must be one of {SHARD_MODES} or None, got {shard!r}")
        if rank is not None or world_size is not None:
            resolve_rank(rank, world_size)  # validate now; resolved again per epoch
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
        self.rank, self.world_size = rank, world_size
        self.shard = shard
        self._sharded = shard is not None or rank is not None or world_size is not None
        self._iterable = isinstance(self.dataset, IterableDataset)
        if self._sharded and not self._iterable:
            raise ValueError(
                "rank, world_size and shard apply to iterable-style datasets; for a map-style "
                "dataset pass sampler=torch.utils.data.DistributedSampler(dataset)"
            )
        self._async = not self._iterable and _is_async(self.dataset)
        mode, reason = static_mode(
            worker_type,
            num_workers=num_workers,
            iterable=self._iterable,
            init_fn=worker_init_fn is not None,
            is_async=self._async,
            sharded=self._sharded,
        )
        if worker_type == "auto" and on_error == "skip" and mode == "process":
            mode, reason = "thread", "on_error='skip' runs on threads"
        self._mode, self._mode_reason = mode, reason  # "probe": decided by the first batch
        self._probing = False  # the first epoch's first batch is being watched
        if mode == "main" and timeout > 0 and worker_type != "auto":
            raise ValueError(
                f"timeout needs a background worker; got timeout={timeout!r} with "
                f"worker_type={worker_type!r}, num_workers={num_workers!r}"
            )
        if worker_init_fn is not None and worker_type == "thread":
            warnings.warn(
                "iopipe.DataLoader: worker_init_fn is called in worker processes only "
                "(worker_type='process'); thread workers share this process and never call it",
                UserWarning,
                stacklevel=2,
            )
        if on_error == "skip" and worker_type == "process" and num_workers > 0:
            raise ValueError(
                "on_error='skip' needs worker_type='thread' or 'main' (worker processes run "
                f"torch's own fetcher), got worker_type={worker_type!r}, "
                f"num_workers={num_workers!r}"
            )
        self.on_error, self.max_failures = on_error, max_failures
        # Counts the samples attempted in policy.items_seen (no closure over self:
        # a cycle would keep the loader, and its threads, alive until a gc pass).
        self._policy = FailurePolicy(max_failures) if on_error == "skip" else None
        if self._async and self._mode != "thread":
            raise ValueError(
                f"an async def __getitem__ needs worker_type='thread', got worker_type={worker_type!r}"
            )
        if self._iterable:
            self._gens: list[torch.Generator] = [generator] if generator is not None else []
            self._use_global = False
        else:
            self._gens, self._use_global = rng_sources(generator, self._index_sampler)
        self._stream = IndexStream(
            self._index_sampler, self._gens, self._use_global, record=self._mode == "process"
        )
        self._epoch = 0
        self._iterators = 0  # iterators this instance created (torch's persistent-worker rule)
        self._plan: EpochPlan | None = None
        self._pending: tuple[int, int, bool, RngState | None, bool] | None = None
        self._pipe: Pipeline[Any] | None = None
        self._slots: GovernedSlots | None = None  # thread workers' fetch bound
        self._feed: Feed | None = None
        self._gate: FirstGate | None = None
        self._inner: _TorchDataLoader[Any] | None = None
        self._procs = WorkerProcesses(persistent_workers)
        self._primed: _Primed | None = None  # the pipeline's job function
        self._current: weakref.ref[_LoaderIter] | None = None  # the epoch's iterator
        # Copies running the other live iterators, oldest first (see _side_iter).
        self._sides: list[tuple[weakref.ref[_LoaderIter], DataLoader[Any]]] = []
        self._announced = mode != "probe" and worker_type == "auto"  # logged once
        if self._announced:
            announce(self, mode, reason)

    # -- torch hooks -------------------------------------------------------------
    def __len__(self) -> int:
        """Batches per epoch, as torch computes it (per rank when sharding an iterable)."""
        if not (self._iterable and self._sharded):
            return super().__len__()
        n = len(self.dataset)  # type: ignore[arg-type]
        _, world = resolve_rank(self.rank, self.world_size)
        n = -(-n // world) if self._shard_mode == "pad" else n // world
        if self.batch_size is None:
            return n
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def _shard_mode(self) -> str:
        return self.shard or "pad"

    # -- iteration -------------------------------------------------------------
    def __iter__(self) -> _LoaderIter:  # type: ignore[override]
        """Start an epoch and return its iterator (ending a finished or dropped one's).

        The RNG draws of the epoch happen where torch makes them: the base seed
        here, in the calling thread; the sampler's here too with workers, at the
        first ``next()`` with ``num_workers=0`` on the calling thread.
        """
        mine = self._current() if self._current is not None else None
        if mine is not None and self.persistent_workers and self.num_workers > 0:
            return self._iter_epoch(reuse=mine)  # torch resets and returns the same one
        if mine is not None and not self._done(mine):
            return self._side_iter()
        if self._mode == "probe" and self.num_workers > 0:
            return self._iter_probing()
        return self._iter_epoch()

    def _done(self, it: _LoaderIter) -> bool:
        """Whether ``it`` has nothing left to hand out (ended, or every batch taken)."""
        plan = it._plan
        if plan.finished or plan.superseded or it._over:
            return True
        return self._taken_all(plan)

    def _taken_all(self, plan: EpochPlan) -> bool:
        """Whether the consumer took ``len(loader)`` batches of a map-style epoch.

        A loop that stops after ``len(loader)`` batches without a StopIteration
        (``for _ in range(len(loader))``) is done with the epoch.
        """
        if self._iterable:
            return False
        try:
            return plan.consumed >= len(self)
        except TypeError:  # a sampler without a length
            return False

    def _side_iter(self) -> _LoaderIter:
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
        for ref, side in reversed(self._sides):
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
        self._pipe = self._slots = self._feed = self._gate = self._inner = None
        self._primed = self._plan = self._pending = self._current = None
        self._sides = []
        self._procs = WorkerProcesses(self.persistent_workers)
        self._stream = IndexStream(
            self._index_sampler, self._gens, self._use_global, record=self._stream.record
        )
        if self._policy is not None:
            self._policy = FailurePolicy(self.max_failures)

    def _iter_probing(self) -> _LoaderIter:
        """The first epoch of ``worker_type="auto"`` with workers: try threads, watching batch 0.

        If the watched batch needs torch's worker processes, every RNG is set back
        to where this call found it and the epoch starts again on processes, so
        the draws torch makes happen once, as torch makes them.
        """
        rngs = RngSnapshot.take()
        gens = RngState.capture(self._gens, False)
        self._mode, self._probing = "thread", True
        try:
            return self._iter_epoch()
        except _NeedsProcesses:
            rngs.restore()
            gens.apply(self._gens)
            self._stream.record = True
            return self._iter_epoch()
        finally:
            self._probing = False

    def _iter_epoch(self, reuse: _LoaderIter | None = None) -> _LoaderIter:
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
        iter_cls = _LoaderIter if self._policy is None else _SkippingLoaderIter
        if reuse is None:
            it = iter_cls(self, batches, plan)
            # A dropped iterator releases the source thread of its latest epoch.
            weakref.finalize(it, _set_event, it._stop_box)
            if not (self.persistent_workers and self.num_workers > 0):
                weakref.finalize(it, _dropped, weakref.ref(self), plan, threading.get_ident())
        else:
            it = reuse
            it.__init__(self, batches, plan)  # type: ignore[misc]
        it._stop_box[0] = self._procs.stop_event
        self._current = weakref.ref(it)
        return it

    def _settle(self, mode: str, reason: str) -> str:
        """Fix the workers ``worker_type="auto"`` runs on (once per loader); log why."""
        if mode == "process" and self._policy is not None:
            warnings.warn(
                f"iopipe.DataLoader: on_error='skip' runs on threads, but {reason}: torch's "
                "per-worker semantics (worker seeds, get_worker_info()) do not hold there; "
                "pass worker_type='thread' to say this is intended",
                UserWarning,
                stacklevel=4,
            )
            mode = "thread"
        self._mode, self._mode_reason = mode, reason
        if not self._announced:
            announce(self, mode, reason)
            self._announced = True
        return mode

    def _plan_epoch(self, new_workers: bool) -> tuple[EpochPlan, bool, torch.Tensor | None]:
        """Decide the epoch's RNG replay; return (plan, draw the base seed by hand, global RNG to restore).

        torch draws a base seed for every new iterator: each epoch, or only the
        first with persistent workers.  Worker processes draw it inside torch;
        otherwise we draw it by hand.  A resumed state says whether the
        uninterrupted run would draw it; a draw torch makes that the run would not
        is undone by setting the pre-draw state at the sampler's start.
        """
        plan = EpochPlan(self._epoch)
        self._epoch += 1
        pending, self._pending = self._pending, None
        should_draw = not (self.persistent_workers and self._iterators > 0)
        pre_global = None
        if pending is not None:
            _, batches, in_epoch, rng, base_seed = pending
            plan.skip = batches
            plan.at_start = rng
            if in_epoch:
                # The epoch's draws happened before the state was taken: replay them
                # and leave the global RNG as the caller has it now.
                pre_global = torch.get_rng_state()
            else:
                should_draw = base_seed
        auto_draw = new_workers
        if auto_draw and not should_draw and pre_global is None:
            at = plan.at_start or RngState.capture(self._gens, False)
            if self.generator is None:
                at = RngState(at.generators, RngState.capture([], True).global_state)
            plan.at_start = at
        return plan, should_draw and not auto_draw, pre_global

    def _start(self, plan: EpochPlan, hand_draw: bool) -> Iterator[Any]:
        """Run the epoch's set-up in this thread; return the iterator of its batches."""
        if self._mode == "process":
            return self._start_process(plan, hand_draw)
        start = self._epoch_jobs(plan, hand_draw)
        if self._mode in ("main", "probe"):  # torch's num_workers=0: nothing before next()
            return self._inline_epoch(start, plan)
        jobs = start()
        primed = None
        if self._probing:
            jobs, primed = self._probe_first(jobs)
        return self._on_pipeline(jobs, plan, primed)

    def _epoch_jobs(self, plan: EpochPlan, hand_draw: bool) -> Callable[[], Iterator[Any]]:
        """Make the epoch's draws of ``iter()``; return what starts the sampler's.

        torch draws the base seed in ``iter()``; the sampler (or an iterable
        dataset) makes its draws when the first batch is asked for.
        """
        if self._iterable:  # torch calls iter(dataset) in iter(loader) too
            if hand_draw:
                draw_base_seed(self.generator)
            self._at_sampler_start(plan)
            it = iterable_batches(self._dataset_iter(), self.batch_size, self.drop_last, plan.skip)
            return lambda: it
        self._stream.plan = plan
        gen = iter(self._stream)
        if hand_draw:
            draw_base_seed(self.generator)
        return lambda: numbered(next(gen, NOTHING), gen, plan.skip)

    def _inline_epoch(self, start: Callable[[], Iterator[Any]], plan: EpochPlan) -> Iterator[Any]:
        """``num_workers=0``: everything from the first ``next()`` on, in the calling thread.

        Under ``worker_type="auto"`` the first epoch's first batch is watched
        (:func:`~iopipe.loader.modes.probe_here`): a dataset that drew from a global
        RNG stays here, as torch runs it; the others go on in a background thread.
        """
        jobs = start()
        fn: Callable[[Any], Any] = self._job_fn()
        if self._mode == "probe":
            # An iterable dataset draws while it is iterated; a sampler's own draws
            # (before the first job) are the same whatever runs the batches.
            job0 = NOTHING if self._iterable else next(jobs, NOTHING)
            if job0 is NOTHING and not self._iterable:
                return
            probe = probe_here(lambda: _first_job(fn, job0, jobs))
            job0, probe.outcome = probe.outcome
            if job0 is NOTHING:
                return
            jobs = itertools.chain([job0], jobs)
            primed = (job0[0], probe.outcome)
            if probe.needs is None:
                self._settle("thread", "the first batch drew from no global RNG")
                yield from self._on_pipeline(jobs, plan, primed)
                return
            self._settle("main", probe.needs)
            fn = _Primed(fn, primed)
        yield from run_inline(fn, jobs, self._pin_now())

    def _probe_first(self, jobs: Iterator[Any]) -> tuple[Iterator[Any], tuple[int, Any] | None]:
        """Watch batch 0 fetched alone (``num_workers > 0``); raise if it needs processes."""
        job0 = next(jobs, NOTHING)
        if job0 is NOTHING:
            return jobs, None
        wait = min(PROBE_TIMEOUT_S, self.timeout) if self.timeout > 0 else PROBE_TIMEOUT_S
        probe = probe_in_thread(self._job_fn(), job0, wait)
        if probe.error is not None:
            raise probe.error
        if probe.timed_out and self.timeout > 0 and wait >= self.timeout:
            n, index = job0
            raise RuntimeError(
                f"DataLoader timed out after {self.timeout} seconds: batch {n} (indices "
                f"{item_label(index, 120)}) did not come (fetched alone, to choose the workers)"
            )
        if probe.needs is not None:
            if self._settle("process", probe.needs) == "process":
                raise _NeedsProcesses(probe.needs)
        else:
            self._settle("thread", "the first batch needed no per-worker state")
        primed = (job0[0], probe.outcome) if probe.done else None
        return itertools.chain([job0], jobs), primed

    def _on_pipeline(
        self, jobs: Iterator[Any], plan: EpochPlan, primed: tuple[int, Any] | None
    ) -> Iterator[Any]:
        """Feed ``jobs`` to the loader's pipeline; ``primed``: a job already done."""
        pipe = self._pipeline()
        assert self._feed is not None
        self._feed.current = jobs
        if self._primed is not None:
            self._primed.primed = primed
        if self._slots is not None:
            self._slots.restart()
        if self._gate is not None and isinstance(self._feed, AsyncFeed) and primed is None:
            self._feed.gate = self._gate.arm(plan.skip)
        return iter(pipe)

    def _at_sampler_start(self, plan: EpochPlan) -> None:
        """Iterable datasets: replay and snapshot the generator where a sampler would start."""
        if plan.at_start is not None:
            plan.at_start.apply(self._gens)
        if self._gens:
            plan.snapshot = RngState.capture(self._gens, False)

    def _dataset_iter(self) -> Iterator[Any]:
        it = iter(self.dataset)
        if self._sharded:
            rank, world = resolve_rank(self.rank, self.world_size)
            it = _shard_iter(it, rank, world, self._shard_mode)
        return it

    def _job_fn(self) -> Callable[[Any], Any]:
        if self._iterable:
            return self._collate()
        return self._fetcher()

    def _fetcher(self, dataset: Any = None) -> MapFetcher:
        cls = MapFetcher if self._policy is None else SkippingMapFetcher
        ds = self.dataset if dataset is None else dataset
        return cls(ds, self.collate_fn, self._auto_collation)

    def _workers_dataset(self) -> Any:
        """The dataset thread workers fetch from: with ``persistent_workers``, a copy.

        torch's persistent workers keep the dataset as it was when they started:
        attributes set on it between epochs do not reach them
        (``test_dataset_not_reset`` in torch's suite).  A shallow copy taken when
        the threads start gives the same for rebound attributes, without copying
        the data.
        """
        if not (self.persistent_workers and self.num_workers > 0):
            return self.dataset
        try:
            return copy.copy(self.dataset)
        except Exception:  # an object that cannot be copied is shared, as before
            return self.dataset

    def _async_fetcher(self) -> AsyncMapFetcher:
        cls = AsyncMapFetcher if self._policy is None else SkippingAsyncMapFetcher
        return cls(self.dataset, self.collate_fn, self._auto_collation)

    def _collate(self) -> Collate:
        if self._policy is None:
            return Collate(self.collate_fn)
        return SkippingCollate(self.collate_fn, batched=self.batch_size is not None)

    def _pin_now(self) -> bool:
        return bool(self.pin_memory) and torch.cuda.is_available()

    def _pipeline(self) -> Pipeline[Any]:
        """Build the loader's pipeline once; its threads live until :meth:`close`."""
        if self._pipe is not None:
            return self._pipe
        feed = AsyncFeed() if self._mode == "thread" and not self._iterable else Feed()
        conc = max(1, self.num_workers)
        # Batches ready for the consumer; up to 2 * conc more are being fetched.
        handoff = 2 if self._mode == "process" else max(1, self.prefetch_factor or 2)
        pipe: Pipeline[Any] = Pipeline.from_iterable(
            feed,
            rank=0,  # never re-shard the index batches (the sampler already did)
            world_size=1,
            group_size=1,
            handoff=handoff,
            timeout=self.timeout if self.timeout > 0 else None,
        )
        if self._mode == "thread":
            ordered = bool(self.in_order)
            # in_order=False: the others go first, as torch hands them out (no gate).
            gate = FirstGate() if conc > 1 and not self._iterable and ordered else None
            self._gate = gate
            if self._async:
                afetcher = self._async_fetcher()
                afetcher.gate = gate
                pipe = pipe.map(
                    afetcher, concurrency=conc, executor="async", ordered=ordered, name="fetch"
                )
                pipe = pipe.map(self._collate(), concurrency=1, name="collate")
            elif self._iterable:
                self._primed = _Primed(self._collate())
                pipe = pipe.map(self._primed, concurrency=conc, name="collate")
            else:
                # One job more than workers is in flight, waiting on `slots`: a worker
                # that finishes a batch starts the next at once instead of waiting for
                # the loop thread to be scheduled and submit it (bench/bench_loader.py).
                fetcher = self._fetcher(self._workers_dataset())
                fetcher.gate = gate
                fetcher.slots = self._slots = GovernedSlots(conc)
                self._primed = _Primed(fetcher)
                pipe = pipe.map(
                    self._primed,
                    concurrency=conc + 1,
                    executor="thread",
                    ordered=ordered,
                    name="fetch",
                )
            if self.pin_memory:
                pipe = pipe.to_device("cpu", pin_memory=True)
        self._pipe, self._feed = pipe, feed
        return pipe

    # -- worker processes ---------------------------------------------------------
    def _start_process(self, plan: EpochPlan, hand_draw: bool) -> Iterator[Any]:
        self._stream.plan = plan
        if self._inner is None:
            dataset = self.dataset
            if self._sharded:
                dataset = RankShard(
                    dataset, *resolve_rank(self.rank, self.world_size), self._shard_mode
                )
            self._inner = inner_loader(self, dataset, self._stream)
        driver = self._procs.start_epoch(
            self._inner, plan, drop=plan.skip if self._iterable else 0, hand_draw=hand_draw
        )
        if self._iterable:
            self._at_sampler_start(plan)
        pipe = self._pipeline()
        assert self._feed is not None
        self._feed.current = driver
        return iter(pipe)

    # -- lifecycle ---------------------------------------------------------------
    def _end_epoch(self) -> None:
        """Retire the current epoch's iterator and stop what feeds it."""
        plan = self._plan
        if plan is not None and not plan.finished:
            if self._taken_all(plan):
                plan.finished = True  # its iterator raises StopIteration, as torch's would
            else:
                plan.superseded = True
        if self._pipe is not None:
            self._pipe._stop_current()  # stop prefetching for an iterator nobody may read
        self._procs.end_epoch()

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
        if self._pipe is None:
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

    def _pin_warnings(self) -> None:
        # The warnings torch's iterator gives (in _BaseDataLoaderIter.__init__).
        if self._mode == "process" or not self.pin_memory:
            return
        if self.pin_memory_device:
            warnings.warn(
                "pin_memory_device is deprecated, the current accelerator will be used as the "
                f"device,ignore pin_memory_device='{self.pin_memory_device}'.",
                stacklevel=3,
            )
        if not torch.accelerator.is_available():
            warnings.warn(
                "'pin_memory' argument is set as true but no accelerator is found, "
                "then device pinned memory won't be used.",
                stacklevel=3,
            )

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
            return _state(epoch, batches, in_epoch, rng, base_seed)
        plan = self._plan
        if plan is not None and not plan.finished and not self._taken_all(plan):
            return _state(plan.epoch, plan.consumed, True, plan.snapshot, True)
        # Between epochs: record the generators as the next epoch's sampler will find them.
        base_seed = not (self.persistent_workers and self._iterators > 0)
        rng = None
        if self._gens:
            states = list(RngState.capture(self._gens, False).generators)
            if self.generator is not None and base_seed:
                states[0] = advance(states[0])
            rng = RngState(tuple(states), None)
        return _state(self._epoch, 0, False, rng, base_seed)

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


def _state(
    epoch: int, batches: int, in_epoch: bool, rng: RngState | None, base_seed: bool
) -> dict[str, Any]:
    return {
        "version": STATE_VERSION,
        "epoch": epoch,
        "batches": batches,
        "in_epoch": in_epoch,
        "base_seed": base_seed,
        "rng": None if rng is None else rng.to_json(),
    }


class _LoaderIter:
    """One epoch of a :class:`DataLoader`: batches in sampler order.

    Counts what the consumer takes (for ``state_dict``).  An error in
    ``__getitem__`` is raised as itself, with a note naming the batch and index;
    a timeout raises torch's ``RuntimeError``, naming the stage where items wait.
    """

    def __init__(self, loader: DataLoader[Any], batches: Iterator[Any], plan: EpochPlan) -> None:
        self._loader = loader
        self._batches = batches
        self._plan = plan
        self._over = False  # ended early (on_error="skip" past max_failures)
        if not hasattr(self, "_stop_box"):  # kept when persistent workers reuse the iterator
            self._stop_box: list[threading.Event | None] = [None]  # the worker source's stop
        # torch warns when an iterable dataset yields more than len(loader) said.
        self._len_called = loader._IterableDataset_len_called if loader._iterable else None

    def __iter__(self) -> _LoaderIter:
        return self

    def __len__(self) -> int:
        return len(self._loader)

    def __next__(self) -> Any:
        plan = self._plan
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
        try:
            return next(self._batches)
        except StopIteration:
            self._plan.finished = True
            raise
        except (StageError, TimeoutError) as exc:
            if self._loader._mode == "main":  # the user's own exception, raised here
                raise
            err = exc
        _reraise(err, self._loader)


def _dropped(ref: weakref.ref[DataLoader[Any]], plan: EpochPlan, thread: int) -> None:
    loader = ref()
    if loader is not None:
        loader._dropped(plan, thread)


def _set_event(holder: list[threading.Event | None]) -> None:
    event = holder[0]
    if event is not None:
        event.set()


def _first_job(fn: Callable[[Any], Any], job: Any, jobs: Iterator[Any]) -> tuple[Any, Any]:
    """Run the epoch's first job (taking it from ``jobs`` when ``job`` is NOTHING)."""
    if job is NOTHING:
        job = next(jobs, NOTHING)
    return job, (NOTHING if job is NOTHING else fn(job))


class _NeedsProcesses(Exception):
    """The watched first batch needs torch's worker processes (``worker_type="auto"``)."""


class _Primed:
    """A job function that returns a result already computed for one job.

    The batch watched by ``worker_type="auto"`` is not fetched twice: the
    pipeline's job function hands out its outcome when that job comes.
    """

    __slots__ = ("fn", "primed")

    def __init__(self, fn: Callable[[Any], Any], primed: tuple[int, Any] | None = None) -> None:
        self.fn = fn
        self.primed = primed

    def __call__(self, job: tuple[int, Any]) -> Any:
        primed = self.primed
        if primed is not None and primed[0] == job[0]:
            self.primed = None
            return primed[1]
        return self.fn(job)


def _failures_row(name: str, failures: int) -> StageStats:
    return StageStats(name, 1, 0, 0, 0.0, 0.0, 0.0, 0, 0.0, 0, 0.0, failures=failures)


class _SkippingLoaderIter(_LoaderIter):
    """:class:`_LoaderIter` under ``on_error="skip"``: batches come as ``Fetched``.

    Counts and logs each batch's failures in batch order (consumer thread); a
    batch with nothing left counts as taken (for ``state_dict``) and is passed
    over.  Past ``max_failures`` it raises :class:`~iopipe.TooManyFailures` and
    the epoch ends (later ``next()`` calls raise StopIteration).
    """

    def __init__(self, loader: DataLoader[Any], batches: Iterator[Any], plan: EpochPlan) -> None:
        super().__init__(loader, batches, plan)
        assert loader._policy is not None
        self._policy = loader._policy

    def __next__(self) -> Any:
        if self._over:
            raise StopIteration
        plan = self._plan
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
        loader = self._loader
        self._policy.items_seen += fetched.n
        stage = loader._policy_stage
        try:
            for what, exc, lost in fetched.failures:
                index = not (isinstance(what, str) and what.startswith("batch "))
                self._policy.record(stage, None, what, exc, lost, what="index" if index else "")
        except BaseException:
            self._stop()
            raise
        self._end_if_over(final=False)

    def _end_if_over(self, *, final: bool) -> None:
        try:
            self._policy.check(final=final)
        except BaseException:
            self._stop()
            raise

    def _stop(self) -> None:
        self._over = True  # the plan keeps its position: state_dict() resumes here
        pipe = self._loader._pipe
        if pipe is not None:
            pipe._stop_current()


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
        if loader._mode == "process":
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
