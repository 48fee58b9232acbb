"""iopipe.DataLoader against a Pipeline doing the same per-sample work, on token windows.

The suite's token row for the Pipeline is iopipe's ``TokenShards`` (merged range reads
straight into the batch), a different program from a map-style dataset whose
``__getitem__`` slices one window out of a memmap.  This measures the DataLoader
against a Pipeline that runs that same ``__getitem__`` per sample
(``Pipeline.from_iterable(offsets).map(load).batch(32)``), so the ratio is the
DataLoader wrapper's cost over the engine, and shows TokenShards beside both.
Each case in a fresh process, repeats interleaved, page-cached file.

Usage: ``python -m bench.bench_dl_tokens [--repeats 5]`` (needs ``python -m bench.gen_data``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "bench" / "data" / "scale-1"
SYSTEMS = ("iopipe.DataLoader", "Pipeline map", "TokenShards")
#: As the suite calls them: DataLoader(num_workers=2), and a map with two threads.
WORKERS = 2


def run_case(system: str) -> dict[str, Any]:
    """Run one epoch of ``system`` in this process; return its rate and CPU per sample."""
    import torch

    from bench import _workloads
    from bench._harness import warm
    from bench.systems import iopipe_pipeline
    from bench.systems.torch_loader import ItemDataset
    from iopipe import DataLoader, Pipeline

    torch.set_num_threads(1)
    wl = _workloads.make("tokens", DATA)
    warm(_workloads.paths("tokens", DATA))
    c0, t0 = time.process_time(), time.perf_counter()
    if system == "iopipe.DataLoader":
        loader: Any = DataLoader(
            ItemDataset(wl.items, wl.load), batch_size=wl.batch_size, num_workers=WORKERS
        )
    elif system == "Pipeline map":
        loader = (
            Pipeline.from_iterable(wl.items).map(wl.load, concurrency=WORKERS).batch(wl.batch_size)
        )
    else:
        loader = iopipe_pipeline._token_shards(wl)
    with loader:
        n = sum(len(b[0]) if isinstance(b, tuple | list) else len(b) for b in loader)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"rate": n / wall, "cpu_us": 1e6 * cpu / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--case", metavar="SYSTEM")
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case)))
        return
    res: dict[str, list[dict[str, Any]]] = {s: [] for s in SYSTEMS}
    for _ in range(args.repeats):
        for s in SYSTEMS:
            out = subprocess.run(
                [sys.executable, "-m", "bench.bench_dl_tokens", "--case", s],
                capture_output=True,
                text=True,
                cwd=ROOT,
                check=True,
            )
            res[s].append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = statistics.median(r["rate"] for r in res["Pipeline map"])
    print("| system | samples/s (median, min-max) | x Pipeline map | CPU us/sample |")
    print("|---|---|---|---|")
    for s, rs in res.items():
        rates = [r["rate"] for r in rs]
        med = statistics.median(rates)
        cpu = statistics.median(r["cpu_us"] for r in rs)
        print(
            f"| {s} | {med:,.0f} ({min(rates):,.0f}-{max(rates):,.0f}) | {med / base:.2f}x "
            f"| {cpu:.1f} |"
        )


if __name__ == "__main__":
    main()
