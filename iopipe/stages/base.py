"""What every stage shares: the :class:`Stage` base class, item failures, executors.

The loop each stage runs over its groups is in iopipe/stages/pump.py; the
controllers that move a stage's bound (job sizing, the I/O and rate governors)
are in iopipe/control/governor.py.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import copy
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, ClassVar, Protocol, Self

from ..runtime.budget import ByteBudget
from ..runtime.channels import Group
from ..runtime.errors import Interrupted, StageError, shielded
from ..runtime.limits import CapacityLimiter
from ..runtime.policy import FailurePolicy
from ..runtime.stats import StageCounters
from ..runtime.threads import Job, WorkerPool, interpreter_exiting
from .steps import FusedStep, StepRun

__all__ = [
    "CURRENT_GROUP",
    "CURRENT_SINCE",
    "CURRENT_SPAN",
    "InQueue",
    "ItemFailure",
    "OutQueue",
    "Stage",
    "shutdown_executor",
    "skippable",
    "timed",
    "timed_cpu",
]

#: The group a stage's task is processing, and the span ``(start, stop)`` of it that
#: a job covers (``stop`` -1: to the end): set by :func:`pump` and
#: :func:`gather_spans`, read by :meth:`Stage.submit`, so the stall watchdog can
#: name a stuck job's items while the stages keep no per-item books.
CURRENT_GROUP: contextvars.ContextVar[Group | None] = contextvars.ContextVar(
    "iopipe_group", default=None
)
CURRENT_SPAN: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar(
    "iopipe_span", default=None
)
#: When the work a job is one piece of began (a large item read in chunks): the
#: watchdog reports that age, not the age of the chunk running now.
CURRENT_SINCE: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "iopipe_since", default=None
)


class OutQueue(Protocol):
    async def put(self, group: Any) -> None: ...


class InQueue(Protocol):
    async def get(self) -> Any: ...


class ItemFailure(Exception):
    """Raised inside a job: item ``index`` of the job failed with ``__cause__``.

    Under ``on_error="skip"`` jobs return it in place of the item's output instead.
    """

    def __init__(self, index: int, cause: BaseException) -> None:
        super().__init__(index, cause)
        self.index = index
        self.cause = cause

    def __reduce__(self) -> tuple[Any, ...]:  # crosses process boundaries intact
        return (ItemFailure, (self.index, self.cause))


def skippable(exc: BaseException) -> bool:
    """Whether ``on_error="skip"`` may skip an item that failed with ``exc``.

    Only ordinary exceptions are about the item; MemoryError (and anything that
    is not an Exception: KeyboardInterrupt, SystemExit, which travel as
    :class:`~iopipe.runtime.errors.Interrupted`) always stops the epoch.
    """
    return isinstance(exc, Exception) and not isinstance(exc, MemoryError | Interrupted)


class Stage:
    """Base class of the stages that sit between the source and the consumer.

    A stage object holds configuration only until :meth:`open` gives it its
    runtime resources; the pipeline opens a fresh copy per running pipeline
    (:meth:`fresh`), so one builder chain can be iterated by several pipelines.
    """

    kind: ClassVar[str] = "stage"
    #: Whether the stage keeps the one-to-one item correspondence with the source
    #: (needed by the cache, which keys outputs by source item).
    one_to_one: ClassVar[bool] = True
    #: Set by ``concurrency="auto"`` / ``prefetch("auto")``: the autotuner
    #: (iopipe/control/autotune.py) moves this stage's limit while it runs.
    autotune: bool = False
    #: The knob the autotuner turns on this stage, when ``autotune`` is set:
    #: ``"map"`` (jobs in flight), ``"read"`` (reads in flight) or ``"prefetch"``
    #: (depth in groups); ``None``: the stage has none.  A stage with a ``"map"`` or
    #: ``"read"`` knob implements :meth:`set_knob`.
    knob: ClassVar[str | None] = None
    #: The pipeline's failure policy under ``on_error="skip"`` (set on the running
    #: copy by the pipeline); ``None`` under ``"raise"``: fail at the first error.
    policy: FailurePolicy | None = None
    #: Traits the runtime plans with (it never names a concrete stage):
    #: source items per output element (a batcher's ``batch_size``); None: one per item.
    batch_size: int | None = None
    #: Whether ``max_inflight_bytes`` gates this stage's admissions; the first such
    #: stage of a chain gets the bound (``byte_bound``) and each epoch's ``budget``.
    gates_bytes: ClassVar[bool] = False
    budget: ByteBudget | None = None
    byte_bound: int | None = None
    #: Whether the source looks its items up in this stage (the cache) before sending them.
    serves_source: ClassVar[bool] = False

    def __init__(self, *, name: str | None, concurrency: int) -> None:
        if not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1:
            raise ValueError(f"concurrency must be an int >= 1, got {concurrency!r}")
        if name is not None and (not isinstance(name, str) or not name):
            raise TypeError(f"name must be a non-empty str or None, got {name!r}")
        self.name = name or self.kind
        self.concurrency = concurrency
        self.capacity: int | None = None  # output queue capacity in items; None = default
        self.counters = StageCounters(self.name, concurrency)
        self.unit = 1  # items per group in this stage's input (set by the pipeline)
        # Jobs running in workers: job -> (group, span of it, submit time), per job
        # (never per item); the stall watchdog names stuck items from it.
        self._inflight: dict[
            concurrent.futures.Future[Any], tuple[Any, Any, float, float | None]
        ] = {}

    def fresh(self) -> Self:
        """Return an unopened copy with the same configuration."""
        clone = copy.copy(self)
        clone.reset_runtime()
        return clone

    def reset_runtime(self) -> None:
        """Drop the runtime state a :meth:`fresh` copy would share with its original.

        Called on the copy; a stage with runtime resources of its own extends it.
        """
        self.counters = StageCounters(self.name, self.concurrency)
        self._inflight = {}

    async def submit(
        self,
        pool: concurrent.futures.Executor | None,
        fn: Callable[..., Any],
        *args: Any,
    ) -> Any:
        """Run ``fn(*args)`` in ``pool`` and await it; the job is tracked until it ends.

        Cancelling the awaiting task does not stop a job already running in a
        worker: :meth:`quiesce` waits for such jobs, so a stopped epoch leaves no
        read (and no open file) behind.
        """
        if pool is None:
            raise RuntimeError(f"stage {self.name!r} is not open")
        fut = pool.submit(shielded, fn, *args)
        inflight = self._inflight
        now = time.perf_counter()
        inflight[fut] = (CURRENT_GROUP.get(), CURRENT_SPAN.get(), now, CURRENT_SINCE.get())
        fut.add_done_callback(lambda f: inflight.pop(f, None))
        waiter = asyncio.wrap_future(fut)
        # A job that fails after its task was cancelled (the epoch stopped) has no
        # one to read its exception: read it here, so asyncio does not log it at exit.
        waiter.add_done_callback(_retrieve)
        return await waiter

    def running_jobs(self) -> list[tuple[list[Any], list[Any], float]]:
        """``(keys, items, seconds running)`` of each job in a worker, oldest first (any thread).

        ``keys`` and ``items`` are the job's part of its input group (empty when
        the job was submitted outside a pumped group).
        """
        now = time.perf_counter()
        out = []
        for fut, (group, span, t0, since) in self._inflight.copy().items():
            # A WorkerPool job knows its start; a piece of larger work (CURRENT_SINCE)
            # is as old as that work.
            started = since if since is not None else getattr(fut, "started", 0.0) or t0
            keys: list[Any] = []
            items: list[Any] = []
            if group is not None:
                a, b = span if span is not None else (0, -1)
                b = len(group.keys) if b < 0 else b
                keys, items = group.keys[a:b], group.items[a:b]
            out.append((keys, items, now - started))
        out.sort(key=lambda job: -job[2])
        return out

    def abandon(self, older_than: float) -> None:
        """Stop waiting for jobs running longer than ``older_than`` s (stuck: see iopipe/runtime/threads.py)."""
        now = time.perf_counter()
        for fut in list(self._inflight.copy()):
            if isinstance(fut, Job) and fut.started and now - fut.started >= older_than:
                fut.abandoned = True

    async def quiesce(self) -> None:
        """Wait until no job this stage submitted still runs (loop thread)."""
        pending = [
            f
            for f in list(self._inflight.copy())
            if not f.cancel() and not getattr(f, "abandoned", False)
        ]
        if pending and not interpreter_exiting():  # at exit, nobody waits for a stuck job
            await asyncio.wait([asyncio.wrap_future(f) for f in pending])

    def jobs_in_flight(self) -> int:
        """Jobs this stage submitted that still run in a worker (any thread)."""
        return len(self._inflight)

    @property
    def limiter(self) -> CapacityLimiter | None:
        """The limiter bounding this stage's jobs while it is open; None: it has none."""
        return None

    def set_knob(self, value: int) -> None:
        """Apply the autotuner's setting of this stage's :attr:`knob` (loop thread)."""
        raise TypeError(f"stage {self.name!r} has no autotuned limit")

    def config(self) -> dict[str, Any]:
        """Return this stage's arguments as plain data (see ``Pipeline.to_config``)."""
        return {}

    def open(self, unit: int) -> None:
        """Acquire runtime resources (executors); ``unit`` is the input group size."""
        self.unit = unit

    def close(self, timeout: float) -> None:
        """Release runtime resources, waiting at most ``timeout`` seconds."""

    def window(self) -> int:
        """Most groups the stage holds at once."""
        return 2

    @property
    def active(self) -> bool:
        """Whether the stage does anything (a running pipeline leaves out one that does not)."""
        return True

    def elements(self, n: int) -> int:
        """Elements this stage puts out for ``n`` elements in (a batcher: batches)."""
        return n

    def ready_depth(self, weight: int) -> int | None:
        """Source items kept ready for the consumer (``prefetch(n)``), ``weight`` per element.

        Sets this stage's output queue capacity; None: the stage keeps none ahead.
        """
        return None

    def parts(self) -> list[Stage]:
        """The stages this unit of a running plan runs in one job; [] for a plain stage."""
        return []

    def busy_member(self) -> Stage | None:
        """The part the oldest job is in now (a fused unit); None for a plain stage."""
        return None

    def cut(self, groups: AsyncIterator[Group]) -> AsyncIterator[Group]:
        """The input as this stage takes it in groups (a batcher: one batch each)."""
        return groups

    # -- fused runs (stages/fused.py drives members through these only) ----------
    def fusable(self) -> bool:
        """Whether this stage, as configured, may join a fused run (stages/steps.py)."""
        return False

    def fused_step(self, group: Group) -> FusedStep:
        """This stage's step of a fused job on ``group``."""
        raise TypeError(f"stage {self.name!r} cannot run in a fused job")

    def fused_width(self) -> int | None:
        """Fused jobs this stage would run at once (a map's concurrency); None: no say."""
        return None

    @property
    def worker_pool(self) -> concurrent.futures.Executor | None:
        """The pool this stage runs its jobs in while open (a fused run borrows it)."""
        return None

    def reads_cached(self) -> bool:
        """Whether this stage's reads are served by the page cache now (no reads: yes)."""
        return True

    def account_fused(self, run: StepRun, items: int) -> None:
        """Count this stage's step of a fused job over ``items`` input items (loop thread)."""
        self.counters.items += items

    async def resume_fused(self, group: Group, inputs: list[Any], items: list[Any]) -> list[Any]:
        """Finish on the loop what this stage's step stopped short of; the job then goes on.

        ``inputs`` are what the step was given, ``items`` what it returned when it stopped.
        """
        raise TypeError(f"stage {self.name!r} never stops a fused job")

    async def staged(self, group: Group, index: int) -> Group:
        """Process ``group`` alone, as batch number ``index`` where that matters (staged path)."""
        raise TypeError(f"stage {self.name!r} cannot run in a fused run")

    def fused_output(self, group: Group, items: list[Any], index: int) -> Group:
        """The group a fused run ending at this stage puts out."""
        return group.replace_items(items)

    def fused_failure(self, group: Group, exc: BaseException, index: int) -> StageError:
        """This stage's failure in a fused job on ``group`` (batch number ``index``)."""
        return self.fail(group, exc)

    #: Resumes by replaying its epoch: the source starts from the epoch's beginning and
    #: the stage drops the elements already handed out (a shuffle buffer).
    replays = False

    def begin_epoch(self, epoch: int, skip: int) -> None:
        """The epoch about to run, and (``replays``) the elements of it to drop."""

    def reset_counters(self) -> None:
        self.counters = StageCounters(self.name, self.concurrency)

    async def run(self, inq: InQueue, outq: OutQueue) -> None:
        """Consume ``inq`` until END, put results and then END on ``outq``."""
        raise NotImplementedError

    def fail(self, group: Group, exc: BaseException, offset: int = 0) -> StageError:
        """Turn a job failure into a StageError naming this stage and the item."""
        if isinstance(exc, ItemFailure):
            index = offset + exc.index
            item = group.keys[index] if index < len(group.keys) else None
            return StageError(self.name, item, exc.cause)
        return StageError(self.name, None, exc)

    def drop_failed(
        self, group: Group, out: list[Any], failed: list[tuple[int, BaseException]]
    ) -> Group:
        """Skip the entries of ``group`` at the ``failed`` indices (``on_error="skip"``).

        ``out`` holds this stage's output per entry (anything at a failed index).
        Each failure is counted and logged by the policy, which raises once the
        budget is exceeded.
        """
        policy = self.policy
        assert policy is not None
        for i, exc in failed:
            n = group.counts[i] if group.batched and group.counts is not None else 1
            policy.record(self.name, self.counters, group.keys[i], exc, n)
        return group.drop(out, {i for i, _ in failed})


def timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """Call ``fn(*args)`` and return its result with the seconds it took (runs in a worker)."""
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def timed_cpu(fn: Callable[..., Any], *args: Any) -> tuple[Any, float, float]:
    """Like :func:`timed`, also returning the calling thread's CPU seconds."""
    c0 = time.thread_time()
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0, time.thread_time() - c0


class PooledStage(Stage):
    """A stage whose jobs run in a pool of its own, bounded by its limiter.

    Subclasses create ``_pool`` and ``_limit`` in ``open()``; this base closes
    the pool and sizes the window so the pool's workers stay busy.
    """

    _pool: concurrent.futures.Executor | None
    _limit: CapacityLimiter | None

    def close(self, timeout: float) -> None:
        shutdown_executor(self._pool, timeout)
        self._pool = None

    def window(self) -> int:
        # Small groups (one item each, say) need several in process to fill the workers.
        return max(2, -(-2 * self.concurrency // max(1, self.unit)))

    @property
    def limiter(self) -> CapacityLimiter | None:
        return self._limit

    @property
    def worker_pool(self) -> concurrent.futures.Executor | None:
        return self._pool


def shutdown_executor(ex: concurrent.futures.Executor | None, timeout: float) -> None:
    """Shut ``ex`` down, cancelling queued jobs and joining workers within ``timeout``."""
    if ex is None:
        return
    if isinstance(ex, WorkerPool):  # daemon threads; abandoned (stuck) jobs are not waited for
        ex.shutdown(wait=False, cancel_futures=True)
        ex.join(timeout)
        return
    # A process pool forgets its processes, manager thread and result pipe on
    # shutdown(wait=False): take them first, so they can be joined and closed.
    procs = dict(getattr(ex, "_processes", None) or {})
    manager = getattr(ex, "_executor_manager_thread", None)
    results = getattr(ex, "_result_queue", None)
    ex.shutdown(wait=False, cancel_futures=True)
    threads = getattr(ex, "_threads", ())
    deadline = time.monotonic() + timeout
    for t in [*threads, *([manager] if manager is not None else [])]:
        t.join(max(0.0, deadline - time.monotonic()))
    for p in list(procs.values()):
        p.join(max(0.0, deadline - time.monotonic()))
    if results is not None and not (manager is not None and manager.is_alive()):
        results.close()  # what shutdown(wait=True) does once the manager is done


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()
