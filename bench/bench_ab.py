"""A/B two checkouts of iopipe on one workload: the plain loop, then each tree's Pipeline.

For judging a change: make a worktree of the older commit (``git worktree add /tmp/old
HEAD~5``, with ``bench/data`` linked into it) and run
``python -m bench.bench_ab 5 /tmp/old .``.  Each case runs in a fresh process with the
tree's own ``iopipe`` first on ``sys.path``; cases are interleaved over the repeats.
Prints medians of samples/s (min-max), the ratio to the plain loop, CPU microseconds per
sample (the process's) and minor page faults.  ``WL=jpeg`` picks another workload of
``bench/_workloads.py`` (default ``small_files``), page cached.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def case(system: str, tree: str) -> None:
    """Run one epoch of ``system`` ("plain" or "iopipe") with ``tree``'s iopipe; print JSON."""
    sys.path.insert(0, tree)
    import torch
    from torch.utils.data import default_collate

    from bench import _workloads
    from bench._harness import warm
    from iopipe import Pipeline

    torch.set_num_threads(1)
    wl = _workloads.make(os.environ.get("WL", "small_files"), ROOT / "bench" / "data" / "scale-1")
    warm(list(_workloads.paths(wl.name, ROOT / "bench" / "data" / "scale-1")))
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    c0, t0 = time.process_time(), time.perf_counter()
    n = 0
    if system == "plain":
        size = wl.batch_size
        for i in range(0, len(wl.items), size):
            n += len(default_collate([wl.load(x) for x in wl.items[i : i + size]]))
    else:
        pipe = (
            Pipeline.from_files(list(wl.items))
            .read(concurrency=wl.read_concurrency)
            .map(wl.transform, concurrency=wl.map_concurrency)
            .batch(wl.batch_size)
        )
        with pipe:
            n = sum(len(b) for b in pipe)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    print(json.dumps({"rate": n / wall, "cpu_us": cpu / n * 1e6, "faults": faults}))


def main(argv: list[str]) -> None:
    if len(argv) > 2 and argv[0] == "--case":
        case(argv[1], argv[2])
        return
    if len(argv) < 2:
        raise SystemExit("usage: python -m bench.bench_ab REPEATS TREE [TREE ...]")
    trees = [str(Path(t).resolve()) for t in argv[1:]]
    systems = [("plain", str(ROOT))] + [(f"iopipe@{t}", t) for t in trees]
    res: dict[str, list[dict[str, float]]] = {s: [] for s, _ in systems}
    for _ in range(int(argv[0])):
        for name, tree in systems:
            out = subprocess.run(
                [sys.executable, "-m", "bench.bench_ab", "--case", name.split("@")[0], tree],
                capture_output=True,
                text=True,
                cwd=ROOT,
                check=True,
            )
            res[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = statistics.median(r["rate"] for r in res["plain"])
    for name, rs in res.items():
        rates = [r["rate"] for r in rs]
        med = statistics.median(rates)
        print(
            f"{name:40s} {med:9,.0f}/s ({min(rates):,.0f}-{max(rates):,.0f}) x{med / base:.2f}"
            f"  CPU {statistics.median(r['cpu_us'] for r in rs):5.1f} us/sample"
            f"  faults {statistics.median(r['faults'] for r in rs):,.0f}"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
