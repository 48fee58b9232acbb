"""A/B two or more checkouts of iopipe on the same workloads, side by side in one run.

For judging a change: make a worktree of the older commit (``git worktree add /tmp/old
HEAD~5``) and run ``python -m bench.bench_ab 5 /tmp/old .``.  Each case runs in a fresh
process with the tree's own ``iopipe`` first on ``sys.path`` and only the public API, so
trees with different internals compare; the trees are interleaved within every repeat.

Workloads (``WL``, comma-separated; default all): ``small_files`` and ``jpeg`` (the
Pipeline read -> map -> batch of ``bench/bench_fused.py``), ``loader`` (``iopipe.DataLoader``
over the small files, ``num_workers=2``), ``tokens`` (one epoch of ``TokenShards``) and
``checkpoint`` (``load_checkpoint`` of ``bench/bench_checkpoint.py``'s model).  Modes
(``MODE``: ``warm``, ``cold`` or both): warm reads the data once before timing; cold evicts
it from the page cache (``posix_fadvise(DONTNEED)`` after ``sync``) before each case.
Every case starts timing on a collected heap (``gc.collect()`` after the imports).
Prints, per workload and mode, the median rate (min-max) of each tree, CPU microseconds
per unit, and each tree's median ratio to the first tree.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WORKLOADS = ("small_files", "jpeg", "loader", "tokens", "checkpoint")
TOKENS_WINDOWS = 20_000


def _files(workload: str) -> list[str]:
    from bench import _workloads
    from bench.bench_fused import DATA

    return list(_workloads.make("small_files" if workload == "loader" else workload, DATA).items)


def _checkpoint() -> tuple[Path, list[Path]]:
    from bench import bench_checkpoint

    folder = ROOT / "bench" / "data" / "checkpoint"
    return folder, bench_checkpoint.generate(folder)


def _token_path() -> Path:
    from bench import bench_tokens

    return bench_tokens.token_file()


def data_paths(workload: str) -> list[str]:
    """The files a workload reads (generated on first use)."""
    if workload == "checkpoint":
        return [str(p) for p in _checkpoint()[1]]
    if workload == "tokens":
        return [str(_token_path())]
    return _files(workload)


def _run(workload: str) -> int:
    """One epoch of ``workload`` through the public API; return the units processed."""
    import iopipe

    if workload in ("small_files", "jpeg"):
        from bench import _workloads
        from bench.bench_fused import DATA

        wl = _workloads.make(workload, DATA)
        pipe = (
            iopipe.Pipeline.from_files(list(wl.items))
            .read(concurrency=wl.read_concurrency)
            .map(wl.transform, concurrency=wl.map_concurrency)
            .batch(wl.batch_size)
        )
        with pipe:
            return sum(len(b) for b in pipe)
    if workload == "loader":
        from bench._workloads import first_8k, read_file

        files = _files(workload)

        class Files:
            def __len__(self) -> int:
                return len(files)

            def __getitem__(self, i: int) -> Any:
                return first_8k(read_file(files[i]))

        with iopipe.DataLoader(Files(), batch_size=256, num_workers=2) as dl:
            return sum(len(b) for b in dl)
    if workload == "tokens":
        with iopipe.TokenShards(
            _token_path(), seq_len=1024, batch_size=32, dtype="uint16",
            windows_per_epoch=TOKENS_WINDOWS,
        ) as ts:  # fmt: skip
            return sum(len(x) for x, _y in ts)
    folder, _ = _checkpoint()
    from bench.bench_checkpoint import INDEX

    state = iopipe.load_checkpoint(folder / INDEX)
    return sum(t.numel() * t.element_size() for t in state.values()) >> 20  # MiB


def case(workload: str, mode: str, tree: str) -> None:
    """Run one case in this process with ``tree``'s iopipe; print its JSON result."""
    sys.path.insert(0, tree)  # before iopipe is imported
    import torch

    from bench._harness import evict, warm

    torch.set_num_threads(1)
    paths = data_paths(workload)
    (evict if mode == "cold" else warm)(paths)
    sys.path.insert(0, tree)  # again: a bench module may have put this checkout first
    import iopipe  # imported before timing, for every tree alike

    if not iopipe.__file__ or not iopipe.__file__.startswith(tree):
        raise SystemExit(f"iopipe came from {iopipe.__file__}, not from {tree}")

    # A full collection pending from the imports (~80 ms with torch loaded) would
    # otherwise land in the timed epoch of one tree and not another, by chance of
    # how many objects each tree's modules allocate (bench/case.py does the same).
    gc.collect()
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    c0, t0 = time.process_time(), time.perf_counter()
    n = _run(workload)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    print(json.dumps({"rate": n / wall, "cpu_us": 1e6 * cpu / n, "faults": faults}))


def _spawn(workload: str, mode: str, tree: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-m", "bench.bench_ab", "--case", workload, mode, tree],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"{workload} {mode} {tree} failed:\n{out.stderr[-3000:]}")
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str]) -> None:
    if len(argv) == 4 and argv[0] == "--case":
        case(argv[1], argv[2], argv[3])
        return
    if len(argv) < 2:
        raise SystemExit("usage: python -m bench.bench_ab REPEATS TREE [TREE ...]")
    trees = [str(Path(t).resolve()) for t in argv[1:]]
    workloads = os.environ.get("WL", ",".join(WORKLOADS)).split(",")
    modes = os.environ.get("MODE", "warm,cold").split(",")
    for wl in workloads:
        data_paths(wl)  # generate before any timing
    unit = {"checkpoint": "MiB/s", "tokens": "rows/s"}
    for wl in workloads:
        for mode in modes:
            res: dict[str, list[dict[str, float]]] = {t: [] for t in trees}
            for _ in range(int(argv[0])):
                for tree in trees:
                    res[tree].append(_spawn(wl, mode, tree))
            base = [r["rate"] for r in res[trees[0]]]
            for tree, rs in res.items():
                rates = [r["rate"] for r in rs]
                ratios = [a / b for a, b in zip(rates, base, strict=True)]
                print(
                    f"{wl:11s} {mode:4s} {tree:28s} {statistics.median(rates):10,.0f} "
                    f"{unit.get(wl, 'samples/s')} ({min(rates):,.0f}-{max(rates):,.0f})"
                    f"  x{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
                    f"  CPU {statistics.median(r['cpu_us'] for r in rs):7.1f} us/unit",
                    flush=True,
                )


if __name__ == "__main__":
    main(sys.argv[1:])
