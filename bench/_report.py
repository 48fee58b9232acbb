"""Turn summarized rows into a console table, docs/benchmarks.md and docs/benchmarks.png."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench._harness import REPO

WORKLOAD_TITLES = {
    "small_files": "Small files: read 8-24 KiB files, first 8 KiB as uint8, batch 256",
    "jpeg": "JPEG decode: PIL decode, centre crop 224, CHW uint8, batch 64",
    "tokens": "Token windows: 1025 uint16 tokens at random offsets as int64, batch 32",
    "overlap": "Overlap: small files with a simulated accelerator step (sleep) per batch",
}
TORCH = ("torch-w0", "torch-w2")

Row = dict[str, Any]


def _find(rows: Sequence[Row], wl: str, temp: str, system: str) -> Row | None:
    for row in rows:
        if (row["workload"], row["temp"], row["system"]) == (wl, temp, system):
            return row if row.get("status") in ("ok", "partial") else None
    return None


def _med(row: Row | None, metric: str) -> float | None:
    return None if row is None else float(row[metric]["median"])


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}x"


def _best_torch(rows: Sequence[Row], wl: str, temp: str) -> float | None:
    vals = [_med(_find(rows, wl, temp, s), "samples_per_s") for s in TORCH]
    present = [v for v in vals if v is not None]
    return max(present) if present else None


def _fmt_rate(x: float) -> str:
    return f"{x / 1000:.1f}k" if x >= 10_000 else f"{x:.0f}"


def _busy(row: Row) -> str:
    frac = row.get("foreign_cpu_frac", {}).get("max")
    return "-" if frac is None or frac != frac else f"{frac * 100:.0f}"


def table_rows(rows: Sequence[Row]) -> list[list[str]]:
    """Return the cells of the main table, one list per row."""
    out = []
    for row in rows:
        wl, temp, name = row["workload"], row["temp"], row["system"]
        if row.get("status") not in ("ok", "partial"):
            out.append([wl, temp, name, row.get("status", "?"), row.get("reason", "")[:60]])
            continue
        sps = row["samples_per_s"]
        plain = _med(_find(rows, wl, temp, "plain"), "samples_per_s")
        out.append(
            [
                wl,
                temp,
                name,
                _fmt_rate(sps["median"]),
                f"{_fmt_rate(sps['min'])}-{_fmt_rate(sps['max'])}",
                f"{row['mb_per_s']['median']:.0f}",
                f"{row['ttfb_s']['median'] * 1000:.0f}",
                f"{row['cpu_s']['median']:.2f}",
                f"{row['peak_rss_mb']['median']:.0f}",
                f"{row['peak_pss_mb']['median']:.0f}",
                f"{row['peak_pss_anon_mb']['median']:.0f}",
                _ratio(sps["median"], plain),
                _ratio(sps["median"], _best_torch(rows, wl, temp)),
                _busy(row),
                ("ok" if row["checksum_ok"] else "MISMATCH")
                + ("*" if row.get("own_samples") else "")
                + f" ({row['runs']})",
            ]
        )
    return out


HEADER = [
    "workload",
    "temp",
    "system",
    "samples/s",
    "min-max",
    "MB/s",
    "TTFB ms",
    "CPU s",
    "RSS MB",
    "PSS MB",
    "anon PSS MB",
    "x plain",
    "x torch",
    "other CPU %",
    "checksum (runs)",
]


def console_table(rows: Sequence[Row]) -> str:
    """Return the main table as fixed-width text."""
    cells = [HEADER, *table_rows(rows)]
    widths = [max(len(r[i]) for r in cells if i < len(r)) for i in range(len(HEADER))]
    return "\n".join("  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip() for r in cells)


def _md_table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r + [""] * (len(header) - len(r))) + " |" for r in body]
    return lines


def overlap_rows(rows: Sequence[Row]) -> list[list[str]]:
    """Return the overlap table: wall time against compute alone and against torch-w2."""
    out = []
    for row in rows:
        if row["workload"] != "overlap" or row.get("status") not in ("ok", "partial"):
            continue
        temp, name = row["temp"], row["system"]
        wall = row["wall_s"]["median"]
        compute = row["compute_s"]["median"]
        io_alone = _med(_find(rows, "small_files", temp, name), "wall_s")
        w2 = _med(_find(rows, "overlap", temp, "torch-w2"), "wall_s")
        bound = max(compute, io_alone) if io_alone is not None else None
        out.append(
            [
                temp,
                name,
                f"{row['step_s'] * 1000:.2f}",
                f"{wall:.2f}",
                f"{compute:.2f}",
                "-" if io_alone is None else f"{io_alone:.2f}",
                _ratio(wall, compute),
                _ratio(wall, bound),
                _ratio(wall, w2),
            ]
        )
    return out


OVERLAP_HEADER = [
    "temp",
    "system",
    "step ms",
    "wall s",
    "compute alone s",
    "own I/O alone s",
    "wall / compute",
    "wall / max(compute, I/O)",
    "wall / torch-w2 wall",
]


def overhead_rows(rows: Sequence[Row]) -> list[list[str]]:
    """Each framework's own cost per sample, against the plain loop doing the same work.

    CPU: (CPU seconds of the process tree - the plain loop's) / samples.  Wall:
    1/rate - 1/plain rate (negative: faster than the plain loop, by overlapping).
    """
    out = []
    for wl in ("small_files", "jpeg"):
        for temp in ("warm", "cold"):
            plain = _find(rows, wl, temp, "plain")
            if plain is None:
                continue
            p_cpu, p_sps = _med(plain, "cpu_s"), _med(plain, "samples_per_s")
            n = float(plain["samples"])
            for row in rows:
                if (row["workload"], row["temp"]) != (wl, temp) or row["system"] == "plain":
                    continue
                if row.get("status") not in ("ok", "partial"):
                    continue
                cpu, sps = _med(row, "cpu_s"), _med(row, "samples_per_s")
                cpu_us = (cpu - p_cpu) / n * 1e6 if cpu is not None and p_cpu is not None else None
                wall_us = (1 / sps - 1 / p_sps) * 1e6 if sps and p_sps else None
                out.append(
                    [
                        WORKLOAD_TITLES.get(wl, wl).split(":")[0],
                        temp,
                        row["system"],
                        "-" if cpu_us is None else f"{cpu_us:+.1f}",
                        "-" if wall_us is None else f"{wall_us:+.1f}",
                    ]
                )
    return out


OVERHEAD_HEADER = [
    "workload",
    "temp",
    "system",
    "CPU us/sample over plain",
    "wall us/sample over plain",
]


def _target(label: str, value: float | None, limit: float, *, at_most: bool = False) -> str:
    sign = "<=" if at_most else ">="
    if value is None:
        return f"| {label} | n/a | {sign} {limit} | not measured |"
    ok = value <= limit if at_most else value >= limit
    return f"| {label} | {value:.2f} | {sign} {limit} | {'met' if ok else '**not met**'} |"


def _div(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def targets(rows: Sequence[Row]) -> list[str]:
    """Return issue 6's targets for iopipe, as measured in this run (n/a where not run)."""

    def sps(wl: str, temp: str, system: str) -> float | None:
        return _med(_find(rows, wl, temp, system), "samples_per_s")

    lines = []
    lines.append(
        _target(
            "small files warm, iopipe / plain",
            _div(sps("small_files", "warm", "iopipe"), sps("small_files", "warm", "plain")),
            0.9,
        )
    )
    lines.append(
        _target(
            "small files cold, iopipe / best torch",
            _div(sps("small_files", "cold", "iopipe"), _best_torch(rows, "small_files", "cold")),
            1.0,
        )
    )
    for temp in ("warm", "cold"):
        plain = sps("jpeg", temp, "plain")
        lines.append(
            _target(
                f"JPEG {temp}, iopipe / (2 x plain)",
                _div(sps("jpeg", temp, "iopipe"), None if plain is None else 2 * plain),
                0.9,
            )
        )
        lines.append(
            _target(
                f"JPEG {temp}, iopipe / torch-w2",
                _div(sps("jpeg", temp, "iopipe"), sps("jpeg", temp, "torch-w2")),
                1.0,
            )
        )
    lines.append(
        _target(
            "tokens warm, iopipe / plain",
            _div(sps("tokens", "warm", "iopipe"), sps("tokens", "warm", "plain")),
            0.8,
        )
    )
    lines.append(
        _target(
            "tokens cold, iopipe / plain",
            _div(sps("tokens", "cold", "iopipe"), sps("tokens", "cold", "plain")),
            1.0,
        )
    )
    for temp in ("warm", "cold"):
        row = _find(rows, "overlap", temp, "iopipe")
        wall = _med(row, "wall_s")
        io_alone = _med(_find(rows, "small_files", temp, "iopipe"), "wall_s")
        compute = _med(row, "compute_s")
        bound = None if compute is None or io_alone is None else max(compute, io_alone)
        lines.append(
            _target(
                f"overlap {temp}, iopipe wall / max(compute, own I/O)",
                _div(wall, bound),
                1.1,
                at_most=True,
            )
        )
        lines.append(
            _target(
                f"overlap {temp}, iopipe wall / torch-w2 wall",
                _div(wall, _med(_find(rows, "overlap", temp, "torch-w2"), "wall_s")),
                0.65,
                at_most=True,
            )
        )
    for wl in ("small_files", "jpeg", "tokens"):
        for temp in ("warm", "cold"):
            ttfb = _med(_find(rows, wl, temp, "iopipe"), "ttfb_s")
            w0 = _med(_find(rows, wl, temp, "torch-w0"), "ttfb_s")
            w2 = _med(_find(rows, wl, temp, "torch-w2"), "ttfb_s")
            lines.append(
                _target(
                    f"TTFB {wl} {temp}, iopipe / (2 x torch-w0)",
                    _div(ttfb, None if w0 is None else 2 * w0),
                    1.0,
                    at_most=True,
                )
            )
            lines.append(
                _target(f"TTFB {wl} {temp}, iopipe / torch-w2", _div(ttfb, w2), 1.0, at_most=True)
            )
            pss = _med(_find(rows, wl, temp, "iopipe"), "peak_pss_mb")
            pss0 = _med(_find(rows, wl, temp, "torch-w0"), "peak_pss_mb")
            lines.append(
                _target(
                    f"peak PSS {wl} {temp}, iopipe / torch-w0", _div(pss, pss0), 1.1, at_most=True
                )
            )
            lines.append(
                _target(
                    f"{wl} {temp}, iopipe-dl / iopipe",
                    _div(sps(wl, temp, "iopipe-dl"), sps(wl, temp, "iopipe")),
                    0.9,
                )
            )
    return lines


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine() -> dict[str, str]:
    """Return facts about this machine and its software, for the report."""
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "CPU": f"{cpu}, {os.cpu_count()} logical cores ({len(os.sched_getaffinity(0))} usable)",
        "memory": f"{mem:.1f} GiB",
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "packages": ", ".join(
            f"{d} {_version(d)}"
            for d in ("torch", "numpy", "pillow", "spdl", "torchdata", "iopipe")
        ),
        "iopipe commit": commit or "(none)",
    }


def markdown(
    rows: Sequence[Row],
    *,
    info: dict[str, str],
    command: str,
    notes: Sequence[str] = (),
    extra_sections: Sequence[tuple[str, str]] = (),
    png_name: str | None = "benchmarks.png",
) -> str:
    """Return the whole of docs/benchmarks.md."""
    lines = [
        "# Benchmarks",
        "",
        "Generated by `bench/run.py`; do not edit by hand. Reproduce with:",
        "",
        "```",
        command,
        "```",
        "",
        "## Machine",
        "",
    ]
    lines += [f"- **{k}**: {v}" for k, v in info.items()]
    lines += ["", "## How it is measured", ""]
    lines += [
        "- Every case runs in a fresh process (`python -m bench.case`); repeats are interleaved "
        "(repeat 1 of every case, then repeat 2, ...). Cells give the median, `min-max` the range.",
        "- warm: the harness reads every file of the workload once before the case; cold: "
        "`os.sync()` then `posix_fadvise(DONTNEED)` on every file before the case.",
        "- Timed from building the loader to the consumer finishing the last batch: start-up "
        "(worker processes, threads) is inside, in time to first batch (TTFB) too. Every case "
        "starts from a collected heap (`gc.collect()` after the imports, before the timer), so "
        "a full collection owed to the imports does not land in one system's first batch.",
        "- samples/s = samples / wall; MB/s = bytes read from storage / wall (file sizes; for "
        "tokens the window bytes). CPU s: the process tree (workers included), from /proc. "
        "RSS and PSS: peak of the sum over the process tree (RSS double-counts pages shared "
        "with forked workers; PSS splits them). anon PSS leaves out file-backed pages "
        "(shared libraries such as libtorch, whose share depends on how many other processes "
        "on the machine map them): the memory the loader itself allocates. A memory-mapped "
        "file's pages that a process touched count in its RSS and PSS (tokens, plain loop).",
        "- Checksum: sum of every delivered batch's uint64 words mod 2^64 (order-independent); "
        "`ok` means every run of the row equals the plain loop's; `ok*`: the system picks its "
        "own samples (iopipe's TokenShards draws its own random windows, as many and as long) "
        "and every run equals the checksum of those windows read straight from the file. Ratios: `x plain` against "
        "the plain loop, `x torch` against the better of torch-w0 and torch-w2, same "
        "workload and temperature.",
        "- other CPU %: the largest share of the machine's CPU that other processes (not the "
        "case, not the harness) used during one run of the row, from /proc/stat. Several "
        "people share this 2-core machine: before each run the harness waits (briefly) for "
        "quiet, and reruns a run disturbed past `--max-other-cpu` up to `--retries` times, "
        "keeping the quietest (chosen by load, never by result). Rows with a high share are "
        "suspect: on a busy machine the max of the range is closer to the machine's ability.",
        "- `torch.set_num_threads(1)` in every case process (`bench/case.py`); DataLoader "
        "workers get one thread from torch itself.",
    ]
    lines += [f"- {n}" for n in notes]
    lines += ["", "## Results", ""]
    if png_name:
        lines += [f"![samples/s per system]({png_name})", ""]
    body = table_rows(rows)
    for wl in dict.fromkeys(r["workload"] for r in rows):
        lines += [f"### {WORKLOAD_TITLES.get(wl, wl)}", ""]
        lines += _md_table(HEADER[1:], [r[1:] for r in body if r[0] == wl])
        lines.append("")
    ov = overlap_rows(rows)
    if ov:
        lines += ["### Overlap: wall time against compute alone", ""]
        lines += _md_table(OVERLAP_HEADER, ov)
        lines.append("")
    oh = overhead_rows(rows)
    if oh:
        lines += [
            "### Framework overhead per sample",
            "",
            "What each system costs per sample beyond the plain loop doing the same work: "
            "CPU = (CPU s of the process tree - plain's) / samples; wall = 1/rate - 1/plain "
            "rate (negative = faster than the plain loop).",
            "",
        ]
        lines += _md_table(OVERHEAD_HEADER, oh)
        lines.append("")
    lines += ["## Issue 6 targets for iopipe (this run)", ""]
    lines += ["| ratio | measured | target | verdict |", "|---|---|---|---|", *targets(rows)]
    lines.append("")
    for title, text in extra_sections:
        lines += [f"## {title}", "", text.rstrip(), ""]
    return "\n".join(lines)


def chart(rows: Sequence[Row], path: Path) -> None:
    """Write a bar chart of samples/s (median, min-max whiskers) per system per workload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    temps = list(dict.fromkeys(r["temp"] for r in rows))
    names = list(dict.fromkeys(r["system"] for r in rows))
    colors = plt.get_cmap("tab10")
    fig, axes = plt.subplots(
        len(workloads), len(temps), figsize=(5.5 * len(temps), 2.8 * len(workloads)), squeeze=False
    )
    for i, wl in enumerate(workloads):
        for j, temp in enumerate(temps):
            ax = axes[i][j]
            for k, name in enumerate(names):
                row = _find(rows, wl, temp, name)
                if row is None:
                    ax.text(k, 0, "n/a", ha="center", va="bottom", fontsize=7, color="grey")
                    continue
                s = row["samples_per_s"]
                err = [[s["median"] - s["min"]], [s["max"] - s["median"]]]
                ax.bar(k, s["median"], yerr=err, color=colors(k % 10), capsize=2)
                ax.text(
                    k, s["median"], _fmt_rate(s["median"]), ha="center", va="bottom", fontsize=7
                )
            ax.set_xticks(range(len(names)), names, rotation=30, fontsize=8)
            ax.set_title(f"{wl} ({temp})", fontsize=9)
            ax.set_ylabel("samples/s", fontsize=8)
            ax.tick_params(axis="y", labelsize=7)
            ax.margins(y=0.15)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
