"""A/B two checkouts of iopipe on one workload: the plain loop, then each tree's Pipeline.

For judging a change: make a worktree of the older commit (``git worktree add /tmp/old
HEAD~5``, with ``bench/data`` linked into it) and run
``python -m bench.bench_ab 5 /tmp/old .``.  Each case runs in a fresh process with the
tree's own ``iopipe`` first on ``sys.path``; cases are interleaved over the repeats.
Prints medians of samples/s (min-max), the ratio to the plain loop, CPU microseconds per
sample (the process's) and minor page faults.  The cases are ``bench/bench_fused.py``'s
(plain loop; Pipeline read, map, batch); ``WL=jpeg`` picks JPEG decode (default
``small_files``), page cached.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def case(system: str, tree: str) -> None:
    """Run one epoch of ``system`` ("plain" or "iopipe") with ``tree``'s iopipe; print JSON."""
    sys.path.insert(0, tree)  # before iopipe is imported (bench_fused imports it lazily)
    from bench.bench_fused import run_case

    workload = os.environ.get("WL", "small_files")
    print(json.dumps(run_case(workload, "plain" if system == "plain" else "iopipe fuse=True")))


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
