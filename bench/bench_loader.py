"""Issue 3's bench: iopipe.DataLoader against torch.utils.data.DataLoader, same arguments.

A map-style dataset whose ``__getitem__`` reads one small file and decodes it (the
suite's small-files workload: 20,000 files of 8-24 KiB, first 8 KiB as a uint8
tensor, batch 256), loaded by both DataLoaders at ``num_workers`` 0, 2 and 4
(iopipe: thread workers, the default), page-cached ("warm") and evicted with
``os.sync()`` + ``POSIX_FADV_DONTNEED`` per file ("cold").  Every case runs in a
fresh process; repeats are interleaved (repeat 1 of every case, then repeat 2, ...)
and the median is reported: samples/s, time to first batch, peak RSS and PSS of
the whole process tree (workers included).  Every case checks the epoch's checksum.

Usage: ``python -m bench.bench_loader [--quick] [--repeats N] [--scale S] [--workers 0,2,4]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
WORKLOAD = "small_files"
TEMPS = ("warm", "cold")
IMPLS = ("torch", "iopipe")
CASE_TIMEOUT_S = 600.0
METRICS = ("samples_per_s", "ttfb_s", "peak_rss_mb", "peak_pss_mb", "cpu_s")


# -- one case (runs in its own process) ---------------------------------------------------
def _batches(impl: str, workers: int, ds: Any, batch_size: int) -> Iterator[Any]:
    """Yield one epoch from ``impl``'s DataLoader over ``ds`` (built lazily: it is timed).

    Both libraries are imported before the timer starts, as in a training script.
    """
    from torch.utils.data import DataLoader

    import iopipe

    if impl == "torch":
        yield from DataLoader(ds, batch_size=batch_size, num_workers=workers)
        return
    with iopipe.DataLoader(ds, batch_size=batch_size, num_workers=workers) as loader:
        yield from loader


def run_case(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one case in this process and return its record."""
    import torch

    import iopipe  # noqa: F401 - imported before the timer, like torch
    from bench import _workloads
    from bench._proctree import TreeSampler, tree_cpu_s
    from bench.case import consume
    from bench.systems.torch_loader import ItemDataset

    torch.set_num_threads(1)
    wl = _workloads.make(WORKLOAD, Path(spec["data_dir"]))
    ds = ItemDataset(wl.items, wl.load)
    cpu0 = tree_cpu_s()
    sampler = TreeSampler().start()
    it = _batches(spec["impl"], spec["workers"], ds, wl.batch_size)
    try:
        measured = consume(it, 0.0)
    finally:
        it.close()
        sampler.stop()
    wall = measured["wall_s"]
    return {
        **spec,
        **measured,
        "status": "ok",
        "cpu_s": tree_cpu_s() - cpu0 - sampler.cpu_s,
        "peak_rss_mb": sampler.peak_rss / 1e6,
        "peak_pss_mb": sampler.peak_pss / 1e6,
        "samples_per_s": measured["samples"] / wall if wall > 0 else 0.0,
    }


# -- the matrix (this process) --------------------------------------------------------------
def spawn(spec: dict[str, Any]) -> dict[str, Any]:
    """Prepare the page cache, run ``spec`` in a fresh process, return its record."""
    from bench import _harness, _workloads

    _harness.prepare(_workloads.paths(WORKLOAD, Path(spec["data_dir"])), spec["temp"])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "bench.bench_loader", "--case", json.dumps(spec)]
    try:
        proc = subprocess.run(
            cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=CASE_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        return {**spec, "status": "error", "reason": "timed out"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        return {**spec, "status": "error", "reason": f"exit {proc.returncode}: {tail}"}
    record: dict[str, Any] = json.loads(lines[-1])
    return record


def summarize(records: list[dict[str, Any]]) -> dict[tuple[str, int, str], dict[str, float]]:
    """Median of every metric per (temp, workers, impl)."""
    groups: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for r in records:
        if r.get("status") == "ok":
            groups.setdefault((r["temp"], r["workers"], r["impl"]), []).append(r)
    return {
        key: {m: statistics.median(float(r[m]) for r in rs) for m in METRICS} | {"n": len(rs)}
        for key, rs in groups.items()
    }


def table(med: dict[tuple[str, int, str], dict[str, float]], workers: list[int]) -> str:
    """The results with iopipe / torch ratios, one row per (temp, num_workers)."""
    head = (
        f"{'temp':<5}{'nw':>3} | {'torch/s':>8} {'iopipe/s':>8} {'ratio':>6} | "
        f"{'ttfb torch':>10} {'iopipe':>7} {'ratio':>6} | "
        f"{'RSS torch':>9} {'iopipe':>7} {'ratio':>6} | {'PSS torch':>9} {'iopipe':>7}"
    )
    lines = [head, "-" * len(head)]
    for temp in TEMPS:
        for nw in workers:
            t, i = med.get((temp, nw, "torch")), med.get((temp, nw, "iopipe"))
            if t is None or i is None:
                lines.append(f"{temp:<5}{nw:>3} | (missing)")
                continue
            lines.append(
                f"{temp:<5}{nw:>3} | {t['samples_per_s']:8.0f} {i['samples_per_s']:8.0f} "
                f"{_ratio(i['samples_per_s'], t['samples_per_s'])} | "
                f"{t['ttfb_s'] * 1e3:8.1f}ms {i['ttfb_s'] * 1e3:5.1f}ms "
                f"{_ratio(i['ttfb_s'], t['ttfb_s'])} | "
                f"{t['peak_rss_mb']:7.0f}MB {i['peak_rss_mb']:5.0f}MB "
                f"{_ratio(i['peak_rss_mb'], t['peak_rss_mb'])} | "
                f"{t['peak_pss_mb']:7.0f}MB {i['peak_pss_mb']:5.0f}MB"
            )
    return "\n".join(lines)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:5.2f}x" if b else "   n/a"


def main(argv: list[str] | None = None) -> int:
    """Run the matrix and print the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="scale 0.1, 1 repeat")
    p.add_argument("--repeats", type=int, default=None, help="repeats per case (default 3)")
    p.add_argument("--scale", type=float, default=None, help="data scale (default 1)")
    p.add_argument("--workers", default="0,2,4", help="num_workers values (default 0,2,4)")
    p.add_argument("--temps", default="warm,cold", help="warm,cold (default both)")
    args = p.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))), flush=True)
        os._exit(0)  # skip teardown: the record is out
    from bench import gen_data

    scale = args.scale if args.scale is not None else (0.1 if args.quick else 1.0)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    workers = [int(w) for w in args.workers.split(",")]
    temps = [t for t in args.temps.split(",") if t]
    data_dir = gen_data.generate(scale=scale, only=["small"], verbose=True)
    records = []
    for rep in range(repeats):
        for temp in temps:
            for nw in workers:
                for impl in IMPLS:
                    spec = {
                        "impl": impl,
                        "workers": nw,
                        "temp": temp,
                        "rep": rep,
                        "data_dir": str(data_dir),
                    }
                    rec = spawn(spec)
                    records.append(rec)
                    status = (
                        f"{rec['samples_per_s']:8.0f} samples/s  ttfb {rec['ttfb_s'] * 1e3:6.1f} ms  "
                        f"rss {rec['peak_rss_mb']:5.0f} MB"
                        if rec.get("status") == "ok"
                        else rec.get("reason", "?")
                    )
                    print(f"rep {rep} {temp:<4} nw={nw} {impl:<6} {status}", flush=True)
    sums = {r["checksum"] for r in records if r.get("status") == "ok"}
    print()
    print(table(summarize(records), workers))
    print(f"\nchecksums agree: {len(sums) == 1} ({len(records)} cases, {repeats} repeats)")
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    raw = out / time.strftime("bench_loader-%Y%m%d-%H%M%S.json")
    raw.write_text(json.dumps({"argv": sys.argv, "records": records}, indent=1))
    print(f"raw records: {raw.relative_to(REPO)}")
    return 0 if len(sums) == 1 and all(r.get("status") == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
