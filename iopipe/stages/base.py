"""What every stage shares: the ordered/unordered group pump, executors, job sizing.

A stage consumes :class:`~iopipe.runtime.channels.Group` s from an input queue and puts
groups on an output queue.  ``pump`` runs the common loop: it keeps at most
``window`` groups in process (so the items alive in a stage are bounded), emits
results in input order unless ``ordered=False``, and records wait times.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import copy
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, ClassVar, Protocol

from ..runtime.channels import END, Group
from ..runtime.errors import Interrupted, StageError, shielded
from ..runtime.policy import FailurePolicy
from ..runtime.stats import StageCounters
from ..runtime.threads import Job, WorkerPool, interpreter_exiting

__all__ = [
    "ItemFailure",
    "Limiter",
    "OutQueue",
    "SpanFailure",
    "Stage",
    "drain",
    "gather_spans",
    "job_sizer",
    "pump",
    "skippable",
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

#: A job should take about this long, so that the ~30 us cost of handing it to a
#: thread stays a few percent of the work (bench/bench_pipeline.py shows the effect).
TARGET_JOB_S = 0.002


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


class Limiter:
    """A semaphore whose limit can change while it is in use (for autotuning)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._held = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def held(self) -> int:
        return self._held

    def set_limit(self, limit: int) -> None:
        self._limit = max(1, limit)
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._held < self._limit:
            fut = self._waiters.popleft()
            if not fut.done():
                self._held += 1
                fut.set_result(None)

    async def acquire(self) -> None:
        if self._held < self._limit and not self._waiters:
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
        self._held -= 1
        self._wake()

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self.release()


class job_sizer:
    """Chooses how many items go in one executor job from the measured time per item.

    Cheap items (page-cached reads, light decode) are packed many to a job so the
    thread hand-off is amortised; slow items (cold reads) get small jobs so that
    they fan out across ``concurrency`` workers.
    """

    __slots__ = ("_per_item",)

    def __init__(self) -> None:
        self._per_item = 0.0  # EWMA of seconds per item; 0 = unknown

    def observe(self, seconds: float, items: int) -> None:
        if items <= 0:
            return
        x = seconds / items
        self._per_item = x if self._per_item == 0.0 else 0.7 * self._per_item + 0.3 * x

    def split(self, n: int, concurrency: int) -> list[tuple[int, int]]:
        """Return ``[start, stop)`` ranges that cover ``range(n)``."""
        if n == 0:
            return []
        fan = math.ceil(n / max(1, concurrency))  # enough jobs to use every worker
        if self._per_item > 0:
            size = max(1, min(n, max(fan, int(TARGET_JOB_S / self._per_item))))
            if self._per_item * fan >= TARGET_JOB_S:
                size = fan
        else:
            size = fan
        return [(i, min(n, i + size)) for i in range(0, n, size)]


async def drain(inq: InQueue, counters: StageCounters) -> AsyncIterator[Group]:
    """Yield the groups of ``inq`` until END, counting the time spent waiting."""
    while True:
        t0 = time.perf_counter()
        group = await inq.get()
        counters.wait_input_s += time.perf_counter() - t0
        if group is END:
            return
        yield group


async def _put(outq: OutQueue, group: Group, counters: StageCounters) -> None:
    t0 = time.perf_counter()
    await outq.put(group)
    counters.wait_output_s += time.perf_counter() - t0


async def pump(
    groups: AsyncIterator[Group],
    outq: OutQueue,
    process: Callable[[Group], Coroutine[Any, Any, Group]],
    *,
    window: int,
    ordered: bool,
    counters: StageCounters,
) -> None:
    """Run ``process`` over ``groups`` with at most ``window`` groups in process.

    Invariant: a slot of ``window`` is taken before a group is pulled from the
    input and given back only once its result was put downstream, so the stage
    never holds more than ``window`` groups.  Ends by putting END.
    """
    slots = asyncio.Semaphore(window)
    pending: deque[asyncio.Task[Group]] = deque()
    ready = asyncio.Event()  # for the ordered emitter: something was appended / ended
    finished = False

    async def emit_ordered() -> None:
        while True:
            while not pending:
                if finished:
                    return
                ready.clear()
                await ready.wait()
            task = pending[0]
            out = await task
            pending.popleft()
            await _put(outq, out, counters)
            slots.release()

    async def one_unordered(group: Group) -> None:
        try:
            out = await process(group)
            await _put(outq, out, counters)
        finally:
            slots.release()

    async with flat_task_group() as tg:
        if ordered:
            tg.create_task(emit_ordered())
        it = aiter(groups)
        while True:
            await slots.acquire()
            try:
                group = await anext(it)
            except StopAsyncIteration:
                slots.release()
                break
            if ordered:
                CURRENT_GROUP.set(group)  # the task's context copies it
                pending.append(tg.create_task(process(group)))
                ready.set()
            else:
                CURRENT_GROUP.set(group)
                tg.create_task(one_unordered(group))
        finished = True
        ready.set()
    await outq.put(END)


def skippable(exc: BaseException) -> bool:
    """Whether ``on_error="skip"`` may skip an item that failed with ``exc``.

    Only ordinary exceptions are about the item; MemoryError (and anything that
    is not an Exception: KeyboardInterrupt, SystemExit, which travel as
    :class:`~iopipe.runtime.errors.Interrupted`) always stops the epoch.
    """
    return isinstance(exc, Exception) and not isinstance(exc, MemoryError | Interrupted)


def leaf_errors(exc: BaseException) -> list[BaseException]:
    """The non-group exceptions inside (possibly nested) exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in leaf_errors(sub)]
    return [exc]


class flat_task_group:
    """An ``asyncio.TaskGroup`` that re-raises a lone failure as itself.

    Stages nest task groups; without this, one failed item would reach the
    consumer wrapped in several layers of ExceptionGroup.
    """

    def __init__(self) -> None:
        self._tg = asyncio.TaskGroup()

    async def __aenter__(self) -> asyncio.TaskGroup:
        return await self._tg.__aenter__()

    async def __aexit__(self, et: Any, exc: Any, tb: Any) -> bool | None:
        try:
            await self._tg.__aexit__(et, exc, tb)
            return None
        except BaseExceptionGroup as eg:
            leaves = [e for e in leaf_errors(eg) if not isinstance(e, asyncio.CancelledError)]
            # One failure can be raised twice: by a job's task and by the ordered
            # emitter that awaits it.  Count each exception object once.
            leaves = list({id(e): e for e in leaves}.values())
            if len(leaves) == 1:
                raise leaves[0] from leaves[0].__cause__
            raise


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
    #: The pipeline's failure policy under ``on_error="skip"`` (set on the running
    #: copy by the pipeline); ``None`` under ``"raise"``: fail at the first error.
    policy: FailurePolicy | None = None

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

    def fresh(self) -> Stage:
        """Return an unopened copy with the same configuration."""
        clone = copy.copy(self)
        clone.counters = StageCounters(self.name, self.concurrency)
        clone._inflight = {}
        return clone

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


class IoGovernor:
    """Opens reads in flight while they wait on storage and it pays; closes them when not.

    Page-cached reads are CPU work under the GIL: extra threads only add
    contention (bench/bench_reader_backends.py; 16 threads read warm small files
    2-3x slower than one).  Storage-bound reads may gain from many in flight, or
    not (a local disk serving small files saturates at a few).  The governor
    tells cached from storage-bound reads by cache misses, probed exactly with
    ``preadv(RWF_NOWAIT)`` (a read the page cache cannot serve comes back
    short).  While more than 20% of reads miss it doubles the limit, but only
    as long as each doubling raised the reads completed per second by 10% or
    more; otherwise it goes back and keeps that ceiling.  Below 5% misses it
    steps down towards 1.  Where the probe is unsupported it falls back to the
    share of a job's wall time its thread was off the CPU (noisier: on a busy
    machine, waiting for a core looks like waiting for the disk).
    """

    __slots__ = (
        "_ceiling",
        "_cpu",
        "_miss",
        "_prev",
        "_wait",
        "_win_items",
        "_win_jobs",
        "_win_start",
        "limiter",
        "maximum",
        "probe_flags",
    )

    def __init__(self, limiter: Limiter, maximum: int, probe_flags: int = 0) -> None:
        self.limiter = limiter
        self.maximum = maximum
        self.probe_flags = probe_flags
        self._cpu = 0.0  # EWMA CPU seconds per item
        self._wait = 0.0  # EWMA share of wall time spent waiting
        self._miss = 0.0  # EWMA share of items that missed the page cache
        self._ceiling = maximum  # highest limit known to pay
        self._prev: tuple[int, float] | None = None  # (limit, items/s) before the last raise
        self._win_items = 0
        self._win_jobs = 0
        self._win_start = time.perf_counter()

    def _window_rate(self, items: int) -> float | None:
        """Items/s over the window that this job completes, or None mid-window."""
        self._win_items += items
        self._win_jobs += 1
        now = time.perf_counter()
        span = now - self._win_start
        if self._win_jobs < 2 * self.limiter.limit or span < 0.02:
            return None
        rate = self._win_items / span
        self._win_items, self._win_jobs, self._win_start = 0, 0, now
        return rate

    def observe(self, wall: float, cpu: float, items: int, misses: int = -1) -> None:
        """Account one finished job of ``items`` reads (``misses`` < 0: not probed)."""
        if items <= 0 or wall <= 0:
            return
        per = cpu / items
        first = self._cpu == 0.0
        self._cpu = per if first else 0.8 * self._cpu + 0.2 * per
        limit = self.limiter.limit
        if misses >= 0 and self.probe_flags:
            rate_now = misses / items
            self._miss = rate_now if first else 0.7 * self._miss + 0.3 * rate_now
            if self._miss < 0.05:
                self._ceiling, self._prev = self.maximum, None  # cached again: forget
                if limit > 1:
                    self.limiter.set_limit(limit - 1)
                return
            rate = self._window_rate(items)
            if rate is None or self._miss <= 0.2:
                return
            if self._prev is not None and limit > self._prev[0] and rate < 1.1 * self._prev[1]:
                self._ceiling = self._prev[0]  # the last raise did not pay: back, and stay
                self.limiter.set_limit(self._prev[0])
                self._prev = None
            elif limit < min(self.maximum, self._ceiling):
                self._prev = (limit, rate)
                self.limiter.set_limit(min(self.maximum, self._ceiling, 2 * limit))
            return
        if misses < 0:
            self.probe_flags = 0  # the file system refused the probe: fall back for good
        wait = max(0.0, 1.0 - cpu / wall)
        self._wait = wait if first else 0.8 * self._wait + 0.2 * wait
        if self._wait > 0.6 and limit < self.maximum:
            self.limiter.set_limit(limit + 1)
        elif self._wait < 0.3 and limit > 1:
            self.limiter.set_limit(limit - 1)

    def split(self, n: int) -> list[tuple[int, int]]:
        """Ranges of ``range(n)``: big jobs for cached reads, fan-out for waiting ones."""
        if n == 0:
            return []
        limit = self.limiter.limit
        if self._cpu > 0 and limit == 1:
            size = max(1, min(n, int(4 * TARGET_JOB_S / self._cpu)))
        else:
            size = math.ceil(n / limit) if limit > 1 else min(n, 16)
        return [(i, min(n, i + size)) for i in range(0, n, size)]


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


class SpanFailure(Exception):
    """An ItemFailure of one job, with the index of the job's first item in its group."""

    def __init__(self, exc: ItemFailure, offset: int) -> None:
        super().__init__(exc, offset)
        self.exc = exc
        self.offset = offset


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


async def gather_spans(coros: list[Any], offsets: list[int]) -> list[Any]:
    """Gather job coroutines; an ItemFailure is re-raised with its job's offset."""
    tasks = []
    for i, c in enumerate(coros):
        CURRENT_SPAN.set((offsets[i], offsets[i + 1] if i + 1 < len(offsets) else -1))
        tasks.append(asyncio.ensure_future(c))  # the task's context copies the span
    CURRENT_SPAN.set(None)
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException as exc:
        for t in tasks:
            t.cancel()
        if isinstance(exc, ItemFailure):
            for off, t in zip(offsets, tasks, strict=True):
                if t.done() and not t.cancelled() and t.exception() is exc:
                    raise SpanFailure(exc, off) from None
        raise
