"""Issue 4's bench: does ``concurrency="auto"`` settle within 10% of the best fixed setting?

For each workload (the suite's small files and JPEG decode, bench/_workloads.py) and page-cache
temperature, it runs the same pipeline as bench/systems/iopipe_pipeline.py (read -> map ->
batch) with every fixed setting of a grid (reads in flight x map workers), and with
``read(concurrency="auto")`` and ``map(concurrency="auto")``.  No human picks a number: the
best fixed setting is whichever the grid measured fastest, and the ratio printed is

    auto / best fixed  (samples/s in the epochs after auto settled; target >= 0.9)

Every case runs in a fresh process; repeats are interleaved (repeat 1 of every case, then
repeat 2, ...) so that drift on this shared machine spreads over all cases, and medians are
reported.  A fixed case runs one unmeasured epoch, then ``--epochs`` measured ones.  An auto
case runs epochs until the tuner settles (at most ``--max-tune-epochs``), then the same
measured epochs; the epochs spent tuning are reported too.  Cold cases evict the files
before every epoch (untimed).

Usage: ``python -m bench.bench_autotune [--quick] [--repeats N] [--scale S]``
(``--case JSON`` runs one case in this process; the harness does that).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import _harness, _workloads, gen_data

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
CHUNK_BYTES = 4 << 20
TARGET = 0.9
GRID = {"read": (1, 4, 16, 64), "map": (1, 2, 4)}
QUICK_GRID = {"read": (1, 16), "map": (1, 2)}
WORKLOADS = (("small_files", "warm"), ("small_files", "cold"), ("jpeg", "warm"))
CASE_TIMEOUT_S = 900.0


# -- one case, in its own process -------------------------------------------------------


def _epoch(pipe: Any) -> int:
    samples = 0
    for batch in pipe:
        samples += len(batch)
    return samples


def run_case(spec: dict[str, Any]) -> dict[str, Any]:
    """Build the pipeline of ``spec``, tune or warm it up, and time the measured epochs."""
    import torch

    from iopipe import Pipeline

    torch.set_num_threads(1)
    data_dir = Path(spec["data_dir"])
    wl = _workloads.make(spec["workload"], data_dir)
    paths = _workloads.paths(spec["workload"], data_dir)
    auto = spec["setting"] == "auto"
    read = "auto" if auto else spec["setting"]["read"]
    workers = "auto" if auto else spec["setting"]["map"]
    pipe = (
        Pipeline.from_files(list(wl.items))
        .read(chunk_bytes=CHUNK_BYTES, concurrency=read)
        .map(wl.transform, concurrency=workers)
        .batch(wl.batch_size)
    )

    def timed_epoch() -> tuple[int, float]:
        if spec["temp"] == "cold":
            _harness.evict(paths)
        t0 = time.perf_counter()
        n = _epoch(pipe)
        return n, time.perf_counter() - t0

    out: dict[str, Any] = {**spec, "status": "ok"}
    with pipe:
        tuning: list[tuple[int, float]] = []
        if auto:
            while len(tuning) < spec["max_tune_epochs"]:
                tuning.append(timed_epoch())
                tuner = pipe._rt.tuner  # type: ignore[union-attr]
                if tuner.climber.settled:
                    break
            out["settled"] = tuner.climber.settled
            out["chosen"] = tuner.climber.best
            out["tune_epochs"] = len(tuning)
            out["tune_samples_per_s"] = sum(n for n, _ in tuning) / sum(t for _, t in tuning)
            out["windows"] = len(tuner.history)
        else:
            timed_epoch()  # warm-up: threads, caches, job sizes
        measured = [timed_epoch() for _ in range(spec["epochs"])]
        if auto:
            out["final"] = pipe._rt.tuner.climber.best  # type: ignore[union-attr]
    out["samples_per_s"] = sum(n for n, _ in measured) / sum(t for _, t in measured)
    out["epoch_s"] = [round(t, 4) for _, t in measured]
    return out


# -- the harness --------------------------------------------------------------------------


def _label(setting: Any) -> str:
    return "auto" if setting == "auto" else f"read={setting['read']} map={setting['map']}"


def launch(spec: dict[str, Any]) -> dict[str, Any]:
    """Prepare the page cache, run ``spec`` in a fresh process, return its record."""
    paths = _workloads.paths(spec["workload"], Path(spec["data_dir"]))
    _harness.prepare(paths, spec["temp"])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "bench.bench_autotune", "--case", json.dumps(spec)]
    busy0, _ = _harness.machine_busy_s()
    wall0 = time.monotonic()
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
    busy = _harness.machine_busy_s()[0] - busy0
    record["machine_busy_frac"] = busy / ((time.monotonic() - wall0) * (os.cpu_count() or 1))
    return record


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (workload, temp): every setting's median samples/s, the best fixed one, auto's ratio."""
    out = []
    keys = sorted({(r["workload"], r["temp"]) for r in records}, key=str)
    for wl, temp in keys:
        rows = [r for r in records if (r["workload"], r["temp"]) == (wl, temp)]
        by: dict[str, list[float]] = {}
        for r in rows:
            if r["status"] == "ok":
                by.setdefault(_label(r["setting"]), []).append(r["samples_per_s"])
        med = {k: statistics.median(v) for k, v in by.items()}
        fixed = {k: v for k, v in med.items() if k != "auto"}
        best = max(fixed, key=lambda k: fixed[k]) if fixed else None
        autos = [r for r in rows if r["setting"] == "auto" and r["status"] == "ok"]
        out.append(
            {
                "workload": wl,
                "temp": temp,
                "median_samples_per_s": med,
                "best_fixed": best,
                "ratio": med["auto"] / fixed[best] if best and "auto" in med else None,
                "auto_chosen": [r.get("final") for r in autos],
                "auto_tune_epochs": [r.get("tune_epochs") for r in autos],
                "auto_settled": [r.get("settled") for r in autos],
                "auto_tuning_ratio": (
                    statistics.median(r["tune_samples_per_s"] for r in autos) / fixed[best]
                    if autos and best
                    else None
                ),
                "errors": [r["reason"] for r in rows if r["status"] != "ok"],
            }
        )
    return out


def report(summary: list[dict[str, Any]]) -> str:
    """The summary as text: one table per workload and the ratio line."""
    lines = []
    for s in summary:
        lines.append(f"\n{s['workload']} ({s['temp']}): samples/s, median of repeats")
        for label, v in sorted(s["median_samples_per_s"].items(), key=lambda kv: -kv[1]):
            mark = "  <- best fixed" if label == s["best_fixed"] else ""
            lines.append(f"  {label:<18} {v:>10,.0f}{mark}")
        if s["ratio"] is not None:
            verdict = "met" if s["ratio"] >= TARGET else "NOT met"
            lines.append(
                f"  auto / best fixed ({s['best_fixed']}) = {s['ratio']:.2f}x "
                f"(target >= {TARGET}) {verdict}; auto chose {s['auto_chosen']} after "
                f"{s['auto_tune_epochs']} tuning epochs (settled: {s['auto_settled']}); "
                f"while tuning: {s['auto_tuning_ratio']:.2f}x"
            )
        for e in s["errors"]:
            lines.append(f"  error: {e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the grid and auto on each workload; print and save the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--scale", type=float, default=1.0, help="data set scale (default 1)")
    parser.add_argument("--repeats", type=int, default=2, help="repeats per case (default 2)")
    parser.add_argument("--epochs", type=int, default=2, help="measured epochs per case")
    parser.add_argument("--max-tune-epochs", type=int, default=20, help="auto's tuning cap")
    parser.add_argument("--quick", action="store_true", help="small grid, scale 0.1, 1 repeat")
    parser.add_argument(
        "--workloads",
        default=",".join(f"{w}:{t}" for w, t in WORKLOADS),
        help="workload:temp pairs, comma-separated (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))), flush=True)
        return 0
    if args.quick:
        args.scale, args.repeats = 0.1, 1
    grid = QUICK_GRID if args.quick else GRID
    data_dir = gen_data.generate(scale=args.scale, only=("small", "jpeg"), verbose=True)
    pairs = [tuple(p.split(":")) for p in args.workloads.split(",")]
    settings: list[Any] = [
        {"read": r, "map": m} for r, m in itertools.product(grid["read"], grid["map"])
    ]
    settings.append("auto")
    records = []
    total = args.repeats * len(pairs) * len(settings)
    t0 = time.monotonic()
    for rep in range(args.repeats):
        for wl, temp in pairs:
            for setting in settings:
                spec = {
                    "workload": wl,
                    "temp": temp,
                    "setting": setting,
                    "rep": rep,
                    "data_dir": str(data_dir),
                    "epochs": args.epochs,
                    "max_tune_epochs": args.max_tune_epochs,
                }
                rec = launch(spec)
                records.append(rec)
                rate = rec.get("samples_per_s")
                shown = f"{rate:,.0f}/s" if rate else rec.get("reason")
                print(
                    f"[{len(records)}/{total} {time.monotonic() - t0:.0f}s] {wl} {temp} "
                    f"{_label(setting)} rep {rep}: {shown}",
                    file=sys.stderr,
                    flush=True,
                )
    summary = summarize(records)
    text = report(summary)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = RESULTS / f"autotune-{stamp}.json"
    out.write_text(json.dumps({"summary": summary, "records": records}, indent=1))
    print(f"\nsaved {out.relative_to(REPO)}")
    return 0 if all(s["ratio"] is not None and s["ratio"] >= TARGET for s in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
