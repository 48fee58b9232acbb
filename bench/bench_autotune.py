"""Issue 4's bench: does ``concurrency="auto"`` settle within 10% of the best fixed setting?

For each workload (the suite's small files and JPEG decode, bench/_workloads.py) and page-cache
temperature, it runs the pipeline of bench/systems/iopipe_pipeline.py (read -> map -> batch).
No human picks a number:

1. Grid: every fixed setting (reads in flight x map workers) runs once; the fastest is the
   best fixed setting.
2. Side by side: the best fixed setting and ``read(concurrency="auto")`` +
   ``map(concurrency="auto")`` run ``--repeats`` times each, alternating, and the ratio of
   their medians is printed: ``auto / best fixed`` (samples/s after auto settled; target
   >= 0.9).  Re-measuring the best fixed setting removes the luck that made it the
   fastest of the grid (the maximum of noisy numbers is biased upwards).

Every case runs in a fresh process.  A fixed case runs one unmeasured epoch, then
``--epochs`` measured ones.  An auto case runs epochs until the tuner settles (at most
``--max-tune-epochs``), then the same measured epochs; its throughput while tuning is
reported too.  Cold cases evict the files before every epoch (untimed).

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
            out["history"] = [[h[0], round(h[1], 1)] for h in tuner.history]
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


def launch(spec: dict[str, Any], quiet_wait_s: float = 0.0) -> dict[str, Any]:
    """Prepare the page cache, run ``spec`` in a fresh process, return its record.

    With ``quiet_wait_s`` > 0, first wait (that long at most) for other processes to
    leave the CPUs mostly idle: this machine is shared.
    """
    paths = _workloads.paths(spec["workload"], Path(spec["data_dir"]))
    _harness.prepare(paths, spec["temp"])
    if quiet_wait_s > 0:
        _harness.wait_for_quiet(quiet_wait_s)
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


def _median(records: list[dict[str, Any]]) -> float | None:
    rates = [r["samples_per_s"] for r in records if r["status"] == "ok"]
    return statistics.median(rates) if rates else None


def summarize(grid: list[dict[str, Any]], final: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (workload, temp): the grid, the best fixed setting, and auto / best from phase 2."""
    out = []
    for wl, temp in sorted({(r["workload"], r["temp"]) for r in grid}, key=str):
        mine = [r for r in grid if (r["workload"], r["temp"]) == (wl, temp)]
        rates = {_label(r["setting"]): r["samples_per_s"] for r in mine if r["status"] == "ok"}
        best = max(rates, key=lambda k: rates[k]) if rates else None
        pair = [r for r in final if (r["workload"], r["temp"]) == (wl, temp)]
        fixed = [r for r in pair if r["setting"] != "auto"]
        autos = [r for r in pair if r["setting"] == "auto"]
        f, a = _median(fixed), _median(autos)
        ok_autos = [r for r in autos if r["status"] == "ok"]
        tuning = [r["tune_samples_per_s"] for r in ok_autos]
        out.append(
            {
                "workload": wl,
                "temp": temp,
                "grid_samples_per_s": rates,
                "best_fixed": best,
                "best_fixed_samples_per_s": [r.get("samples_per_s") for r in fixed],
                "auto_samples_per_s": [r.get("samples_per_s") for r in autos],
                "ratio": a / f if a and f else None,
                "tuning_ratio": statistics.median(tuning) / f if tuning and f else None,
                "auto_chosen": [r.get("final") for r in ok_autos],
                "auto_tune_epochs": [r.get("tune_epochs") for r in ok_autos],
                "auto_settled": [r.get("settled") for r in ok_autos],
                "errors": [r["reason"] for r in mine + pair if r["status"] != "ok"],
            }
        )
    return out


def report(summary: list[dict[str, Any]]) -> str:
    """The summary as text: the grid per workload, then auto against the best of it."""
    lines = []
    for s in summary:
        lines.append(f"\n{s['workload']} ({s['temp']}): grid, samples/s (one run each)")
        for label, v in sorted(s["grid_samples_per_s"].items(), key=lambda kv: -kv[1]):
            mark = "  <- best fixed" if label == s["best_fixed"] else ""
            lines.append(f"  {label:<18} {v:>10,.0f}{mark}")
        if s["ratio"] is None:
            lines.append("  auto / best fixed: n/a")
        else:
            verdict = "met" if s["ratio"] >= TARGET else "NOT met"
            lines.append(
                f"  side by side, median of {len(s['auto_samples_per_s'])}: auto / best fixed "
                f"({s['best_fixed']}) = {s['ratio']:.2f}x (target >= {TARGET}) {verdict}"
            )
            lines.append(
                f"  auto settled on {s['auto_chosen']} after {s['auto_tune_epochs']} epochs "
                f"(settled: {s['auto_settled']}); while tuning it ran at "
                f"{s['tuning_ratio']:.2f}x the best fixed"
            )
        for e in s["errors"]:
            lines.append(f"  error: {e}")
    return "\n".join(lines)


class Runner:
    """Launches cases, logs each record as a JSON line, prints progress."""

    def __init__(self, log: Path, base: dict[str, Any], quiet_wait_s: float) -> None:
        self.log = log
        self.base = base
        self.quiet_wait_s = quiet_wait_s
        self.t0 = time.monotonic()
        self.count = 0

    def __call__(self, wl: str, temp: str, setting: Any, rep: int) -> dict[str, Any]:
        spec = {**self.base, "workload": wl, "temp": temp, "setting": setting, "rep": rep}
        rec = launch(spec, self.quiet_wait_s)
        self.count += 1
        with self.log.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        rate = rec.get("samples_per_s")
        shown = f"{rate:,.0f}/s" if rate else rec.get("reason")
        print(
            f"[{self.count} {time.monotonic() - self.t0:.0f}s] {wl} {temp} {_label(setting)} "
            f"rep {rep}: {shown}",
            file=sys.stderr,
            flush=True,
        )
        return rec


def main(argv: list[str] | None = None) -> int:
    """Grid-search the fixed settings, then run the best of them and auto side by side."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--scale", type=float, default=1.0, help="data set scale (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="side-by-side repeats (default 3)")
    parser.add_argument("--epochs", type=int, default=2, help="measured epochs per case")
    parser.add_argument("--max-tune-epochs", type=int, default=40, help="auto's tuning cap")
    parser.add_argument("--quick", action="store_true", help="small grid, scale 0.1, 1 repeat")
    parser.add_argument("--grid-read", help="reads in flight to try, e.g. 1,8,64")
    parser.add_argument("--grid-map", help="map workers to try, e.g. 1,2,4")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the results")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=0.0,
        metavar="S",
        help="before each case, wait up to S s for other processes to leave the CPUs idle",
    )
    parser.add_argument(
        "--grid-from",
        type=Path,
        help="take phase 1 (the grid) from a results file of an earlier run on this machine",
    )
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
    grid = dict(QUICK_GRID if args.quick else GRID)
    for knob, text in (("read", args.grid_read), ("map", args.grid_map)):
        if text:
            grid[knob] = tuple(int(v) for v in text.split(","))
    data_dir = gen_data.generate(scale=args.scale, only=("small", "jpeg"), verbose=True)
    pairs = [tuple(p.split(":")) for p in args.workloads.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = {
        "data_dir": str(data_dir),
        "epochs": args.epochs,
        "max_tune_epochs": args.max_tune_epochs,
    }
    run = Runner(args.out / f"autotune-{stamp}.jsonl", base, args.quiet_wait)
    # Phase 1: every fixed setting once; the fastest is the best fixed setting.
    if args.grid_from:
        doc = json.loads(args.grid_from.read_text())
        grid_records = [
            r
            for r in doc.get("grid") or doc["records"]
            if r["setting"] != "auto" and (r["workload"], r["temp"]) in pairs
        ]
    else:
        grid_records = [
            run(wl, temp, {"read": r, "map": m}, 0)
            for wl, temp in pairs
            for r, m in itertools.product(grid["read"], grid["map"])
        ]
    best: dict[tuple[str, str], Any] = {}
    for wl, temp in pairs:
        mine = [
            r
            for r in grid_records
            if (r["workload"], r["temp"]) == (wl, temp) and r["status"] == "ok"
        ]
        best[(wl, temp)] = max(mine, key=lambda r: r["samples_per_s"])["setting"]
    # Phase 2: the best fixed setting and auto, alternating, so that both see the same
    # machine; a fresh measurement of the best also removes the luck that made it the max.
    final = []
    for rep in range(args.repeats):
        for wl, temp in pairs:
            order = [best[(wl, temp)], "auto"]
            for setting in order if rep % 2 == 0 else order[::-1]:
                final.append(run(wl, temp, setting, rep))
    summary = summarize(grid_records, final)
    text = report(summary)
    print(text)
    out = args.out / f"autotune-{stamp}.json"
    doc = {"summary": summary, "text": text, "grid": grid_records, "final": final}
    out.write_text(json.dumps(doc, indent=1))
    print(f"\nsaved {out}")
    return 0 if all(s["ratio"] is not None and s["ratio"] >= TARGET for s in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
