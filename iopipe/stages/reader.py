"""ChunkedReader: read each item's bytes into one preallocated buffer.

Backend: ``os.preadv`` in a thread pool, straight into ``numpy.empty`` buffers.
aiofiles was measured against it (bench/bench_reader_backends.py) and loses on
every workload here, because it pays a thread hand-off per call; see
docs/design.md.
"""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Any

from ..control.governor import IoGovernor
from ..io.reads import RWF_NOWAIT
from ..runtime.budget import Ticket
from ..runtime.channels import Group
from ..runtime.limits import CapacityLimiter
from ..runtime.threads import WorkerPool
from .base import (
    CURRENT_SINCE,
    CURRENT_SPAN,
    ItemFailure,
    OutQueue,
    PooledStage,
    skippable,
    timed_cpu,
)
from .pump import SpanFailure, drain, gather_spans, pump
from .read_jobs import (
    Large,
    NeedRoom,
    ReadStep,
    normalize_item,
    piece_bytes,
    read_job,
    read_job_skipping,
    read_piece,
)
from .steps import StepRun

__all__ = ["ChunkedReader"]


class ChunkedReader(PooledStage):
    """Read items (paths or ``(path, offset, length)`` ranges) into buffers.

    Each item becomes one ``numpy.ndarray`` of ``uint8`` (``len()`` and the buffer
    protocol; ``torch.from_numpy`` wraps it without a copy).  Items up to
    ``chunk_bytes`` are read whole, several to a job; larger ones are split into
    ``chunk_bytes`` pieces read concurrently into the same buffer.

    Invariant: at most ``concurrency`` reads (jobs) are in flight; each job holds
    the buffers of the items it reads.
    """

    kind = "read"
    knob = "read"
    #: ``max_inflight_bytes`` gates the reads (``budget``: the epoch's byte budget;
    #: ``byte_bound``: the bound, set on a gated reader, which is never fused).
    gates_bytes = True

    def __init__(
        self,
        *,
        chunk_bytes: int = 4 << 20,
        concurrency: int = 16,
        with_source: bool = False,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name, concurrency=concurrency)
        if not isinstance(chunk_bytes, int) or isinstance(chunk_bytes, bool) or chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be an int >= 1, got {chunk_bytes!r}")
        self.chunk_bytes = chunk_bytes
        if not isinstance(with_source, bool):
            raise TypeError(f"with_source must be True or False, got {with_source!r}")
        self.with_source = bool(with_source)
        self._pool: WorkerPool | None = None
        self._limit: CapacityLimiter | None = None
        self._gov: IoGovernor | None = None

    def config(self) -> dict[str, Any]:
        return {
            "chunk_bytes": self.chunk_bytes,
            "concurrency": self.concurrency,
            "with_source": self.with_source,
        }

    def reset_runtime(self) -> None:
        super().reset_runtime()
        self._pool, self._limit, self._gov = None, None, None

    def open(self, unit: int) -> None:
        super().open(unit)
        self._pool = WorkerPool(self.concurrency, f"iopipe-{self.name}")
        self._limit = CapacityLimiter(1)
        self._gov = IoGovernor(self._limit, self.concurrency, RWF_NOWAIT)

    @property
    def probe_flags(self) -> int:
        """``preadv`` flags a job probes the page cache with (0: none, or not open)."""
        return self._gov.probe_flags if self._gov is not None else 0

    def cached(self) -> bool:
        """Whether the governor sees the page cache serve the reads (limit 1; not open: yes)."""
        return self._limit is None or self._limit.total_tokens == 1

    def set_knob(self, value: int) -> None:
        """Let the I/O governor open up to ``value`` reads (the autotuner's setting)."""
        assert self._gov is not None
        assert self._limit is not None
        self.counters.concurrency = value
        self._gov.maximum = value
        if self._limit.total_tokens > value:
            self._limit.total_tokens = value

    # -- in a fused run (stages/fused.py) ---------------------------------------
    def fusable(self) -> bool:
        # max_inflight_bytes reserves per item: a gated reader runs its reads staged.
        return self.byte_bound is None

    def fused_step(self, group: Group) -> ReadStep:
        return ReadStep(self.chunk_bytes, self.probe_flags, self.with_source)

    def reads_cached(self) -> bool:
        return self.cached()

    def account_fused(self, run: StepRun, items: int) -> None:
        c = self.counters
        c.items += items
        c.bytes += run.bytes
        c.extra["cpu_s"] = c.extra.get("cpu_s", 0.0) + run.cpu
        if self._gov is not None:  # the I/O governor sees the reads a fused job did
            self._gov.observe(run.seconds, run.cpu, items, run.misses)

    async def resume_fused(self, group: Group, inputs: list[Any], items: list[Any]) -> list[Any]:
        larges = [(i, x) for i, x in enumerate(items) if isinstance(x, Large)]
        await self.read_larges(group, larges)
        self.counters.bytes += sum(len(x.buf) for _, x in larges)
        bufs = [x.buf if isinstance(x, Large) else x for x in items]
        if self.with_source:
            return list(zip(inputs, bufs, strict=True))
        return bufs

    async def staged(self, group: Group, index: int) -> Group:
        return await self.process(group)

    async def _job(self, fn: Any, items: int, *args: Any) -> Any:
        assert self._limit is not None
        assert self._gov is not None
        async with self._limit:
            job = functools.partial(timed_cpu, fn, *args, self._gov.probe_flags)
            (out, misses), wall, cpu = await self.submit(self._pool, job)
        self.counters.busy_s += wall
        self.counters.jobs += 1
        # CPU seconds of the reads: the bottleneck verdict tells storage from CPU by it.
        self.counters.extra["cpu_s"] = self.counters.extra.get("cpu_s", 0.0) + cpu
        if isinstance(out, list) and out and isinstance(out[-1], NeedRoom):
            items = len(out) - 1  # the job stopped for room: what it read is what it did
        self._gov.observe(wall, cpu, items, misses)
        return out

    async def read_larges(self, group: Group, larges: list[tuple[int, Large]]) -> None:
        """Read a group's large items ``(index in group, item)`` concurrently, in pieces.

        A failure is raised as a StageError naming the item; the other reads are
        cancelled and waited for first.
        """
        tasks = [asyncio.ensure_future(self._read_large(lg, i)) for i, lg in larges]
        try:
            await asyncio.gather(*tasks)
        except BaseException as exc:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for (idx, _), t in zip(larges, tasks, strict=True):
                if t.done() and not t.cancelled() and t.exception() is exc:
                    raise self.fail(group, ItemFailure(0, exc), idx)
            raise

    async def _read_large(self, large: Large, idx: int) -> None:
        """Read item ``idx`` of the group in pieces, up to ``concurrency`` at once.

        ``concurrency`` tasks take the pieces in turn, so the tasks, and the
        memory they hold, do not grow with the item's size over ``chunk_bytes``.
        """
        CURRENT_SPAN.set((idx, idx + 1))  # this task's context: the watchdog names the item
        CURRENT_SINCE.set(time.perf_counter())  # and its age, not the current piece's
        size, chunk = len(large.buf), self.chunk_bytes
        step = piece_bytes(size, chunk, self.concurrency)
        starts = iter(range(0, size, step))

        async def take_pieces() -> None:
            for s in starts:
                await self._job(read_piece, 1, large, s, min(size, s + step), chunk)

        tasks = [
            asyncio.ensure_future(take_pieces())
            for _ in range(min(self.concurrency, -(-size // step)))
        ]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def _read_span(self, job: Any, entries: list[Any], ticket: Ticket | None) -> list[Any]:
        """Run ``job`` over ``entries``, waiting on the loop wherever the byte budget is full.

        A job that meets an item with no room ends there; the wait holds no read
        slot, so reads already admitted (the pieces of large items) go on, and a
        new job takes up the rest.  Item indexes in failures are the span's.
        """
        out: list[Any] = []
        while True:
            rest = entries[len(out) :]
            try:
                part: list[Any] = await self._job(job, len(rest), rest, self.chunk_bytes)
            except ItemFailure as failure:
                if not out:
                    raise
                raise ItemFailure(failure.index + len(out), failure.cause) from None
            if not part or not isinstance(part[-1], NeedRoom):
                return out + part if out else part
            assert ticket is not None
            need = part.pop()
            out.extend(part)
            await ticket.budget.wait_room(ticket, need.bytes)

    async def process(self, group: Group) -> Group:
        """Read one group's items (the pump's step; a fused run's staged path)."""
        # Taken before any await: tickets follow the source order (iopipe/runtime/budget.py).
        budget = self.budget
        ticket = budget.ticket(group.weight + group.dropped) if budget is not None else None
        try:
            entries = [normalize_item(x) for x in group.items]
        except (TypeError, ValueError) as exc:
            if self.policy is None:
                raise self.fail(group, exc)
            group, entries = self._drop_unreadable(group)
            if not entries:
                return group
        results: list[Any] = []
        assert self._gov is not None
        spans = self._gov.split(len(entries))
        job = read_job if self.policy is None else read_job_skipping
        if ticket is not None:
            job = functools.partial(job, reserve=ticket.try_take)
            ticket.expect(len(entries))
        try:
            done = await gather_spans(
                [self._read_span(job, entries[a:b], ticket) for a, b in spans],
                [a for a, _ in spans],
            )
        except SpanFailure as sf:
            raise self.fail(group, sf.exc, sf.offset)
        finally:
            if ticket is not None:
                ticket.done()
        larges: list[tuple[int, Large]] = []
        for out, (a, _) in zip(done, spans, strict=True):
            for j, x in enumerate(out):
                if isinstance(x, Large):
                    larges.append((a + j, x))
                    results.append(x.buf)
                else:
                    results.append(x)
        if self.policy is not None:
            return await self._finish_skipping(group, results, larges)
        if larges:
            await self.read_larges(group, larges)
        self.counters.items += len(results)
        self.counters.bytes += sum(len(r) for r in results)
        if self.with_source:
            results = [(src, buf) for src, buf in zip(group.items, results, strict=True)]
        return group.replace_items(results)

    def _drop_unreadable(self, group: Group) -> tuple[Group, list[tuple[str, int, int | None]]]:
        """Skip the items that are not paths or byte ranges (``on_error="skip"``)."""
        entries = []
        failed: list[tuple[int, BaseException]] = []
        for i, x in enumerate(group.items):
            try:
                entries.append(normalize_item(x))
            except (TypeError, ValueError) as exc:
                failed.append((i, exc))
        return self.drop_failed(group, group.items, failed), entries

    async def _finish_skipping(
        self, group: Group, results: list[Any], larges: list[tuple[int, Large]]
    ) -> Group:
        """The end of ``process`` under ``on_error="skip"``: drop the items that failed."""
        failed = [(i, r.cause) for i, r in enumerate(results) if isinstance(r, ItemFailure)]
        if larges:
            tasks = [asyncio.ensure_future(self._read_large(lg, i)) for i, lg in larges]
            try:
                outcomes = await asyncio.gather(*tasks, return_exceptions=True)
            except BaseException:
                for t in tasks:
                    t.cancel()
                raise
            for (idx, _), res in zip(larges, outcomes, strict=True):
                if isinstance(res, asyncio.CancelledError):
                    raise res
                if isinstance(res, BaseException):
                    if not skippable(res):
                        raise self.fail(group, ItemFailure(0, res), idx)
                    failed.append((idx, res))
        if not failed:
            self.counters.items += len(results)
            self.counters.bytes += sum(len(r) for r in results)
            if self.with_source:
                results = [(src, buf) for src, buf in zip(group.items, results, strict=True)]
            return group.replace_items(results)
        failed.sort(key=lambda f: f[0])
        gone = {i for i, _ in failed}
        self.counters.bytes += sum(len(r) for i, r in enumerate(results) if i not in gone)
        if self.with_source:
            results = [(src, buf) for src, buf in zip(group.items, results, strict=True)]
        group = self.drop_failed(group, results, failed)
        self.counters.items += len(group.items)
        return group

    async def run(self, inq: Any, outq: OutQueue) -> None:
        await pump(
            drain(inq, self.counters),
            outq,
            self.process,
            window=self.window(),
            ordered=True,
            counters=self.counters,
        )
