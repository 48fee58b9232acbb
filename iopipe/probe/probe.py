"""The measurement core of ``iopipe probe``: how fast can this storage be read, and how?

For every cell of a grid (reads in flight x chunk size) the probe reads the files
with exactly that many worker threads, each issuing one ``os.preadv`` of at most
``chunk_bytes`` at a time into a buffer it reuses.  It uses the engine's reader
internals (:func:`~iopipe.stages.reader.read_exact`) but not the engine's
pipeline: the reader's adaptive governor would change the concurrency being
measured.  Large files are split into chunks that any worker may take, as the
engine's reader does, so one big file still keeps every worker busy.

Cold runs evict every file from the page cache before each cell (``os.sync()``,
then ``posix_fadvise(POSIX_FADV_DONTNEED)``); warm runs read everything once
first, so that every cell sees the same (cached) state.

Storage-bound or CPU-bound: each worker reads its thread's scheduler statistics
(``/proc/thread-self/schedstat``: time on a CPU, time waiting for one), whose
sum over the workers divided by the wall time is the mean number of readers
that were *runnable* (counting the wait for a CPU keeps a machine busy with
other work from looking like slow storage; without schedstat, process CPU time
is used).  The reads are **storage-bound** when more reads in flight pay
(the best cell reads at least :data:`SCALES` times as fast as the fewest readers
did: the device has parallelism that waiting readers leave unused) or when
the fewest readers were runnable less than half of the time (they slept in
``preadv``); otherwise **CPU-bound**: readers that do not wait on the device
are limited by the CPU, or by the GIL for per-file Python overhead, and more
of them will not help.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..io.files import open_sized
from ..pipeline.config import format_size
from ..stages.reader import read_exact

__all__ = [
    "SCHEMA",
    "ProbeCell",
    "ProbeReport",
    "evict",
    "list_files",
    "measure",
    "probe",
    "warm",
]

SCHEMA = "iopipe.probe/1"
_O_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
#: Cells within this share of the best throughput count as equally good; the
#: recommendation takes the one with the fewest reads in flight.
GOOD_ENOUGH = 0.95
#: Speed-up over the fewest readers from which the reads count as storage-bound.
SCALES = 1.5
#: Passes over the files per cell at least, seconds per cell at least, passes at most.
REPEATS = 3
MIN_TIME_S = 0.5
MAX_PASSES = 1000
_JOIN_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class ProbeCell:
    """What one (concurrency, chunk size) cell measured.

    Attributes:
        concurrency: Worker threads, each with one read in flight.
        chunk_bytes: Largest single read.
        files: Files read completely.
        bytes: Bytes read.
        wall_s: Seconds from the first read to the last.
        cpu_s: CPU seconds the readers used.
        runq_s: Seconds the readers were ready to run but waited for a CPU.
        p50_ms, p99_ms: Median and 99th percentile of the time to read one file.
        cpus: CPUs the machine has.
        passes: Times the files were read for this cell; the other figures are
            those of the median pass (by throughput).
        best_mb_per_s: The fastest pass's throughput.
        spread: (fastest - slowest) / median throughput over the passes.
    """

    concurrency: int
    chunk_bytes: int
    files: int
    bytes: int
    wall_s: float
    cpu_s: float
    runq_s: float
    p50_ms: float
    p99_ms: float
    cpus: int = field(default=1)
    passes: int = 1
    best_mb_per_s: float = 0.0
    spread: float = 0.0

    @property
    def mb_per_s(self) -> float:
        """Throughput in MB/s (10**6 bytes per second)."""
        return self.bytes / self.wall_s / 1e6 if self.wall_s > 0 else 0.0

    @property
    def files_per_s(self) -> float:
        """Whole files read per second."""
        return self.files / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def runnable(self) -> float:
        """Mean number of readers running or ready to run (see the module docstring)."""
        return (self.cpu_s + self.runq_s) / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "concurrency": self.concurrency,
            "chunk_bytes": self.chunk_bytes,
            "files": self.files,
            "bytes": self.bytes,
            "wall_s": round(self.wall_s, 6),
            "mb_per_s": round(self.mb_per_s, 3),
            "files_per_s": round(self.files_per_s, 3),
            "p50_ms": round(self.p50_ms, 4),
            "p99_ms": round(self.p99_ms, 4),
            "cpu_s": round(self.cpu_s, 6),
            "runq_s": round(self.runq_s, 6),
            "runnable": round(self.runnable, 4),
            "passes": self.passes,
            "spread": round(self.spread, 4),
        }


@dataclass(frozen=True, slots=True)
class ProbeReport:
    """All cells of one probe, and what they recommend."""

    path: str
    files: int
    bytes: int
    cold: bool
    duration_s: float | None
    warmed: bool  # every file was read once before measuring (warm runs that fit in memory)
    cpus: int
    cells: tuple[ProbeCell, ...]

    def recommended(self) -> ProbeCell:
        """The cell with the fewest reads in flight among those within 5% of the best.

        A cell whose fastest pass comes within 5% of the best median counts: the
        passes' noise decides nothing.
        """
        top = max(c.mb_per_s for c in self.cells)
        good = [c for c in self.cells if max(c.mb_per_s, c.best_mb_per_s) >= GOOD_ENOUGH * top]
        return min(good, key=lambda c: (c.concurrency, -c.mb_per_s))

    def _fewest(self) -> ProbeCell:
        """The best cell among those with the fewest readers."""
        least = min(c.concurrency for c in self.cells)
        return max((c for c in self.cells if c.concurrency == least), key=lambda c: c.mb_per_s)

    def speedup(self) -> float:
        """Best throughput over the best with the fewest readers."""
        base = self._fewest().mb_per_s
        return max(c.mb_per_s for c in self.cells) / base if base > 0 else 1.0

    def bound(self) -> str:
        """``"storage"`` or ``"cpu"`` (see the module docstring)."""
        few = self._fewest()
        idle = few.runnable / few.concurrency < 0.5
        return "storage" if self.speedup() >= SCALES or idle else "cpu"

    def advice(self) -> str:
        """One line: the settings to use and why the reads are bounded where they are."""
        c, few = self.recommended(), self._fewest()
        setting = f"read(concurrency={c.concurrency}, chunk_bytes={format_size(c.chunk_bytes)!r})"
        speed = f"{c.mb_per_s:,.1f} MB/s, {c.files_per_s:,.0f} files/s"
        busy = few.runnable / few.concurrency
        many = few.concurrency > 1
        n = f"{few.concurrency} read{'s' if many else ''} in flight"
        threads = "their threads were" if many else "its thread was"
        if self.bound() == "cpu":
            why = (
                f"CPU-bound: {n} already reach {1 / self.speedup():.0%} of the best and "
                f"{threads} runnable {busy:.0%} of the time (cached data, or per-file "
                "overhead); more reads in flight will not help"
            )
        elif self.speedup() >= SCALES:
            why = (
                f"storage-bound: {self.speedup():.1f}x as fast as {n}; reads wait on the "
                "device, and keeping more in flight hides its latency"
            )
        else:
            why = (
                f"storage-bound: with {n} {threads} runnable only {busy:.0%} of the "
                "time; reads wait on the device"
            )
        return f"{setting}: {speed}; {why}"

    def to_dict(self) -> dict[str, Any]:
        c = self.recommended()
        return {
            "schema": SCHEMA,
            "path": self.path,
            "files": self.files,
            "bytes": self.bytes,
            "cold": self.cold,
            "warmed": self.warmed,
            "duration_s": self.duration_s,
            "cpus": self.cpus,
            "results": [cell.to_dict() for cell in self.cells],
            "recommendation": {
                "concurrency": c.concurrency,
                "chunk_bytes": c.chunk_bytes,
                "mb_per_s": round(c.mb_per_s, 3),
                "files_per_s": round(c.files_per_s, 3),
                "bound": self.bound(),
                "speedup": round(self.speedup(), 4),
                "advice": self.advice(),
            },
        }

    def table(self) -> str:
        """The cells as an aligned text table."""
        rows = [("conc", "chunk", "MB/s", "±", "files/s", "p50 ms", "p99 ms", "runnable")]
        for c in self.cells:
            rows.append(
                (
                    str(c.concurrency),
                    format_size(c.chunk_bytes),
                    f"{c.mb_per_s:,.1f}",
                    f"{c.spread / 2:.0%}",
                    f"{c.files_per_s:,.0f}",
                    f"{c.p50_ms:.3f}",
                    f"{c.p99_ms:.3f}",
                    f"{c.runnable:.2f}",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join(
            "  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in rows
        )


# -- files and the page cache ---------------------------------------------------------


def list_files(path: str | os.PathLike[str], pattern: str | None = None) -> list[tuple[str, int]]:
    """Return ``(path, size)`` of the regular files under ``path``, sorted; check they open.

    Args:
        path: A folder (searched recursively) or one file.
        pattern: A glob relative to ``path`` (``"*.jpg"``, ``"**/*.bin"``); default: every file.

    Raises:
        FileNotFoundError: ``path`` does not exist, or no file is found.
        PermissionError, OSError: a file cannot be opened (the message names it).
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"no such file or directory: {os.fspath(path)}")
    found = [root]
    if root.is_dir():
        found = sorted(root.glob(pattern) if pattern else root.rglob("*"))
    out: list[tuple[str, int]] = []
    for p in found:
        try:
            st = os.stat(p)
        except OSError as exc:
            raise type(exc)(exc.errno, f"cannot read {p}: {exc.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            continue
        try:
            os.close(open_sized(p, _O_FLAGS)[0])  # a FIFO or /proc file is refused
        except OSError as exc:
            raise type(exc)(exc.errno, f"cannot read {p}: {exc.strerror}") from None
        out.append((os.fspath(p), st.st_size))
    if not out:
        where = f"matching {pattern!r} " if pattern else ""
        raise FileNotFoundError(f"no files {where}under {os.fspath(path)}")
    return out


def evict(paths: Sequence[str]) -> None:
    """Drop ``paths`` from the page cache: ``os.sync()``, then ``POSIX_FADV_DONTNEED`` each."""
    os.sync()
    for p in paths:
        fd = os.open(p, _O_FLAGS)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(paths: Sequence[str]) -> None:
    """Read every file of ``paths`` once, so that it sits in the page cache."""
    buf = bytearray(8 << 20)
    for p in paths:
        fd = os.open(p, _O_FLAGS)
        try:
            while os.readv(fd, [buf]) > 0:
                pass
        finally:
            os.close(fd)


# -- one cell ----------------------------------------------------------------------------


class _Cell:
    """Shared state of the workers of one cell (their invariant: one read in flight each)."""

    def __init__(
        self, files: Sequence[tuple[str, int]], chunk_bytes: int, deadline: float | None
    ) -> None:
        self.files = files
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
                fd = os.open(path, _O_FLAGS)
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
) -> ProbeCell:
    """Read ``files`` with ``concurrency`` threads, one read of <= ``chunk_bytes`` each.

    Blocks until every file is read or ``duration`` seconds have passed; calls
    ``tick(state)`` about every 0.1 s from the calling thread (for progress).

    Raises:
        OSError: a read failed (the first failure; the other workers stop).
    """
    start = time.perf_counter()
    cell = _Cell(files, chunk_bytes, start + duration if duration else None)
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
) -> ProbeReport:
    """Measure every (concurrency, chunk size) cell over ``files``.

    Args:
        path: What was probed (for the report).
        files: ``(path, size)`` pairs, as :func:`list_files` returns them.
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
    """
    if repeats < 1 or min_time < 0:
        raise ValueError(f"repeats must be >= 1 and min_time >= 0, got {repeats}, {min_time}")
    paths = [p for p, _ in files]
    total = sum(s for _, s in files)
    warmed = not cold and total <= _available_memory() // 2
    if warmed:  # data larger than that would evict itself while being read
        warm(paths)
    cells = []
    for c in concurrency:
        for ch in chunk_bytes:
            if progress is not None:
                progress.set_description(f"conc {c}, chunk {format_size(ch)}")

            def one_pass(c: int = c, ch: int = ch, t0: float = time.perf_counter()) -> ProbeCell:
                def tick(cell: _Cell) -> None:
                    dt = time.perf_counter() - t0
                    if progress is not None and dt > 0:
                        progress.set_postfix_str(f"{cell.bytes / dt / 1e6:,.0f} MB/s")

                if cold:
                    evict(paths)
                return measure(files, concurrency=c, chunk_bytes=ch, duration=duration, tick=tick)

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


def _repeat(one_pass: Callable[[], ProbeCell], repeats: int, min_time: float) -> ProbeCell:
    """Run ``one_pass`` ``repeats`` times at least and until ``min_time``; the median pass."""
    passes: list[ProbeCell] = []
    started = time.perf_counter()
    while len(passes) < MAX_PASSES and (
        len(passes) < repeats or time.perf_counter() - started < min_time
    ):
        passes.append(one_pass())
    return median_pass(passes)


def median_pass(passes: Sequence[ProbeCell]) -> ProbeCell:
    """One cell from its passes: the median pass by throughput, with the passes' spread."""
    if not passes:
        raise ValueError("a cell needs at least one pass")
    ranked = sorted(passes, key=lambda p: p.mb_per_s)
    mid = ranked[(len(ranked) - 1) // 2]  # the lower median: a pass that happened
    low, high = ranked[0].mb_per_s, ranked[-1].mb_per_s
    spread = (high - low) / mid.mb_per_s if mid.mb_per_s > 0 else 0.0
    return dataclasses.replace(mid, passes=len(passes), best_mb_per_s=high, spread=spread)


def _available_memory() -> int:
    """Bytes of memory available for the page cache (a large number where unknown)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # pragma: no cover - not Linux
        return 1 << 62


def plot(report: ProbeReport, out: str | os.PathLike[str]) -> None:
    """Write a PNG of throughput against concurrency, one line per chunk size.

    Raises:
        ImportError: matplotlib is not installed (``pip install 'iopipe-ml[plot]'``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    try:
        chunks = sorted({c.chunk_bytes for c in report.cells})
        concs = sorted({c.concurrency for c in report.cells})
        for ch in chunks:
            pts = sorted((c.concurrency, c.mb_per_s) for c in report.cells if c.chunk_bytes == ch)
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=format_size(ch))
        best = report.recommended()
        ax.scatter(
            [best.concurrency], [best.mb_per_s], s=160, facecolors="none", edgecolors="black"
        )
        ax.set_xscale("log", base=2)
        ax.set_xticks(concs, [str(c) for c in concs])
        ax.set_xlabel("reads in flight (concurrency)")
        ax.set_ylabel("MB/s")
        ax.set_ylim(bottom=0)
        temp = "cold" if report.cold else "warm"
        ax.set_title(
            f"iopipe probe: {report.files:,} files, {format_size_approx(report.bytes)} ({temp})"
        )
        ax.grid(True, alpha=0.3)
        ax.legend(title="chunk")
        fig.tight_layout()
        fig.savefig(out, format="png")
    finally:
        plt.close(fig)


def format_size_approx(n: int) -> str:
    """``3461234 -> "3.3 MiB"`` (for titles; sizes users type go through format_size)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover
