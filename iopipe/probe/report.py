"""What ``iopipe probe`` measured: its cells, their verdict and advice, the chart.

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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..pipeline.sizes import format_size, format_size_approx

__all__ = ["GOOD_ENOUGH", "SCALES", "SCHEMA", "ProbeCell", "ProbeReport", "median_pass", "plot"]

SCHEMA = "iopipe.probe/1"
#: Cells within this share of the best throughput count as equally good; the
#: recommendation takes the one with the fewest reads in flight.
GOOD_ENOUGH = 0.95
#: Speed-up over the fewest readers from which the reads count as storage-bound.
SCALES = 1.5


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


def median_pass(passes: Sequence[ProbeCell]) -> ProbeCell:
    """One cell from its passes: the median pass by throughput, with the passes' spread."""
    if not passes:
        raise ValueError("a cell needs at least one pass")
    ranked = sorted(passes, key=lambda p: p.mb_per_s)
    mid = ranked[(len(ranked) - 1) // 2]  # the lower median: a pass that happened
    low, high = ranked[0].mb_per_s, ranked[-1].mb_per_s
    spread = (high - low) / mid.mb_per_s if mid.mb_per_s > 0 else 0.0
    return dataclasses.replace(mid, passes=len(passes), best_mb_per_s=high, spread=spread)


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
