"""Issue 15's anchor table: iopipe against torch at the same arguments, each ratio with its target.

Usage::

    python -m bench.anchors                  # scale 1, 5 interleaved repeats (~25 min here)
    python -m bench.anchors --quick          # scale 0.1, 3 repeats (a smoke run, ~4 min)
    bash scripts/bench anchors [--quick]     # the same, after setting up .venv

Every case runs in a fresh process (``bench/case.py``), the systems interleaved repeat by
repeat, and each ratio is the ratio of the medians.  ``iopipe-dl`` is ``iopipe.DataLoader``
called with torch-w2's arguments, ``iopipe-dl-w0`` with torch-w0's, ``iopipe`` the builder
API.  The raw records go to ``bench/results/anchors-*.json``; ``--report-only FILE`` prints
the table again from them.  Exit status 0 whatever the ratios (they are measurements, and
the 2-core machine is shared): read the ``verdict`` column.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from bench import _harness, _workloads, gen_data
from bench._report import _div, _find, _med

WORKLOADS = ("small_files", "jpeg", "tokens", "overlap")
SYSTEMS = ("plain", "torch-w0", "torch-w2", "iopipe", "iopipe-dl", "iopipe-dl-w0")
LOADER_WORKLOADS = ("small_files", "jpeg", "tokens")


def _ratios(rows: list[dict[str, Any]]) -> list[tuple[str, float | None, str, float]]:
    """``(label, value, sign, target)`` for each of the issue's acceptance ratios."""

    def sps(wl: str, temp: str, system: str) -> float | None:
        return _med(_find(rows, wl, temp, system), "samples_per_s")

    out: list[tuple[str, float | None, str, float]] = []
    for wl in LOADER_WORKLOADS:
        for temp in _harness.TEMPS:
            w0 = _div(sps(wl, temp, "iopipe-dl-w0"), sps(wl, temp, "torch-w0"))
            w2 = _div(sps(wl, temp, "iopipe-dl"), sps(wl, temp, "torch-w2"))
            out.append((f"{wl} {temp}: DataLoader w0 / torch-w0", w0, ">=", 1.0))
            out.append((f"{wl} {temp}: DataLoader w2 / torch-w2", w2, ">=", 1.0))
    out.append(
        (
            "small_files warm: Pipeline / plain loop",
            _div(sps("small_files", "warm", "iopipe"), sps("small_files", "warm", "plain")),
            ">=",
            0.95,
        )
    )
    for wl in ("small_files", "jpeg"):
        out.append(
            (
                f"{wl} cold: Pipeline / torch-w2",
                _div(sps(wl, "cold", "iopipe"), sps(wl, "cold", "torch-w2")),
                ">=",
                1.0,
            )
        )
    for temp in _harness.TEMPS:
        row = _find(rows, "overlap", temp, "iopipe")
        io_alone = _med(_find(rows, "small_files", temp, "iopipe"), "wall_s")
        compute = _med(row, "compute_s")
        bound = None if compute is None or io_alone is None else max(compute, io_alone)
        out.append(
            (
                f"overlap {temp}: Pipeline wall / max(compute, own I/O)",
                _div(_med(row, "wall_s"), bound),
                "<=",
                1.05,
            )
        )
    for wl in LOADER_WORKLOADS:
        for temp in _harness.TEMPS:
            base = _med(_find(rows, wl, temp, "torch-w0"), "peak_pss_mb")
            for name in ("iopipe-dl-w0", "iopipe-dl", "iopipe"):
                pss = _med(_find(rows, wl, temp, name), "peak_pss_mb")
                out.append((f"{wl} {temp}: peak PSS {name} / torch-w0", _div(pss, base), "<=", 1.1))
    return out


def table(rows: list[dict[str, Any]]) -> str:
    """The rates measured, then every ratio with its target and verdict (markdown)."""
    lines = [
        "| workload | temp | " + " | ".join(SYSTEMS) + " |",
        "|---|---|" + "---|" * len(SYSTEMS),
    ]
    for wl in LOADER_WORKLOADS:
        for temp in _harness.TEMPS:
            cells = []
            for name in SYSTEMS:
                v = _med(_find(rows, wl, temp, name), "samples_per_s")
                cells.append("-" if v is None else f"{v:,.0f}")
            lines.append(f"| {wl} | {temp} | " + " | ".join(cells) + " |")
    lines += ["", "| ratio (medians) | measured | target | verdict |", "|---|---|---|---|"]
    for label, value, sign, target in _ratios(rows):
        if value is None:
            lines.append(f"| {label} | n/a | {sign} {target} | not measured |")
            continue
        ok = value >= target if sign == ">=" else value <= target
        lines.append(
            f"| {label} | {value:.2f} | {sign} {target} | {'met' if ok else '**not met**'} |"
        )
    bad = [r for r in rows if r.get("checksum_ok") is False]
    if bad:
        names = ", ".join(f"{r['workload']} {r['temp']} {r['system']}" for r in bad)
        lines.append(f"\n**checksums disagree with the plain loop**: {names}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="issue 15's anchor table (iopipe vs torch)")
    p.add_argument("--quick", action="store_true", help="scale 0.1, 3 repeats")
    p.add_argument("--repeats", type=int, default=None, help="default 5 (quick: 3)")
    p.add_argument("--only", default=",".join(WORKLOADS), help=f"some of {WORKLOADS}")
    p.add_argument("--report-only", type=Path, default=None, metavar="RAW_JSON")
    args = p.parse_args(argv)
    if args.report_only is not None:
        saved = json.loads(args.report_only.read_text())
        print(table(_harness.summarize(saved["records"])))
        return 0
    scale = 0.1 if args.quick else 1.0
    repeats = args.repeats or (3 if args.quick else 5)
    workloads = [w for w in args.only.split(",") if w]
    for w in workloads:
        if w not in WORKLOADS:
            p.error(f"--only: unknown {w!r}; expected some of {WORKLOADS}")
    kinds = sorted({_workloads.KIND[w] for w in workloads})
    data_dir = gen_data.generate(
        gen_data.dataset_dir(scale, gen_data.ROOT), scale=scale, only=kinds
    )
    t0 = time.perf_counter()

    def show(rec: dict[str, Any]) -> None:
        if rec.get("status") == "ok" and rec.get("rep", 0) >= 0:
            print(
                f"  {rec['workload']:<11} {rec['temp']:<4} {rec['system']:<12} "
                f"{rec['samples_per_s']:>9.0f} samples/s  pss {rec['peak_pss_mb']:4.0f} MB",
                flush=True,
            )
        elif rec.get("status") != "ok":
            print(f"  {rec['workload']} {rec['temp']} {rec['system']}: {rec.get('status')}")

    records = _harness.run_matrix(
        workloads=workloads,
        systems_=list(SYSTEMS),
        repeats=repeats,
        data_dir=data_dir,
        on_result=show,
        contention=_harness.Contention(quiet_wait_s=0 if args.quick else 2, retries=0),
    )
    raw = _harness.REPO / "bench" / "results" / time.strftime("anchors-%Y%m%d-%H%M%S.json")
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text(json.dumps({"scale": scale, "repeats": repeats, "records": records}, indent=1))
    print(
        f"\nscale {scale:g}, {repeats} interleaved repeats, {(time.perf_counter() - t0) / 60:.1f} min;"
        f" raw records: {raw}\n"
    )
    print(table(_harness.summarize(records)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
