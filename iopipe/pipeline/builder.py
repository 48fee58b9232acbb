"""Pipeline: the builder API and the runtime that drives the stages.

Threads (see docs/design.md): the consumer calls ``next()`` on the thread that
iterates; one ``iopipe-loop`` thread per pipeline runs every stage's coroutine;
workers named after their stage (``iopipe-read_0``, ``iopipe-map_1``) do the
blocking work.  Data crosses from the loop to the consumer in exactly one place,
:class:`~iopipe.runtime.channels.Handoff`, one group (usually one batch) at a time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import os
import time
import weakref
from collections.abc import AsyncIterable, Callable, Iterable, Iterator, Mapping
from typing import Any, Generic, TypeVar

import torch

from ..control.autotune import (
    MAX_AUTO_READS,
    AutoTuner,
    auto_value,
    check_budgets,
    make_tuner,
    map_pool_size,
)
from ..observe.verdict import StatsReporter, check_monitoring
from ..runtime.budget import ByteBudget, check_inflight_bytes
from ..runtime.channels import END, GroupQueue, Handoff
from ..runtime.errors import PipelineClosedError, StageError, released
from ..runtime.loop import LoopThread
from ..runtime.policy import FailurePolicy, check_policy
from ..runtime.stats import PipelineStats, snapshot
from ..runtime.watchdog import (
    DEFAULT_STALL_WARNING_S,
    Stall,
    StallTimeoutError,
    abandon_stuck,
    check_seconds,
    check_stall_warning,
    find_stall,
    logger,
    queue_summary,
)
from ..stages.base import Limiter, Stage, leaf_errors
from ..stages.batch import Batcher
from ..stages.cache import Cache
from ..stages.decode import Decoder
from ..stages.device import DeviceTransfer
from ..stages.fused import Fused
from ..stages.fused import plan as fused_plan
from ..stages.prefetch import Prefetcher
from ..stages.reader import ChunkedReader
from ..stages.source import EMPTY_HINT, Source, list_files
from .config import pipeline_from_config, pipeline_to_config
from .trust import Trust

__all__ = ["Pipeline"]

T = TypeVar("T")
U = TypeVar("U")

#: Items per group when no batcher fixes the group size.
DEFAULT_GROUP = 64
_STOP_TIMEOUT_S = 10.0


class _Sink:
    """Adapts the hand-off to the ``put`` interface of a stage's output queue."""

    def __init__(self, handoff: Handoff, tap: Callable[[int], None] | None = None) -> None:
        self.handoff = handoff
        self.tap = tap  # the autotuner's throughput meter (iopipe/control/autotune.py)
        self.policy: FailurePolicy | None = None  # on_error="skip": checked at the end

    async def put(self, group: Any) -> None:
        if group is END:
            if self.policy is not None:  # a fraction's last check, over the whole epoch
                self.policy.check(final=True)
            self.handoff.put_end()
        else:
            await self.handoff.put(group)
            if self.tap is not None:
                self.tap(group.weight)


class _Runtime:
    """What a running pipeline owns: the loop thread and the opened stages."""

    #: The ``max_inflight_bytes`` option: each epoch gets a ByteBudget of it.
    max_inflight_bytes: int | None = None

    def __init__(
        self,
        source: Source,
        stages: list[Stage],
        group_size: int,
        use_uvloop: bool | None,
        fuse: bool = True,
    ) -> None:
        self.source = source
        self.stages = stages  # as built: stats, errors and state speak of these
        self.group_size = group_size
        self.cache = next((s for s in stages if isinstance(s, Cache)), None)
        self.loop = LoopThread(use_uvloop=use_uvloop)
        self.closed = False
        # The process that started the threads: a child made by os.fork() inherits
        # this object but none of its threads (see shutdown and Pipeline._runtime).
        self.pid = os.getpid()
        self.tuner: AutoTuner | None = None  # set by Pipeline._runtime when a stage is "auto"
        self.policy: FailurePolicy | None = None  # set by Pipeline._runtime for on_error="skip"
        source.open()
        weight = 1
        for s in stages:
            unit = group_size if weight == 1 else 1
            s.open(unit)
            if isinstance(s, Prefetcher):
                s.capacity = s.n * weight
            if isinstance(s, Batcher):
                weight *= s.batch_size
        # What runs: consecutive thread stages fused where they can be (stages/fused.py).
        self.plan: list[Stage] = fused_plan(stages) if fuse else list(stages)
        for s in self.plan:
            if isinstance(s, Fused):
                s.open(s.members[0].unit)

    def shutdown(self, timeout: float = _STOP_TIMEOUT_S) -> None:
        """Stop the loop, then release every stage's workers (idempotent, any thread)."""
        if self.closed:
            return
        self.closed = True
        if self.pid != os.getpid():
            # Inherited through os.fork(): the loop, the workers and their pipes
            # belong to the parent (closing them here would stop its pipeline), and
            # locks may be held by threads that do not exist in this process.
            return
        deadline = time.monotonic() + timeout  # one bound for the whole shutdown
        self.loop.stop(timeout)
        for s in self.stages:
            s.close(max(0.0, deadline - time.monotonic()))
        for s in self.plan:
            if isinstance(s, Fused):
                s.close(timeout)
        self.source.close(max(0.0, deadline - time.monotonic()))

    async def run_epoch(self, ep: _Epoch) -> None:
        """Run the source and every stage until END reaches the consumer (loop thread)."""
        ep.task = asyncio.current_task()
        self.source.counters.__init__("source", 1)  # type: ignore[misc]
        for s in self.stages:
            s.reset_counters()
        reader = _budgeted_reader(self.stages)
        if reader is not None:
            reader.budget = ep.budget
        if self.policy is not None:
            self.policy.reset()
        sink: Any = _Sink(ep.handoff, self.tuner.on_group if self.tuner is not None else None)
        sink.policy = self.policy
        plan = self.plan
        queues: list[Any] = [GroupQueue(self._capacity(s)) for s in plan[:-1]]
        ins: list[Any] = [GroupQueue(2 * self.group_size), *queues] if plan else []
        outs: list[Any] = [*queues, ep.handoff] if plan else []
        # The output queue of the source and of each stage (None inside a fused run).
        out_of: dict[int, Any] = {}
        for unit, q in zip(plan, outs, strict=True):
            members = unit.members if isinstance(unit, Fused) else [unit]
            for m in members:
                out_of[id(m)] = None
            out_of[id(members[-1])] = q
        ep.queues = [ins[0] if plan else ep.handoff, *(out_of[id(s)] for s in self.stages)]
        outs = [*queues, sink] if plan else []
        if self.tuner is not None:
            self.tuner.start_epoch(self.stages, ep.queues)
        first = ins[0] if self.stages else sink
        try:
            async with asyncio.TaskGroup() as tg:
                src = tg.create_task(
                    self.source.produce(
                        first,
                        epoch=ep.epoch,
                        skip=ep.skip,
                        group_size=self.group_size,
                        cache=self.cache,
                    ),
                    name="source",
                )
                for stage, inq, outq in zip(plan, ins, outs, strict=True):
                    task = tg.create_task(stage.run(inq, outq), name=stage.name)
                    task.add_done_callback(ep.stage_done)
                src.add_done_callback(ep.stage_done)
        except BaseExceptionGroup as eg:
            errors = [
                _as_stage_error(e)
                # One exception can be raised by two tasks (a job and the emitter
                # awaiting it): count each once.
                for e in {id(e): e for e in leaf_errors(eg)}.values()
                if not isinstance(e, asyncio.CancelledError)
            ]
            # Several groups of one stage can fail at once (a broken process pool fails
            # every job in flight; two batches fail to collate): the consumer gets that
            # stage's first failure, and a group only when several stages failed.
            by_stage: dict[Any, BaseException] = {}
            for e in errors:
                by_stage.setdefault(getattr(e, "stage", id(e)), e)
            errors = list(by_stage.values())
            if errors:
                ep.handoff.put_error(
                    errors[0]
                    if len(errors) == 1
                    else BaseExceptionGroup("several iopipe stages failed", errors)
                )
        finally:
            ep.ended = time.perf_counter()

    def _capacity(self, stage: Stage) -> int:
        return stage.capacity if stage.capacity is not None else 2 * self.group_size


def _as_stage_error(exc: BaseException) -> BaseException:
    if isinstance(exc, StageError):
        return exc
    return StageError("pipeline", None, exc)


class _Epoch:
    """One pass over the source, started by ``iter(pipeline)``."""

    def __init__(self, rt: _Runtime, epoch: int, skip: int, handoff_groups: int) -> None:
        self.rt = rt
        self.epoch = epoch
        self.skip = skip
        self.handoff = Handoff(handoff_groups, rt.loop.call_soon)
        self.queues: list[Any] = []
        self.started = time.perf_counter()
        self.ended: float | None = None
        # When each stage finished (task name -> perf_counter): a stage's stats cover
        # the time it ran, so one that finished early does not look busy meanwhile.
        self.stage_ended: dict[str, float] = {}
        self.delivered = 0
        self.consumed = skip  # source items handed out before the current group
        # The consumer's cursor in the group it is reading.  It lives here, not on
        # the iterator, so the position survives the iterator (state after a break).
        self.buf: list[Any] = []
        self.counts: list[int] | None = None
        self.i = 0
        self.tail = 0  # source items that failed after the group's last element (skip)
        self.finished = False
        self.task: asyncio.Task[Any] | None = None  # run_epoch's task, once it runs
        self.budget: ByteBudget | None = None
        if rt.max_inflight_bytes is not None:
            self.budget = ByteBudget(rt.max_inflight_bytes, skip, self.idle_after_reader)
        self.future: concurrent.futures.Future[None] = rt.loop.submit(rt.run_epoch(self))

    def position(self) -> int:
        """Source items handed to the consumer so far this epoch."""
        if self.counts is None:
            return self.consumed + self.i
        done = self.consumed + sum(self.counts[: self.i])
        return done + self.tail if self.i >= len(self.buf) else done

    def stage_done(self, task: asyncio.Task[Any]) -> None:
        now = time.perf_counter()
        for name in task.get_name().split("+"):  # a fused run is named "read+map+batch"
            self.stage_ended[name] = now

    def stop(self) -> None:
        """Cancel whatever still runs of this epoch and wait for it (bounded)."""
        if self.rt.pid != os.getpid():
            return  # inherited through os.fork(): the parent's to stop (see _Runtime.shutdown)
        # Keep the consumer's position, drop what it had not taken yet.
        self.consumed = self.position()
        self.buf, self.i, self.counts, self.tail = [], 0, None, 0
        self.handoff.close()
        if self.budget is not None:
            self.budget.close()  # wakes (and fails) reads waiting for room
        fut = self.future
        if not fut.done():
            fut.cancel()  # cancels the task on the loop thread
        loop = self.rt.loop
        if loop.in_loop_thread or not loop.alive or self.rt.closed:
            return
        # The future reads "cancelled" at once, while the task is still unwinding on
        # the loop: wait there until it has (a task that never started is done).
        try:
            loop.submit(self._settled()).result(_STOP_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            # A job that never returns: waited for once, not again by close().
            abandon_stuck(self.rt.source, self.units(), 0.0)
        except (concurrent.futures.CancelledError, RuntimeError):
            pass

    async def _settled(self) -> None:
        task = self.task
        if task is not None and not task.done():
            await asyncio.wait([task])
        # Jobs already running in workers outlive their cancelled tasks: wait for
        # them too, so nothing of this epoch (a read, an open file) runs on.
        await asyncio.gather(*(s.quiesce() for s in self.rt.plan))

    def idle_after_reader(self) -> bool:
        """Whether no read runs, nothing after the reader is queued or running, and the
        consumer waits in ``next()`` (the budget asks, on the loop thread).

        Then no byte held can reach the consumer without more reads: the budget
        lets the oldest waiting group's read through rather than deadlock
        (iopipe/runtime/budget.py).
        """
        reader = _budgeted_reader(self.rt.stages)
        budget = self.budget
        if reader is None or budget is None or reader._inflight:  # a read will deliver
            return False
        if not self.handoff.consumer_waiting:  # it computes: admitting can wait until it asks
            return False
        at = self.rt.stages.index(reader)
        if any(q is not None and q.counters.used for q in self.queues[at + 1 :]):
            return False
        for unit in self.units():
            for s in [unit, *(getattr(unit, "members", None) or [])]:
                if s is reader:
                    continue
                limit = getattr(s, "_limit", None)
                if s._inflight or (isinstance(limit, Limiter) and limit.held):
                    return False
        return True

    def units(self) -> list[Stage]:
        """What runs: the stages, or the fused plan of them."""
        return list(getattr(self.rt, "plan", self.rt.stages))

    def stall(self) -> Stall:
        """Where the consumer's data is stuck: the oldest job in a worker, else the queues."""
        found = find_stall(self.rt.source, self.units())
        return found if found is not None else Stall(self.stuck_stage())

    def stuck_stage(self) -> str:
        """Name the stage nearest the consumer that still holds work (for timeouts)."""
        names = [self.rt.source.name] + [s.name for s in self.rt.stages]
        for unit in reversed(self.rt.plan):
            member = unit.busy_member() if isinstance(unit, Fused) else None
            if member is not None:
                return member.name
        for i in range(len(self.rt.stages) - 1, -1, -1):
            s = self.rt.stages[i]
            limit = getattr(s, "_limit", None)
            if limit is not None and limit.held:
                return s.name
            inq = self.queues[i] if i < len(self.queues) else None
            if inq is not None and inq.counters.used:
                return s.name
        return names[0]


class _EpochIterator(Generic[T]):
    """Iterator over one epoch; dropping it (``break``, ``del``) stops the epoch."""

    def __init__(
        self,
        pipe: Pipeline[T],
        ep: _Epoch,
        timeout: float | None,
        stall_warning: float | None = None,
    ) -> None:
        self._pipe = pipe  # keeps the pipeline (and its threads) alive while iterating
        self._ep = ep
        self._timeout = timeout
        self._stall_warning = stall_warning
        loop = ep.rt.loop
        self._alive = lambda: loop.alive
        self._finalizer = weakref.finalize(self, ep.stop)

    def __iter__(self) -> _EpochIterator[T]:
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
        if self._pipe._closed:
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
            self._close()
            if self._pipe._closed and isinstance(exc, RuntimeError):  # close() from elsewhere
                raise PipelineClosedError("this pipeline was closed") from None
            current = self._pipe._current
            if isinstance(exc, RuntimeError) and (current is None or current() is not self):
                raise RuntimeError(
                    "iopipe: this iterator's epoch was ended by a newer iter(pipeline) "
                    "(one epoch runs at a time); read from the new iterator"
                ) from None
            err = released(exc)
            if err is not exc:
                raise err from None  # the user's KeyboardInterrupt or SystemExit, as itself
            raise
        if group is END:
            ep.finished = True
            self._close()
            raise StopIteration
        if ep.budget is not None:  # the consumer holds this group now, not the pipeline
            ep.budget.release_upto(ep.consumed + group.weight + group.dropped)
        ep.delivered += len(group.items)
        ep.buf = group.items
        ep.counts = group.counts
        ep.tail = group.dropped
        ep.i = 1
        return ep.buf[0]  # type: ignore[no-any-return]

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

    def _close(self) -> None:
        self._finalizer()


class Pipeline(Generic[T]):
    """A chain of stages on a background event loop; iterate it for one epoch.

    Build one with :meth:`from_files` or :meth:`from_iterable` and the chaining
    methods; each returns a new pipeline and starts nothing.  The first
    ``iter()`` starts the loop thread and the stages' workers, which stay up
    across epochs until :meth:`close` (or garbage collection, or interpreter
    exit).  Each ``iter()`` is one epoch; starting a new one stops the old.

    Thread-safety: iterate a pipeline from one thread at a time; :meth:`stats`
    and :meth:`close` may be called from any thread.
    """

    def __init__(
        self,
        source: Source,
        stages: tuple[Stage, ...] = (),
        *,
        timeout: float | None = None,
        handoff: int = 2,
        group_size: int | None = None,
        use_uvloop: bool | None = None,
        stats_interval: float | None = None,
        on_stats: Callable[[PipelineStats], Any] | None = None,
        cpu_budget: int | None = None,
        memory_budget_bytes: int | None = None,
        on_error: str = "raise",
        max_failures: int | float | None = None,
        stall_warning: float | None = DEFAULT_STALL_WARNING_S,
        max_inflight_bytes: int | None = None,
        fuse: bool = True,
    ) -> None:
        check_monitoring(stats_interval, on_stats)
        check_budgets(cpu_budget, memory_budget_bytes)
        check_policy(on_error, max_failures)
        if group_size is not None and (not isinstance(group_size, int) or group_size < 1):
            raise ValueError(f"group_size must be an int >= 1 or None, got {group_size!r}")
        check_seconds("timeout", timeout)
        if not isinstance(handoff, int) or handoff < 1:
            raise ValueError(f"handoff must be an int >= 1, got {handoff!r}")
        if use_uvloop is not None and not isinstance(use_uvloop, bool):
            raise TypeError(f"use_uvloop must be True, False or None, got {use_uvloop!r}")
        check_stall_warning(stall_warning)
        check_inflight_bytes(max_inflight_bytes)
        if not isinstance(fuse, bool):
            raise TypeError(f"fuse must be True or False, got {fuse!r}")
        self._source = source
        self._stages = stages
        self._timeout = timeout
        self._handoff = handoff
        self._group_size = group_size
        self._use_uvloop = use_uvloop
        self._stats_interval = stats_interval
        self._on_stats = on_stats
        self._cpu_budget = cpu_budget
        self._memory_budget_bytes = memory_budget_bytes
        # Every keyword option as given: chained pipelines inherit them (see _then),
        # and Pipeline.to_config writes them out.
        self._options: dict[str, Any] = {
            "timeout": timeout,
            "handoff": handoff,
            "group_size": group_size,
            "use_uvloop": use_uvloop,
            "stats_interval": stats_interval,
            "on_stats": on_stats,
            "cpu_budget": cpu_budget,
            "memory_budget_bytes": memory_budget_bytes,
            "on_error": on_error,
            "max_failures": max_failures,
            "stall_warning": stall_warning,
            "max_inflight_bytes": max_inflight_bytes,
            "fuse": fuse,
        }
        self._rt: _Runtime | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._closed = False
        self._epoch = 0
        self._skip = 0
        self._current: weakref.ref[_EpochIterator[Any]] | None = None
        self._last: _Epoch | None = None  # for stats()
        self._position: _Epoch | None = None  # the epoch whose position state_dict() reports

    # -- construction ------------------------------------------------------------
    @classmethod
    def from_files(
        cls,
        paths: str | os.PathLike[str] | Iterable[Any],
        *,
        shuffle: bool = False,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        shard: str = "pad",
        allow_empty: bool = False,
        **options: Any,
    ) -> Pipeline[str]:
        """Start a pipeline over files.

        Args:
            paths: A glob (``**`` recursive), a directory (every file below it), a
                file, or a list of paths and ``(path, offset, length)`` byte ranges.
                Globs and directories are listed once, now, and sorted.
            shuffle: Visit the files in an order drawn from ``(seed, epoch)``.
            seed: The shuffle's seed.
            rank, world_size, shard: This process's share (see :class:`Source`).
            allow_empty: Let a glob or directory that matches no file give empty
                epochs; by default it raises FileNotFoundError naming the pattern.
            **options: Pipeline options: ``timeout`` (seconds a ``next()`` may wait),
                ``handoff`` (groups waiting for the consumer), ``group_size`` (items
                that travel together between stages; default: the batch size, else
                64), ``use_uvloop`` (``None``: when importable), ``stats_interval``
                (seconds between reports of the stats and the bottleneck verdict to
                the ``"iopipe"`` logger), ``on_stats`` (called with each report's
                :class:`PipelineStats`, on the loop thread: for TensorBoard, W&B),
                ``on_error`` (``"raise"``, the default: the first failing item
                stops the epoch; ``"skip"``: items whose read or map fails, and
                batches whose collate fails, are dropped, counted in the stats
                and logged), ``max_failures`` (with ``"skip"``: an int count, a
                float share in (0, 1) of the items seen, or None for no limit;
                past it the epoch raises :class:`TooManyFailures`; see "Failure
                policy" in docs/design.md),
                ``stall_warning`` (seconds, default 60; ``None``: off: when the
                consumer has waited that long for data, a warning on the
                ``"iopipe"`` logger names the stage and the items stuck there,
                repeated each interval; docs/reliability.md),
                ``max_inflight_bytes`` (bytes read and not yet handed to the
                consumer: in reads, queues, prefetch and the stages between;
                the reader waits while the bound is reached; a single item
                larger than the bound still passes, alone; docs/reliability.md),
                ``cpu_budget`` and ``memory_budget_bytes`` (bounds for ``"auto"``
                settings; default ``os.cpu_count()`` and 1 GiB; docs/tuning.md),
                ``fuse`` (default True: consecutive ``read``/thread ``map``/``batch``
                stages run as one job per group while reads hit the page cache;
                docs/design.md).

        Raises:
            FileNotFoundError: a path does not exist, or a glob or directory
                matched no file (unless ``allow_empty``).
            ValueError: ``paths`` is an empty list (unless ``allow_empty``).
            TypeError: ``paths`` is neither a path nor an iterable of paths.
        """
        if not isinstance(allow_empty, bool):
            raise TypeError(f"allow_empty must be True or False, got {allow_empty!r}")
        if isinstance(paths, str | os.PathLike):
            items: list[Any] = list_files(
                paths,
                allow_empty=allow_empty,
                hint=f"; {EMPTY_HINT}",
            )
        elif isinstance(paths, Iterable):
            items = list(paths)
            if not items and not allow_empty:
                raise ValueError(f"paths is an empty list; {EMPTY_HINT}")
        else:
            raise TypeError(
                "paths must be a glob, a directory, a file or a list of paths and byte "
                f"ranges, got {type(paths).__name__}: {paths!r:.80}"
            )
        src = Source(
            items, shuffle=shuffle, seed=seed, rank=rank, world_size=world_size, shard=shard
        )
        src.origin = {"files": os.fspath(paths) if isinstance(paths, str | os.PathLike) else items}
        if allow_empty:
            src.origin["allow_empty"] = True
        return Pipeline(src, **options)

    @classmethod
    def from_iterable(
        cls,
        items: Iterable[U] | AsyncIterable[U],
        *,
        shuffle: bool = False,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        shard: str = "pad",
        **options: Any,
    ) -> Pipeline[U]:
        """Start a pipeline over any iterable or async iterable.

        Sequences (lists, tuples, ranges) have a length and can be shuffled;
        other iterables are pulled a group at a time in a worker thread, and
        async iterables on the loop.  See :meth:`from_files` for the arguments.
        """
        src = Source(
            items, shuffle=shuffle, seed=seed, rank=rank, world_size=world_size, shard=shard
        )
        return Pipeline(src, **options)

    @classmethod
    def from_config(
        cls,
        config: Mapping[str, Any] | str | os.PathLike[str],
        *,
        allow: Iterable[str] | str | None = None,
        trusted: bool = False,
    ) -> Pipeline[Any]:
        """Build a pipeline from a config: a mapping, or a ``.toml``/``.json``/``.yaml`` file.

        See docs/config.md for the format.  User functions are named
        ``"package.module:function"``; sizes may be written ``"4MiB"``.

        A config is data, so it may name functions only from the modules in
        ``allow`` (each with every module below it: ``allow=["myproject"]``)
        and a few pure built-ins (``"builtins:len"``); ``trusted=True`` lifts
        the limit for a config as trusted as code.  Nothing is imported before
        the whole config is checked, and a module not allowed is never imported.

        Raises:
            ConfigError: the config is invalid, or names a function it may not;
                the message starts with the key path (``stages[2].concurrency:
                expected an int >= 1 or 'auto', got 'x'``).
            FileNotFoundError: the config file, or the source's files, do not exist.
        """
        pipe, origin = pipeline_from_config(config, cls, Trust.of(allow, trusted))
        pipe._source.origin = origin
        return pipe

    def to_config(self) -> dict[str, Any]:
        """Return this pipeline's config as plain data (``from_config`` of it rebuilds it).

        Raises:
            ConfigError: a part has no config form (a lambda, an arbitrary iterable source).
        """
        defaults = {
            k: p.default
            for k, p in inspect.signature(type(self).__init__).parameters.items()
            if p.default is not inspect.Parameter.empty
        }
        return pipeline_to_config(self._source, self._options, defaults, self._stages)

    def _then(self, stage: Stage) -> Pipeline[Any]:
        names = {s.name for s in self._stages}
        if stage.name in names:
            base, n = stage.name, 1
            while f"{base}_{n}" in names:
                n += 1
            stage.name = stage.counters.name = f"{base}_{n}"
        return Pipeline(self._source, (*self._stages, stage), **self._options)

    def read(
        self,
        *,
        chunk_bytes: int = 4 << 20,
        concurrency: int | str = 16,
        with_source: bool = False,
    ) -> Pipeline[Any]:
        """Read each item (a path or ``(path, offset, length)``) into a ``uint8`` numpy buffer.

        Args:
            chunk_bytes: The largest single ``preadv``.  Items larger than this
                are read in pieces, concurrently, into one buffer: a piece is one
                chunk, or, when an item has more chunks than there are workers,
                whole chunks adding up to about 1 MiB (one job, one ``preadv``
                each), so the jobs of an item do not grow with its size over
                ``chunk_bytes``.
            concurrency: Reads in flight, or ``"auto"`` (tuned while running, see
                docs/tuning.md).
            with_source: Yield ``(item, buffer)`` pairs instead of buffers.
        """
        n, auto = auto_value(concurrency, MAX_AUTO_READS)
        stage = ChunkedReader(chunk_bytes=chunk_bytes, concurrency=n, with_source=with_source)
        stage.autotune = auto
        return self._then(stage)

    def prefetch(self, n: int | str) -> Pipeline[T]:
        """Keep up to ``n`` finished elements ready ahead of the consumer (``"auto"``: tuned)."""
        size, auto = auto_value(n, 1, param="prefetch size")
        stage = Prefetcher(size)
        stage.autotune = auto
        return self._then(stage)

    def map(
        self,
        fn: Callable[[T], U],
        *,
        concurrency: int | str = 4,
        executor: str | None = None,
        ordered: bool = True,
        name: str | None = None,
    ) -> Pipeline[U]:
        """Apply ``fn`` to every element.

        Args:
            fn: A function of one element.  ``async def`` functions are awaited
                on the loop.  For ``executor="process"`` it must be picklable.
            concurrency: Jobs in flight (threads, processes or awaits), or ``"auto"``
                (tuned while running within ``cpu_budget``, see docs/tuning.md).
            executor: ``"thread"`` (default for sync functions), ``"process"``,
                ``"async"`` (default for async functions) or ``"inline"`` (on
                the loop thread: for functions that take microseconds).
            ordered: Keep input order (default); ``False`` yields in completion order.
            name: Stage name in stats and errors (default ``"map"``).
        """
        n, auto = auto_value(concurrency, map_pool_size(fn, executor, self._cpu_budget))
        stage = Decoder(fn, concurrency=n, executor=executor, ordered=ordered, name=name)
        stage.autotune = auto
        return self._then(stage)

    def batch(
        self,
        batch_size: int,
        *,
        drop_last: bool = False,
        collate_fn: Callable[[list[T]], Any] | None = None,
    ) -> Pipeline[Any]:
        """Group elements into batches of ``batch_size``, collated by ``collate_fn``.

        Without ``collate_fn`` torch's ``default_collate`` is used, as in
        ``torch.utils.data.DataLoader``.
        """
        return self._then(Batcher(batch_size, drop_last=drop_last, collate_fn=collate_fn))

    def cache(self, *, max_bytes: int) -> Pipeline[T]:
        """Keep the output of the stages so far in memory, up to ``max_bytes``.

        Later epochs take the cached items without running those stages again.
        Must come before any ``batch()``.

        Raises:
            ValueError: a batcher precedes the cache, or a cache already exists.
        """
        if any(not s.one_to_one for s in self._stages):
            raise ValueError("cache() must come before batch(): it keys outputs by source item")
        if any(isinstance(s, Cache) for s in self._stages):
            raise ValueError("a pipeline can have only one cache()")
        return self._then(Cache(max_bytes=max_bytes))

    def to_device(self, device: str | torch.device, *, pin_memory: bool = False) -> Pipeline[T]:
        """Copy every tensor of each element to ``device`` on a side CUDA stream.

        The copy runs in a worker thread and has completed when the element is
        handed out.  With ``pin_memory`` tensors are pinned first.  Without CUDA
        this only accepts ``"cpu"`` and does nothing.
        """
        return self._then(DeviceTransfer(device, pin_memory=pin_memory))

    # -- iteration ---------------------------------------------------------------
    @property
    def group_size(self) -> int:
        """Items per group: as given, else the first batch size, else 64 (docs/design.md)."""
        if self._group_size is not None:
            return self._group_size
        for s in self._stages:
            if isinstance(s, Batcher):
                return s.batch_size
        return DEFAULT_GROUP

    def _runtime(self) -> _Runtime:
        if self._closed:
            raise PipelineClosedError("this pipeline was closed")
        if self._rt is not None and self._rt.pid != os.getpid():
            self._forget_inherited()
        if self._rt is None:
            stages = [s.fresh() for s in self._stages]
            stages = [s for s in stages if not (isinstance(s, DeviceTransfer) and not s.active)]
            if self._options["max_inflight_bytes"] is not None:
                reader = _budgeted_reader(stages)
                if reader is not None:
                    reader.byte_bound = self._options["max_inflight_bytes"]  # never fused
            source = _fresh_source(self._source)
            policy = _failure_policy(self._options, source, stages)
            self._rt = _Runtime(
                source,
                stages,
                self.group_size,
                self._use_uvloop,
                # Skipping failed items (on_error="skip") happens stage by stage.
                fuse=self._options["fuse"] and self._options.get("on_error", "raise") == "raise",
            )
            self._rt.max_inflight_bytes = self._options["max_inflight_bytes"]
            self._rt.tuner = make_tuner(
                stages,
                group_size=self.group_size,
                cpu_budget=self._cpu_budget,
                memory_budget_bytes=self._memory_budget_bytes,
            )
            self._rt.policy = policy
            self._finalizer = weakref.finalize(self, self._rt.shutdown)
        return self._rt

    def _forget_inherited(self) -> None:
        """Drop a runtime inherited through ``os.fork()``; the next one is this process's own.

        Nothing of it is touched: its threads exist only in the parent, and the
        locks they held at the fork stay held here.
        """
        if self._finalizer is not None:
            self._finalizer.detach()
        self._rt, self._finalizer, self._current = None, None, None

    def __iter__(self) -> Iterator[T]:
        """Start an epoch and return its iterator (stopping any epoch still running)."""
        rt = self._runtime()
        self._stop_current()
        ep = _Epoch(rt, self._epoch, self._skip, _handoff_groups(rt, self._handoff))
        self._epoch += 1
        self._skip = 0
        self._last = self._position = ep
        it: _EpochIterator[T] = _EpochIterator(
            self, ep, self._timeout, self._options["stall_warning"]
        )
        self._current = weakref.ref(it)
        if self._stats_interval is not None or self._on_stats is not None:
            StatsReporter(self, ep, self._stats_interval, self._on_stats).start()
        return it

    def _stop_current(self) -> None:
        it = self._current() if self._current is not None else None
        if it is not None:
            it._close()

    def __len__(self) -> int:
        """Elements per epoch: items, or batches after ``batch()``.

        Raises:
            TypeError: the source's length is unknown.
        """
        n = len(self._source)
        for s in self._stages:
            if isinstance(s, Batcher):
                n = n // s.batch_size if s.drop_last else -(-n // s.batch_size)
        return n

    def set_epoch(self, epoch: int) -> None:
        """Set the number of the next epoch (it seeds the shuffle)."""
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self._epoch = epoch
        self._skip = 0
        self._position = None

    # -- state -------------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        """Return where the consumer stands: ``{"epoch": e, "consumed": k}``.

        ``consumed`` counts source items handed to the consumer (not those merely
        prefetched).  Restoring it with :meth:`load_state_dict` makes the next
        ``iter()`` continue exactly after them.
        """
        ep = self._position
        if ep is not None and not ep.finished:  # running, or broken off mid-epoch
            return {"epoch": ep.epoch, "consumed": ep.position()}
        return {"epoch": self._epoch, "consumed": self._skip}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Make the next ``iter()`` resume from ``state`` (see :meth:`state_dict`).

        Raises:
            ValueError: the state is malformed.
        """
        try:
            epoch, consumed = int(state["epoch"]), int(state["consumed"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"not a Pipeline state: {state!r:.200}") from None
        if epoch < 0 or consumed < 0:
            raise ValueError(f"not a Pipeline state: {state!r:.200}")
        self._stop_current()
        self._current = None
        self._position = None  # state_dict() now reports the loaded state
        self._epoch, self._skip = epoch, consumed

    # -- introspection and lifecycle --------------------------------------------
    @property
    def max_items_in_flight(self) -> int:
        """Upper bound on source items alive between the source and the consumer.

        The sum of every stage's window and every queue's capacity (each queue
        may take one group beyond it when empty), plus the consumer's group.
        """
        g = self.group_size
        total = 2 * g + g  # first queue + one group held by the source
        w = 1
        for s in self._stages:
            unit = g if w == 1 else w
            total += s.window() * unit
            cap = s.capacity if s.capacity is not None else 2 * g
            if isinstance(s, Prefetcher):
                cap = s.n * w
            total += cap + unit
            if isinstance(s, Batcher):
                total += s.batch_size  # items waiting to complete a batch
                w *= s.batch_size
        unit = g if w == 1 else w
        return total + (self._handoff + 1) * unit

    def stats(self) -> PipelineStats:
        """Return a snapshot of every stage's counters (callable during iteration)."""
        ep = self._last
        rt = self._rt
        if ep is None or rt is None:
            return PipelineStats((), 0.0, 0, 0.0, self._epoch)
        snaps = []
        queues = ep.queues
        parts: list[Any] = [rt.source, *rt.stages]
        for i, s in enumerate(parts):
            q = queues[i] if i < len(queues) else None
            qc = q.counters if q is not None else None
            snaps.append(
                snapshot(
                    s.counters,
                    qc.capacity if qc else 0,
                    qc.mean() if qc else 0.0,
                    qc.used if qc else 0,
                    ep.started,
                    ep.stage_ended.get(s.name, ep.ended),
                )
            )
        elapsed = (ep.ended or time.perf_counter()) - ep.started
        delivered = ep.delivered - len(ep.buf) + ep.i
        budget = ep.budget
        return PipelineStats(
            tuple(snaps),
            elapsed,
            delivered,
            ep.handoff.wait_s,
            ep.epoch,
            inflight_bytes=budget.held if budget is not None else 0,
            peak_inflight_bytes=budget.peak if budget is not None else 0,
        )

    def close(self) -> None:
        """Stop the running epoch, join every thread and release workers (idempotent).

        Bounded: waits at most about 10 s for work in flight to finish.
        """
        self._closed = True
        self._stop_current()
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> Pipeline[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        chain = " -> ".join(["source", *(s.name for s in self._stages)])
        return f"<iopipe.Pipeline {chain}>"


def _handoff_groups(rt: _Runtime, handoff: int) -> int:
    """Groups the hand-off holds: ``handoff``, or enough for a ``prefetch(n)`` ending the chain.

    The last stage puts straight into the hand-off, so a final prefetcher's own
    queue capacity would otherwise never apply.  (``max_items_in_flight`` already
    counts that capacity.)
    """
    last = rt.stages[-1] if rt.stages else None
    if not isinstance(last, Prefetcher):
        return handoff
    w = 1
    for s in rt.stages:
        if isinstance(s, Batcher):
            w *= s.batch_size
    unit = rt.group_size if w == 1 else w
    return max(handoff, -(-last.n * w // unit))


def _failure_policy(
    options: Mapping[str, Any], source: Source, stages: list[Stage]
) -> FailurePolicy | None:
    """The policy of ``on_error="skip"``, given to every stage (None for ``"raise"``).

    Set before the stages are planned: a stage with a policy is not fused.
    """
    if options["on_error"] != "skip":
        return None
    counters = source.counters
    policy = FailurePolicy(options["max_failures"], lambda: counters.items)
    for s in stages:
        s.policy = policy
    return policy


def _budgeted_reader(stages: list[Stage]) -> ChunkedReader | None:
    """The reader that ``max_inflight_bytes`` gates: the first one."""
    return next((s for s in stages if isinstance(s, ChunkedReader)), None)


def _fresh_source(src: Source) -> Source:
    import copy

    clone = copy.copy(src)
    from ..runtime.stats import StageCounters

    clone.counters = StageCounters("source", 1)
    clone._pool = None
    return clone
