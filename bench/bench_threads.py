"""A/B: the stages' WorkerPool (iopipe/runtime/threads.py) against ThreadPoolExecutor (issues 6, 7).

WorkerPool replaced ``concurrent.futures.ThreadPoolExecutor`` in every stage so
that a job that never returns cannot hang interpreter exit, and then so that a
stage running one job at a time keeps it on one thread (ThreadPoolExecutor's
workers take turns).  A read + map + batch pipeline over ~5k small page-cached
files, run fused (the default) and staged (``fuse=False``: three pools, a
hand-off per job), alternating the two pools epoch by epoch in one process.

Usage: ``python bench/bench_threads.py [N_FILES] [REPEATS]``.  Prints samples/s
and CPU microseconds per sample (the process's) per case, medians of the
repeats, and the ratios WorkerPool / ThreadPoolExecutor.
"""

from __future__ import annotations

import concurrent.futures
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import iopipe.stages.batch
import iopipe.stages.decode
import iopipe.stages.reader
from iopipe import Pipeline
from iopipe.runtime.threads import WorkerPool

MODULES = (iopipe.stages.reader, iopipe.stages.decode, iopipe.stages.batch)


def tpe(max_workers: int, name: str) -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(max_workers, thread_name_prefix=name)


def use(factory: Any) -> None:
    for m in MODULES:
        m.WorkerPool = factory  # type: ignore[attr-defined]


def transform(buf: np.ndarray) -> int:
    return int(buf[:64].sum())


def epoch_rate(pattern: str, fuse: bool) -> tuple[float, float]:
    pipe = (
        Pipeline.from_files(pattern, fuse=fuse)
        .read(concurrency=4)
        .map(transform, concurrency=2)
        .batch(64)
    )
    with pipe:
        sum(1 for _ in pipe)  # warm: threads started, files cached
        t, c = time.perf_counter(), time.process_time()
        n = sum(len(b) for b in pipe)
        return n / (time.perf_counter() - t), 1e6 * (time.process_time() - c) / n


def main() -> None:
    n_files = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 7
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n_files):
            Path(tmp, f"{i:05d}.bin").write_bytes(os.urandom(4096))
        pattern = os.path.join(tmp, "*.bin")
        for fuse in (True, False):
            rates: dict[str, list[float]] = {"WorkerPool": [], "ThreadPoolExecutor": []}
            cpus: dict[str, list[float]] = {"WorkerPool": [], "ThreadPoolExecutor": []}
            for _ in range(repeats):
                for name, factory in (("WorkerPool", WorkerPool), ("ThreadPoolExecutor", tpe)):
                    use(factory)
                    rate, cpu = epoch_rate(pattern, fuse)
                    rates[name].append(rate)
                    cpus[name].append(cpu)
            use(WorkerPool)
            med = {k: statistics.median(v) for k, v in rates.items()}
            cpu_med = {k: statistics.median(v) for k, v in cpus.items()}
            print(
                f"fuse={fuse}: WorkerPool {med['WorkerPool']:,.0f}/s "
                f"{cpu_med['WorkerPool']:.1f} us CPU/sample, "
                f"ThreadPoolExecutor {med['ThreadPoolExecutor']:,.0f}/s "
                f"{cpu_med['ThreadPoolExecutor']:.1f} us, "
                f"ratio {med['WorkerPool'] / med['ThreadPoolExecutor']:.3f} "
                f"(CPU {cpu_med['WorkerPool'] / cpu_med['ThreadPoolExecutor']:.2f}x) "
                f"(spread WP {min(rates['WorkerPool']):,.0f}-{max(rates['WorkerPool']):,.0f}, "
                f"TPE {min(rates['ThreadPoolExecutor']):,.0f}-"
                f"{max(rates['ThreadPoolExecutor']):,.0f})"
            )


if __name__ == "__main__":
    main()
