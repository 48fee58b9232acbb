"""Fused runs against the same stages run one by one (``fuse=False``), and the plain loop.

Each case runs in a fresh process (``python -m bench.bench_fused --case ...``); cases are
interleaved over the repeats; the table gives medians of samples/s and of CPU microseconds
per sample (the process's own CPU time, which noise on a shared machine moves less than
wall time). Workloads are those of ``bench/run.py`` (small files and JPEG decode, page
cached), built from ``bench/gen_data.py``'s data.

Usage: ``python -m bench.bench_fused [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "bench" / "data" / "scale-1"
CASES = [
    (wl, system)
    for wl in ("small_files", "jpeg")
    for system in ("plain", "iopipe fuse=True", "iopipe fuse=False")
]


def run_case(workload: str, system: str) -> dict[str, Any]:
    """Run one case in this process; return its rate, CPU per sample and minor page faults."""
    import torch
    from torch.utils.data import default_collate

    from bench import _workloads
    from bench._harness import warm
    from iopipe import Pipeline

    torch.set_num_threads(1)
    wl = _workloads.make(workload, DATA)
    warm(list(wl.items))
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    c0, t0 = time.process_time(), time.perf_counter()
    n = 0
    if system == "plain":
        size = wl.batch_size
        for i in range(0, len(wl.items), size):
            n += len(default_collate([wl.load(x) for x in wl.items[i : i + size]]))
    else:
        fuse = system.endswith("True")
        pipe = (
            Pipeline.from_files(list(wl.items), fuse=fuse)
            .read(concurrency=wl.read_concurrency)
            .map(wl.transform, concurrency=wl.map_concurrency)
            .batch(wl.batch_size)
        )
        with pipe:
            n = sum(len(b) for b in pipe)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    return {"rate": n / wall, "cpu_us": 1e6 * cpu / n, "faults": faults}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--case", nargs=2, metavar=("WORKLOAD", "SYSTEM"))
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(*args.case)))
        return
    if not (DATA / "small").is_dir():
        raise SystemExit("no data: run python -m bench.gen_data first")
    got: dict[tuple[str, str], list[dict[str, Any]]] = {c: [] for c in CASES}
    for _ in range(args.repeats):
        for wl, system in CASES:
            out = subprocess.run(
                [sys.executable, "-m", "bench.bench_fused", "--case", wl, system],
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=True,
            )
            got[(wl, system)].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("| workload | system | samples/s (median) | x plain | CPU us/sample |")
    print("|---|---|---|---|---|")
    for wl, system in CASES:
        rate = statistics.median(r["rate"] for r in got[(wl, system)])
        plain = statistics.median(r["rate"] for r in got[(wl, "plain")])
        cpu = statistics.median(r["cpu_us"] for r in got[(wl, system)])
        print(f"| {wl} | {system} | {rate:,.0f} | {rate / plain:.2f}x | {cpu:.1f} |")


if __name__ == "__main__":
    main()
