"""Decoder: apply a user function to every item (the ``map`` stage).

Three executors: a thread pool (default; right for I/O and for code that
releases the GIL such as PIL, numpy and torch), a process pool (for
GIL-holding Python), or the event loop itself for ``async def`` functions.
``"inline"`` runs a cheap sync function on the loop thread, with no hand-off.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import multiprocessing
import os
import select
import threading
import time
from collections.abc import Callable
from typing import Any

from ..control.governor import job_sizer
from ..runtime.channels import Group
from ..runtime.errors import Interrupted
from ..runtime.limits import CapacityLimiter
from ..runtime.threads import WorkerPool
from .base import ItemFailure, OutQueue, PooledStage, shutdown_executor, skippable, timed
from .pump import SpanFailure, drain, gather_spans, pump
from .steps import FusedStep, StepRun

__all__ = ["EXECUTORS", "Decoder", "map_items", "map_items_skipping"]

EXECUTORS = ("thread", "process", "async", "inline")


def map_items(fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
    """Apply ``fn`` to each item; a failure names the item's index (runs in a worker)."""
    out = []
    for i, x in enumerate(items):
        try:
            out.append(fn(x))
        except Exception as exc:
            raise ItemFailure(i, exc) from None
        except BaseException as exc:  # KeyboardInterrupt, SystemExit: see iopipe/runtime/errors.py
            raise ItemFailure(i, Interrupted(exc)) from None
    return out


class _MapStep(FusedStep):
    """A thread map's step of a fused job: :func:`map_items` of its function."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self.fn = fn

    def run(self, items: list[Any], out: StepRun) -> tuple[list[Any], bool]:
        return map_items(self.fn, items), False


def map_items_skipping(
    fn: Callable[[Any], Any], items: list[Any]
) -> tuple[list[Any], list[tuple[int, BaseException]]]:
    """Like :func:`map_items`, going on past failures (``on_error="skip"``).

    Returns the outputs (``None`` at a failed index) and ``(index, exception)``
    per failed item.  A MemoryError still stops the job (see ``skippable``).
    """
    out: list[Any] = []
    failed: list[tuple[int, BaseException]] = []
    for i, x in enumerate(items):
        try:
            out.append(fn(x))
        except Exception as exc:
            if not skippable(exc):
                raise ItemFailure(i, exc) from None
            out.append(None)
            failed.append((i, exc))
        except BaseException as exc:
            raise ItemFailure(i, Interrupted(exc)) from None
    return out, failed


def _timed_map(fn: Callable[[Any], Any], items: list[Any]) -> tuple[list[Any], float]:
    return timed(map_items, fn, items)


def _timed_map_skipping(fn: Callable[[Any], Any], items: list[Any]) -> tuple[Any, float]:
    return timed(map_items_skipping, fn, items)


def _process_init(parent: int | None = None) -> None:
    if parent is not None:
        _exit_with(parent)
    # A decode worker process should not start its own intra-op thread pool: on
    # small machines torch's threads compete with the loader's (see docs/design.md).
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass


def _exit_with(parent: int) -> None:
    """Exit this pool worker as soon as ``parent`` (the process that made the pool) is gone.

    A SIGKILLed or SIGTERMed parent cannot shut its pool down, and the
    workers' parent is the forkserver, not it (so ``PR_SET_PDEATHSIG`` would
    not fire): without this, workers, forkserver and resource tracker outlive
    it.  A pidfd becomes readable when its process exits (Linux 5.3); else the
    thread polls every second.
    """
    try:
        fd = os.pidfd_open(parent)
    except ProcessLookupError:
        os._exit(1)
    except (AttributeError, OSError):
        fd = -1

    def watch() -> None:
        if fd >= 0:
            select.select([fd], [], [])
        else:
            while _alive(parent):
                time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="iopipe-parent-watch", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _mp_context() -> Any:
    # fork is unsafe once the loop and pool threads exist; forkserver is cheap
    # after its first start and needs only picklable functions, like spawn.
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    # The server imports torch and this module once; every worker forked from it
    # starts with them loaded instead of paying seconds of imports each.  (A no-op
    # if the process's forkserver already runs.)
    ctx.set_forkserver_preload(["torch", __name__])
    return ctx


def _forget_parents_forkserver() -> None:
    """In a child made by ``os.fork()``, drop the forkserver handle inherited from the parent.

    multiprocessing keeps one forkserver per process, and a forked child inherits
    the parent's handle: its first process pool would ``waitpid()`` a server that
    is not its child and fail (``ChildProcessError``).  Forgetting the handle makes
    the child start a server of its own; closing the child's copy of the "alive"
    descriptor leaves the parent's server to the parent.  (Private attributes of
    multiprocessing.forkserver, read defensively; tests/guarantees/test_faults.py checks it.)
    """
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    if getattr(server, "_forkserver_pid", None) is None:
        return
    alive = getattr(server, "_forkserver_alive_fd", None)
    server._forkserver_pid = None  # type: ignore[union-attr]
    server._forkserver_address = None  # type: ignore[union-attr]
    server._forkserver_alive_fd = None  # type: ignore[union-attr]
    server._lock = threading.Lock()  # type: ignore[union-attr]  # may be held at the fork
    if isinstance(alive, int):
        try:
            os.close(alive)
        except OSError:
            pass


os.register_at_fork(after_in_child=_forget_parents_forkserver)


def _check_picklable(fn: Callable[[Any], Any]) -> None:
    """Fail at build time, not mid-epoch, for a function worker processes cannot receive."""
    from multiprocessing.reduction import ForkingPickler

    try:
        ForkingPickler.dumps(fn)
    except Exception as exc:
        raise TypeError(
            "executor='process' needs a picklable function (a def at module level, not a "
            f"lambda or a nested function), got {fn!r:.80}: {type(exc).__name__}: {exc}"
        ) from exc


class Decoder(PooledStage):
    """Apply ``fn`` to each item with up to ``concurrency`` jobs in flight.

    Output is in input order unless ``ordered=False`` (then groups are emitted in
    completion order).  Invariant: at most ``concurrency`` jobs run at once; the
    stage holds at most ``window()`` groups.
    """

    kind = "map"
    knob = "map"

    def __init__(
        self,
        fn: Callable[[Any], Any],
        *,
        concurrency: int = 4,
        executor: str | None = None,
        ordered: bool = True,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name, concurrency=concurrency)
        if not callable(fn):
            raise TypeError(f"map() needs a callable, got {type(fn).__name__}: {fn!r:.80}")
        is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
            getattr(fn, "__call__", None)  # noqa: B004 - an object with an async __call__
        )
        if executor is None:
            executor = "async" if is_async else "thread"
        if executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
        if executor == "async" and not is_async:
            raise TypeError(f"executor='async' needs an async def function, got {fn!r:.80}")
        if executor != "async" and is_async:
            raise TypeError(f"{fn!r:.80} is an async function: use executor='async'")
        if executor == "process":
            _check_picklable(fn)
        if not isinstance(ordered, bool):
            raise TypeError(f"ordered must be True or False, got {ordered!r}")
        self.fn = fn
        self.executor = executor
        self.ordered = bool(ordered)
        self._pool: concurrent.futures.Executor | None = None
        self._limit: CapacityLimiter | None = None
        self._sizer = job_sizer()

    def config(self) -> dict[str, Any]:
        return {
            "fn": self.fn,
            "concurrency": self.concurrency,
            "executor": self.executor,
            "ordered": self.ordered,
        }

    def reset_runtime(self) -> None:
        super().reset_runtime()
        self._pool, self._limit, self._sizer = None, None, job_sizer()

    def open(self, unit: int) -> None:
        super().open(unit)
        self._limit = CapacityLimiter(self.concurrency)
        if self.executor == "thread":
            self._pool = WorkerPool(self.concurrency, f"iopipe-{self.name}")
        elif self.executor == "process":
            self._pool = concurrent.futures.ProcessPoolExecutor(
                self.concurrency,
                mp_context=_mp_context(),
                initializer=_process_init,
                initargs=(os.getpid(),),
            )

    def set_knob(self, value: int) -> None:
        """Run up to ``value`` jobs at once (the autotuner's setting; within the pool)."""
        assert self._limit is not None
        self.counters.concurrency = value
        self._limit.total_tokens = value

    # -- in a fused run (stages/fused.py) ---------------------------------------
    def fusable(self) -> bool:
        return self.executor == "thread"

    def fused_step(self, group: Group) -> _MapStep:
        return _MapStep(self.fn)

    def fused_width(self) -> int | None:
        return self.concurrency

    def account_fused(self, run: StepRun, items: int) -> None:
        self.counters.items += items
        self._sizer.observe(run.seconds, items)  # the job sizer sees the fused job's maps

    async def staged(self, group: Group, index: int) -> Group:
        return await self.process(group)

    async def _run_job(self, items: list[Any], job: Callable[..., Any] = _timed_map) -> Any:
        assert self._limit is not None
        async with self._limit:
            out, dt = await self.submit(self._pool, job, self.fn, items)
        self.counters.busy_s += dt
        self.counters.jobs += 1
        self._sizer.observe(dt, len(items))
        return out

    async def _run_async_item(self, x: Any, i: int) -> Any:
        assert self._limit is not None
        async with self._limit:
            t0 = loop_time()
            try:
                return await self.fn(x)
            except Exception as exc:
                raise ItemFailure(i, exc) from None
            finally:
                self.counters.busy_s += loop_time() - t0

    async def _run_async_item_skipping(self, x: Any, i: int) -> Any:
        try:
            return await self._run_async_item(x, i)
        except ItemFailure as exc:
            if not skippable(exc.cause):
                raise
            return exc

    async def process(self, group: Group) -> Group:
        """Map one group's items (the pump's step; a fused run's staged path)."""
        items = group.items
        if not items:
            return group
        if self.policy is not None:
            return await self._process_skipping(group)
        try:
            if self.executor == "inline":
                out, dt = timed(map_items, self.fn, items)
                self.counters.busy_s += dt
            elif self.executor == "async":
                out = list(
                    await asyncio.gather(*(self._run_async_item(x, i) for i, x in enumerate(items)))
                )
            else:
                spans = self._sizer.split(
                    len(items), self._limit.total_tokens if self._limit else 1
                )
                parts = await gather_spans(
                    [self._run_job(items[a:b]) for a, b in spans], [a for a, _ in spans]
                )
                out = [y for part in parts for y in part]
        except SpanFailure as sf:
            raise self.fail(group, sf.exc, sf.offset)
        except ItemFailure as exc:
            raise self.fail(group, exc)
        except concurrent.futures.BrokenExecutor as exc:
            raise self.fail(group, exc)
        self.counters.items += len(out)
        return group.replace_items(out)

    async def _process_skipping(self, group: Group) -> Group:
        """``process`` under ``on_error="skip"``: failed items are dropped, not raised."""
        items = group.items
        failed: list[tuple[int, BaseException]] = []
        try:
            if self.executor == "inline":
                (out, failed), dt = timed(map_items_skipping, self.fn, items)
                self.counters.busy_s += dt
            elif self.executor == "async":
                out = list(
                    await asyncio.gather(
                        *(self._run_async_item_skipping(x, i) for i, x in enumerate(items))
                    )
                )
                failed = [(i, y.cause) for i, y in enumerate(out) if isinstance(y, ItemFailure)]
            else:
                spans = self._sizer.split(
                    len(items), self._limit.total_tokens if self._limit else 1
                )
                parts = await gather_spans(
                    [self._run_job(items[a:b], _timed_map_skipping) for a, b in spans],
                    [a for a, _ in spans],
                )
                out = []
                for (a, _), (part, part_failed) in zip(spans, parts, strict=True):
                    out.extend(part)
                    failed.extend((a + i, exc) for i, exc in part_failed)
        except SpanFailure as sf:  # a MemoryError
            raise self.fail(group, sf.exc, sf.offset)
        except ItemFailure as exc:
            raise self.fail(group, exc)
        except concurrent.futures.BrokenExecutor as exc:
            raise self.fail(group, exc)
        if failed:
            group = self.drop_failed(group, out, failed)
            self.counters.items += len(group.items)
            return group
        self.counters.items += len(out)
        return group.replace_items(out)

    def _renew_broken_pool(self) -> None:
        """Replace a process pool one of whose workers died (a crash, SIGKILL, the OOM killer).

        A broken ProcessPoolExecutor refuses every later job: without this, one
        dead worker would fail every later epoch of the pipeline, not only its own.
        """
        pool = self._pool
        if isinstance(pool, concurrent.futures.ProcessPoolExecutor) and getattr(
            pool, "_broken", False
        ):
            shutdown_executor(pool, 10.0)  # its workers are already terminated
            self._pool = concurrent.futures.ProcessPoolExecutor(
                self.concurrency,
                mp_context=_mp_context(),
                initializer=_process_init,
                initargs=(os.getpid(),),
            )

    async def run(self, inq: Any, outq: OutQueue) -> None:
        self._renew_broken_pool()
        await pump(
            drain(inq, self.counters),
            outq,
            self.process,
            window=self.window(),
            ordered=self.ordered,
            counters=self.counters,
        )


def loop_time() -> float:
    return asyncio.get_running_loop().time()
