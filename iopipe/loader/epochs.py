"""The epochs of a DataLoader: their RNG replay, their start in each mode, their pipeline.

:class:`EpochRunner` is the base of :class:`~iopipe.DataLoader` that holds the
machinery (the public surface, the iterators and the state are in
``loader.py``).  Each epoch is planned (:meth:`EpochRunner._plan_epoch`: which RNG
draws torch would make), then started in the loader's mode: on the loader's
pipeline with thread workers, on torch's worker processes, or in the calling
thread (``"main"``); ``worker_type="auto"`` watches the first batch to decide
(see ``modes.py``).
"""

from __future__ import annotations

import copy
import itertools
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch.utils.data import DataLoader as _TorchDataLoader

from ..pipeline.builder import Pipeline
from ..runtime.errors import item_label
from ..runtime.policy import FailurePolicy
from ..stages.source import resolve_rank, shard_iter
from .fetch import AsyncMapFetcher, Collate, MapFetcher
from .helped import HelpedRun, run_helped
from .judge import HelpJudge
from .modes import (
    PROBE_TIMEOUT_S,
    NeedsProcesses,
    Primed,
    announce,
    first_job,
    probe_here,
    probe_in_thread,
)
from .options import LoaderOptions, StartMode
from .placement import PlaceJudge
from .processes import RankShard, WorkerProcesses, inner_loader
from .state import EpochPlan, IndexStream, RngState, draw_base_seed, rng_sources
from .workers import (
    NOTHING,
    AsyncFeed,
    Feed,
    FirstGate,
    GovernedSlots,
    iterable_batches,
    numbered,
    run_inline,
)

__all__ = ["EpochRunner"]

_T_co = TypeVar("_T_co", covariant=True)


class EpochRunner(_TorchDataLoader[_T_co]):
    """torch's DataLoader with the machinery that plans and starts iopipe's epochs.

    Not used on its own: :class:`~iopipe.DataLoader` builds on it.  Invariant:
    ``_pipe`` (and the thread workers' parts made with it: ``_feed``,
    ``_slots``, ``_gate``, ``_primed``) is built once and lives until
    ``close()``; each epoch re-arms it.
    """

    rank: int | None  # DataLoader's arguments, as given
    world_size: int | None
    shard: str | None
    _options: LoaderOptions
    _iterable: bool
    _async: bool
    _mode: str  # "thread", "process", "main", or "probe" (decided by the first batch)
    _mode_reason: str
    _probing: bool  # the first epoch's first batch is being watched
    _announced: bool  # the mode was logged
    _policy: FailurePolicy | None
    _gens: list[torch.Generator]
    _use_global: bool
    _stream: IndexStream
    _epoch: int
    _iterators: int  # iterators this instance created (torch's persistent-worker rule)
    _plan: EpochPlan | None
    _pending: tuple[int, int, bool, RngState | None, bool] | None
    _pipe: Pipeline[Any] | None
    _slots: GovernedSlots | None  # thread workers' fetch bound
    _feed: Feed | None
    _gate: FirstGate | None
    _inner: _TorchDataLoader[Any] | None
    _procs: WorkerProcesses
    _primed: Primed | None  # the pipeline's job function
    _helped: bool  # loads in the consumer thread with helpers (see helped.py)
    _helped_run: HelpedRun | None  # the epoch it runs
    _judge: HelpJudge | None  # how many helpers pay: kept across epochs
    _helped_fetch: Primed | None  # the helpers' job function, made once (persistent_workers)
    _placer: PlaceJudge | None  # whether "auto"'s thread loads move to processes

    def _init_epochs(
        self, options: LoaderOptions, start: StartMode, generator: torch.Generator | None
    ) -> None:
        """Set up the epoch machinery (after torch's ``__init__``); nothing starts yet."""
        self._options = options
        self._iterable, self._async = start.iterable, start.is_async
        self._mode, self._mode_reason = start.mode, start.reason
        self._probing = False
        # Counts the samples attempted in policy.items_seen (no closure over self:
        # a cycle would keep the loader, and its threads, alive until a gc pass).
        self._policy = FailurePolicy(options.max_failures) if options.on_error == "skip" else None
        if self._iterable:
            self._gens = [generator] if generator is not None else []
            self._use_global = False
        else:
            self._gens, self._use_global = rng_sources(generator, self._index_sampler)
        self._epoch = 0
        self._iterators = 0
        self._helped = False
        self._placer = None
        self._fresh_resources(record=self._mode == "process")

    def _fresh_resources(self, *, record: bool) -> None:
        """No threads, processes or epochs yet: the state a new (or copied) loader starts from."""
        self._stream = IndexStream(self._index_sampler, self._gens, self._use_global, record=record)
        self._pipe = self._slots = self._feed = self._gate = self._inner = None
        self._primed = self._plan = self._pending = self._helped_run = None
        self._judge = self._helped_fetch = None  # a copy (a second live iterator) measures anew
        self._procs = WorkerProcesses(self.persistent_workers)

    @property
    def worker_mode(self) -> str:
        """Where batches load now: ``"thread"``, ``"process"`` or ``"main"``.

        ``"probe"`` while ``worker_type="auto"`` has yet to watch the first batch
        (``num_workers=0``) to decide between ``"main"`` and ``"thread"``.
        """
        return self._mode

    @property
    def _shard_mode(self) -> str:
        return self.shard or "pad"

    def _stop_prefetch(self) -> None:
        """Stop the pipeline's epoch in progress (its batches are for nobody now)."""
        if self._pipe is not None:
            self._pipe.stop_epoch()
        if self._helped_run is not None:
            self._helped_run.stop()  # kept: stats() describes the last epoch

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
            self._helped = self._mode == "thread" and self._helps_workers()
        if self._helped:
            if self._helped_fetch is None:  # once: persistent workers keep their dataset copy
                self._helped_fetch = Primed(self._fetcher(self._workers_dataset()))
            self._helped_fetch.primed = primed
            return iter(self._helped_epoch(self._helped_fetch, jobs))
        return self._on_pipeline(jobs, plan, primed)

    def _helps_workers(self) -> bool:
        """Whether thread workers chosen by ``"auto"`` run as helpers of the training thread.

        For a map-style dataset with a plain ``__getitem__``, delivered in order,
        without ``timeout``: the configurations ``helped.py`` runs as torch's do.
        """
        return not (self._iterable or self._async or self.timeout > 0 or not self.in_order)

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
        RNG runs here alone, as torch runs it; for the others a helper thread runs
        batches ahead while the training loop is away from ``next()``
        (``helped.py``).
        """
        jobs = start()
        fn: Callable[[Any], Any] = self._job_fn()
        if self._mode == "probe":
            # An iterable dataset draws while it is iterated; a sampler's own draws
            # (before the first job) are the same whatever runs the batches.
            job0 = NOTHING if self._iterable else next(jobs, NOTHING)
            if job0 is NOTHING and not self._iterable:
                return
            probe = probe_here(lambda: first_job(fn, job0, jobs))
            job0, probe.outcome = probe.outcome
            if job0 is NOTHING:
                return
            jobs = itertools.chain([job0], jobs)
            primed = (job0[0], probe.outcome)
            if probe.needs is None and self.timeout > 0:  # only a background worker times out
                self._settle("thread", "the first batch drew from no global RNG; timeout= set")
                yield from self._on_pipeline(jobs, plan, primed)
                return
            fn = Primed(fn, primed)
            self._helped = probe.needs is None
            reason = probe.needs or (
                "the first batch drew from no global RNG; a helper thread runs batches "
                "ahead while the training loop is away from next()"
            )
            self._settle("main", reason)
        if not self._helped:
            yield from run_inline(fn, jobs, self._pin_now())
            return
        yield from self._helped_epoch(fn, jobs)

    def _helped_epoch(self, fn: Callable[[Any], Any], jobs: Iterator[Any]) -> HelpedRun:
        """Run the epoch's jobs in this thread, with helpers where they pay (``helped.py``)."""
        helpers = max(1, self.num_workers)
        if self._judge is None:
            self._judge = HelpJudge(helpers, gate_away=self.num_workers == 0)
        # torch's num_workers=0 holds no batch ahead: the helper loads one, the batch the
        # loop takes after its step (memory as torch's, plus one batch); with workers torch
        # keeps prefetch_factor batches per worker in flight.
        depth = 1 if self.num_workers == 0 else (self.prefetch_factor or 2) * helpers
        run = self._helped_run = run_helped(
            fn, jobs, self._pin_now(), depth=depth, helpers=helpers, judge=self._judge
        )
        return run

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
                raise NeedsProcesses(probe.needs)
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
        if self._options.sharded:
            rank, world = resolve_rank(self.rank, self.world_size)
            it = shard_iter(it, rank, world, self._shard_mode)
        return it

    def _job_fn(self) -> Callable[[Any], Any]:
        if self._iterable:
            return self._collate()
        return self._fetcher()

    def _fetcher(self, dataset: Any = None) -> MapFetcher:
        ds = self.dataset if dataset is None else dataset
        return MapFetcher(ds, self.collate_fn, self._auto_collation, skip=self._policy is not None)

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
        skip = self._policy is not None
        return AsyncMapFetcher(self.dataset, self.collate_fn, self._auto_collation, skip=skip)

    def _collate(self) -> Collate:
        batched = self.batch_size is not None
        return Collate(self.collate_fn, skip=self._policy is not None, batched=batched)

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
                self._primed = Primed(self._collate())
                pipe = pipe.map(self._primed, concurrency=conc, name="collate")
            else:
                # One job more than workers is in flight, waiting on `slots`: a worker
                # that finishes a batch starts the next at once instead of waiting for
                # the loop thread to be scheduled and submit it (bench/bench_loader.py).
                fetcher = self._fetcher(self._workers_dataset())
                fetcher.gate = gate
                fetcher.slots = self._slots = GovernedSlots(conc)
                self._primed = Primed(fetcher)
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

    def _start_process(self, plan: EpochPlan, hand_draw: bool) -> Iterator[Any]:
        self._stream.plan = plan
        if self._inner is None:
            dataset = self.dataset
            fetch = self._helped_fetch.fn if self._helped_fetch is not None else None
            if isinstance(fetch, MapFetcher) and self.persistent_workers:
                dataset = fetch.dataset  # the copy the thread workers started with
            if self._options.sharded:
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
        self._stop_prefetch()  # stop prefetching for an iterator nobody may read
        self._procs.end_epoch()

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
