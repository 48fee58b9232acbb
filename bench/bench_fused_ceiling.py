"""The ceiling of a background-thread loader on page-cached small files (issue 6 note).

Runs the whole per-batch work (read 256 files, transform, collate) as ONE job per
batch through the engine (the most favourable fusion possible), with 1 and 2
workers, against the same job called in the consumer's own thread.  On the 2-core
VM: fused, 1 worker ~32.7k samples/s; 2 workers ~26.8k; in-thread ~46.8k.  The
work is GIL-bound Python, so moving it to another thread cannot beat doing it in
the thread that waits for it when that thread does nothing else.

Usage: ``python bench/bench_fused_ceiling.py`` (needs bench/data from bench/gen_data.py).
"""

import glob
import time

import numpy as np
import torch

torch.set_num_threads(1)
from torch.utils.data import default_collate

from iopipe import Pipeline
from iopipe.stages.reader import _read_job

paths = sorted(glob.glob("bench/data/scale-1/small/*/*"))


def tf(buf):
    return torch.from_numpy(np.frombuffer(buf, dtype=np.uint8, count=8192).copy())


chunks = [paths[i : i + 256] for i in range(0, len(paths), 256)]


def job(ps):
    bufs, _ = _read_job([(p, 0, None) for p in ps], 4 << 20, 8)
    return default_collate([tf(b) for b in bufs])


for conc in (1, 2):
    p = Pipeline.from_iterable(chunks, group_size=1).map(job, concurrency=conc)
    for ep in range(3):
        c = time.process_time()
        t = time.perf_counter()
        n = 0
        for b in p:
            n += len(b)
        dt = time.perf_counter() - t
        cpu = time.process_time() - c
    print(f"fused conc={conc}: {n / dt:,.0f}/s cpu {1e6 * cpu / n:.1f}us/item")
    p.close()
t = time.perf_counter()
c = time.process_time()
n = 0
for ps in chunks:
    n += len(job(ps))
print(
    f"single thread, no pipeline: {n / (time.perf_counter() - t):,.0f}/s cpu {1e6 * (time.process_time() - c) / n:.1f}us/item"
)
