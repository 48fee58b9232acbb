"""Run one benchmark case in this (fresh) process and print its result as one JSON line.

Usage (the harness does this): ``python -m bench.case '{"workload": "small_files",
"system": "plain", "temp": "warm", "data_dir": "bench/data/scale-1", "step_s": 0.0}'``

The page cache is prepared by the harness before this process starts. Timed: from building
the system to the consumer having handled the last batch (so time to first batch includes
worker or thread start-up). The consumer checksums every batch (the sum of its uint64 words
mod 2**64, independent of sample order) and, for the overlap workload, sleeps ``step_s`` per
batch to stand in for an accelerator step.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import _workloads, systems
from bench._proctree import TreeSampler, tree_cpu_s

MASK = (1 << 64) - 1


def _tensors(batch: Any) -> list[Any]:
    return list(batch) if isinstance(batch, tuple | list) else [batch]


def checksum(batch: Any) -> int:
    """Return the sum of the uint64 words of ``batch`` mod 2**64 (sample-order independent).

    A tuple or list batch (such as TokenShards' ``(x, y)``) sums all of its tensors.
    """
    total = 0
    for t in _tensors(batch):
        arr = t.numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
        words = np.ascontiguousarray(arr).reshape(-1).view(np.uint64)
        total += int(words.sum(dtype=np.uint64))
    return total & MASK


def consume(it: Iterator[Any], step_s: float) -> dict[str, Any]:
    """Drain ``it`` like a training loop; return counts, checksum and timings.

    The timer starts when this is called; the caller creates ``it`` lazily (a generator), so
    building the system is timed too.
    """
    t0 = time.perf_counter()
    ttfb = t_last = 0.0
    samples = nbatches = nbytes = total = 0
    compute = 0.0
    for batch in it:
        if nbatches == 0:
            ttfb = time.perf_counter() - t0
        nbatches += 1
        parts = _tensors(batch)
        samples += len(parts[0])
        nbytes += sum(t.numel() * t.element_size() for t in parts)
        total = (total + checksum(batch)) & MASK
        if step_s:
            s0 = time.perf_counter()
            time.sleep(step_s)
            compute += time.perf_counter() - s0
        t_last = time.perf_counter()
    return {
        "samples": samples,
        "batches": nbatches,
        "bytes": nbytes,
        "checksum": f"{total:016x}",
        "wall_s": t_last - t0,
        "ttfb_s": ttfb,
        "compute_s": compute,
    }


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Run the case described by ``spec`` and return its result record."""
    result: dict[str, Any] = {**spec, "pid": os.getpid()}
    reason = systems.unavailable(spec["system"])
    if reason is not None:
        return {**result, "status": "unavailable", "reason": reason}
    step_s = float(spec.get("step_s", 0.0))
    wl = _workloads.make(spec["workload"], Path(spec["data_dir"]), step_s=step_s)
    batches = systems.batches_fn(spec["system"])
    # From a collected heap: a full collection owed to the imports (torch's, the system's)
    # would otherwise land in whichever system's first batch crosses the threshold.
    gc.collect()
    cpu0 = tree_cpu_s()
    sampler = TreeSampler().start()
    it = batches(wl)
    try:
        measured = consume(it, step_s)
    finally:
        it.close()  # shut the system down (joins its workers) before CPU is read
        sampler.stop()
    cpu = tree_cpu_s() - cpu0 - sampler.cpu_s
    wall = measured["wall_s"]
    expected = systems.expected_checksum(spec["system"], wl)  # untimed
    if expected is not None:
        result["checksum_expected"] = f"{expected:016x}"
    return {
        **result,
        **measured,
        "status": "ok",
        "input_bytes": wl.input_bytes,
        "cpu_s": cpu,
        "peak_rss_mb": sampler.peak_rss / 1e6,
        "peak_pss_mb": sampler.peak_pss / 1e6,
        "peak_pss_anon_mb": sampler.peak_pss_anon / 1e6,
        "pss_samples": sampler.pss_samples,
        "samples_per_s": measured["samples"] / wall if wall > 0 else 0.0,
        "mb_per_s": wl.input_bytes / 1e6 / wall if wall > 0 else 0.0,
    }


def main(argv: list[str]) -> int:
    """Entry point: run the case in ``argv[0]`` (JSON) and print its record as JSON."""
    spec = json.loads(argv[0])
    # Decode and collate run in this process (and in DataLoader workers, where torch already
    # sets one thread): one intra-op thread keeps torch from oversubscribing the two cores.
    torch.set_num_threads(1)
    try:
        result = run(spec)
        code = 0
    except Exception as exc:
        tb = traceback.format_exc()
        print(tb, file=sys.stderr)
        result = {**spec, "status": "error", "reason": f"{type(exc).__name__}: {exc}"[:300]}
        code = 1
    print(json.dumps(result), flush=True)
    sys.stderr.flush()
    # Skip interpreter teardown: a framework that leaves a non-daemon thread behind must not
    # hold the whole matrix up (our own shutdown has already run in `run`).
    os._exit(code)


if __name__ == "__main__":
    main(sys.argv[1:])
