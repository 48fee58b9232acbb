"""Issue 2's bench: iopipe's Pipeline against torch's DataLoader and a plain loop, small files.

A preset of the suite's small-files workload (20,000 files of 8-24 KiB, first 8 KiB as
uint8, batch 256), warm and cold, every case in a fresh process with repeats interleaved.
Prints the table and the two ratios issue 2 asks for, measured side by side in one run:
warm Pipeline / plain loop (target >= 0.8) and cold Pipeline / best of torch's (>= 1.0).

Usage: ``python -m bench.bench_pipeline [--quick] [--repeats N] [--scale S]``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from bench import _harness, _report, gen_data
from bench.run import RESULTS

SYSTEMS = ("plain", "torch-w0", "torch-w2", "iopipe")
TARGETS = {"warm": ("plain", 0.8), "cold": ("best torch", 1.0)}


def ratios(rows: list[dict[str, Any]]) -> list[str]:
    """Return the Pipeline's samples/s ratios against the references, one line per temp."""

    def med(temp: str, system: str) -> float | None:
        for row in rows:
            if (row["temp"], row["system"]) == (temp, system) and "samples_per_s" in row:
                return float(row["samples_per_s"]["median"])
        return None

    lines = []
    for temp, (ref, target) in TARGETS.items():
        mine = med(temp, "iopipe")
        if ref == "plain":
            base = med(temp, "plain")
        else:
            torch_rates = [v for v in (med(temp, "torch-w0"), med(temp, "torch-w2")) if v]
            base = max(torch_rates) if torch_rates else None
        if mine is None or not base:
            lines.append(f"{temp}: Pipeline / {ref}: n/a")
            continue
        verdict = "met" if mine / base >= target else "NOT met"
        lines.append(
            f"{temp}: Pipeline / {ref} = {mine / base:.2f}x (target >= {target}) {verdict}"
        )
    for temp in TARGETS:
        plain, w0, w2 = med(temp, "plain"), med(temp, "torch-w0"), med(temp, "torch-w2")
        mine = med(temp, "iopipe")
        lines.append(
            f"{temp}: Pipeline / torch-w0 = {_r(mine, w0)}, / torch-w2 = {_r(mine, w2)}, "
            f"/ plain = {_r(mine, plain)}"
        )
    return lines


def _r(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or not b else f"{a / b:.2f}x"


def main(argv: list[str] | None = None) -> int:
    """Run the preset and print its table and ratios."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="scale 0.1, 1 repeat")
    p.add_argument("--repeats", type=int, default=None, help="repeats per case (default 3)")
    p.add_argument("--scale", type=float, default=None, help="data scale (default 1)")
    args = p.parse_args(argv)
    scale = args.scale if args.scale is not None else (0.1 if args.quick else 1.0)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    data_dir = gen_data.generate(scale=scale, only=["small"], verbose=True)
    records = _harness.run_matrix(
        workloads=["small_files"],
        systems_=SYSTEMS,
        repeats=repeats,
        data_dir=data_dir,
        contention=_harness.Contention(
            quiet_wait_s=0 if args.quick else 2, max_foreign=0.3, retries=0 if args.quick else 1
        ),
        on_result=lambda r: print(
            f"{r['temp']:<4} {r['system']:<9} "
            + (f"{r['samples_per_s']:9.0f} samples/s" if r.get("status") == "ok" else r["reason"]),
            flush=True,
        ),
    )
    rows = _harness.summarize(records)
    print()
    print(_report.console_table(rows))
    print()
    print("\n".join(ratios(rows)))
    RESULTS.mkdir(parents=True, exist_ok=True)
    raw = RESULTS / time.strftime("bench_pipeline-%Y%m%d-%H%M%S.json")
    raw.write_text(json.dumps({"argv": sys.argv, "records": records}, indent=1))
    return 0 if all(r.get("checksum_ok", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
