"""Run the benchmark matrix and write the report (what ``bash scripts/bench`` calls).

Usage::

    python -m bench.run                      # full scale, 3 repeats -> docs/benchmarks.{md,png}
    python -m bench.run --quick              # scale 0.1, 1 repeat -> bench/results/
    python -m bench.run --only small_files,jpeg --systems plain,torch-w0,torch-w2

A run that is quick or filtered writes its report to ``bench/results/`` unless ``--md`` says
otherwise, so a smoke run never overwrites the published numbers. Every run also keeps its
raw records in ``bench/results/run-YYYYmmdd-HHMMSS.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import _harness, _report, _workloads, gen_data, systems

REPO = _harness.REPO
RESULTS = REPO / "bench" / "results"
ALL_WORKLOADS = (*_workloads.WORKLOADS, "checkpoint")
CHECKPOINT_SCRIPT = REPO / "bench" / "bench_checkpoint.py"
CHECKPOINT_TIMEOUT_S = 900


def _csv(value: str, allowed: tuple[str, ...], what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    for item in items:
        if item not in allowed:
            raise argparse.ArgumentTypeError(
                f"{what}: unknown {item!r}; expected some of {allowed}"
            )
    return items


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(description="Run iopipe's benchmark matrix (issue 6).")
    p.add_argument("--quick", action="store_true", help="scale 0.1, 1 repeat (smoke run)")
    p.add_argument("--scale", type=float, default=None, help="data scale (default 1, quick 0.1)")
    p.add_argument("--repeats", type=int, default=None, help="repeats per case (default 3)")
    p.add_argument("--only", default=None, help=f"workloads, comma-separated: {ALL_WORKLOADS}")
    p.add_argument(
        "--systems", default=None, help=f"systems, comma-separated: {tuple(systems.SYSTEMS)}"
    )
    p.add_argument("--temps", default="warm,cold", help="warm,cold (default both)")
    p.add_argument("--md", type=Path, default=None, help="report path (default: see above)")
    p.add_argument("--png", type=Path, default=None, help="chart path (default: beside --md)")
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=None,
        help="before each case wait up to this many seconds for other jobs to go quiet "
        "(default 2, quick 0)",
    )
    p.add_argument(
        "--max-other-cpu",
        type=float,
        default=30.0,
        metavar="PERCENT",
        help="rerun a case when other jobs used more than this share of the CPUs (default 30)",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=None,
        help="reruns of a disturbed case, the quietest run kept (default 1, quick 0)",
    )
    p.add_argument("--data-root", type=Path, default=gen_data.ROOT, help="where data sets live")
    p.add_argument(
        "--report-only",
        type=Path,
        default=None,
        metavar="RAW_JSON",
        help="run nothing: rewrite the report from a run's saved records (bench/results/run-*.json)",
    )
    return p.parse_args(argv)


def _progress(total: int) -> Any:
    done = [0]

    def show(rec: dict[str, Any]) -> None:
        done[0] += 1
        head = f"[{done[0]:>3}/{total}] {rec['workload']:<11} {rec['temp']:<4} {rec['system']:<9}"
        if rec.get("rep", 0) == -1:
            head += " (overlap calibration)"
        if rec.get("status") != "ok":
            print(f"{head} {rec.get('status')}: {rec.get('reason', '')}", flush=True)
            return
        print(
            f"{head} {rec['samples_per_s']:>9.0f} samples/s  ttfb {rec['ttfb_s'] * 1e3:6.0f} ms"
            f"  cpu {rec['cpu_s']:5.2f} s  pss {rec['peak_pss_mb']:4.0f} MB  {rec['checksum']}"
            f"  other cpu {rec.get('foreign_cpu_frac', 0) * 100:3.0f}%",
            flush=True,
        )

    return show


def run_checkpoint(quick: bool, repeats: int) -> str:
    """Run ``bench/bench_checkpoint.py`` (issue 5's bench, not ours) and return its output.

    It gets ``--quick`` on a quick run when it accepts it, and ``--repeats`` when it accepts
    that; nothing else is assumed about its interface.
    """
    cmd = [sys.executable, str(CHECKPOINT_SCRIPT)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    helptext = subprocess.run(
        [*cmd, "--help"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    ).stdout
    if quick and "--quick" in helptext:
        cmd.append("--quick")
    elif "--repeats" in helptext:
        cmd += ["--repeats", str(repeats)]
    print(f"checkpoint: {shlex.join(cmd)}", flush=True)
    try:
        proc = subprocess.run(
            cmd,
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=CHECKPOINT_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"bench/bench_checkpoint.py timed out after {CHECKPOINT_TIMEOUT_S} s"
    out = proc.stdout.strip()
    if proc.returncode:
        out += f"\n(exit {proc.returncode})\n" + "\n".join(proc.stderr.strip().splitlines()[-10:])
    print(out, flush=True)
    return "\n".join(out.splitlines()[-80:])


def main(argv: list[str] | None = None) -> int:
    """Run the matrix, print the table and write the report; return the exit status."""
    args = parse_args(argv)
    scale = args.scale if args.scale is not None else (0.1 if args.quick else 1.0)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    workloads = _csv(args.only, ALL_WORKLOADS, "--only") if args.only else list(ALL_WORKLOADS)
    names = (
        _csv(args.systems, tuple(systems.SYSTEMS), "--systems")
        if args.systems
        else list(systems.DEFAULT)
    )
    temps = _csv(args.temps, _harness.TEMPS, "--temps")
    filtered = (
        args.quick
        or args.only
        or args.systems
        or args.scale is not None
        or args.temps != "warm,cold"
    )
    md = args.md or (RESULTS / "benchmarks.md" if filtered else REPO / "docs" / "benchmarks.md")
    png = args.png or md.with_suffix(".png")
    command = os.environ.get("BENCH_COMMAND") or shlex.join(
        ["python", "-m", "bench.run", *(argv or sys.argv[1:])]
    )
    if args.report_only is not None:
        return write_report(json.loads(args.report_only.read_text()), md, png)

    matrix = [w for w in workloads if w != "checkpoint"]
    kinds = sorted({_workloads.KIND[w] for w in matrix})
    data_dir = gen_data.generate(
        gen_data.dataset_dir(scale, args.data_root), scale=scale, only=kinds, verbose=True
    )
    info = _report.machine()
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    print(
        f"bench: {command}\ndata: {data_dir}  repeats: {repeats}  load avg: {load0[0]:.2f}",
        flush=True,
    )
    runnable = [n for n in names if systems.unavailable(n) is None]
    total = len(matrix) * len(temps) * (len(runnable) * repeats) + (
        len(temps) * min(repeats, 3) if "overlap" in matrix else 0
    )
    total += (len(names) - len(runnable)) * len(matrix) * len(temps)
    records = _harness.run_matrix(
        workloads=matrix,
        systems_=names,
        temps=temps,
        repeats=repeats,
        data_dir=data_dir,
        on_result=_progress(total),
        contention=_harness.Contention(
            quiet_wait_s=args.quiet_wait
            if args.quiet_wait is not None
            else (0 if args.quick else 2),
            max_foreign=args.max_other_cpu / 100,
            retries=args.retries if args.retries is not None else (0 if args.quick else 1),
        ),
    )
    extra = []
    if "checkpoint" in workloads:
        if CHECKPOINT_SCRIPT.exists():
            extra.append(
                (
                    "Checkpoint (bench/bench_checkpoint.py, issue 5)",
                    "```\n" + run_checkpoint(args.quick, repeats) + "\n```",
                )
            )
        else:
            extra.append(
                ("Checkpoint", "Skipped: bench/bench_checkpoint.py does not exist yet (issue 5).")
            )
    elapsed = time.perf_counter() - t0
    load1 = os.getloadavg()
    info = {
        **info,
        "date": _harness.now_stamp(),
        "run": f"scale {scale:g}, {repeats} repeat(s), {elapsed / 60:.1f} min; load average "
        f"{load0[0]:.2f} at start, {load1[0]:.2f} at end (2 cores: other jobs skew results)",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    raw = RESULTS / time.strftime("run-%Y%m%d-%H%M%S.json")
    saved = {"command": command, "info": info, "extra": extra, "records": records}
    raw.write_text(json.dumps(saved, indent=1))
    print(f"raw records: {raw}")
    return write_report(saved, md, png)


def write_report(saved: dict[str, Any], md: Path, png: Path) -> int:
    """Print the table and write ``md`` and ``png`` from a run's saved records.

    Returns:
        1 when some system's checksum disagrees with the plain loop's, else 0.
    """
    rows = _harness.summarize(saved["records"])
    notes = []
    steps = {r["temp"]: r["step_s"] for r in rows if r["workload"] == "overlap" and "step_s" in r}
    if steps:
        notes.append(
            "overlap step per batch (the plain loop's small-files time per batch, calibrated "
            "in this run): " + ", ".join(f"{t} {s * 1000:.2f} ms" for t, s in steps.items())
        )
    print()
    print(_report.console_table(rows))
    md.parent.mkdir(parents=True, exist_ok=True)
    _report.chart(rows, png)
    text = _report.markdown(
        rows,
        info=saved["info"],
        command=saved["command"],
        notes=notes,
        extra_sections=[tuple(x) for x in saved.get("extra", [])],
        png_name=os.path.relpath(png, md.parent),
    )
    md.write_text(text)
    print(f"\nwrote {md} and {png}")
    bad = [r for r in rows if r.get("status") == "ok" and not r.get("checksum_ok")]
    if bad:
        names = ", ".join(f"{r['workload']}/{r['temp']}/{r['system']}" for r in bad)
        print(f"CHECKSUM MISMATCH: {names}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
