"""The measurement core of ``iopipe probe``: how fast can this storage be read, and how?

For every cell of a grid (reads in flight x chunk size) the probe reads the files
with exactly that many worker threads, each issuing one ``os.preadv`` of at most
``chunk_bytes`` at a time into a buffer it reuses.  It uses the engine's reader
I/O (:func:`~iopipe.io.reads.read_exact`) but not the engine's
pipeline: the reader's adaptive governor would change the concurrency being
measured.  Large files are split into chunks that any worker may take, as the
engine's reader does, so one big file still keeps every worker busy.

Cold runs evict every file from the page cache before each cell (``os.sync()``,
then ``posix_fadvise(POSIX_FADV_DONTNEED)``); warm runs read everything once
first, so that every cell sees the same (cached) state.

The cells and their verdict (storage-bound or CPU-bound) are in
:mod:`iopipe.probe.report`.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..io.files import O_READ
from ..io.reads import read_exact
from ..pipeline.sizes import format_size
from .report import ProbeCell, ProbeReport, median_pass

__all__ = ["evict", "measure", "probe", "warm"]

#: Passes over the files per cell at least, seconds per cell at least, passes at most.
REPEATS = 3
MIN_TIME_S = 0.5
MAX_PASSES = 1000
_JOIN_TIMEOUT_S = 30.0


# -- the page cache ------------------------------------------------------------------


def evict(paths: Sequence[str]) -> None:
    """Drop ``paths`` from the page cache: ``os.sync()``, then ``POSIX_FADV_DONTNEED`` each."""
    os.sync()
    for p in paths:
        fd = os.open(p, O_READ)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(paths: Sequence[str]) -> None:
    """Read every file of ``paths`` once, so that it sits in the page cache."""
    buf = bytearray(8 << 20)
    for p in paths:
        fd = os.open(p, O_READ)
        try:
            while os.readv(fd, [buf]) > 0:
                pass
        finally:
            os.close(fd)


# -- one cell ----------------------------------------------------------------------------


class _Cell:
    """Shared state of the workers of one cell (their invariant: one read in flight each)."""

    def __init__(
        self,
        files: Sequence[tuple[str, int]],
        chunk_bytes: int,
        deadline: float | None,
        read: Callable[[str, Any, int], None] | None = None,
    ) -> None:
        self.files = files
        self.read = read  # (name, buffer, offset): a remote read; None: local files
        self.chunk_bytes = chunk_bytes
        self.deadline = deadline
        # Work units: (file index, offset, length); a file of size 0 is one empty unit.
        self.units = [
            (i, off, min(chunk_bytes, size - off))
            for i, (_, size) in enumerate(files)
            for off in (range(0, size, chunk_bytes) if size else (0,))
        ]
        self.left = [max(1, -(-size // chunk_bytes)) for _, size in files]
        self.started = [0.0] * len(files)
        self.latencies: list[float] = []
        self.bytes = 0
        self.next = 0
        self.lock = threading.Lock()
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.cpu_s = 0.0  # summed over the workers, from their schedstat
        self.runq_s = 0.0
        self.schedstat = True

    def take(self) -> tuple[int, int, int] | None:
        with self.lock:
            if self.next >= len(self.units) or self.stop.is_set():
                return None
            if self.deadline is not None and time.perf_counter() >= self.deadline:
                return None
            unit = self.units[self.next]
            self.next += 1
            if self.started[unit[0]] == 0.0:
                self.started[unit[0]] = time.perf_counter()
            return unit

    def done(self, index: int, n: int) -> None:
        now = time.perf_counter()
        with self.lock:
            self.bytes += n
            self.left[index] -= 1
            if self.left[index] == 0:
                self.latencies.append(now - self.started[index])

    def work(self) -> None:
        buf = np.empty(self.chunk_bytes, np.uint8)  # reused: touching fresh pages costs
        s0 = _schedstat()
        try:
            while (unit := self.take()) is not None:
                index, offset, length = unit
                path = self.files[index][0]
                if self.read is not None:
                    self.read(path, buf[:length], offset)
                else:
                    fd = os.open(path, O_READ)
                    try:
                        read_exact(fd, buf[:length], offset, path)
                    finally:
                        os.close(fd)
                self.done(index, length)
        except BaseException as exc:  # reported by measure() in the calling thread
            with self.lock:
                self.error = self.error or exc
            self.stop.set()
        finally:
            s1 = _schedstat()
            with self.lock:
                if s0 is None or s1 is None:
                    self.schedstat = False
                else:
                    self.cpu_s += s1[0] - s0[0]
                    self.runq_s += s1[1] - s0[1]


def _schedstat() -> tuple[float, float] | None:
    """This thread's seconds on a CPU and waiting for one, or None where unavailable."""
    try:
        with open("/proc/thread-self/schedstat", "rb") as f:
            on_cpu, waiting = f.read().split()[:2]
        return int(on_cpu) / 1e9, int(waiting) / 1e9
    except (OSError, ValueError):
        return None


def measure(
    files: Sequence[tuple[str, int]],
    *,
    concurrency: int,
    chunk_bytes: int,
    duration: float | None = None,
    tick: Callable[[_Cell], None] | None = None,
    cpus: int | None = None,
    read: Callable[[str, Any, int], None] | None = None,
) -> ProbeCell:
    """Read ``files`` with ``concurrency`` threads, one read of <= ``chunk_bytes`` each.

    Blocks until every file is read or ``duration`` seconds have passed; calls
    ``tick(state)`` about every 0.1 s from the calling thread (for progress).

    Raises:
        OSError: a read failed (the first failure; the other workers stop).
    """
    start = time.perf_counter()
    cell = _Cell(files, chunk_bytes, start + duration if duration else None, read)
    threads = [
        threading.Thread(target=cell.work, name=f"iopipe-probe_{i}", daemon=True)
        for i in range(concurrency)
    ]
    cpu0 = time.process_time()
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(0.1)
                if tick is not None:
                    tick(cell)
    except BaseException:
        cell.stop.set()
        for t in threads:
            t.join(_JOIN_TIMEOUT_S)
        raise
    wall = time.perf_counter() - start
    cpu, runq = cell.cpu_s, cell.runq_s
    if not cell.schedstat:
        cpu, runq = time.process_time() - cpu0, 0.0
    if cell.error is not None:
        raise cell.error
    lat = np.array(cell.latencies) * 1e3 if cell.latencies else np.zeros(1)
    return ProbeCell(
        concurrency=concurrency,
        chunk_bytes=chunk_bytes,
        files=len(cell.latencies),
        bytes=cell.bytes,
        wall_s=wall,
        cpu_s=cpu,
        runq_s=runq,
        p50_ms=float(np.percentile(lat, 50)),
        p99_ms=float(np.percentile(lat, 99)),
        cpus=cpus or os.cpu_count() or 1,
    )


def probe(
    path: str,
    files: Sequence[tuple[str, int]],
    *,
    concurrency: Sequence[int],
    chunk_bytes: Sequence[int],
    cold: bool = False,
    duration: float | None = None,
    repeats: int = REPEATS,
    min_time: float = MIN_TIME_S,
    progress: Any = None,
    read: Callable[[str, Any, int], None] | None = None,
) -> ProbeReport:
    """Measure every (concurrency, chunk size) cell over ``files``.

    Args:
        path: What was probed (for the report).
        files: ``(path, size)`` pairs, as :func:`~iopipe.io.listing.sized_files` returns them.
        concurrency: Reads in flight to try.
        chunk_bytes: Largest single reads to try.
        cold: Evict the files from the page cache before each cell; otherwise
            read them all once before the first (unless they exceed half the
            available memory: then they are read as the cache holds them).
        duration: Seconds per pass at most (default: read every file once).
        repeats: Passes per cell at least; the cell reports the median pass.
        min_time: Seconds per cell at least: small folders are read again
            (at most :data:`MAX_PASSES` passes) until the cell took this long,
            so a 10 ms measurement does not decide the advice.
        progress: A tqdm-like bar (``update``, ``set_postfix_str``) or None.
        read: ``read(name, buffer, offset)`` fills ``buffer`` from object ``name``
            (remote objects: neither warmed nor evicted); None: local files.
    """
    if repeats < 1 or min_time < 0:
        raise ValueError(f"repeats must be >= 1 and min_time >= 0, got {repeats}, {min_time}")
    paths = [p for p, _ in files]
    total = sum(s for _, s in files)
    warmed = read is None and not cold and total <= _available_memory() // 2
    if warmed:  # data larger than that would evict itself while being read
        warm(paths)
    cells = []
    for c in concurrency:
        for ch in chunk_bytes:
            if progress is not None:
                progress.set_description(f"conc {c}, chunk {format_size(ch)}")
            local_cold = cold and read is None  # remote objects are never evicted
            one_pass = _one_pass(files, c, ch, local_cold, duration, progress, read)
            cells.append(_repeat(one_pass, repeats, min_time))
            if progress is not None:
                progress.update(1)
    return ProbeReport(
        path=path,
        files=len(files),
        bytes=total,
        cold=cold,
        duration_s=duration,
        warmed=warmed,
        cpus=os.cpu_count() or 1,
        cells=tuple(cells),
    )


def _one_pass(
    files: Sequence[tuple[str, int]],
    concurrency: int,
    chunk_bytes: int,
    cold: bool,
    duration: float | None,
    progress: Any,
    read: Callable[[str, Any, int], None] | None = None,
) -> Callable[[], ProbeCell]:
    """One pass of a cell, as :func:`_repeat` runs it: evict if ``cold``, then measure."""
    paths = [p for p, _ in files]
    t0 = time.perf_counter()

    def tick(cell: _Cell) -> None:
        dt = time.perf_counter() - t0
        if progress is not None and dt > 0:
            progress.set_postfix_str(f"{cell.bytes / dt / 1e6:,.0f} MB/s")

    def one_pass() -> ProbeCell:
        if cold:
            evict(paths)
        return measure(
            files,
            concurrency=concurrency,
            chunk_bytes=chunk_bytes,
            duration=duration,
            tick=tick,
            read=read,
        )

    return one_pass


def _repeat(one_pass: Callable[[], ProbeCell], repeats: int, min_time: float) -> ProbeCell:
    """Run ``one_pass`` ``repeats`` times at least and until ``min_time``; the median pass."""
    passes: list[ProbeCell] = []
    started = time.perf_counter()
    while len(passes) < MAX_PASSES and (
        len(passes) < repeats or time.perf_counter() - started < min_time
    ):
        passes.append(one_pass())
    return median_pass(passes)


def _available_memory() -> int:
    """Bytes of memory available for the page cache (a large number where unknown)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # pragma: no cover - not Linux
        return 1 << 62
