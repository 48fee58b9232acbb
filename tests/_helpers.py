"""Shared test helpers: leak probes, stage drivers and the properties every stage passes.

The property checks follow torchdata.nodes' test pattern: each takes a *factory*
that builds a fresh pipeline, so a test of any stage (or format) states in one
line that the pipeline keeps order and count, propagates errors with the stage
and item, closes cleanly midway, and resumes exactly from a state saved midway.

* ``check_order_and_count(make, expected)``
* ``check_error_propagation(make, stage=..., item=..., cause=...)``
* ``check_close_midway(make, take=k)``
* ``check_state_midway(make, expected, take=k)``

Stage drivers run one stage alone on the running event loop, joined by
:class:`~iopipe.runtime.channels.GroupQueue` s as the pipeline would join it:
``run_stage(stage, groups)`` and ``run_source(source, ...)``.

Functions here that a process-pool decoder runs (``square``, ``fail_on``) live at
module level so that they pickle.
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from iopipe import Pipeline, PipelineClosedError, StageError
from iopipe.runtime.channels import END, Group, GroupQueue
from iopipe.runtime.errors import item_label
from iopipe.stages.base import Stage
from iopipe.stages.pump import leaf_errors
from iopipe.stages.source import Source

PipeFactory = Callable[[], Pipeline[Any]]

#: Bound on one stage-driver run: a hang fails the test instead of the suite.
STAGE_TIMEOUT_S = 30.0

# -- leak probes ---------------------------------------------------------------------


def iopipe_threads() -> list[threading.Thread]:
    """Threads iopipe started (all are named ``iopipe-...``)."""
    return [t for t in threading.enumerate() if t.name.startswith("iopipe")]


def join_threads(threads: Iterable[threading.Thread], timeout: float = 10.0) -> list[str]:
    """Join ``threads`` within one shared deadline; return the names of those still alive."""
    deadline = time.monotonic() + timeout
    threads = list(threads)
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return [t.name for t in threads if t.is_alive()]


def fd_table() -> dict[int, str]:
    """This process's open descriptors and what each points to."""
    out: dict[int, str] = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # the descriptor listdir itself used, closed by now
            pass
    return out


def process_lifetime_fds() -> set[int]:
    """Descriptors multiprocessing keeps open for the life of the process.

    The forkserver (which the process-pool decoder starts on first use) and the
    resource tracker are process-wide singletons, not leaks of a pipeline.
    """
    fds: set[int] = set()
    try:
        from multiprocessing import forkserver, resource_tracker

        for fd in (
            getattr(forkserver._forkserver, "_forkserver_alive_fd", None),
            getattr(resource_tracker._resource_tracker, "_fd", None),
        ):
            if isinstance(fd, int):
                fds.add(fd)
    except ImportError:  # pragma: no cover
        pass
    return fds


def thread_count() -> int:
    return len(threading.enumerate())


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Wait (bounded) until ``predicate()`` holds, re-checking on a short timed wait.

    For states with no event to wait on (a pipeline reaching a steady state);
    returns whether the predicate held.
    """
    deadline = time.monotonic() + timeout
    tick = threading.Event()
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        tick.wait(0.002)
    return True


# -- comparing outputs ---------------------------------------------------------------


def assert_same(a: Any, b: Any, path: str = "") -> None:
    """Assert ``a`` and ``b`` are equal, tensors and arrays by value, dtype and shape."""
    where = path or "value"
    if isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor), f"{where}: {type(a).__name__} is not a tensor"
        assert a.dtype == b.dtype, f"{where}: dtype {a.dtype} != {b.dtype}"
        assert a.shape == b.shape, f"{where}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        assert torch.equal(a.cpu(), b.cpu()), f"{where}: values differ"
    elif isinstance(b, np.ndarray):
        assert isinstance(a, np.ndarray), f"{where}: {type(a).__name__} is not an ndarray"
        assert a.dtype == b.dtype, f"{where}: dtype {a.dtype} != {b.dtype}"
        np.testing.assert_array_equal(a, b, err_msg=where)
    elif isinstance(b, dict):
        assert isinstance(a, dict), f"{where}: {type(a).__name__} is not a dict"
        assert list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for k in b:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(b, list | tuple):
        assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
        assert len(a) == len(b), f"{where}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def as_bytes(x: Any) -> bytes:
    """The bytes of a reader buffer (anything with the buffer protocol)."""
    return memoryview(x).cast("B").tobytes()


# -- data ----------------------------------------------------------------------------


def make_files(root: Path, sizes: Sequence[int], *, seed: int = 0) -> list[tuple[str, bytes]]:
    """Write one file per size under ``root`` (``f0003.bin``...); return ``(path, content)``."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for i, size in enumerate(sizes):
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        path = root / f"f{i:04d}.bin"
        path.write_bytes(data)
        out.append((str(path), data))
    return out


class CountingSequence(Sequence[int]):
    """A lazy sized source of ``0..n-1`` that counts the items it produced.

    ``produced`` grows as the source indexes it; ``peak(consumed)`` is tracked
    by the consumer through :meth:`note_consumed`, so a test can assert an upper
    bound on items between the source and the consumer at every moment.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self.produced = 0
        self.consumed = 0
        self.peak = 0  # max of produced - consumed, seen at every production
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            raise TypeError("no slicing")
        if not 0 <= i < self.n:
            raise IndexError(i)
        with self._lock:
            self.produced += 1
            self.peak = max(self.peak, self.produced - self.consumed)
        return i

    def note_consumed(self, k: int = 1) -> None:
        with self._lock:
            self.consumed += k


# -- functions a decoder runs (module level: they pickle for the process pool) -------


def square(x: int) -> int:
    return x * x


def fail_on(x: int, bad: int = 7) -> int:
    if x == bad:
        raise ValueError(f"bad item {x}")
    return x


def fail_on_seven(x: int) -> int:
    return fail_on(x, 7)


def square_and_pid(x: int) -> tuple[int, int]:
    return x * x, os.getpid()


# -- stage drivers (run on the test's event loop) ---------------------------------


def groups_of(items: Sequence[Any], size: int, keys: Sequence[Any] | None = None) -> list[Group]:
    """Cut ``items`` into groups of ``size`` with ``keys`` (default: the items' indices)."""
    ks = list(keys) if keys is not None else list(range(len(items)))
    return [Group(list(items[i : i + size]), ks[i : i + size]) for i in range(0, len(items), size)]


async def settle(ticks: int = 200) -> None:
    """Let every coroutine on the loop run until it blocks (loop-only stages)."""
    for _ in range(ticks):
        await asyncio.sleep(0)


def _lone(eg: BaseExceptionGroup[Any]) -> BaseException:
    """The one real failure inside a task group's error (the stage's own), else the group."""
    leaves = [e for e in leaf_errors(eg) if not isinstance(e, asyncio.CancelledError)]
    return leaves[0] if len(leaves) == 1 else eg


async def run_stage(
    stage: Stage,
    groups: Sequence[Group],
    *,
    unit: int | None = None,
    in_capacity: int | None = None,
    out_capacity: int | None = None,
) -> list[Group]:
    """Open a fresh copy of ``stage``, feed it ``groups`` through GroupQueues, return its output.

    The stage's output groups are collected until END; the stage is closed in any case.
    """
    st = stage.fresh()
    u = unit if unit is not None else max([len(g.items) for g in groups] or [1])
    st.open(u)
    inq = GroupQueue(in_capacity or 2 * u)
    outq = GroupQueue(out_capacity or st.capacity or 2 * u)
    out: list[Group] = []

    async def feed() -> None:
        for g in groups:
            await inq.put(g)
        await inq.put(END)

    async def collect() -> None:
        while True:
            g = await outq.get()
            if g is END:
                return
            out.append(g)

    try:
        async with asyncio.timeout(STAGE_TIMEOUT_S), asyncio.TaskGroup() as tg:
            tg.create_task(feed())
            tg.create_task(st.run(inq, outq))
            tg.create_task(collect())
    except BaseExceptionGroup as eg:
        raise _lone(eg)  # not "from": that would replace a StageError's __cause__
    finally:
        st.close(10.0)
    return out


def items_of(groups: Iterable[Group]) -> list[Any]:
    return [x for g in groups for x in g.items]


def keys_of(groups: Iterable[Group]) -> list[Any]:
    return [k for g in groups for k in g.keys]


async def run_source(
    source: Source,
    *,
    epoch: int = 0,
    skip: int = 0,
    group_size: int = 4,
    capacity: int | None = None,
) -> list[Group]:
    """Run ``source.produce`` for one epoch into a GroupQueue; return the groups it put."""
    outq = GroupQueue(capacity or 2 * group_size)
    out: list[Group] = []

    async def collect() -> None:
        while True:
            g = await outq.get()
            if g is END:
                return
            out.append(g)

    source.open()
    try:
        async with asyncio.timeout(STAGE_TIMEOUT_S), asyncio.TaskGroup() as tg:
            tg.create_task(source.produce(outq, epoch=epoch, skip=skip, group_size=group_size))
            tg.create_task(collect())
    except BaseExceptionGroup as eg:
        raise _lone(eg)  # not "from": that would replace a StageError's __cause__
    finally:
        source.close(10.0)
    return out


# -- the shared properties (torchdata's pattern) -----------------------------------


def check_order_and_count(
    make: PipeFactory,
    expected: Sequence[Any] | Callable[[int], Sequence[Any]],
    *,
    epochs: int = 2,
    ordered: bool = True,
    sort_key: Callable[[Any], Any] | None = None,
) -> None:
    """Every epoch yields exactly ``expected`` (per epoch when a function), in order.

    With ``ordered=False`` only the multiset is compared (sorted by ``sort_key``).
    A sized pipeline's ``len()`` must equal the count.
    """
    with make() as pipe:
        for epoch in range(epochs):
            want = list(expected(epoch) if callable(expected) else expected)
            got = list(pipe)
            assert len(got) == len(want), f"epoch {epoch}: {len(got)} elements, want {len(want)}"
            if ordered:
                assert_same(got, want, f"epoch {epoch}")
            else:
                assert_same(sorted(got, key=sort_key), sorted(want, key=sort_key))
            try:
                n = len(pipe)
            except TypeError:
                continue
            assert n == len(want)


def check_error_propagation(
    make: PipeFactory,
    *,
    stage: str,
    item: Any,
    cause: type[BaseException],
    match: str | None = None,
    prefix_of: Sequence[Any] | None = None,
) -> StageError:
    """Iterating raises a StageError naming ``stage`` and ``item``, caused by ``cause``.

    The note ``iopipe stage: S, item: I`` is attached; what arrived before the
    error is a prefix of ``prefix_of`` (when given); a second epoch fails the
    same way (the pipeline stays usable after an error).
    """
    with make() as pipe:
        for _ in range(2):
            got, err = consume(pipe)
            assert isinstance(err, StageError), repr(err)
            assert err.stage == stage
            assert err.item == item
            assert isinstance(err.__cause__, cause), repr(err.__cause__)
            if match is not None:
                assert re.search(match, str(err)), f"{match!r} not in {str(err)!r}"
            assert f"iopipe stage: {stage}, item: {item_label(item)}" in err.__notes__
            assert stage in str(err)
            if prefix_of is not None:
                assert_same(got, list(prefix_of[: len(got)]))
    assert isinstance(err, StageError)
    return err


def check_close_midway(make: PipeFactory, *, take: int = 1) -> None:
    """Closing after ``take`` elements joins every thread; the pipeline stays closed."""
    before = set(iopipe_threads())
    pipe = make()
    it = iter(pipe)
    for _ in range(take):
        next(it)
    started = [t for t in iopipe_threads() if t not in before]
    assert started, "a running pipeline has at least its loop thread"
    pipe.close()
    # close() joins; the short deadline only bounds a failure.
    assert join_threads(started, 5.0) == []
    with pytest.raises(PipelineClosedError):
        next(it)
    with pytest.raises(PipelineClosedError):
        iter(pipe)
    pipe.close()  # idempotent


def check_state_midway(
    make: PipeFactory,
    expected: Sequence[Any],
    *,
    take: int,
    epochs_before: int = 0,
) -> dict[str, int]:
    """Resuming a fresh pipeline from a state saved after ``take`` elements gives the rest.

    ``epochs_before`` whole epochs are run first, so the state's epoch matters
    (with a shuffle, ``expected`` must be that epoch's order).
    """
    with make() as a:
        for _ in range(epochs_before):
            list(a)
        it = iter(a)
        head = [next(it) for _ in range(take)]
        state = a.state_dict()
        del it
    assert state["epoch"] == epochs_before
    with make() as b:
        b.load_state_dict(state)
        rest = list(b)
        after = b.state_dict()
    assert_same(head + rest, list(expected))
    assert after == {"epoch": epochs_before + 1, "consumed": 0}
    return state


def consume(pipe: Iterable[Any]) -> tuple[list[Any], BaseException | None]:
    """Iterate one epoch; return what arrived and the exception that ended it (or None)."""
    got: list[Any] = []
    it = iter(pipe)
    while True:
        try:
            got.append(next(it))
        except StopIteration:
            return got, None
        except Exception as exc:
            return got, exc


def drain_pipeline(pipe: Iterable[Any], limit: int | None = None) -> list[Any]:
    """Take up to ``limit`` elements of one epoch (all when ``None``)."""
    out = []
    it: Iterator[Any] = iter(pipe)
    for x in it:
        out.append(x)
        if limit is not None and len(out) >= limit:
            break
    return out
