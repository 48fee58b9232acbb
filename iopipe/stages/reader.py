"""ChunkedReader: read each item's bytes into one preallocated buffer.

Backend: ``os.preadv`` in a thread pool, straight into ``numpy.empty`` buffers.
aiofiles was measured against it (bench/bench_reader_backends.py) and loses on
every workload here, because it pays a thread hand-off per call; see
docs/design.md.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..io.files import open_regular, open_sized
from ..runtime.budget import ByteBudget, Ticket
from ..runtime.channels import Group
from ..runtime.threads import WorkerPool
from .base import (
    CURRENT_SINCE,
    CURRENT_SPAN,
    IoGovernor,
    ItemFailure,
    Limiter,
    OutQueue,
    SpanFailure,
    Stage,
    drain,
    gather_spans,
    pump,
    shutdown_executor,
    skippable,
    timed_cpu,
)

__all__ = ["ChunkedReader", "normalize_item", "read_exact"]

_O_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)


@dataclass(slots=True)
class _Large:
    """An item too big for one job: its pieces are read concurrently into ``buf``.

    It carries no open file: each piece's job opens and closes the file itself, so
    a job abandoned by a cancelled epoch can never leak a descriptor.
    """

    path: str
    buf: np.ndarray[Any, np.dtype[np.uint8]]
    offset: int


@dataclass(slots=True, frozen=True)
class _NeedRoom:
    """The last entry of a job's output: the next item's ``bytes`` did not fit the budget."""

    bytes: int


def normalize_item(item: Any) -> tuple[str, int, int | None]:
    """Return ``(path, offset, length)`` for a path or a ``(path, offset, length)`` tuple.

    Raises:
        TypeError: the item is neither.
        ValueError: a negative offset or length.
    """
    if isinstance(item, str | os.PathLike):
        return os.fspath(item), 0, None
    if isinstance(item, tuple) and len(item) == 3 and isinstance(item[0], str | os.PathLike):
        path, offset, length = item
        if not isinstance(offset, int) or offset < 0:
            raise ValueError(f"byte range offset must be an int >= 0, got {offset!r}")
        if not isinstance(length, int) or length < 0:
            raise ValueError(f"byte range length must be an int >= 0, got {length!r}")
        return os.fspath(path), offset, length
    raise TypeError(
        "read() expects paths or (path, offset, length) tuples, got "
        f"{type(item).__name__}: {item!r:.80}"
    )


def read_exact(fd: int, buf: Any, offset: int, path: str) -> None:
    """Fill ``buf`` from ``fd`` at ``offset`` with ``os.preadv``; short files raise EOFError."""
    n = os.preadv(fd, [buf], offset)
    want = len(buf) if isinstance(buf, np.ndarray) else memoryview(buf).nbytes
    if n == want:
        return
    view = memoryview(buf).cast("B")
    got = n
    while got < want:
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            raise EOFError(
                f"{path}: expected {want} bytes at offset {offset}, the file ended after {got}"
            )
        got += n


#: ``preadv`` flag that fails with EAGAIN instead of waiting for storage (Linux).
_NOWAIT: int = getattr(os, "RWF_NOWAIT", 0)

#: A job probes every this many reads (the first always): a refused probe costs
#: 3-7 us of CPU per cold file on the benchmark machine, a sample of 1 in 8
#: tells the miss rate as well for a group of any size worth governing.
_PROBE_EVERY = 8


def _read_probing(fd: int, buf: Any, offset: int, path: str, flags: int) -> int:
    """Fill ``buf`` like :func:`read_exact`; say whether the bytes had to come from storage.

    With ``flags=RWF_NOWAIT`` the first ``preadv`` returns only what the page cache
    holds, so a short or refused read is a cache miss, measured exactly and for the
    price of one syscall.  Returns 1 for a miss, 0 for a hit, -1 when the file
    system does not support the probe (the caller stops probing).
    """
    if not flags:
        read_exact(fd, buf, offset, path)
        return 0
    want = len(buf)
    try:
        n = os.preadv(fd, [buf], offset, flags)
    except BlockingIOError:
        n, missed = 0, 1
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            read_exact(fd, buf, offset, path)
            return -1
        raise
    else:
        missed = 0 if n == want else 1
    if n < want:
        read_exact(fd, buf[n:], offset + n, path)
    return missed


def _item_size(
    fd: int, fd_size: int, path: str, offset: int, length: int | None
) -> tuple[int, int]:
    """``(bytes to read, file size)`` of an item; a range past the end is refused first.

    A bogus length is refused before its buffer is allocated (:func:`_past_end`
    looks again, in case the file grew since it was opened).
    """
    if length is None:
        return max(0, fd_size - offset), fd_size
    if offset + length > fd_size:
        fd_size = _past_end(fd, path, offset, length)
    return length, fd_size


def _read_job(
    entries: list[tuple[str, int, int | None]],
    chunk_bytes: int,
    flags: int,
    skip: bool = False,
    reserve: Callable[[int], bool] | None = None,
) -> tuple[list[Any], int]:
    """Read whole small items; size large ones for chunked reading (worker thread).

    Returns the buffers and the number of cache misses (-1: the probe is not
    supported here, or nothing probed), estimated from every ``_PROBE_EVERY``-th
    read.  Consecutive byte ranges of one file share one descriptor (token
    windows, say, would otherwise pay an open and a close per range).
    Every descriptor it opens is closed before it returns.  With ``skip``
    (``on_error="skip"``) an item that fails gets an :class:`ItemFailure` in
    place of its buffer and the job goes on.  With ``reserve`` (``max_inflight_bytes``)
    each item's size is reserved before its buffer is allocated; an item that does
    not fit ends the job, with a :class:`_NeedRoom` after the items read.
    """
    out: list[Any] = []
    misses = probed = 0
    fd, fd_path = -1, ""
    try:
        for i, (path, offset, length) in enumerate(entries):
            if path != fd_path:
                if fd >= 0:
                    os.close(fd)
                    fd, fd_path = -1, ""
                try:
                    fd, fd_size = open_sized(path, _O_FLAGS)
                except OSError as exc:
                    if not skip:
                        raise ItemFailure(i, exc) from None
                    out.append(ItemFailure(i, exc))
                    continue
                fd_path = path
            try:
                size, fd_size = _item_size(fd, fd_size, path, offset, length)
                if reserve is not None and not reserve(size):
                    out.append(_NeedRoom(size))  # the reader waits for room on the loop
                    break
                buf: Any = np.empty(size, np.uint8)
                if size > chunk_bytes:
                    out.append(_Large(path, buf, offset))
                    continue
                if flags and i % _PROBE_EVERY == 0:
                    miss = _read_probing(fd, buf, offset, path, flags)
                    flags, misses, probed = (
                        (0, -1, probed) if miss < 0 else (flags, misses + miss, probed + 1)
                    )
                elif os.preadv(fd, [buf], offset) != size:  # short: read the rest
                    read_exact(fd, buf, offset, path)
                out.append(buf)
            except Exception as err:
                failure = _explained(err, fd, path, offset, length)
                if not skip or not skippable(failure):
                    raise ItemFailure(i, failure) from None
                out.append(ItemFailure(i, failure))
    finally:
        if fd >= 0:
            os.close(fd)
    read = len(out) - (1 if out and isinstance(out[-1], _NeedRoom) else 0)
    if probed == 0:
        misses = -1  # nothing probed: no observation (a job cut short by the budget, say)
    elif misses > 0:
        misses = min(read, round(misses * read / probed))
    return out, misses


_read_job_skipping = functools.partial(_read_job, skip=True)


def _explained(exc: Exception, fd: int, path: str, offset: int, length: int | None) -> Exception:
    """Make a failed read say which file, and how short it was, in its own message.

    ``preadv`` on a folder raises IsADirectoryError without a filename (the
    path was replaced by a folder after listing); a short read reports only
    the last call's offsets, not the range the user asked for.
    """
    if isinstance(exc, OSError) and exc.filename is None:
        exc.filename = path
        return exc
    if not isinstance(exc, EOFError):
        return exc
    try:
        now = os.fstat(fd).st_size
    except OSError:
        return exc
    if length is not None:
        text = (
            f"{path}: byte range (offset {offset}, length {length}) runs past the end of "
            f"the file ({now} bytes): a wrong range, or the file was truncated after listing"
        )
    else:
        text = f"{path}: the file was truncated to {now} bytes while being read"
    new = EOFError(text)
    new.__cause__ = exc
    return new


def _past_end(fd: int, path: str, offset: int, length: int) -> int:
    """The file's size now if the range fits it after all (it grew); else raise EOFError."""
    now = os.fstat(fd).st_size
    if offset + length <= now:
        return now
    raise EOFError(
        f"{path}: byte range (offset {offset}, length {length}) runs past the end of "
        f"the file ({now} bytes): a wrong range, or the file was truncated after listing"
    )


#: A job of a large item reads at least this much (several chunks, one ``preadv``
#: each) once the item has more chunks than workers to read them: a job costs a
#: thread crossing (hundreds of microseconds of CPU here), a 1 MiB read about as much.
_MIN_JOB_BYTES = 1 << 20


def _piece_bytes(size: int, chunk_bytes: int, workers: int) -> int:
    """Bytes per job for a ``size``-byte item: whole chunks, enough jobs for ``workers``."""
    chunks = -(-size // chunk_bytes)
    per_job = min(-(-_MIN_JOB_BYTES // chunk_bytes), chunks // max(1, workers))
    return chunk_bytes * max(1, per_job)


def _read_piece(large: _Large, start: int, stop: int, chunk: int, flags: int) -> tuple[int, int]:
    """Read ``buf[start:stop]`` of a large item, ``chunk`` bytes a ``preadv`` (worker thread)."""
    fd = open_regular(large.path, _O_FLAGS)
    miss = 0
    try:
        for a in range(start, stop, chunk):
            b = min(stop, a + chunk)
            if a == start:  # the first chunk's read probes the page cache for the piece
                miss = _read_probing(fd, large.buf[a:b], large.offset + a, large.path, flags)
            else:
                read_exact(fd, large.buf[a:b], large.offset + a, large.path)
    finally:
        os.close(fd)
    return stop - start, miss


class ChunkedReader(Stage):
    """Read items (paths or ``(path, offset, length)`` ranges) into buffers.

    Each item becomes one ``numpy.ndarray`` of ``uint8`` (``len()`` and the buffer
    protocol; ``torch.from_numpy`` wraps it without a copy).  Items up to
    ``chunk_bytes`` are read whole, several to a job; larger ones are split into
    ``chunk_bytes`` pieces read concurrently into the same buffer.

    Invariant: at most ``concurrency`` reads (jobs) are in flight; each job holds
    the buffers of the items it reads.
    """

    kind = "read"
    #: The epoch's byte budget (``max_inflight_bytes``), set by the pipeline per epoch.
    budget: ByteBudget | None = None
    #: ``max_inflight_bytes`` when this reader is gated by it (a gated reader is never fused).
    byte_bound: int | None = None

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
        self._limit: Limiter | None = None
        self._gov: IoGovernor | None = None

    def config(self) -> dict[str, Any]:
        return {
            "chunk_bytes": self.chunk_bytes,
            "concurrency": self.concurrency,
            "with_source": self.with_source,
        }

    def fresh(self) -> ChunkedReader:
        clone = super().fresh()
        assert isinstance(clone, ChunkedReader)
        clone._pool, clone._limit, clone._gov = None, None, None
        return clone

    def open(self, unit: int) -> None:
        super().open(unit)
        self._pool = WorkerPool(self.concurrency, f"iopipe-{self.name}")
        self._limit = Limiter(1)
        self._gov = IoGovernor(self._limit, self.concurrency, _NOWAIT)

    def close(self, timeout: float) -> None:
        shutdown_executor(self._pool, timeout)
        self._pool = None

    def window(self) -> int:
        # Small groups (one item each, say) need several in process to fill the workers.
        return max(2, -(-2 * self.concurrency // max(1, self.unit)))

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
        if isinstance(out, list) and out and isinstance(out[-1], _NeedRoom):
            items = len(out) - 1  # the job stopped for room: what it read is what it did
        self._gov.observe(wall, cpu, items, misses)
        return out

    async def read_larges(self, group: Group, larges: list[tuple[int, _Large]]) -> None:
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

    async def _read_large(self, large: _Large, idx: int) -> None:
        """Read item ``idx`` of the group in pieces, up to ``concurrency`` at once.

        ``concurrency`` tasks take the pieces in turn, so the tasks, and the
        memory they hold, do not grow with the item's size over ``chunk_bytes``.
        """
        CURRENT_SPAN.set((idx, idx + 1))  # this task's context: the watchdog names the item
        CURRENT_SINCE.set(time.perf_counter())  # and its age, not the current piece's
        size, chunk = len(large.buf), self.chunk_bytes
        step = _piece_bytes(size, chunk, self.concurrency)
        starts = iter(range(0, size, step))

        async def take_pieces() -> None:
            for s in starts:
                await self._job(_read_piece, 1, large, s, min(size, s + step), chunk)

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
            if not part or not isinstance(part[-1], _NeedRoom):
                return out + part if out else part
            assert ticket is not None
            need = part.pop()
            out.extend(part)
            await ticket.budget.wait_room(ticket, need.bytes)

    async def _process(self, group: Group) -> Group:
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
        job = _read_job if self.policy is None else _read_job_skipping
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
        larges: list[tuple[int, _Large]] = []
        for out, (a, _) in zip(done, spans, strict=True):
            for j, x in enumerate(out):
                if isinstance(x, _Large):
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
        self, group: Group, results: list[Any], larges: list[tuple[int, _Large]]
    ) -> Group:
        """The end of ``_process`` under ``on_error="skip"``: drop the items that failed."""
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
            self._process,
            window=self.window(),
            ordered=True,
            counters=self.counters,
        )
