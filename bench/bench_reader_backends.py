"""Reader backends side by side: aiofiles vs os.preadv jobs (iopipe's reader).

Issue 2 asks to measure both ways of reading each item into memory and keep the
faster.  Cases, each in a fresh process, repeats interleaved:

* ``aiofiles``: ``async with aiofiles.open(p, "rb") as f: await f.read()`` per
  file, ``concurrency`` files in flight on one asyncio loop (every open/read/close
  is a thread hand-off).
* ``preadv-per-file``: one executor job per file doing ``os.open`` + ``os.preadv``
  into ``numpy.empty`` (a hand-off per file, no aiofiles).
* ``iopipe``: ``Pipeline.from_files(paths).read(concurrency=...)``, which packs
  many files per job and adapts reads in flight.

Usage: ``python -m bench.bench_reader_backends [--files N] [--cold] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

from bench import _harness

HERE = os.path.dirname(os.path.abspath(__file__))
SYSTEMS = ("aiofiles", "preadv-per-file", "iopipe")


def make_files(root: str, n: int) -> list[str]:
    os.makedirs(root, exist_ok=True)
    paths = []
    for i in range(n):
        p = os.path.join(root, f"{i:06d}.bin")
        rng = random.Random(i)  # per file, so a re-run rewrites nothing
        size = rng.randint(8 << 10, 24 << 10)
        if not os.path.exists(p) or os.path.getsize(p) != size:
            with open(p, "wb") as f:
                f.write(rng.randbytes(size))
        paths.append(p)
    return paths


def run_case(system: str, paths: list[str], concurrency: int) -> tuple[int, int]:
    """Read every file; return (files, bytes)."""
    import asyncio

    if system == "iopipe":
        from iopipe import Pipeline

        with Pipeline.from_files(paths).read(concurrency=concurrency) as pipe:
            total = sum(len(b) for b in pipe)
        return len(paths), total

    async def main() -> int:
        sem = asyncio.Semaphore(concurrency)
        loop = asyncio.get_running_loop()
        if system == "aiofiles":
            import aiofiles

            async def one(p: str) -> int:
                async with sem, aiofiles.open(p, "rb") as f:
                    return len(await f.read())
        else:
            import numpy as np

            def read(p: str) -> int:
                fd = os.open(p, os.O_RDONLY)
                try:
                    buf = np.empty(os.fstat(fd).st_size, np.uint8)
                    os.preadv(fd, [buf], 0)
                    return len(buf)
                finally:
                    os.close(fd)

            async def one(p: str) -> int:
                async with sem:
                    return await loop.run_in_executor(None, read, p)

        sizes = await asyncio.gather(*(one(p) for p in paths))
        return sum(sizes)

    return len(paths), asyncio.run(main())


def child(args: argparse.Namespace) -> None:
    if args.system == "iopipe":
        import iopipe  # noqa: F401 - import (torch) outside the timed region
    else:
        import aiofiles  # noqa: F401
        import numpy  # noqa: F401
    paths = make_files(args.root, args.files)
    if args.cold:
        _harness.evict(paths)
    else:
        run_case(args.system, paths, args.concurrency)  # warm-up pass
    t0 = time.perf_counter()
    files, nbytes = run_case(args.system, paths, args.concurrency)
    dt = time.perf_counter() - t0
    print(json.dumps({"files_per_s": files / dt, "mb_per_s": nbytes / dt / 1e6, "bytes": nbytes}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=5000)
    ap.add_argument("--root", default=os.path.join(HERE, "data", "reader-backends"))
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--cold", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--system", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.system:
        child(args)
        return
    make_files(args.root, args.files)
    results: dict[str, list[float]] = {s: [] for s in SYSTEMS}
    sums: dict[str, set[int]] = {s: set() for s in SYSTEMS}
    for _ in range(args.repeats):
        for system in SYSTEMS:
            cmd = [
                sys.executable,
                "-m",
                "bench.bench_reader_backends",
                "--system",
                system,
                "--files",
                str(args.files),
                "--root",
                args.root,
                "--concurrency",
                str(args.concurrency),
            ] + (["--cold"] if args.cold else [])
            out = subprocess.run(
                cmd, capture_output=True, text=True, check=True, cwd=os.path.dirname(HERE)
            )
            row = json.loads(out.stdout.strip().splitlines()[-1])
            results[system].append(row["files_per_s"])
            sums[system].add(row["bytes"])
    temp = "cold" if args.cold else "warm"
    best = max(statistics.median(v) for v in results.values())
    print(
        f"{args.files} files of 8-24 KiB, {temp}, concurrency {args.concurrency}, {args.repeats} repeats"
    )
    for system, v in results.items():
        med = statistics.median(v)
        print(
            f"  {system:16s} {med:>10,.0f} files/s  (min {min(v):,.0f}, max {max(v):,.0f})  "
            f"{med / best:.2f}x of best; bytes {sorted(sums[system])}"
        )


if __name__ == "__main__":
    main()
