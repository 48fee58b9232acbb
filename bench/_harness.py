"""The harness: page-cache control and the interleaved matrix of cases, each in a fresh process.

Order: repeat 1 of every (workload, temperature, system), then repeat 2, and so on, so that a
drift in the machine (another job, thermal state) spreads over all systems instead of landing
on one. Before each case the workload's files are made:

* warm: read once in full by this process (an untimed warm-up pass through the page cache);
* cold: ``os.sync()`` and then ``posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)`` on every file,
  which evicts them from the page cache (directory entries and inodes stay cached).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import _workloads, systems

REPO = Path(__file__).resolve().parent.parent
TEMPS = ("warm", "cold")
CASE_TIMEOUT_S = 600.0
METRICS = (
    "samples_per_s",
    "mb_per_s",
    "wall_s",
    "ttfb_s",
    "cpu_s",
    "peak_rss_mb",
    "peak_pss_mb",
    "peak_pss_anon_mb",
    "compute_s",
    "foreign_cpu_frac",
)


@dataclass(frozen=True)
class Case:
    """One cell of the matrix."""

    workload: str
    system: str
    temp: str


def warm(paths: Iterable[str]) -> None:
    """Read every file in ``paths`` once, so that it sits in the page cache."""
    buf = bytearray(8 << 20)
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def evict(paths: Iterable[str]) -> None:
    """Drop every file in ``paths`` from the page cache (after writing back dirty pages)."""
    os.sync()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def prepare(paths: Sequence[str], temp: str) -> None:
    """Make ``paths`` warm or cold.

    Raises:
        ValueError: ``temp`` is neither "warm" nor "cold".
    """
    if temp == "warm":
        warm(paths)
    elif temp == "cold":
        evict(paths)
    else:
        raise ValueError(f"temp must be 'warm' or 'cold', got {temp!r}")


def machine_busy_s() -> tuple[float, float]:
    """Return (busy, total) CPU seconds of the whole machine since boot, from /proc/stat.

    Busy counts user, nice, system, irq, softirq and steal; total adds idle and iowait.
    """
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:9]]
    tick = os.sysconf("SC_CLK_TCK")
    idle = vals[3] + vals[4]
    return (sum(vals) - idle) / tick, sum(vals) / tick


def wait_for_quiet(max_wait_s: float, *, busy_frac: float = 0.25, probe_s: float = 0.5) -> float:
    """Wait (at most ``max_wait_s``) until other processes use under ``busy_frac`` of the CPUs.

    Several people share this 2-core machine; a case that starts while another job runs
    measures that job as much as itself. Returns the last busy fraction seen.
    """
    deadline = time.monotonic() + max_wait_s
    frac = 0.0
    while True:
        b0, t0 = machine_busy_s()
        time.sleep(probe_s)
        b1, t1 = machine_busy_s()
        frac = (b1 - b0) / max(t1 - t0, 1e-9)
        if frac < busy_frac or time.monotonic() >= deadline:
            return frac


def _own_cpu_s() -> float:
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def run_case(
    case: Case,
    *,
    data_dir: Path,
    rep: int = 0,
    step_s: float = 0.0,
    timeout_s: float = CASE_TIMEOUT_S,
    quiet_wait_s: float = 0.0,
) -> dict[str, Any]:
    """Prepare the page cache, run ``case`` in a fresh process and return its record.

    The record's ``foreign_cpu_frac`` is the share of the machine's CPU that other processes
    used while the case ran (0 on a quiet machine): read it before trusting a number.
    ``quiet_wait_s`` > 0 first waits up to that long for the machine to be quiet.
    """
    prepare(_workloads.paths(case.workload, data_dir), case.temp)
    if quiet_wait_s > 0:
        wait_for_quiet(quiet_wait_s)
    spec = {
        "workload": case.workload,
        "system": case.system,
        "temp": case.temp,
        "rep": rep,
        "data_dir": str(data_dir),
        "step_s": step_s,
    }
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("PYTHONHASHSEED", None)
    cmd = [sys.executable, "-m", "bench.case", json.dumps(spec)]
    busy0, _ = machine_busy_s()
    own0, wall0 = _own_cpu_s(), time.monotonic()
    try:
        proc = subprocess.run(
            cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        return {**spec, "status": "error", "reason": f"timed out after {timeout_s:.0f} s"}
    foreign = machine_busy_s()[0] - busy0 - (_own_cpu_s() - own0)
    foreign_frac = max(0.0, foreign) / ((time.monotonic() - wall0) * (os.cpu_count() or 1))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {**spec, "status": "error", "reason": f"exit {proc.returncode}: {' | '.join(tail)}"}
    record: dict[str, Any] = json.loads(lines[-1])
    record["foreign_cpu_frac"] = foreign_frac
    return record


@dataclass(frozen=True)
class Contention:
    """How the harness copes with other jobs on this shared machine.

    Attributes:
        quiet_wait_s: Before each run, wait up to this long for the machine to go quiet.
        max_foreign: A run during which other processes used more than this share of the
            machine's CPU ...
        retries: ... is run again, up to this many times; the quietest run is kept (chosen by
            the machine's load, never by the result).
    """

    quiet_wait_s: float = 0.0
    max_foreign: float = 1.0
    retries: int = 0


def run_clean(
    case: Case,
    *,
    data_dir: Path,
    rep: int = 0,
    step_s: float = 0.0,
    contention: Contention = Contention(),
) -> dict[str, Any]:
    """Run ``case`` with :func:`run_case`, again while other jobs disturbed it (see Contention)."""
    best: dict[str, Any] | None = None
    for attempt in range(contention.retries + 1):
        rec = run_case(
            case, data_dir=data_dir, rep=rep, step_s=step_s, quiet_wait_s=contention.quiet_wait_s
        )
        rec["attempts"] = attempt + 1
        if rec.get("status") != "ok":
            return rec
        if best is None or rec["foreign_cpu_frac"] < best["foreign_cpu_frac"]:
            best = rec
        if rec["foreign_cpu_frac"] <= contention.max_foreign:
            break
    assert best is not None  # the loop runs at least once
    return best


def overlap_step(
    data_dir: Path,
    temp: str,
    *,
    runs: int = 1,
    contention: Contention = Contention(),
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> float:
    """Size the overlap workload's step: the plain loop's time per batch on small files.

    With this step the simulated compute of an epoch takes about as long as the plain loop's
    I/O of the same epoch, the point where hiding one behind the other matters most.
    """
    walls = []
    batches = 1
    for _ in range(max(1, runs)):
        rec = run_clean(
            Case("small_files", "plain", temp), data_dir=data_dir, rep=-1, contention=contention
        )
        if rec.get("status") != "ok":
            raise RuntimeError(f"overlap calibration failed: {rec.get('reason')}")
        if on_result is not None:
            on_result(rec)
        walls.append(float(rec["wall_s"]))
        batches = rec["batches"]
    return statistics.median(walls) / batches


def run_matrix(
    *,
    workloads: Sequence[str],
    systems_: Sequence[str],
    temps: Sequence[str] = TEMPS,
    repeats: int = 3,
    data_dir: Path,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    contention: Contention = Contention(),
) -> list[dict[str, Any]]:
    """Run every (workload, temp, system) ``repeats`` times, interleaved; return all records.

    Systems that cannot run here get one record with status "unavailable" and are not run.
    The overlap workload's step is calibrated first, per temperature (see :func:`overlap_step`).
    ``contention``: how to cope with other jobs on the machine (see :class:`Contention`).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats!r}")
    records: list[dict[str, Any]] = []

    def emit(rec: dict[str, Any]) -> None:
        records.append(rec)
        if on_result is not None:
            on_result(rec)

    runnable = []
    for name in systems_:
        reason = systems.unavailable(name)
        if reason is None:
            runnable.append(name)
            continue
        for wl in workloads:
            for temp in temps:
                emit(
                    {
                        "workload": wl,
                        "system": name,
                        "temp": temp,
                        "status": "unavailable",
                        "reason": reason,
                    }
                )
    steps = {}
    if "overlap" in workloads:
        for temp in temps:
            steps[temp] = overlap_step(
                data_dir, temp, runs=min(repeats, 3), on_result=emit, contention=contention
            )
    for rep in range(repeats):
        for wl in workloads:
            for temp in temps:
                for name in runnable:
                    step = steps.get(temp, 0.0) if wl == "overlap" else 0.0
                    case = Case(wl, name, temp)
                    emit(
                        run_clean(
                            case, data_dir=data_dir, rep=rep, step_s=step, contention=contention
                        )
                    )
    return records


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Group records by (workload, temp, system): median and min-max of every metric.

    Each row also says whether its checksums agree with each other (``checksum_ok``) and with
    the workload's reference checksum (the plain loop's, else the most common one).
    """
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for rec in records:
        if rec.get("rep", 0) == -1:
            continue  # calibration runs
        groups.setdefault((rec["workload"], rec["temp"], rec["system"]), []).append(rec)
    reference: dict[str, str] = {}
    by_workload: dict[str, list[dict[str, Any]]] = {}
    for (wl, _, _), recs in groups.items():
        by_workload.setdefault(wl, []).extend(r for r in recs if r.get("status") == "ok")
    for wl, recs in by_workload.items():
        plain = [r["checksum"] for r in recs if r["system"] == "plain"]
        sums = plain or [r["checksum"] for r in recs if "checksum_expected" not in r]
        if sums:
            reference[wl] = max(set(sums), key=sums.count)
    rows = []
    for (wl, temp, name), recs in groups.items():
        ok = [r for r in recs if r.get("status") == "ok"]
        row: dict[str, Any] = {"workload": wl, "temp": temp, "system": name, "runs": len(ok)}
        if not ok:
            row["status"] = recs[0].get("status", "error")
            row["reason"] = recs[0].get("reason", "")
            rows.append(row)
            continue
        row["status"] = "ok" if len(ok) == len(recs) else "partial"
        row["reason"] = "" if len(ok) == len(recs) else recs[-1].get("reason", "")
        for metric in METRICS:
            row[metric] = _stats([float(r.get(metric, "nan")) for r in ok])
        distinct = {r["checksum"] for r in ok}
        row["checksum"] = sorted(distinct)[0]
        row["checksum_ok"] = all(
            r["checksum"] == r.get("checksum_expected", reference.get(wl)) for r in ok
        )
        row["own_samples"] = any("checksum_expected" in r for r in ok)
        row["samples"] = ok[0]["samples"]
        row["step_s"] = ok[0].get("step_s", 0.0)
        rows.append(row)
    order = {name: i for i, name in enumerate((*_workloads.WORKLOADS, *TEMPS, *systems.SYSTEMS))}
    rows.sort(key=lambda r: tuple(order.get(r[k], 99) for k in ("workload", "temp", "system")))
    return rows


def now_stamp() -> str:
    """Return the local time as ``YYYY-mm-dd HH:MM:SS``."""
    return time.strftime("%Y-%m-%d %H:%M:%S")
