"""The ceiling of a background-thread loader on page-cached small files (issue 6 note).

Runs the whole per-batch work (read 256 files, transform, collate) as ONE job per
batch through the engine (the most favourable fusion possible), with 1 and 2
workers, against the same job called in the consumer's own thread.  On the 2-core
VM: fused, 1 worker ~32.7k samples/s; 2 workers ~26.8k; in-thread ~46.8k.  The
work is GIL-bound Python, so moving it to another thread cannot beat doing it in
the thread that waits for it when that thread does nothing else.

Usage: ``python bench/bench_fused_ceiling.py`` (needs bench/data from bench/gen_data.py).
"""

from __future__ import annotations

import glob
import time

import numpy as np
import torch
from torch.utils.data import default_collate

from iopipe import Pipeline
from iopipe.io.reads import RWF_NOWAIT as _NOWAIT
from iopipe.stages.read_jobs import read_job as _read_job


def transform(buf: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(buf, dtype=np.uint8, count=8192).copy())


def job(paths: list[str]) -> torch.Tensor:
    """Read, transform and collate one batch in the calling thread."""
    bufs, _ = _read_job([(p, 0, None) for p in paths], 4 << 20, _NOWAIT)
    return default_collate([transform(b) for b in bufs])


def measure(run) -> tuple[float, float, int]:  # type: ignore[no-untyped-def]
    c, t = time.process_time(), time.perf_counter()
    n = run()
    return n / (time.perf_counter() - t), 1e6 * (time.process_time() - c) / n, n


def main() -> None:
    torch.set_num_threads(1)
    paths = sorted(glob.glob("bench/data/scale-1/small/*/*"))
    if not paths:
        raise SystemExit("no data: run python -m bench.gen_data first")
    chunks = [paths[i : i + 256] for i in range(0, len(paths), 256)]
    for conc in (1, 2):
        with Pipeline.from_iterable(chunks, group_size=1).map(job, concurrency=conc) as pipe:
            for _ in range(2):  # warm-up epochs: threads started, caches hot
                rate, cpu, _n = measure(lambda: sum(len(b) for b in pipe))
            print(
                f"fused job through the engine, {conc} worker(s): {rate:,.0f}/s, {cpu:.1f} us CPU/sample"
            )
    rate, cpu, _n = measure(lambda: sum(len(job(ps)) for ps in chunks))
    print(f"the same job in the consumer's thread: {rate:,.0f}/s, {cpu:.1f} us CPU/sample")


if __name__ == "__main__":
    main()
