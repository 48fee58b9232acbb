"""Benchmark token-window loading: iopipe.TokenShards vs np.memmap slicing vs torch's DataLoader.

Data: a 512 MiB file of uint16 tokens.  ``bench/gen_data.py`` makes one at
``bench/data/scale-1/tokens/tokens.u16``; it is reused when present, else one is
generated at ``bench/data/tokens/tokens.u16``.

Every case reads the same ``--windows`` (20k) random windows of ``--seq-len + 1``
(1025) tokens (the windows of ``TokenShards(..., seed=0)``'s epoch 0) and produces
``(x, y)`` int64 batches of ``--batch`` (32) rows, ``y`` shifted by one:

* ``iopipe``: ``iopipe.TokenShards`` (background loop; concurrent ``preadv`` into
  each batch's buffers).
* ``memmap``: nanoGPT's ``get_batch``: ``np.memmap`` slices, ``astype(int64)`` per
  row, ``torch.stack`` (the reference).
* ``memmap_gather``: one vectorised fancy-index gather from the memmap per batch
  (the strongest single-thread memmap variant we found).
* ``dataloader``: ``torch.utils.data.DataLoader(num_workers=2)`` over a map-style
  dataset slicing the memmap, default collate (worker start-up included).
* ``generic``: iopipe's generic path: ``Pipeline.from_iterable(ranges).read()``
  ``.map(...).batch(32)``, to show what the specialised stage buys.

Each case runs in a fresh process, ``--repeats`` (3) times, interleaved (rotated
order each round).  warm: the file is read once in full by the case's process
before timing; cold: ``os.sync()`` then ``POSIX_FADV_DONTNEED`` on the file, so
every window comes from storage.  windows/s counts from construction of the
loader to its last batch; cpu_s is the process's (and its workers') CPU time;
read MB is what the process (and its reaped workers) read from storage
(``/proc/self/io``).
Other jobs share this machine: read the medians and the ratios, which were
measured side by side.

Usage: ``.venv/bin/python bench/bench_tokens.py [--repeats 3] [--cases iopipe,memmap]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run as a script from anywhere

CASES = ("iopipe", "memmap", "memmap_gather", "dataloader", "generic")
SHARED = HERE / "data" / "scale-1" / "tokens" / "tokens.u16"
OWN = HERE / "data" / "tokens" / "tokens.u16"
FILE_BYTES = 512 << 20
VOCAB = 50257


# -- data ------------------------------------------------------------------------------


def token_file() -> Path:
    """Return a 512 MiB uint16 token file, generating one if none exists."""
    import numpy as np

    for path in (SHARED, OWN):
        if path.exists() and path.stat().st_size == FILE_BYTES:
            return path
    OWN.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(20240601)
    tmp = OWN.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        for _ in range(FILE_BYTES // (64 << 20)):
            rng.integers(0, VOCAB, size=32 << 20, dtype=np.uint16).tofile(f)
    tmp.rename(OWN)
    return OWN


# -- the systems ---------------------------------------------------------------------


def _offsets(path: Path, args: argparse.Namespace) -> Any:
    """The token offsets of the windows every case reads (TokenShards' epoch 0)."""

    with _shards(path, args) as ts:
        return ts.windows(0)[:, 1]


def _shards(path: Path, args: argparse.Namespace) -> Any:
    import iopipe

    return iopipe.TokenShards(
        path,
        seq_len=args.seq_len,
        batch_size=args.batch,
        dtype="uint16",
        windows_per_epoch=args.windows,
        **json.loads(args.opts),
    )


def _run_iopipe(path: Path, args: argparse.Namespace, offsets: Any) -> int:
    rows = 0
    with _shards(path, args) as ts:
        for x, _y in ts:
            rows += len(x)
    return rows


def _run_memmap(path: Path, args: argparse.Namespace, offsets: Any) -> int:
    import numpy as np
    import torch

    data = np.memmap(path, dtype=np.uint16, mode="r")
    L, B = args.seq_len, args.batch
    rows = 0
    for a in range(0, len(offsets), B):
        ix = offsets[a : a + B].tolist()
        x = torch.stack([torch.from_numpy(data[i : i + L].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + L].astype(np.int64)) for i in ix])
        rows += len(x) + 0 * len(y)
    return rows


def _run_memmap_gather(path: Path, args: argparse.Namespace, offsets: Any) -> int:
    import numpy as np
    import torch

    data = np.memmap(path, dtype=np.uint16, mode="r")
    L, B = args.seq_len, args.batch
    span = np.arange(L + 1, dtype=np.int64)
    rows = 0
    for a in range(0, len(offsets), B):
        w = data[offsets[a : a + B, None] + span]
        x = torch.from_numpy(w[:, :-1].astype(np.int64))
        y = torch.from_numpy(w[:, 1:].astype(np.int64))
        rows += len(x) + 0 * len(y)
    return rows


class _MemmapWindows:
    """A map-style dataset of windows (opens the memmap lazily, in each worker)."""

    def __init__(self, path: Path, offsets: Any, seq_len: int) -> None:
        self.path, self.offsets, self.seq_len = path, offsets, seq_len
        self.data: Any = None

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> Any:
        import numpy as np
        import torch

        if self.data is None:
            self.data = np.memmap(self.path, dtype=np.uint16, mode="r")
        o = int(self.offsets[i])
        w = torch.from_numpy(self.data[o : o + self.seq_len + 1].astype(np.int64))
        return w[:-1], w[1:]


def _run_dataloader(path: Path, args: argparse.Namespace, offsets: Any) -> int:
    from torch.utils.data import DataLoader

    dataset: Any = _MemmapWindows(path, offsets, args.seq_len)
    loader: Any = DataLoader(dataset, batch_size=args.batch, num_workers=2)
    rows = 0
    for x, _y in loader:
        rows += len(x)
    return rows


def _run_generic(path: Path, args: argparse.Namespace, offsets: Any) -> int:
    import numpy as np
    import torch

    import iopipe

    L = args.seq_len

    def to_xy(buf: Any) -> tuple[Any, Any]:
        w = buf.view(np.uint16)
        return torch.from_numpy(w[:-1].astype(np.int64)), torch.from_numpy(w[1:].astype(np.int64))

    ranges = [(str(path), 2 * int(o), 2 * (L + 1)) for o in offsets]
    pipe = (
        iopipe.Pipeline.from_iterable(ranges)
        .read(concurrency=16)
        .map(to_xy, executor="inline")
        .batch(args.batch)
    )
    rows = 0
    with pipe:
        for x, _y in pipe:
            rows += len(x)
    return rows


RUNNERS = {
    "iopipe": _run_iopipe,
    "memmap": _run_memmap,
    "memmap_gather": _run_memmap_gather,
    "dataloader": _run_dataloader,
    "generic": _run_generic,
}


# -- one case, in a fresh process -----------------------------------------------------


def _warm(path: Path) -> None:
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(16 << 20)
        while f.readinto(buf):
            pass


def _evict(path: Path) -> None:
    os.sync()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _cpu() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _read_bytes() -> int:
    """Bytes this process made storage read (``/proc/self/io``; 0 where unavailable)."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def child(case: str, mode: str, path: Path, args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    offsets = _offsets(path, args)
    if mode == "warm":
        _warm(path)
    else:
        _evict(path)
    cpu0, io0 = _cpu(), _read_bytes()
    start = time.perf_counter()
    rows = RUNNERS[case](path, args, offsets)
    elapsed = time.perf_counter() - start
    cpu, read_mb = _cpu() - cpu0, (_read_bytes() - io0) / 1e6
    assert rows == len(offsets), (case, rows, len(offsets))
    print(json.dumps({"wps": rows / elapsed, "cpu_s": cpu, "wall_s": elapsed, "read_mb": read_mb}))


def spawn(case: str, mode: str, path: Path, args: argparse.Namespace) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", case, "--mode", mode, "--path", str(path)]
    cmd += ["--windows", str(args.windows), "--seq-len", str(args.seq_len)]
    cmd += ["--batch", str(args.batch), "--opts", args.opts]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    if out.returncode:
        raise RuntimeError(f"{case}/{mode} failed:\n{out.stderr}")
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


# -- driver ---------------------------------------------------------------------------


def bench(path: Path, args: argparse.Namespace) -> dict[tuple[str, str], list[dict[str, float]]]:
    cases = tuple(args.cases.split(","))
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    for rep in range(args.repeats):
        order = cases[rep % len(cases) :] + cases[: rep % len(cases)]
        for mode in ("cold", "warm"):
            for case in order:
                r = spawn(case, mode, path, args)
                results.setdefault((case, mode), []).append(r)
                print(f"  rep {rep + 1} {mode:4} {case:14} {r['wps']:9,.0f} windows/s", flush=True)
    return results


def report(
    results: dict[tuple[str, str], list[dict[str, float]]], args: argparse.Namespace
) -> None:
    cases = args.cases.split(",")
    print(
        f"\n{args.windows} windows of {args.seq_len + 1} uint16 tokens, batch {args.batch}; "
        "windows/s median (min-max) of the repeats; CPU s median"
    )
    print(
        f"{'case':14} {'mode':4} {'windows/s':>10}  {'(min-max)':19} {'cpu_s':>6} "
        f"{'read MB':>8}  {'/memmap':>7}"
    )
    for mode in ("cold", "warm"):
        base = statistics.median(r["wps"] for r in results.get(("memmap", mode), [{"wps": 0}]))
        for case in cases:
            runs = results[(case, mode)]
            wps = [r["wps"] for r in runs]
            med = statistics.median(wps)
            cpu = statistics.median(r["cpu_s"] for r in runs)
            read_mb = statistics.median(r.get("read_mb", 0.0) for r in runs)
            ratio = f"{med / base:6.2f}x" if base else "     -"
            span = f"({min(wps):,.0f}-{max(wps):,.0f})"
            print(
                f"{case:14} {mode:4} {med:10,.0f}  {span:19} {cpu:6.2f} {read_mb:8.0f}  {ratio:>7}"
            )
    if "iopipe" in cases and "memmap" in cases:
        print("\ntargets: warm iopipe/memmap >= 0.8x, cold iopipe/memmap >= 1.0x")
        for mode, target in (("warm", 0.8), ("cold", 1.0)):
            rate = {
                c: statistics.median(r["wps"] for r in results[(c, mode)])
                for c in ("iopipe", "memmap")
            }
            got = rate["iopipe"] / rate["memmap"]
            verdict = "ok" if got >= target else "MISSED"
            print(f"  {mode}: {got:.2f}x (target >= {target}) {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--windows", type=int, default=20_000)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--opts", default="{}", help="extra TokenShards kwargs, as JSON")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("cold", "warm"), help=argparse.SUPPRESS)
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.mode, args.path, args)
        return
    unknown = set(args.cases.split(",")) - set(CASES)
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}; choose from {CASES}")
    path = token_file()
    started = time.perf_counter()
    print(f"token file: {path} ({path.stat().st_size / 2**20:.0f} MiB)")
    results = bench(path, args)
    report(results, args)
    print(
        f"\n{args.repeats} repeats, each case in a fresh process; {time.perf_counter() - started:.0f} s"
    )
    if args.json:
        args.json.write_text(json.dumps({f"{c}/{m}": r for (c, m), r in results.items()}))


if __name__ == "__main__":
    main()
